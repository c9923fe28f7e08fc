"""Vector search: TurboQuantIndex vs FAISS (1.15) at matched bytes per vector, side by side in one run.

For every dataset and memory level (2 and 4 bits per dimension by default), each method is built (train + add,
timed), searched with the held-apart queries (Recall@1@k for k = 1..64: the fraction of queries whose exact
nearest neighbour is among the k returned), and timed on a batch of 500 queries at 1 and 2 threads, and one query
per call at 1 thread (queries/s).

Methods (bytes per vector are measured, not assumed, and written next to each result):
  ours          TurboQuantIndex default (mode "pca": centre + principal axes + integer bit allocation)
  ours-center   mode "center" (centre + fractional split), ours-oblivious (data-oblivious, streaming)
  ours-paper    plain TurboQuant_mse (oblivious, float32 norm on top: +4 B), ours-prod-rerank
  faiss-tqmse   index_factory(d, "RR,SQtqmse{b}") -- the same algorithm as ours-paper, FAISS's implementation
  faiss-pq      IndexPQ with 8-bit sub-quantizers; faiss-pqfs IndexPQFastScan (4-bit); faiss-sq (4/8 bit)
  faiss-rabitq  IndexRaBitQ (extended, b bits); ours@B runs TurboQuantIndex at RaBitQ's exact byte count
  flat          brute force (exact, float32)

Datasets: ``minilm`` (real all-MiniLM-L6-v2 embeddings, ``benchmarks/search_data.py``), ``synth1536`` and
``synth3072`` (anisotropic, normalised, seeded; OpenAI-embedding sized).

    nice -n 10 python benchmarks/search.py --datasets minilm --n 50000
    python benchmarks/search.py --datasets synth1536 --n 100000 --pq-train 20000

Writes ``benchmarks/results/search.json`` (or ``--name``) and a PNG of the recall curves.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, write_json  # noqa: E402

KS = [1, 2, 4, 8, 16, 32, 64]
QPS_BATCH = 500


# --- data ----------------------------------------------------------------------------------------------------------
def synthetic(n: int, dim: int, queries: int = 1000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Anisotropic unit vectors: a power-law spectrum over random axes plus a common mean direction (as real
    embedding models produce); queries from the same law, held apart."""
    rng = np.random.default_rng(seed)
    scales = (1 + np.arange(dim)) ** -0.6
    basis = np.linalg.qr(rng.standard_normal((dim, dim)).astype(np.float32))[0]
    mean = basis[:, -1] * 0.4 * scales[0] * np.sqrt(dim) / 4

    def draw(m):
        out = np.empty((m, dim), dtype=np.float32)
        for lo in range(0, m, 10_000):
            z = rng.standard_normal((min(m, lo + 10_000) - lo, dim)).astype(np.float32) * scales
            out[lo : lo + len(z)] = z @ basis.T + mean
        return out / np.linalg.norm(out, axis=1, keepdims=True)

    return draw(n), draw(queries)


def dataset(name: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    if name == "minilm":
        from search_data import load

        return load(n)
    if name.startswith("synth"):
        return synthetic(n, int(name.removeprefix("synth")))
    raise SystemExit(f"unknown dataset {name!r}")


def ground_truth(x: np.ndarray, q: np.ndarray) -> np.ndarray:
    best = np.full(len(q), -np.inf, dtype=np.float32)
    arg = np.zeros(len(q), dtype=np.int64)
    for lo in range(0, len(x), 20_000):
        s = q @ x[lo : lo + 20_000].T
        j = s.argmax(1)
        better = s[np.arange(len(q)), j] > best
        best[better], arg[better] = s[np.arange(len(q)), j][better], lo + j[better]
    return arg


# --- methods -------------------------------------------------------------------------------------------------------
class Ours:
    def __init__(self, dim, bits, **kw):
        from turbovq.search import TurboQuantIndex

        self.index = TurboQuantIndex(dim, bits, metric="ip", **kw)

    def build(self, x):
        self.index.add(x)

    def search(self, q, k):
        return self.index.search(q, k)

    @property
    def bytes_per_vector(self):
        return self.index.code_size


class Faiss:
    def __init__(self, dim, factory=None, make=None, train_max=None):
        import faiss

        self.index = make() if make else faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
        self.train_max = train_max

    def build(self, x):
        train = x
        if self.train_max and len(x) > self.train_max:
            train = x[np.random.default_rng(0).choice(len(x), self.train_max, replace=False)]
        self.index.train(train)
        self.index.add(x)

    def search(self, q, k):
        return self.index.search(q, k)

    @property
    def bytes_per_vector(self):
        return int(self.index.sa_code_size())


def methods(dim: int, bits: int, args) -> dict:
    """name -> zero-argument constructor, for one memory level (``bits`` per dimension)."""
    import faiss

    budget = dim * bits // 8
    m = {
        "ours": lambda: Ours(dim, bits),
        "ours-center": lambda: Ours(dim, bits, mode="center"),
        "ours-oblivious": lambda: Ours(dim, bits, mode="oblivious"),
        "ours-paper": lambda: Ours(dim, bits, mode="oblivious", fit_norms=False),
        f"faiss-tqmse{bits}": lambda: Faiss(dim, f"RR,SQtqmse{bits}"),
        f"faiss-pqfs{2 * budget}x4": lambda: Faiss(dim, f"PQ{2 * budget}x4fs"),
        f"faiss-rabitq{bits}": lambda: Faiss(dim, f"RaBitQ{bits}"),
    }
    if bits >= 3:
        m["ours-prod-rerank4"] = lambda: Ours(dim, bits, mode="center", estimator="prod", rerank=4)
    if not args.no_pq:
        m[f"faiss-pq{budget}x8"] = lambda: Faiss(dim, f"PQ{budget}x8", train_max=args.pq_train)
    if bits == 4:
        m["faiss-sq4"] = lambda: Faiss(dim, make=lambda: faiss.IndexScalarQuantizer(
            dim, faiss.ScalarQuantizer.QT_4bit, faiss.METRIC_INNER_PRODUCT))
    rabitq_bytes = int(faiss.index_factory(dim, f"RaBitQ{bits}").sa_code_size())
    m[f"ours@{rabitq_bytes}B"] = lambda: Ours(dim, 8 * rabitq_bytes / dim)
    return m


# --- measurement ---------------------------------------------------------------------------------------------------
def set_threads(n: int) -> None:
    import faiss

    torch.set_num_threads(n)
    faiss.omp_set_num_threads(n)


QPS_REPEATS = 2


def qps(method, q: np.ndarray, threads: int, k: int = 10, repeats: int | None = None) -> float:
    """Queries/s on a batch of QPS_BATCH queries at ``threads`` threads (best of ``repeats``)."""
    repeats = QPS_REPEATS if repeats is None else repeats
    set_threads(threads)
    batch = q[:QPS_BATCH]
    best = np.inf
    for _ in range(repeats):
        t = time.perf_counter()
        method.search(batch, k)
        best = min(best, time.perf_counter() - t)
    return len(batch) / best


def qps_single(method, q: np.ndarray, k: int = 10, count: int = 50) -> float:
    """Queries/s one query per call (interactive use), 1 thread, over ``count`` queries after one warm-up call."""
    set_threads(1)
    method.search(q[:1], k)
    t = time.perf_counter()
    for i in range(count):
        method.search(q[i : i + 1], k)
    return count / (time.perf_counter() - t)


def run_method(name, make, x, q, gt, args) -> dict:
    set_threads(args.build_threads)
    method = make()
    t = time.perf_counter()
    method.build(x)
    build_s = time.perf_counter() - t
    set_threads(1)
    _, ids = method.search(q, max(KS))
    recall = {k: float(np.mean((ids[:, :k] == gt[:, None]).any(1))) for k in KS}
    out = {"method": name, "bytes_per_vector": method.bytes_per_vector, "index_time_s": build_s,
           "recall_1_at": recall, "qps_1t": qps(method, q, 1), "qps_2t": qps(method, q, 2) if args.qps_2t else None,
           "qps_single": qps_single(method, q)}
    print(f"  {name:24s} {out['bytes_per_vector']:5d} B  R@1@1 {recall[1]:.3f}  R@1@10-ish {recall[8]:.3f}  "
          f"build {build_s:7.2f}s  qps1 {out['qps_1t']:7.0f}  qps2 {out['qps_2t'] or 0:7.0f}  "
          f"single {out['qps_single']:7.0f}", flush=True)
    return out


def ivf_sweep(x, q, gt, bits: int, nlist: int, args) -> dict:
    """Recall/QPS trade-off of TurboQuantIVFIndex over nprobe (1 thread, batch of QPS_BATCH queries)."""
    from turbovq.search.ivf import TurboQuantIVFIndex

    set_threads(args.build_threads)
    t = time.perf_counter()
    ivf = TurboQuantIVFIndex(x.shape[1], bits, nlist=nlist)
    ivf.add(x)
    build_s = time.perf_counter() - t
    rows = []
    for nprobe in [p for p in (1, 2, 4, 8, 16, 32, 64, 128, 256) if p <= nlist]:
        ivf.nprobe = nprobe
        set_threads(1)
        _, ids = ivf.search(q, max(KS))
        recall = {k: float(np.mean((ids[:, :k] == gt[:, None]).any(1))) for k in KS}
        ours = Ours.__new__(Ours)
        ours.index = ivf
        rows.append({"nprobe": nprobe, "recall_1_at": recall, "qps_1t": qps(ours, q, 1)})
        print(f"  ivf nlist={nlist} nprobe={nprobe:3d}  R@1@1 {recall[1]:.3f}  R@1@8 {recall[8]:.3f}  "
              f"qps1 {rows[-1]['qps_1t']:7.0f}", flush=True)
    return {"bits": bits, "nlist": nlist, "bytes_per_vector": ivf.code_size, "index_time_s": build_s, "sweep": rows}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    levels = sorted({lvl for r in results.values() for lvl in r["levels"]})
    fig, axes = plt.subplots(len(names), len(levels), figsize=(6 * len(levels), 4.5 * len(names)), squeeze=False)
    for i, ds in enumerate(names):
        for j, lvl in enumerate(levels):
            ax = axes[i][j]
            for r in results[ds]["levels"].get(lvl, []):
                ks = [int(k) for k in r["recall_1_at"]]
                style = "-" if r["method"].startswith("ours") else "--"
                ax.plot(ks, list(r["recall_1_at"].values()), style, marker="o", ms=3,
                        label=f"{r['method']} ({r['bytes_per_vector']} B)")
            ax.set_xscale("log", base=2)
            ax.set_title(f"{ds} (n={results[ds]['n']}, d={results[ds]['dim']}), {lvl} bits/dim")
            ax.set_xlabel("k")
            ax.set_ylabel("Recall@1@k")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_ivf(results: dict, path: Path) -> None:
    """Recall@1@1 and Recall@1@8 against queries/s over nprobe, with the flat index as a reference point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for ds, e in results.items():
        if "ivf" not in e:
            continue
        v = e["ivf"]
        qps_ = [r["qps_1t"] for r in v["sweep"]]
        for r in v["sweep"]:  # recall keys are ints in memory, strings once read back from JSON
            r["recall_1_at"] = {str(a): b for a, b in r["recall_1_at"].items()}
        for k, style in (("1", "-o"), ("8", "--s")):
            ax.plot(qps_, [r["recall_1_at"][k] for r in v["sweep"]], style, ms=4,
                    label=f"{ds} IVF{v['nlist']} ({v['bytes_per_vector']} B) R@1@{k}")
        for r in v["sweep"]:
            ax.annotate(str(r["nprobe"]), (r["qps_1t"], r["recall_1_at"]["1"]), fontsize=7)
        for row in e["levels"].get(v["bits"], e["levels"].get(str(v["bits"]), [])):
            if row["method"] == "ours":
                rec = {str(a): b for a, b in row["recall_1_at"].items()}
                ax.plot([row["qps_1t"]], [rec["1"]], "k*", ms=10, label=f"{ds} flat ours R@1@1")
    ax.set_xlabel("queries/s (1 thread, batch of 500)")
    ax.set_ylabel("recall")
    ax.set_xscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--datasets", default="minilm", help="comma list: minilm, synth1536, synth3072")
    ap.add_argument("--n", type=int, default=50_000, help="database size (minilm: a prefix of the cached set)")
    ap.add_argument("--bits", default="4,2")
    ap.add_argument("--methods", default="", help="comma list of method-name prefixes to run (default all)")
    ap.add_argument("--pq-train", type=int, default=65_536, help="training sample of IndexPQ (FAISS's own cap)")
    ap.add_argument("--no-pq", action="store_true", help="skip IndexPQ 8-bit (its training takes many minutes)")
    ap.add_argument("--build-threads", type=int, default=1, help="threads for train + add (all methods)")
    ap.add_argument("--queries", type=int, default=0, help="use only the first N queries (0: all)")
    ap.add_argument("--ivf-nlist", type=int, default=0, help="also sweep nprobe of TurboQuantIVFIndex (4 bits)")
    ap.add_argument("--qps-repeats", type=int, default=2, help="best of this many timed batches")
    ap.add_argument("--no-qps-2t", dest="qps_2t", action="store_false", help="skip the 2-thread timing")
    ap.add_argument("--name", default="search")
    args = ap.parse_args(argv)
    wanted = [w for w in args.methods.split(",") if w]
    global QPS_REPEATS
    QPS_REPEATS = args.qps_repeats
    results = {}
    for ds in args.datasets.split(","):
        x, q = dataset(ds, args.n)
        if args.queries:
            q = q[: args.queries]
        gt = ground_truth(x, q)
        print(f"{ds}: n={len(x)} d={x.shape[1]} queries={len(q)}", flush=True)
        set_threads(1)
        flat = Faiss(x.shape[1], "Flat")
        flat.build(x)
        entry = {"n": len(x), "dim": int(x.shape[1]), "queries": len(q),
                 "flat": {"bytes_per_vector": 4 * x.shape[1], "qps_1t": qps(flat, q, 1),
                          "qps_2t": qps(flat, q, 2) if args.qps_2t else None},
                 "levels": {}}
        for bits in [int(b) for b in args.bits.split(",")]:
            print(f" {bits} bits/dim ({x.shape[1] * bits // 8} B)", flush=True)
            rows = []
            for name, make in methods(x.shape[1], bits, args).items():
                if wanted and not any(name.startswith(w) for w in wanted):
                    continue
                rows.append(run_method(name, make, x, q, gt, args))
                entry["levels"][bits] = rows
                results[ds] = entry
                write_json(args.name, {"datasets": results, "ks": KS, "qps_batch": QPS_BATCH})
        if args.ivf_nlist:
            entry["ivf"] = ivf_sweep(x, q, gt, 4, args.ivf_nlist, args)
        results[ds] = entry
    path = write_json(args.name, {"datasets": results, "ks": KS, "qps_batch": QPS_BATCH})
    written = [str(path)]
    if any(e["levels"] for e in results.values()):
        plot(results, RESULTS / f"{args.name}.png")
        written.append(str(RESULTS / f"{args.name}.png"))
    if any("ivf" in e for e in results.values()):
        plot_ivf(results, RESULTS / f"{args.name}_ivf.png")
        written.append(str(RESULTS / f"{args.name}_ivf.png"))
    print(json.dumps({"written": written}))


if __name__ == "__main__":
    main()
