"""Triton kernels on the GPU: decode attention on codes vs torch bf16 SDPA, encode throughput, roofline.

Everything in one run on one card, so the numbers are ratios measured side by side:

* copy bandwidth: a 2 GiB device-to-device ``copy_`` (bytes read + written) -- the roofline;
* decode attention, one query token, Llama-3.1-8B heads (32 query / 8 KV heads, head_dim 128; ``--heads``,
  ``--head-dim`` for other models), B x T grid:
  ours (codes + float16 norms, centered cache with outlier permutation, 128-token bf16 tail) vs
  ``F.scaled_dot_product_attention(..., enable_gqa=True)`` on bf16 K/V of the same length; achieved bandwidth on
  the compressed bytes;
* encode: ``encode_rows`` (B=8, H=8, T=32k rows of bf16), CUDA and Triton kernels, vs the roofline and vs
  ``RowCodec.encode``;
* ``overhead`` phase: one K4/V3 call timed as a whole (do_bench), as a replayed CUDA graph (GPU only), as host
  enqueue time, per kernel (torch profiler tables in ``profile.txt``) and checked for host syncs;
* ``timeline`` phase: where one K4/V3 call's time goes, per ``--tune-cuda`` variant: the three kernels' spans and
  every split-pass block's start / first unit / end and SM (a ``DBG = 7`` build of decode_mma.cu);
* ``read-floor`` phase: at ``--tune-cells``, the bytes of one K4/V3 call read by a bare streaming kernel, alone and
  between two small kernels, beside the call (what any kernel reaches on that many bytes);
* ``prefill`` phase: a multi-token step (128-2048 new tokens) over a 32k compressed cache: ``dequantize_attention``
  (the CUDA path of q_len > 1) and the ``attend_codes`` reference vs bf16 SDPA;
* ``e2e`` phase: greedy decode of a randomly initialised Llama-3.1-8B-shape model (32 layers by default) at 32k
  context, ours (``TurboQuantCache`` K4/V3, attention on the codes) vs bf16 ``DynamicCache``: tokens/s, ms/step,
  peak memory and cache bytes at ``--e2e-batches``, then the largest batch that fits for each (issue target: ours
  >= 3.5x bf16's) and tokens/s there. The caches are filled with random K/V through ``cache.update`` (no prefill).

Timing: ``triton.testing.do_bench`` medians (it clears the L2 before every repetition).

    PYTHONPATH=src python3 benchmarks/kernels.py --out benchmarks/results
    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True PYTHONPATH=src python3 benchmarks/kernels.py --phases e2e \
        --name e2e --out benchmarks/results
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from turbovq.kernels.decode import decode_attention
from turbovq.kernels.encode import encode_rows
from turbovq.kv.attention import attend_codes
from turbovq.kv.cache import PackedRows, RowCodec

# name -> (key bits, value bits, split-pass backend); "auto" runs decode_mma.cu where it applies (all but 2.5 bits)
CONFIGS = {
    "K4/V3": (4, 3, "auto"),
    "K4/V4": (4, 4, "auto"),
    "3.5": (3.5, 3.5, "auto"),
    "2.5": (2.5, 2.5, "auto"),
    "K4/V3 triton": (4, 3, "triton"),
    "3.5 triton": (3.5, 3.5, "triton"),
    # TurboQuant_prod keys (3 mse bits + QJL): the CUDA split pass, the Triton one, and the torch attend_codes
    "K4 prod/V3": (4, 3, "auto", True),
    "K4 prod/V3 triton": (4, 3, "triton", True),
    "K4 prod/V3 reference": (4, 3, "reference", True),
}
DEFAULT_CONFIGS = ("K4/V3", "K4/V4", "3.5", "2.5", "K4/V3 triton", "3.5 triton")
HQ, HKV, D, TAIL = 32, 8, 128, 128


def bench(fn, rep=100, warmup=25) -> float:
    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


# ms of warm-up before each CUDA encode timing: the GPU idles while a row of the table is set up, and with 25 ms the
# first timing of a row (the default path) read 1-3% slower at head_dim 256 than the same kernel timed after the slow
# Triton kernel (kernels_encode_r15_table.json: 0.746 against 0.730 ms at 3.5 bits)
ENCODE_WARMUP = 250


def copy_bandwidth(dev) -> float:
    src = torch.empty(1 << 30, dtype=torch.uint8, device=dev).random_()
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    return 2 * src.numel() / ms / 1e9  # TB/s


def synthetic_rows(codec: RowCodec, b: int, t: int, dev, seed: int) -> PackedRows:
    """Random valid codes + float16 norms, a per-head permutation and mean: what a 32k-token cache holds."""
    g = torch.Generator(device=dev).manual_seed(seed)
    fields = {}
    sizes = [(f"codes{i}", f"norms{i}", (d * bits + 7) // 8) for i, (bits, d, _) in enumerate(codec.groups)]
    if codec.qjl:
        sizes.append(("qjl", "rnorms", codec.quantizer.qjl.rows // 8))
    for codes, norms, nbytes in sizes:
        fields[codes] = torch.randint(0, 256, (b, HKV, t, nbytes), device=dev, dtype=torch.uint8, generator=g)
        fields[norms] = (torch.rand(b, HKV, t, device=dev, generator=g) * 4 + 8).half()
    perm = torch.stack([torch.randperm(D, device=dev, generator=g) for _ in range(HKV)]) if codec.groups[1:] else None
    mean = torch.randn(b, HKV, 1, D, device=dev, generator=g)
    return PackedRows(codec, fields, perm, t, mean)


def call_bytes(pk: PackedRows, pv: PackedRows, tail: torch.Tensor) -> int:
    """The bytes one decode call reads, which its bandwidth is counted on: the packed key and value fields and the
    bf16 tail window of keys and of values (``tail``'s shape each)."""
    return sum(x.numel() * x.element_size() for p in (pk, pv) for x in p.fields.values()) + 2 * tail.nbytes


def decode_grid(dev, copy_tbs, batches, lengths, configs, block_t, num_warps, graph) -> list[dict]:
    """The B x T grid; with ``graph`` each call is also timed as a replayed CUDA graph (GPU time only)."""
    rows = []
    free = torch.cuda.mem_get_info(dev)[0]
    for b in batches:
        for t in lengths:
            kv_bytes = 2 * b * HKV * t * D * 2
            row = {"B": b, "T": t}
            q = torch.randn(b, HQ, 1, D, device=dev, dtype=torch.bfloat16)
            if 2 * kv_bytes < free * 0.8:
                k = torch.randn(b, HKV, t, D, device=dev, dtype=torch.bfloat16)
                v = torch.randn_like(k)
                def sdpa(q=q, k=k, v=v):
                    return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

                ms = bench(sdpa)
                row["sdpa_ms"], row["sdpa_TBps"] = ms, kv_bytes / ms / 1e9
                if graph:
                    row["sdpa_graph_ms"] = _graph_ms(sdpa, dev)
                del sdpa
                del k, v
            else:
                row["sdpa_ms"] = None  # does not fit next to its own copy
            torch.cuda.empty_cache()
            tk = torch.randn(b, HKV, TAIL, D, device=dev, dtype=torch.bfloat16)
            tv = torch.randn_like(tk)
            for name in configs:
                kb, vb, backend, *qjl = CONFIGS[name]
                kc, vc = RowCodec(D, kb, seed=1, qjl=bool(qjl)), RowCodec(D, vb, seed=2)
                n = t - TAIL
                pk, pv = synthetic_rows(kc, b, n, dev, 1), synthetic_rows(vc, b, n, dev, 2)
                nbytes = call_bytes(pk, pv, tk)

                def fn(q=q, pk=pk, pv=pv, tk=tk, tv=tv, backend=backend):
                    if backend == "reference":
                        return attend_codes(q, pk, pv, tk, tv, None, D**-0.5)
                    return decode_attention(q, pk, pv, tk, tv, None, D**-0.5, block_t=block_t, num_warps=num_warps,
                                            backend=backend)  # fmt: skip

                ms = bench(fn)
                tbs = nbytes / ms / 1e9
                row[name] = {
                    "ms": ms,
                    "bytes": nbytes,
                    "TBps": tbs,
                    "roofline_frac": tbs / copy_tbs,
                    "speedup_vs_sdpa": None if row["sdpa_ms"] is None else row["sdpa_ms"] / ms,
                }
                if graph and backend != "reference":  # (the torch reference syncs the host: no graph capture)
                    gms = _graph_ms(fn, dev)
                    row[name]["graph_ms"] = gms
                    if row.get("sdpa_graph_ms"):
                        row[name]["graph_speedup_vs_sdpa"] = row["sdpa_graph_ms"] / gms
                del pk, pv
            rows.append(row)
            cells = " ".join(
                f"{c}={row[c]['ms'] * 1e3:.0f}us({row[c]['speedup_vs_sdpa'] or 0:.2f}x,{row[c]['roofline_frac']:.0%}"
                + (f";graph {row[c]['graph_ms'] * 1e3:.0f}us {row[c].get('graph_speedup_vs_sdpa') or 0:.2f}x)"
                   if "graph_ms" in row[c] else ")")
                for c in configs
            )  # fmt: skip
            sd = f"{row['sdpa_ms'] * 1e3:.0f}us" if row["sdpa_ms"] else "n/a"
            print(f"B={b:>2} T={t:>6} sdpa={sd} {cells}", flush=True)
            torch.cuda.empty_cache()
    return rows


def tune(dev) -> list[dict]:
    """Triton split pass at the target cell (B=8, T=32k, K4/V3): decoder (PRMT vs centroid gather), block size,
    warps and stages."""
    from turbovq.kernels import decode as kdecode

    out = []
    b, t = 8, 32768
    q = torch.randn(b, HQ, 1, D, device=dev, dtype=torch.bfloat16)
    kk = torch.randn(b, HKV, t, D, device=dev, dtype=torch.bfloat16)
    vv = torch.randn_like(kk)
    sdpa = bench(lambda kk=kk, vv=vv: F.scaled_dot_product_attention(q, kk, vv, enable_gqa=True))
    print(f"tune: sdpa {sdpa * 1e3:.1f} us", flush=True)
    out.append({"sdpa_ms": sdpa})
    del kk, vv
    tk = torch.randn(b, HKV, TAIL, D, device=dev, dtype=torch.bfloat16)
    kc, vc = RowCodec(D, 4, seed=1), RowCodec(D, 3, seed=2)
    pk, pv = synthetic_rows(kc, b, t - TAIL, dev, 1), synthetic_rows(vc, b, t - TAIL, dev, 2)
    default = kdecode._PRMT
    for prmt in (False, True):
        kdecode._PRMT = prmt
        for block_t in (64, 128):
            for warps in (4, 8):
                for stages in (1, 2):
                    try:
                        ms = bench(
                            lambda bt=block_t, w=warps, st=stages: decode_attention(
                                q, pk, pv, tk, tk, None, D**-0.5, block_t=bt, num_warps=w, num_stages=st,
                                backend="triton",
                            )
                        )
                    except Exception as e:  # noqa: BLE001 - e.g. out of shared memory for a config
                        ms = float("nan")
                        print("config failed", block_t, warps, stages, repr(e)[:200])
                    out.append({"prmt": prmt, "block_t": block_t, "num_warps": warps, "num_stages": stages, "ms": ms})
                    print(f"tune prmt={prmt} block_t={block_t} warps={warps} stages={stages}: {ms * 1e3:.1f} us "
                          f"({sdpa / ms:.2f}x sdpa)", flush=True)  # fmt: skip
    kdecode._PRMT = default
    return out


def _sdpa_baseline(b: int, t: int, dev) -> tuple[torch.Tensor, float, float]:
    """A bf16 query of B = b and bf16 SDPA over T = t random K/V: (query, ms as called, ms as a replayed graph); the
    K/V are freed before returning."""
    q = torch.randn(b, HQ, 1, D, device=dev, dtype=torch.bfloat16)
    kk = torch.randn(b, HKV, t, D, device=dev, dtype=torch.bfloat16)
    vv = torch.randn_like(kk)

    def sdpa(q=q, kk=kk, vv=vv):
        return F.scaled_dot_product_attention(q, kk, vv, enable_gqa=True)

    ms, graph_ms = bench(sdpa), _graph_ms(sdpa, dev)
    del kk, vv, sdpa
    torch.cuda.empty_cache()
    return q, ms, graph_ms


@contextlib.contextmanager
def traced(dev):
    """A ``DBG = 7`` build of decode_mma.cu for a block; yields the int64 buffer its Params point the timeline at (8
    words per block or warp, zeroed)."""
    from turbovq.kernels import decode as kdecode

    buf = torch.zeros(8 << 18, dtype=torch.int64, device=dev)
    base = kdecode._MmaParams

    class Traced(base):
        def __init__(self, *a, ptr=buf.data_ptr()):
            super().__init__(*a)
            self.trace = ptr

    kdecode._MmaParams = Traced
    try:
        with tuned({"DBG": 7}):
            yield buf
    finally:
        kdecode._MmaParams = base


@contextlib.contextmanager
def overridden(settings: dict, var: dict):
    """``settings`` (a kernel's tuning dict, changed in place) with ``var`` over it for a block."""
    saved = dict(settings)
    settings.update(var)
    try:
        yield
    finally:
        settings.clear()
        settings.update(saved)


@contextlib.contextmanager
def tuned(var: dict):
    """decode.MMA_TUNING (kernel macros) and, under ``"guide"``, decode.MMA_GUIDE overridden by ``var`` for a block."""
    from turbovq.kernels import decode as kdecode

    var = dict(var)
    with overridden(kdecode.MMA_GUIDE, var.pop("guide", {})), overridden(kdecode.MMA_TUNING, var):
        yield


_CUDA_TWIN = {"prep": "hadamard_query", "reduce": "hadamard_merge"}  # decode.MMA_GUIDE's switch of each


class _NoLaunch:
    """Stands in for a Triton kernel that a timing variant leaves out (``tune_cuda``'s "skip")."""

    def __getitem__(self, grid):
        return lambda *a, **k: None


def tune_cuda(dev, variants: list[dict], config: str = "K4/V3", cells=((8, 32768), (32, 32768))) -> list[dict]:
    """decode_mma.cu tuning (``decode.MMA_TUNING``: warps per block, 16-token chunks per unit, blocks per SM; or
    ``"splits"``) at ``cells`` (B, T), one width (``config``), against bf16 SDPA in the same run. A variant's
    ``"source"`` names another version of decode_mma.cu to time instead (an A/B of two kernel versions in one run);
    its ``"skip"`` (``["reduce"]``, ``["prep"]`` or both) leaves the merge or the query kernel out, the CUDA one of a
    "hadamard" side included (timing only: the output is wrong, and without a query the split pass's own work changes:
    kernels_report.md, round 16)."""
    from turbovq.kernels import decode as kdecode

    out = []
    kb, vb, _, *qjl = CONFIGS[config]
    kc, vc = RowCodec(D, kb, seed=1, qjl=bool(qjl)), RowCodec(D, vb, seed=2)
    default_source = kdecode._MMA_SOURCE
    for b, t in cells:
        q, sdpa, sdpa_g = _sdpa_baseline(b, t, dev)
        tk = torch.randn(b, HKV, TAIL, D, device=dev, dtype=torch.bfloat16)
        pk, pv = synthetic_rows(kc, b, t - TAIL, dev, 1), synthetic_rows(vc, b, t - TAIL, dev, 2)
        for var in variants:
            var = dict(var)
            splits, source, skip = var.pop("splits", None), var.pop("source", None), var.pop("skip", ())
            kdecode._MMA_SOURCE = Path(source).read_text() if source else default_source
            saved = {k: getattr(kdecode, f"_{k}_kernel") for k in skip}  # timing only: that kernel not launched
            for k in skip:
                setattr(kdecode, f"_{k}_kernel", _NoLaunch())
            # (a skipped kernel's CUDA counterpart off too, so that the Triton one, not launched, stands for it)
            var["guide"] = {**var.get("guide", {}), **{_CUDA_TWIN[k]: 0 for k in skip}}

            def call(q=q, pk=pk, pv=pv, tk=tk, s=splits):
                return decode_attention(q, pk, pv, tk, tk, None, D**-0.5, num_splits=s)

            chosen, auto = [], kdecode.mma_splits  # record the count decode_attention picks when splits is None
            kdecode.mma_splits = lambda *a, c=chosen, f=auto, **k: c.append(f(*a, **k)) or c[-1]
            try:
                with tuned(var):
                    ms, gms = bench(call), _graph_ms(call, dev)
                    setting = dict(kdecode.MMA_TUNING, guide=dict(kdecode.MMA_GUIDE))
            finally:
                kdecode.mma_splits = auto
                kdecode._MMA_SOURCE = default_source
                for k, v in saved.items():
                    setattr(kdecode, f"_{k}_kernel", v)
            splits = splits or chosen[-1]
            out.append({"B": b, "T": t, "config": config, **setting, "splits": splits, "source": source, "skip": skip,
                        "ms": ms, "graph_ms": gms, "sdpa_ms": sdpa, "sdpa_graph_ms": sdpa_g})  # fmt: skip
            print(f"tune-cuda {config} B={b} T={t} {setting} splits={splits} source={source}: "
                  f"{ms * 1e3:.1f} us ({sdpa / ms:.2f}x sdpa), graph {gms * 1e3:.1f} us ({sdpa_g / gms:.2f}x)",
                  flush=True)  # fmt: skip
        del pk, pv
        torch.cuda.empty_cache()
    return out


@triton.jit
def _read_kernel(src, out, n, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    """Reads ITERS blocks of int32 words and stores their XOR: a kernel that only streams bytes in."""
    pid = tl.program_id(0)
    acc = tl.zeros([BLOCK], dtype=tl.int32)
    for i in tl.static_range(ITERS):
        offs = (pid * ITERS + i) * BLOCK + tl.arange(0, BLOCK)
        acc ^= tl.load(src + offs, mask=offs < n, other=0, eviction_policy="evict_first")
    tl.store(out + pid, tl.xor_sum(acc, 0))


READ_SHAPES = [(b, w, i) for b in (2048, 4096) for w in (4, 8) for i in (1, 4)]  # (BLOCK, num_warps, ITERS)


def read_floor(dev, copy_tbs, cells, config: str = "K4/V3") -> list[dict]:
    """What reading the bytes of one ``config`` call costs without attention: a flat buffer of the same size read by
    one streaming kernel (the fastest of READ_SHAPES, and torch's int32 ``sum``), and by that kernel between a small
    kernel before it and one after (the chain of three that a call is: query rotation, split pass, merge), each as a
    replayed CUDA graph; beside the call itself, so that its bandwidth can be read against what any kernel reaches
    on this many bytes."""
    kb, vb, _, *qjl = CONFIGS[config]
    kc, vc = RowCodec(D, kb, seed=1, qjl=bool(qjl)), RowCodec(D, vb, seed=2)
    out = []
    for b, t in cells:
        row = _read_floor_cell(dev, copy_tbs, b, t, kc, vc)
        out.append(dict(row, config=config))
        print(f"read-floor B={b} T={t} {row['bytes'] / 1e6:.0f} MB: "
              + ", ".join(f"{k} {row[k + '_graph_ms'] * 1e3:.1f} us ({row[k + '_roofline_frac']:.0%})"
                          for k in ("call", "read", "torch_sum", "chain")), flush=True)  # fmt: skip
        torch.cuda.empty_cache()
    return out


def _read_floor_cell(dev, copy_tbs, b: int, t: int, kc: RowCodec, vc: RowCodec) -> dict:
    q = torch.randn(b, HQ, 1, D, device=dev, dtype=torch.bfloat16)
    tk = torch.randn(b, HKV, TAIL, D, device=dev, dtype=torch.bfloat16)
    pk, pv = synthetic_rows(kc, b, t - TAIL, dev, 1), synthetic_rows(vc, b, t - TAIL, dev, 2)
    nbytes = call_bytes(pk, pv, tk)
    row = {"B": b, "T": t, "bytes": nbytes}
    row["call_graph_ms"] = _graph_ms(lambda: decode_attention(q, pk, pv, tk, tk, None, D**-0.5), dev)
    pk = pv = None
    torch.cuda.empty_cache()
    words = torch.randint(-(2**31), 2**31, (nbytes // 4,), device=dev, dtype=torch.int32)
    parts = torch.empty(triton.cdiv(words.numel(), min(s[0] for s in READ_SHAPES)), device=dev, dtype=torch.int32)
    shapes = {}
    for blk, warps, iters in READ_SHAPES:
        grid = (triton.cdiv(words.numel(), blk * iters),)

        def read(blk=blk, warps=warps, iters=iters, grid=grid):
            _read_kernel[grid](words, parts, words.numel(), BLOCK=blk, ITERS=iters, num_warps=warps)

        shapes[(blk, warps, iters)] = (_graph_ms(read, dev), read)
    best = min(shapes, key=lambda k: shapes[k][0])
    qq = torch.empty_like(q)

    def chain(read=shapes[best][1]):
        torch.mul(q, 2, out=qq)  # stands for the query kernel
        read()
        return parts[: 8 * b].sum()  # stands for the merge

    row["read_shapes"] = [{"block": k[0], "num_warps": k[1], "iters": k[2], "graph_ms": v[0]}
                          for k, v in shapes.items()]  # fmt: skip
    row["read_graph_ms"] = shapes[best][0]
    row["torch_sum_graph_ms"] = _graph_ms(lambda: words.sum(), dev)
    row["chain_graph_ms"] = _graph_ms(chain, dev)
    for k in ("call", "read", "torch_sum", "chain"):
        row[f"{k}_roofline_frac"] = nbytes / row[f"{k}_graph_ms"] / 1e9 / copy_tbs
    return row


def prefill(dev, q_lens=(128, 512, 2048), context: int = 32768, batch: int = 1, qjl: bool = False) -> list[dict]:
    """Multi-token steps over a compressed cache (a later chat turn, chunked prefill): ``dequantize_attention``
    (what ``codes_attention`` runs for q_len > 1 on CUDA) and the ``attend_codes`` reference vs bf16 SDPA over the
    same number of tokens; ``qjl``: TurboQuant_prod keys (3 mse bits + QJL) instead of 4-bit mse keys."""
    from turbovq.kv.attention import dequantize_attention

    out = []
    n = context - TAIL
    pk = synthetic_rows(RowCodec(D, 4, seed=1, qjl=qjl), batch, n, dev, 1)
    pv = synthetic_rows(RowCodec(D, 3, seed=2), batch, n, dev, 2)
    for q_len in q_lens:
        q = torch.randn(batch, HQ, q_len, D, device=dev, dtype=torch.bfloat16)
        tk = torch.randn(batch, HKV, TAIL + q_len, D, device=dev, dtype=torch.bfloat16)
        kk = torch.randn(batch, HKV, context + q_len, D, device=dev, dtype=torch.bfloat16)

        rec = {
            "B": batch, "T": context, "q_len": q_len, "qjl_keys": qjl,
            "sdpa_bf16_ms": bench(lambda q=q, kk=kk: F.scaled_dot_product_attention(q, kk, kk, enable_gqa=True), 20),
            "attend_codes_ms": bench(lambda q=q, tk=tk: attend_codes(q, pk, pv, tk, tk, None, D**-0.5), 20),
            "dequantize_sdpa_ms": bench(lambda q=q, tk=tk: dequantize_attention(q, pk, pv, tk, tk, None, D**-0.5), 20),
        }  # fmt: skip
        os.environ["TURBOVQ_KERNELS"] = "0"  # the torch dequantize (PackedRows.dequantize) instead of the kernel
        rec["torch_dequantize_sdpa_ms"] = bench(lambda q=q, tk=tk: dequantize_attention(q, pk, pv, tk, tk, None,
                                                                                        D**-0.5), 20)  # fmt: skip
        del os.environ["TURBOVQ_KERNELS"]
        out.append(rec)
        print(f"prefill{' QJL keys' if qjl else ''} q_len={q_len}: bf16 sdpa {rec['sdpa_bf16_ms']:.2f} ms, "
              f"attend_codes "
              f"{rec['attend_codes_ms']:.2f} ms, dequantize+sdpa {rec['dequantize_sdpa_ms']:.2f} ms (torch dequantize "
              f"{rec['torch_dequantize_sdpa_ms']:.2f} ms)", flush=True)
        del q, tk, kk
        torch.cuda.empty_cache()
    return out


def _encode_inputs(dev, dim: int, b: int = 8, t: int = 32768) -> tuple[torch.Tensor, ...]:
    """B = 8, H = HKV, T = 32k random bf16 rows, their mean over T and channel scales (as the cache's default)."""
    x = torch.randn(b, HKV, t, dim, device=dev, dtype=torch.bfloat16)
    return x, x.float().mean(2, keepdim=True), torch.rand(b, HKV, 1, dim, device=dev) + 0.5


def _width(spec: str) -> tuple[float, bool]:
    """``"4"`` -> (4.0, False); ``"4:qjl"``: TurboQuant_prod keys."""
    bits, _, kind = spec.partition(":")
    return float(bits), kind == "qjl"


def profile_encode(dev, codec_spec: str = "4", settings: dict | None = None) -> None:
    """Three encodes of B = 8, H = 8, T = 32k bf16 rows (centered, channel scales, as in the encode phase) at
    ``codec_spec`` bits (``"4:qjl"``: TurboQuant_prod keys), for an external profiler:
    ``ncu -k regex:tq_encode -s 2 -c 1 python3 benchmarks/kernels.py --phases profile-encode``
    (``regex:_encode_kernel`` with ``TURBOVQ_CUDA=0`` for the Triton kernel). ``settings`` override the dense
    kernel's tuning (``--tune-encode``'s first entry)."""
    from turbovq.kernels import encode as kencode

    x, mean, scale = _encode_inputs(dev, D)
    bits, qjl = _width(codec_spec)
    codec = RowCodec(D, bits, seed=1, qjl=qjl)
    table = kencode.QJL_TUNING if codec.qjl else kencode.MMA_TUNING
    with overridden(table[D], settings or {}):
        for _ in range(3):
            encode_rows(x, codec, None, mean, scale)
        torch.cuda.synchronize(dev)


class ClockLog:
    """``nvidia-smi`` sampling the SM clock, power and temperature every 20 ms in the background: a latency-bound
    kernel's time follows the SM clock, which the card lowers under a sustained, power-hungry load (the copy's time
    does not follow it). Where the driver has them, also the instantaneous power (``power.draw`` is a one-second
    average) and whether the software power cap is holding the clock down."""

    BASE = "timestamp,clocks.sm,power.draw,temperature.gpu"
    EXTRA = ",power.draw.instant,clocks_event_reasons.sw_power_cap"
    FIELDS = ("time", "sm_mhz", "watts", "celsius", "watts_instant", "power_capped")  # of a sample (the query's order)

    def __init__(self):
        import subprocess
        import tempfile

        self.samples: list[tuple[float, ...]] = []  # (unix time, MHz, W, degrees C[, instant W, power cap 1/0])
        if os.environ.get("TURBOVQ_BENCH_CLOCKS") == "0":
            self.proc = None
            return
        query = self.BASE + self.EXTRA
        probe = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader,nounits"],
                               capture_output=True, text=True)  # fmt: skip
        if probe.returncode or "Field" in probe.stdout:  # an older driver: the basic fields only
            query = self.BASE
        self.file = tempfile.TemporaryFile("w+")  # (not a pipe: unread, it fills up and stalls nvidia-smi)
        self.proc = subprocess.Popen(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader,nounits",
                                      "-lms", "20"], stdout=self.file)  # fmt: skip

    @staticmethod
    def _value(v: str) -> float:
        if v in ("Active", "Not Active"):
            return float(v == "Active")
        return float("nan") if v.startswith("[") else float(v)  # ([N/A], [Unknown Error])

    def close(self) -> list[tuple[float, ...]]:
        import datetime

        if self.proc is None:
            return self.samples
        self.proc.terminate()
        self.proc.wait()
        self.file.seek(0)
        for line in self.file.read().splitlines():
            stamp, *values = (v.strip() for v in line.split(","))
            when = datetime.datetime.strptime(stamp, "%Y/%m/%d %H:%M:%S.%f").timestamp()
            self.samples.append((when, *(self._value(v) for v in values)))
        return self.samples

    def timed(self, fn, *args, **kw) -> tuple[float, list[float]]:
        """``bench(fn, ...)`` and the window it ran in (unix times), for ``median`` once the log is closed."""
        import time

        start = time.time()
        return bench(fn, *args, **kw), [start, time.time()]

    def _inside(self, window: list[float], name: str) -> list[float]:
        i = self.FIELDS.index(name)
        return sorted(x[i] for x in self.samples if window[0] <= x[0] <= window[1] and len(x) > i)

    def median(self, window: list[float], name: str = "sm_mhz") -> float | None:
        """The median of field ``name`` (default the SM clock, MHz) over the samples within ``window``."""
        inside = self._inside(window, name)
        return inside[len(inside) // 2] if inside else None

    def mean(self, window: list[float], name: str) -> float | None:
        """The mean of field ``name`` within ``window`` (of ``"power_capped"``: the fraction of samples capped)."""
        inside = self._inside(window, name)
        return sum(inside) / len(inside) if inside else None


def warmup_effect(dev, codec_spec: str = "4:qjl", repeats: int = 3, variants: list[dict] = ()) -> dict:
    """The default encode (``codec_spec`` as in ``profile_encode``) and the copy, each timed with the sweeps' short
    warm-up (25 ms, 30 ms of timed runs) and with the table's long one (ENCODE_WARMUP, 50 ms), alternately, with the
    median SM clock meanwhile (ClockLog): whether a sustained run is slower than a short one. ``variants``: the dense
    kernel's settings (``encode.mma_tuning``) to time the same way in each round, after the default."""
    from turbovq.kernels import encode as kencode

    x, mean, scale = _encode_inputs(dev, D)
    bits, qjl = _width(codec_spec)
    codec = RowCodec(D, bits, seed=1, qjl=qjl)
    src = torch.empty(1 << 30, dtype=torch.uint8, device=dev).random_()
    dst = torch.empty_like(src)
    settings = (kencode.QJL_TUNING if qjl else kencode.MMA_TUNING)[D]

    def encode_with(kw):
        def fn():
            with overridden(settings, kw):
                return encode_rows(x, codec, None, mean, scale)

        return fn

    fns = {"encode": encode_with({}), "copy": lambda: dst.copy_(src)}
    fns.update({f"encode {json.dumps(kw)}": encode_with(kw) for kw in variants})
    log, out = ClockLog(), []
    try:
        for _ in range(repeats):
            for name, fn in fns.items():
                for warmup, rep in ((25, 30), (ENCODE_WARMUP, 50)):
                    ms, window = log.timed(fn, rep=rep, warmup=warmup)
                    out.append({"what": name, "warmup_ms": warmup, "rep_ms": rep, "ms": ms, "window": window})
    finally:
        log.close()
    for row in out:
        row["sm_mhz"], row["watts_instant"] = log.median(row["window"]), log.median(row["window"], "watts_instant")
        row["power_capped_frac"] = log.mean(row["window"], "power_capped")
        print(row, flush=True)
    return {"timings": out, "nvidia_smi": log.samples}


def profile_call(dev) -> None:
    """Three K4/V3 calls at B = 8, T = 32k and nothing else, for an external profiler:
    ``ncu -k regex:tq_decode_split -s 2 -c 1 python3 benchmarks/kernels.py --phases profile-call``."""
    b, t = 8, 32768
    q = torch.randn(b, HQ, 1, D, device=dev, dtype=torch.bfloat16)
    tk = torch.randn(b, HKV, TAIL, D, device=dev, dtype=torch.bfloat16)
    pk = synthetic_rows(RowCodec(D, 4, seed=1), b, t - TAIL, dev, 1)
    pv = synthetic_rows(RowCodec(D, 3, seed=2), b, t - TAIL, dev, 2)
    for _ in range(3):
        decode_attention(q, pk, pv, tk, tk, None, D**-0.5)
    torch.cuda.synchronize(dev)


def _graph_ms(fn, dev) -> float:
    """GPU time of one call without its host overhead: the call captured in a CUDA graph, replayed."""
    side = torch.cuda.Stream(dev)
    side.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.stream(side):  # warm up on the capture stream (compiles, caches, per-stream buffers)
        for _ in range(3):
            fn()
    torch.cuda.current_stream(dev).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=side):
        fn()
    return bench(graph.replay)


def _host_us(fn, dev, calls: int = 100) -> float:
    """Host time per call (enqueue only: no synchronisation inside the loop)."""
    fn()
    torch.cuda.synchronize(dev)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize(dev)
    return (t1 - t0) / calls * 1e6


def _profile(call, dev, rec: dict, log_dir: Path | None, tag: str) -> None:
    """Host syncs of one call (sync debug mode) and a torch profiler table of 10 calls (per-kernel device time)."""
    import warnings

    from torch.profiler import ProfilerActivity, profile

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        call()
        torch.cuda.set_sync_debug_mode(0)
    rec["sync_warnings"] = [str(w.message)[:200] for w in caught]
    torch.cuda.synchronize(dev)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            call()
        torch.cuda.synchronize(dev)
    ka = prof.key_averages()
    per_call = {e.key[:60]: e.self_device_time_total / 10 for e in ka if e.self_device_time_total > 0}
    rec["kernels_us_per_call"] = per_call
    rec["triton_kernels_us"] = sum(v for k, v in per_call.items() if k.startswith("_"))
    rec["all_kernels_us"] = sum(per_call.values())
    if log_dir is not None:
        import cProfile
        import io
        import pstats

        with cProfile.Profile() as host:  # where the host's enqueue time goes (Python functions, 300 calls)
            for _ in range(300):
                call()
        torch.cuda.synchronize(dev)
        text = io.StringIO()
        pstats.Stats(host, stream=text).sort_stats("tottime").print_stats(30)
        with open(log_dir / "profile.txt", "a") as f:
            f.write(f"===== {tag}: host, cProfile of 300 calls by own time =====\n{text.getvalue()}\n")
            f.write(f"===== {tag}: by self CUDA time =====\n")
            f.write(ka.table(sort_by="self_cuda_time_total", row_limit=15, max_name_column_width=50))
            f.write(f"\n===== {tag}: by CPU time total =====\n")
            f.write(ka.table(sort_by="cpu_time_total", row_limit=25, max_name_column_width=50))
            f.write("\n")


def overhead(dev, modules: list[str], cells: list[tuple[int, int]], log_dir: Path | None) -> list[dict]:
    """Where the time of one decode call goes (K4/V3): full call (do_bench, as in the grid), GPU only (the call
    captured in a CUDA graph and replayed), host enqueue time, per-kernel device times and host syncs."""
    import importlib

    out = []
    kc, vc = RowCodec(D, 4, seed=1), RowCodec(D, 3, seed=2)
    for b, t in cells:
        q, sdpa, sdpa_g = _sdpa_baseline(b, t, dev)
        row = {"B": b, "T": t, "sdpa_ms": sdpa, "sdpa_graph_ms": sdpa_g}
        tk = torch.randn(b, HKV, TAIL, D, device=dev, dtype=torch.bfloat16)
        tv = torch.randn_like(tk)
        pk, pv = synthetic_rows(kc, b, t - TAIL, dev, 1), synthetic_rows(vc, b, t - TAIL, dev, 2)
        ref = None
        for name in modules:
            mod = importlib.import_module(name)
            variants = {"default": {}}
            if "fused_reduce" in mod.decode_attention.__kwdefaults__:
                variants.update({"waves4": {"waves": 4}, "fused": {"fused_reduce": True}})
            for vname, kw in variants.items():

                def call(mod=mod, kw=kw, q=q, pk=pk, pv=pv, tk=tk, tv=tv):
                    return mod.decode_attention(q, pk, pv, tk, tv, None, D**-0.5, **kw)

                res = call().float()
                ref = res if ref is None else ref
                rec = {"module": name, "variant": vname, "max_abs_diff_vs_first": (res - ref).abs().max().item()}
                rec.update(full_ms=bench(call), graph_ms=_graph_ms(call, dev), host_us=_host_us(call, dev))
                if vname == "default":
                    _profile(call, dev, rec, log_dir, f"{name.rsplit('.', 1)[-1]}_B{b}_T{t // 1024}k")
                    try:  # registers / spills / shared memory of every compiled variant (triton internals)
                        rec["decode_kernel_compiled"] = [
                            {"regs": ck.n_regs, "spills": ck.n_spills, "shared": ck.metadata.shared}
                            for cache in mod._decode_kernel.device_caches.values()
                            for ck in cache[0].values()
                        ]
                    except Exception as e:  # noqa: BLE001
                        rec["decode_kernel_compiled"] = repr(e)[:200]
                out.append({**row, **rec})
                kern = f"{rec.get('triton_kernels_us', math.nan):.1f}/{rec.get('all_kernels_us', math.nan):.1f}"
                print(
                    f"overhead B={b} T={t} {name} {vname}: full {rec['full_ms'] * 1e3:.1f} us "
                    f"({row['sdpa_ms'] / rec['full_ms']:.2f}x sdpa {row['sdpa_ms'] * 1e3:.1f}), "
                    f"graph {rec['graph_ms'] * 1e3:.1f} us ({row['sdpa_graph_ms'] / rec['graph_ms']:.2f}x sdpa graph "
                    f"{row['sdpa_graph_ms'] * 1e3:.1f}), host {rec['host_us']:.1f} us, kernels (triton/all) {kern} us, "
                    f"syncs {len(rec.get('sync_warnings', []))}, diff {rec['max_abs_diff_vs_first']:.2e}",
                    flush=True,
                )
        del pk, pv
        torch.cuda.empty_cache()
    return out


def timeline(dev, cells: list[tuple[int, int]], variants: list[dict]) -> list[dict]:
    """Where one K4/V3 call's time goes: the three kernels' spans (torch profiler, the last of 3 calls, L2 cleared
    before each) and, from a ``DBG = 7`` build of decode_mma.cu (same code, plus timestamps), every split-pass
    block's start, setup done, first copies issued, query kernel waited for, first unit in, warp 0's last unit begun,
    end (ns from the call's first block) and SM | units << 16; per ``MMA_TUNING`` variant."""
    from torch.profiler import ProfilerActivity, profile

    from turbovq.kernels import decode as kdecode

    out, flush = [], torch.empty(1 << 28, dtype=torch.uint8, device=dev)
    kc, vc = RowCodec(D, 4, seed=1), RowCodec(D, 3, seed=2)
    for b, t in cells:
        q = torch.randn(b, HQ, 1, D, device=dev, dtype=torch.bfloat16)
        tk = torch.randn(b, HKV, TAIL, D, device=dev, dtype=torch.bfloat16)
        pk, pv = synthetic_rows(kc, b, t - TAIL, dev, 1), synthetic_rows(vc, b, t - TAIL, dev, 2)

        for var in variants:
            with tuned(var):

                def call(q=q, pk=pk, pv=pv, tk=tk):
                    return decode_attention(q, pk, pv, tk, tk, None, D**-0.5)

                call()
                torch.cuda.synchronize(dev)
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    for _ in range(3):
                        flush.zero_()
                        call()
                    torch.cuda.synchronize(dev)
                kern = sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                              if e.device_type.name == "CUDA" and "elementwise" not in e.name and "fill" not in e.name)
                first = [i for i, k in enumerate(kern) if k[2].startswith("_prep")][-1]
                t0 = kern[first][0]
                spans = [{"kernel": k[2][:40], "start_us": k[0] - t0, "end_us": k[1] - t0} for k in kern[first:]]
                with traced(dev) as buf:
                    call()
                    for _ in range(2):
                        torch.cuda.synchronize(dev)
                        buf.zero_()
                        flush.zero_()
                        call()
                    torch.cuda.synchronize(dev)
                tr = buf.view(-1, 8)
                tr = tr[tr[:, 0] > 0].cpu()
                start = tr[:, 0].min()
                blocks = [[int(x - start) if j < 7 and x else int(x) for j, x in enumerate(r)] for r in tr.tolist()]
                code = [r for r in blocks if r[7] >> 16]
                tail = [r for r in blocks if not r[7] >> 16]
                qs = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0], dtype=torch.float64)

                def q_(xs, qs=qs):  # min, 10%, median, 90%, max in us
                    if not xs:
                        return []
                    return [round(float(v) / 1e3, 2) for v in torch.tensor(xs, dtype=torch.float64).quantile(qs)]

                rec = {
                    "B": b, "T": t, "variant": var, "kernels": spans, "blocks": blocks,
                    "code_blocks": len(code), "tail_blocks": len(tail), "sms": len({r[7] & 0xFFFF for r in blocks}),
                    "start_us_q": q_([r[0] for r in code]), "setup_us_q": q_([r[1] - r[0] for r in code]),
                    "copies_us_q": q_([r[2] - r[1] for r in code]), "query_wait_us_q": q_([r[3] - r[2] for r in code]),
                    "first_unit_us_q": q_([r[4] - r[3] for r in code if r[4]]),
                    "last_unit_to_end_us_q": q_([r[6] - r[5] for r in code if r[5]]),
                    "duration_us_q": q_([r[6] - r[0] for r in code]),
                    "end_us_q": q_([r[6] for r in code]), "tail_duration_us_q": q_([r[6] - r[0] for r in tail]),
                    "tail_end_us_q": q_([r[6] for r in tail]),
                }  # fmt: skip
                busy = sum(r[6] - r[0] for r in code) / 1e3
                slots = kdecode.sm_count(dev) * kdecode.MMA_TUNING["MINB"]
                rec["slot_busy_frac"] = busy / (max(r[6] for r in blocks) / 1e3 * slots)
                out.append(rec)
                span_text = " ".join(f"{s['kernel'][:14]} {s['start_us']:.1f}-{s['end_us']:.1f}" for s in spans)
                print(f"timeline B={b} T={t} {var}: {span_text}", flush=True)
                print({k: v for k, v in rec.items() if k not in ("blocks", "kernels")}, flush=True)
        del pk, pv
        torch.cuda.empty_cache()
    return out


def sweep_settings(settings: dict, grid: list[dict], fn) -> list[dict]:
    """Time ``fn`` with ``settings`` (a kernel's tuning dict, updated in place) overridden by each entry of ``grid``,
    fastest first; the settings are restored afterwards. An entry's ``"source"`` (a file) replaces encode_mma.cu for
    that entry (A/B against another version). ``mismatch``: the largest fraction of elements of one of ``fn``'s
    outputs (a dict of tensors) that differ from the default's (0: bit for bit the same)."""
    from turbovq.kernels import encode as kencode

    source, out = kencode._MMA_SOURCE, []
    ref = fn()
    try:
        for order, kw in enumerate(grid):  # (order: the clock may drop over a sweep, see warmup_effect)
            kw = dict(kw)
            path = kw.pop("source", None)
            kencode._MMA_SOURCE = Path(path).read_text() if path else source
            with overridden(settings, kw):
                row = {**settings, **({"source": path} if path else {}), "order": order}
                try:
                    got = fn()
                except Exception as e:  # a setting this case cannot build (e.g. WGA with two channel groups)
                    out.append({**row, "ms": None, "error": f"{type(e).__name__}: {str(e)[:200]}"})
                    continue
                diff = max((got[k] != v).float().mean().item() for k, v in ref.items())
                out.append({**row, "ms": bench(fn, rep=30), "mismatch": diff})
    finally:
        kencode._MMA_SOURCE = source
    return sorted(out, key=lambda r: float("inf") if r["ms"] is None else r["ms"])


def encode_bench(dev, copy_tbs, tune_grid: list[dict], dims: list[int], had_grid: list[dict] = (),
                 widths: list[tuple[float, bool]] = ()) -> list[dict]:
    """``encode_rows`` on B = 8, H = 8, T = 32k rows of bf16 (centered, channel scales as the cache's default):
    the CUDA kernel (encode_mma.cu), the Triton kernel and the torch ``RowCodec.encode``, side by side; achieved
    bandwidth on the bytes read and written vs the copy roofline. head_dim 128: 4, 3, 3.5, 2.5 and 2 bits, and 4-bit
    TurboQuant_prod keys (3-bit codes + QJL signs); other ``dims``: 4, 3, 3.5 and 2.5 bits.
    Where the factored Hadamard kernel applies (HAD, see ``encode.hadamard_supported``), it and the dense-R kernel are
    both timed: ``cuda`` is the default choice, ``cuda_had`` / ``cuda_dense`` each kernel.
    ``cuda``: the median of three timings of the default, the first before the others, two at the row's end, each
    with the median SM clock meanwhile (``cuda_sm_mhz``, ClockLog).
    With ``tune_grid``, a sweep of the dense kernel's tuning (MMA_TUNING) for 4, 3 and 3.5 bits; with ``had_grid``,
    of the HAD kernel's tuning (``encode.had_tuning``). ``widths``: (bits, prod keys) rows to run instead, in order.
    """
    from turbovq.kernels import encode as kencode

    b, t = 8, 32768
    out, log = [], ClockLog()
    for dim in dims:
        x, mean, scale = _encode_inputs(dev, dim, b, t)
        for bits, qjl in widths or (((4, False), (3, False), (3.5, False), (2.5, False), (2, False), (4, True))
                                    if dim == D else ((4, False), (3, False), (3.5, False), (2.5, False))):  # fmt: skip
            codec = RowCodec(dim, bits, seed=1, qjl=qjl)
            perm = codec.calibrate(x[:, :, :1024].float() - mean) if codec.num_outliers else None
            written = sum(v.numel() * v.element_size() for v in encode_rows(x[:, :, :64], codec, perm, mean).values())
            nbytes = x.numel() * 2 + written // 64 * t  # read bf16 rows once, write codes + float32 norms

            def run(backend, codec=codec, perm=perm, x=x, mean=mean, scale=scale, **kw):
                return encode_rows(x, codec, perm, mean, scale, backend=backend, **kw)

            timings = [log.timed(lambda: run("cuda"), rep=50, warmup=ENCODE_WARMUP)]  # (ms, window)
            ms = {"cuda": timings[0][0], "triton": bench(lambda: run("triton"), rep=50)}
            had = not qjl and kencode.hadamard_supported(codec)
            if had:
                ms["cuda_had"] = bench(lambda: run("cuda", hadamard=True), rep=50, warmup=ENCODE_WARMUP)
                ms["cuda_dense"] = bench(lambda: run("cuda", hadamard=False), rep=50, warmup=ENCODE_WARMUP)
                if perm is not None and dim == 256:  # calibrate's gather order against channels sorted per group
                    n = codec.num_outliers
                    plain = torch.cat([perm[:, :n].sort(-1).values, perm[:, n:].sort(-1).values], -1)
                    ms["cuda_had_sorted"] = bench(lambda p=plain: run("cuda", perm=p, hadamard=True), rep=50,
                                                  warmup=ENCODE_WARMUP)  # fmt: skip
            if dim == D:
                xs = (x.float() - mean) / scale
                ms["torch"] = bench(lambda c=codec, p=perm, xs=xs: c.encode(xs, p), rep=20)
                del xs
            # the default's time: the median of three timings spread over the row (the first one of a row read up to
            # 12% slower than later ones of the same kernel in rounds 15-17)
            timings += [log.timed(lambda: run("cuda"), rep=50, warmup=ENCODE_WARMUP) for _ in range(2)]
            ms["cuda"] = sorted(v for v, _ in timings)[1]
            row = {"head_dim": dim, "bits": bits, "qjl": qjl, "rows": b * HKV * t, "bytes": nbytes,
                   "cuda_timings_ms": [v for v, _ in timings], "windows": [w for _, w in timings]}  # fmt: skip
            for k, v in ms.items():
                row[f"{k}_ms"] = v
                row[f"{k}_roofline_frac"] = nbytes / v / 1e9 / copy_tbs
            row["cuda_vs_triton"] = ms["triton"] / ms["cuda"]
            if had:
                row["had_vs_dense"] = ms["cuda_dense"] / ms["cuda_had"]
            if "torch" in ms:
                row["cuda_vs_torch"] = ms["torch"] / ms["cuda"]
            out.append(row)
            print(f"encode d={dim} bits={bits}{' prod' if qjl else ''}: "
                  + ", ".join(f"{k} {v:.3f} ms ({row[f'{k}_roofline_frac']:.0%} of copy bw)" for k, v in ms.items()),
                  flush=True)  # fmt: skip
            if qjl:  # the Triton kernel's settings for prod keys (encode_rows' defaults come from this sweep)
                sweep = [{"block_t": bt, "num_warps": nw, "ms": bench(
                    lambda bt=bt, nw=nw: run("triton", block_t=bt, num_warps=nw), rep=30)}
                    for bt in (32, 64, 128) for nw in (4, 8)]  # fmt: skip
                row["triton_sweep"] = sorted(sweep, key=lambda r: r["ms"])
                print(f"  fastest Triton settings: {row['triton_sweep'][0]}", flush=True)
            if had and had_grid:
                row["had_sweep"] = sweep_settings(kencode.had_tuning(len(codec.groups) == 2), had_grid,
                                                  lambda: run("cuda", hadamard=True))  # fmt: skip
                print("  HAD settings, fastest first:\n" + "\n".join(f"    {r}" for r in row["had_sweep"]), flush=True)
            if (bits in (4, 3, 3.5) or qjl) and tune_grid and not had:  # (QJL: QJL_TUNING)
                table = kencode.QJL_TUNING if qjl else kencode.MMA_TUNING
                row["cuda_sweep"] = sweep_settings(table[dim], tune_grid, lambda: run("cuda"))
                print(f"  fastest CUDA settings: {row['cuda_sweep'][0]}", flush=True)
        del x
        torch.cuda.empty_cache()
    log.close()
    for row in out:  # the SM clock during each timing of the default
        row["cuda_sm_mhz"] = [log.median(w) for w in row.pop("windows")]
        print(f"encode d={row['head_dim']} bits={row['bits']}{' prod' if row['qjl'] else ''}: default "
              + ", ".join(f"{v:.3f} ms at {c} MHz" for v, c in zip(row["cuda_timings_ms"], row["cuda_sm_mhz"])),
              flush=True)  # fmt: skip
    return out


LLAMA_8B = dict(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
    head_dim=128, rope_theta=500000.0, max_position_embeddings=131072,
)  # fmt: skip
E2E_KINDS = ("bf16", "K4/V3")  # the largest-batch search; the timed runs also take "bf16-static"


def _cuda(dev) -> bool:
    return torch.device(dev).type == "cuda"


def _sync(dev) -> None:
    if _cuda(dev):
        torch.cuda.synchronize(dev)


def _peak(dev) -> int | None:
    return torch.cuda.max_memory_allocated(dev) if _cuda(dev) else None


def _is_oom(e: Exception) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e) or "ALLOC_FAILED" in str(e)


def e2e_model(cfg, dev):
    """Random weights, built in bf16 on the device (no float32 copy: 8B parameters, 16 GB)."""
    import transformers

    torch.manual_seed(0)
    with torch.device(dev):
        model = transformers.LlamaForCausalLM._from_config(cfg, dtype=torch.bfloat16, attn_implementation="sdpa")
    return model.eval()


def fill_cache(cache, cfg, batch: int, context: int, dev, rows: int = 65536) -> int:
    """Write ``context`` random bf16 tokens into every layer with ``cache.update``: what a prefill leaves behind, in
    seconds instead of minutes (a 32k-token prefill of an 8B model at batch 60 is not what we measure). Chunks of
    ``rows // batch`` tokens keep the encode / cat transients the same at every batch >= 8, so peak memory stays
    linear in the batch. Returns the chunk length."""
    chunk = max(64, min(8192, rows // batch // 64 * 64))
    shape = (batch, cfg.num_key_value_heads, 0, cfg.head_dim)
    with torch.no_grad():
        for layer in range(cfg.num_hidden_layers):
            for lo in range(0, context, chunk):
                k = torch.randn(*shape[:2], min(chunk, context - lo), shape[3], device=dev, dtype=torch.bfloat16)
                out = cache.update(k, torch.randn_like(k), layer)  # ours: only the tail (under codes_attention)
                del k, out
    return chunk


def e2e_run(model, kind: str, batch: int, context: int, steps: int, dev, warmup: int = 3) -> dict:
    """Fill a fresh cache to ``context`` tokens, greedy-decode ``warmup + steps`` tokens, time the last ``steps``."""
    import contextlib

    import transformers

    from turbovq.kv import TurboQuantCache, codes_attention

    cfg = model.config
    if _cuda(dev):
        torch.cuda.reset_peak_memory_stats(dev)
    if kind == "bf16":
        cache, ctx = transformers.DynamicCache(config=cfg), contextlib.nullcontext()
    elif kind == "bf16-static":  # preallocated: no per-step concatenation of the whole cache, as DynamicCache does
        cache = transformers.StaticCache(config=cfg, max_cache_len=context + warmup + steps)
        ctx = contextlib.nullcontext()
    else:  # under codes_attention our update returns the tail only, not the whole cache dequantized
        cache, ctx = TurboQuantCache(cfg, key_bits=4, value_bits=3, residual_length=128), codes_attention(model)
    with ctx, torch.no_grad():
        t0 = time.perf_counter()
        chunk = fill_cache(cache, cfg, batch, context, dev)
        _sync(dev)
        fill_s, fill_peak = time.perf_counter() - t0, _peak(dev)
        if _cuda(dev):
            torch.cuda.reset_peak_memory_stats(dev)
        tok = torch.randint(0, cfg.vocab_size, (batch, 1), device=dev)
        for i in range(warmup + steps):
            if i == warmup:
                _sync(dev)
                t0 = time.perf_counter()
            tok = model(input_ids=tok, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
        _sync(dev)
        dt = time.perf_counter() - t0
    if kind.startswith("bf16"):
        nbytes = sum(x.numel() * x.element_size() for layer in cache.layers for x in (layer.keys, layer.values))
    else:
        nbytes = cache.nbytes
    decode_peak = _peak(dev)
    return {
        "batch": batch,
        "cache": kind,
        "tokens_per_s": batch * steps / dt,
        "ms_per_step": dt / steps * 1e3,
        "steps": steps,
        "fill_s": fill_s,
        "fill_chunk": chunk,
        "seq_length": int(cache.get_seq_length()),
        "cache_bytes": nbytes,
        "fill_peak_bytes": fill_peak,
        "decode_peak_bytes": decode_peak,
        "peak_bytes": None if fill_peak is None else max(fill_peak, decode_peak),
    }


def _e2e_try(model, kind, batch, context, steps, dev, warmup=3) -> dict:
    """``e2e_run``, or ``{"oom": True}``; either way the cache is gone and the allocator's cache emptied."""
    import gc

    try:
        run = e2e_run(model, kind, batch, context, steps, dev, warmup)
    except (torch.OutOfMemoryError, RuntimeError) as e:
        if not _is_oom(e):
            raise
        run = {"batch": batch, "cache": kind, "oom": True}
    gc.collect()  # the failed run's frames (and their tensors) die with the exception
    if _cuda(dev):
        torch.cuda.empty_cache()
    gib = {k: round(v / 2**30, 2) for k, v in run.items() if k.endswith("bytes") and v is not None}
    print("e2e", {k: round(v, 2) if isinstance(v, float) else v for k, v in run.items()}, "GiB:", gib, flush=True)
    return run


def max_batch(model, kind, context, steps, dev, runs: list[dict], tries: int) -> dict:
    """Largest batch whose fill + decode fits. Peak bytes are linear in the batch (weights + per-row cache and
    transients), so a line through the two largest timed runs that fitted, against what the allocator can reach,
    gives a guess; then step away from it (doubling the step) until the outcome flips and bisect, ``tries`` runs
    at most. Each try times ``steps`` decode steps after 2 warm-up steps: the serving number at that batch."""
    fits = sorted((r for r in runs if not r.get("oom")), key=lambda r: r["batch"])
    lo = fits[-1]["batch"] if fits else 0
    hi = min((r["batch"] for r in runs if r.get("oom")), default=None)
    reach = torch.cuda.mem_get_info(dev)[0] + torch.cuda.memory_allocated(dev)
    guess = 2 * lo or 1
    if len(fits) >= 2:
        (b0, p0), (b1, p1) = [(r["batch"], r["peak_bytes"]) for r in fits[-2:]]
        guess = b1 + int((reach - p1) / ((p1 - p0) / (b1 - b0)))
    b, step, trials, best = guess, max(1, guess // 64), [], None
    while len(trials) < tries and (hi is None or hi - lo > 1):
        b = max(lo + 1, b if hi is None else min(b, hi - 1))
        run = _e2e_try(model, kind, b, context, steps, dev, warmup=2)
        trials.append({k: run.get(k) for k in ("batch", "oom", "tokens_per_s", "peak_bytes")})
        if run.get("oom"):
            hi = b
        else:
            lo, best = b, run
        # no miss yet: step up; a tried fit below a miss: bisect; only misses so far: step down
        b = lo + step if hi is None else (lo + hi) // 2 if best else hi - step
        step *= 2
    best = best or next((r for r in fits if r["batch"] == lo), None)
    out = {"guess": guess, "reachable_bytes": reach, "trials": trials, "largest": lo, "exact": hi == lo + 1}
    out["at_largest"] = best
    print(f"e2e {kind}: largest batch {lo} (guess {guess}, exact {out['exact']}, tries {len(trials)})", flush=True)
    return out


def e2e(dev, layers: int, context: int, new_tokens: int, batches, tries: int = 6, max_steps: int = 8, cfg=None) -> dict:
    """Greedy decode tokens/s and peak memory at ``context`` tokens, ours (K4/V3, attention on the codes) vs bf16
    ``DynamicCache``, random Llama-3.1-8B-shape model; then the largest batch that fits for each (target: ours
    >= 3.5x bf16's) and the throughput there. ``cfg`` replaces the model config (a tiny one for a CPU check)."""
    import transformers

    cfg = cfg or transformers.LlamaConfig(**LLAMA_8B, num_hidden_layers=layers)
    t0 = time.perf_counter()
    model = e2e_model(cfg, dev)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    print(f"e2e: model {weights / 2**30:.1f} GiB in {time.perf_counter() - t0:.1f} s", flush=True)
    res = {"layers": cfg.num_hidden_layers, "context": context, "new_tokens": new_tokens, "weights_bytes": weights}
    kinds = ("bf16", "bf16-static", "K4/V3")
    res["runs"] = [_e2e_try(model, kind, b, context, new_tokens, dev) for b in batches for kind in kinds]
    if _cuda(dev):
        mb = {k: max_batch(model, k, context, max_steps, dev, [r for r in res["runs"] if r["cache"] == k], tries)
              for k in E2E_KINDS}  # fmt: skip
        res["max_batch"] = mb
        ours, ref = mb["K4/V3"], mb["bf16"]
        res["max_batch_ratio"] = ours["largest"] / ref["largest"] if ref["largest"] else None
        if ours["at_largest"] and ref["at_largest"]:
            res["max_batch_tokens_per_s_ratio"] = ours["at_largest"]["tokens_per_s"] / ref["at_largest"]["tokens_per_s"]
        print(f"e2e: largest batch ours {ours['largest']} / bf16 {ref['largest']} = {res['max_batch_ratio']}, "
              f"tokens/s ratio there {res.get('max_batch_tokens_per_s_ratio')}", flush=True)  # fmt: skip
    return res


def plot(decode_rows, copy_tbs, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    cells = [f"B{r['B']}\nT{r['T'] // 1024}k" for r in decode_rows]
    x = range(len(cells))
    for name in CONFIGS:
        if name in decode_rows[0]:
            axes[0].plot(x, [r[name]["speedup_vs_sdpa"] or math.nan for r in decode_rows], "o-", label=name)
            axes[1].plot(x, [r[name]["roofline_frac"] for r in decode_rows], "o-", label=name)
    axes[0].axhline(1, color="gray", lw=0.8)
    axes[0].axhline(3, color="red", lw=0.8, ls="--", label="target 3x")
    axes[0].set_ylabel("speed-up vs bf16 SDPA")
    axes[1].axhline(0.7, color="red", lw=0.8, ls="--", label="target 70%")
    axes[1].set_ylabel(f"bandwidth on compressed bytes / copy ({copy_tbs:.2f} TB/s)")
    for ax in axes:
        ax.set_xticks(list(x), cells, fontsize=7)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(f"Decode attention on TurboQuant codes, {HQ} query / {HKV} KV heads, d={D}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _cells(spec: str) -> list[tuple[int, int]]:
    """``"8x32768,32x32768"`` -> [(8, 32768), (32, 32768)]: (B, T) cells."""
    return [tuple(int(v) for v in c.split("x")) for c in spec.split(",")]


def main() -> None:
    global HQ, HKV, D  # the model shape every phase uses (--heads, --head-dim)
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--name", default="kernels")
    ap.add_argument("--phases", default="tune,decode,encode")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--lengths", default="8192,32768,131072")
    ap.add_argument("--configs", default=",".join(DEFAULT_CONFIGS))
    ap.add_argument("--heads", default=f"{HQ},{HKV}", help="query heads,KV heads (default Llama-3.1-8B's)")
    ap.add_argument("--head-dim", type=int, default=D)
    ap.add_argument("--block-t", type=int, default=128)
    ap.add_argument("--num-warps", type=int, default=4)
    ap.add_argument("--tune-cuda", default='[{"UC": 2, "MINB": 2}, {"UC": 2, "MINB": 3}, {"UC": 1, "MINB": 3}, '
                    '{"UC": 1, "MINB": 4}, {"NWARPS": 8, "UC": 1, "MINB": 1}, {"NWARPS": 8, "UC": 2, "MINB": 1}]')
    ap.add_argument("--tune-configs", default="K4/V3", help="tune-cuda: the widths (CONFIGS names) to time")
    ap.add_argument("--tune-cells", default="8x32768,32x32768", help="tune-cuda: BxT cells")
    ap.add_argument("--tune-encode", default="[]", help="encode: CUDA settings to sweep, e.g. '[{\"MINB\": 4}]'; "
                    "warmup-effect: settings timed alternately with the default")
    ap.add_argument("--encode-dims", default="128", help="encode: head_dims (128 runs every width)")
    ap.add_argument("--encode-widths", default="", help="encode: rows to run instead, in order, e.g. '4:qjl,4,4:qjl'")
    ap.add_argument("--encode-codec", help="profile-encode (default 4), warmup-effect (default 4:qjl): bits, "
                    "'4:qjl' for TurboQuant_prod keys")  # fmt: skip
    ap.add_argument("--tune-had", default="[]", help="encode: HAD kernel settings to sweep, e.g. '[{\"TW\": 1}]'")
    ap.add_argument("--graph", action="store_true", help="decode grid: also time each call as a CUDA graph replay")
    ap.add_argument("--e2e-layers", type=int, default=32)
    ap.add_argument("--e2e-context", type=int, default=32768)
    ap.add_argument("--e2e-new-tokens", type=int, default=32)
    ap.add_argument("--e2e-batches", default="1,8,16")
    ap.add_argument("--e2e-max-tries", type=int, default=6, help="runs per cache kind searching the largest batch")
    ap.add_argument("--e2e-max-steps", type=int, default=8, help="timed decode steps of each of those runs")
    ap.add_argument("--device", default="cuda", help="cpu: the e2e phase only, without the memory search")
    ap.add_argument("--overhead-modules", default="turbovq.kernels.decode")
    ap.add_argument("--overhead-cells", default="8x32768,1x8192")
    args = ap.parse_args()
    (HQ, HKV), D = (int(x) for x in args.heads.split(",")), args.head_dim
    dev = torch.device(args.device)
    phases = args.phases.split(",")
    res = {"device": torch.cuda.get_device_name(dev) if _cuda(dev) else str(dev), "torch": torch.__version__}
    res["shape"] = {"query_heads": HQ, "kv_heads": HKV, "head_dim": D}
    res["triton"] = triton.__version__
    if _cuda(dev):
        res["copy_TBps"] = copy_bw = copy_bandwidth(dev)
        print(f"{res['device']}: copy {copy_bw:.2f} TB/s", flush=True)
    if "profile-call" in phases:
        profile_call(dev)
        return
    if "profile-encode" in phases:
        profile_encode(dev, args.encode_codec or "4", (json.loads(args.tune_encode) or [None])[0])
        return
    if "warmup-effect" in phases:
        res["warmup_effect"] = warmup_effect(dev, args.encode_codec or "4:qjl", variants=json.loads(args.tune_encode))
    if "prefill" in phases:
        res["prefill"] = prefill(dev)
    if "prefill-qjl" in phases:
        res["prefill_qjl"] = prefill(dev, qjl=True)
    if "tune" in phases:
        res["tune"] = tune(dev)
    if "tune-cuda" in phases:
        variants = json.loads(args.tune_cuda)
        cells = _cells(args.tune_cells)
        res["tune_cuda"] = [row for c in args.tune_configs.split(",") for row in tune_cuda(dev, variants, c, cells)]
    if "read-floor" in phases:
        cells = _cells(args.tune_cells)
        res["read_floor"] = [row for _ in range(2) for row in read_floor(dev, copy_bw, cells)]
    if "decode" in phases:
        res["decode"] = decode_grid(
            dev,
            copy_bw,
            [int(x) for x in args.batches.split(",")],
            [int(x) for x in args.lengths.split(",")],
            args.configs.split(","),
            args.block_t,
            args.num_warps,
            args.graph,
        )
        res["decode_settings"] = {"block_t": args.block_t, "num_warps": args.num_warps, "tail": TAIL}
    if "overhead" in phases:
        cells = _cells(args.overhead_cells)
        out_dir = Path(args.out)
        out_dir.mkdir(parents=True, exist_ok=True)
        res["overhead"] = overhead(dev, args.overhead_modules.split(","), cells, out_dir)
    if "timeline" in phases:
        cells = _cells(args.overhead_cells)
        res["timeline"] = timeline(dev, cells, json.loads(args.tune_cuda))
    if "encode" in phases:
        dims = [int(v) for v in args.encode_dims.split(",")]
        widths = [_width(w) for w in args.encode_widths.split(",") if w]
        res["encode"] = encode_bench(dev, copy_bw, json.loads(args.tune_encode), dims, json.loads(args.tune_had),
                                     widths)  # fmt: skip
    if "e2e" in phases:
        res["e2e"] = e2e(
            dev,
            args.e2e_layers,
            args.e2e_context,
            args.e2e_new_tokens,
            [int(x) for x in args.e2e_batches.split(",")],
            args.e2e_max_tries,
            args.e2e_max_steps,
        )
        res["e2e"]["alloc_conf"] = os.environ.get("PYTORCH_CUDA_ALLOC_CONF")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(res, indent=2) + "\n")
    if "decode" in res:
        plot(res["decode"], copy_bw, out / f"{args.name}.png")


if __name__ == "__main__":
    main()
