"""Batched search on a GPU vs FAISS on the CPU cores of the same machine, in one run.

``TurboQuantIndex(...).to("cuda")`` scores tiles of codes with bf16 matrix products on the GPU. The baseline is
the CPU figure the issue names: FAISS ``IndexPQFastScan`` (4-bit sub-quantizers, same bytes/vector), at 1 thread
and at every core of the host. Data: seeded anisotropic unit vectors (d = 384, MiniLM-sized), so the run needs no
download; recall is reported against exact search to show the GPU path returns the same quality.

Run on a GPU machine (faiss-cpu optional; without it only our numbers are written)::

    PYTHONPATH=src python3 benchmarks/search_gpu.py --n 50000,1000000 --out benchmarks/results/search_gpu.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from turbovq import TurboQuantIndex


def dataset(n: int, m: int, dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors with a decaying spectrum (as sentence embeddings have) and queries near database points."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    scale = torch.linspace(1.0, 0.05, dim) ** 1.5
    x = torch.randn(n, dim, generator=g) * scale + 0.3 * scale * torch.randn(1, dim, generator=g)
    x = x / x.norm(dim=1, keepdim=True)
    q = x[torch.randint(0, n, (m,), generator=g)] + 0.05 * torch.randn(m, dim, generator=g) * scale
    q = q / q.norm(dim=1, keepdim=True)
    return x.numpy(), q.numpy()


def recall_at_1(ids: np.ndarray, truth: np.ndarray, k: int) -> float:
    return float(np.mean([truth[i] in ids[i, :k] for i in range(len(ids))]))


def timed(fn, repeat: int = 3, sync=None) -> float:
    fn()  # warm-up (kernels, caches)
    best = float("inf")
    for _ in range(repeat):
        if sync:
            sync()
        t = time.perf_counter()
        fn()
        if sync:
            sync()
        best = min(best, time.perf_counter() - t)
    return best


def measure(n: int, args, faiss) -> dict:
    """One database size: ours on the GPU (index time, recall, q/s) and FAISS PQFastScan on the CPU cores."""
    sync = torch.cuda.synchronize
    x, q = dataset(n, max(args.queries, args.big_batch), args.dim)
    qb = q[: args.queries]
    xt, qt = torch.from_numpy(x).cuda(), torch.from_numpy(q).cuda()
    truth = torch.cat([(qt[i : i + 1000] @ xt.T).argmax(dim=1) for i in range(0, len(qt), 1000)]).cpu().numpy()
    del xt, qt
    row = {"n": n, "dim": args.dim, "bits": args.bits, "batch": args.queries, "big_batch": args.big_batch}

    t = time.perf_counter()
    idx = TurboQuantIndex(args.dim, args.bits).to("cuda")
    idx.add(x)
    sync()
    row["ours_gpu_index_s"] = time.perf_counter() - t
    row["bytes_per_vector"] = idx.code_size
    _, ids = idx.search(qb, args.k)
    row["ours_gpu_recall_1_at_1"] = recall_at_1(ids, truth, 1)
    row["ours_gpu_recall_1_at_10"] = recall_at_1(ids, truth, 10)
    row["ours_gpu_qps"] = args.queries / timed(lambda: idx.search(qb, args.k), sync=sync)
    big = q[: args.big_batch]
    row["ours_gpu_qps_big_batch"] = args.big_batch / timed(lambda: idx.search(big, args.k), sync=sync)
    if faiss is None:
        return row
    t = time.perf_counter()
    pq = faiss.IndexPQFastScan(args.dim, 2 * (int(args.dim * args.bits) // 8), 4, faiss.METRIC_INNER_PRODUCT)
    pq.train(x[: min(n, 65_536)])  # 4-bit sub-quantizers: the same bytes/vector as ours
    pq.add(x)
    row["faiss_pqfs_index_s"] = time.perf_counter() - t
    row["faiss_pqfs_bytes_per_vector"] = pq.code_size
    _, ids = pq.search(qb, args.k)
    row["faiss_pqfs_recall_1_at_1"] = recall_at_1(ids, truth, 1)
    all_threads = faiss.omp_get_max_threads()
    for threads, key in ((1, "faiss_pqfs_qps_1t"), (all_threads, "faiss_pqfs_qps_all")):
        faiss.omp_set_num_threads(threads)
        row[key] = args.queries / timed(lambda: pq.search(qb, args.k))
    faiss.omp_set_num_threads(all_threads)
    row["faiss_threads_all"] = all_threads
    row["gpu_vs_faiss_1t"] = row["ours_gpu_qps"] / row["faiss_pqfs_qps_1t"]
    row["gpu_vs_faiss_all"] = row["ours_gpu_qps"] / row["faiss_pqfs_qps_all"]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", default="50000,1000000", help="comma-separated database sizes")
    ap.add_argument("--queries", type=int, default=500, help="batch size (the issue's batch: 500)")
    ap.add_argument("--big-batch", type=int, default=10_000, help="a second, larger batch for the GPU")
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--bits", type=float, default=4)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--out", default="benchmarks/results/search_gpu.json")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")
    try:
        import faiss
    except ImportError:
        faiss = None
    report = {
        "command": "python benchmarks/search_gpu.py "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
        "gpu": torch.cuda.get_device_name(),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "faiss": getattr(faiss, "__version__", None),
        "rows": [],
    }
    for n in [int(v) for v in args.n.split(",")]:
        row = measure(n, args, faiss)
        print(json.dumps(row), flush=True)
        report["rows"].append(row)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
