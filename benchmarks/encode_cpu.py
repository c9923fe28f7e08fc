"""How fast does turbovq encode (quantize + bit-pack) on a CPU, next to FAISS?

Throughput in vectors/s of ``TurboQuantMSE.quantize`` (b = 2, 4) and ``TurboQuantProd.quantize`` (b = 4) for
d = 128 and 1536, against faiss-cpu in the same process on the same data and thread count:
``IndexScalarQuantizer(d, QT_4bit)`` (trained min/max 4-bit SQ, the reference) and FAISS's own TurboQuant,
``index_factory(d, "RR,SQtqmse{2,4}")`` (dense random rotation + TurboQuant codebook, when this faiss has it).
Each encode is warmed up once, then timed ``--repeats`` times (best reported, median kept in the JSON), for
1 and 2 threads (torch.set_num_threads and faiss.omp_set_num_threads). Then a stage-by-stage profile of our
encode at b = 4 (validation, norm, rotation matmul, normalization, scalar quantization, pack).
Writes results/encode_cpu.json and .png.

    python benchmarks/encode_cpu.py            # 200k vectors at d=128, 20k at d=1536
    python benchmarks/encode_cpu.py --quick
"""

from __future__ import annotations

import argparse
import statistics
import time

import faiss
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from _common import RESULTS, busy_processes, write_json

import turbovq as tq
from turbovq import codebook, packing
from turbovq.quantizer import _as_matrix, _chunks


def timed(fn, repeats: int) -> tuple[float, float, float]:
    """Warm up once, then (best, median) wall seconds and the best process CPU seconds over ``repeats`` runs.

    torch and faiss each bring their own libgomp, whose idle workers spin-wait for a while after a parallel
    region; on 2 cores those spinning threads would steal the other library's cores, so every run starts after
    a short pause. CPU seconds (all threads, spin-waits included) are less sensitive to other processes sharing
    the machine; at 1 thread they are the cleaner number when the machine is not idle.
    """
    fn()
    times, cpu = [], []
    for _ in range(repeats):
        time.sleep(0.2)
        t, c = time.perf_counter(), time.process_time()
        fn()
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return min(times), statistics.median(times), min(cpu)


def methods(d: int, x: np.ndarray, train: np.ndarray) -> dict:
    """name -> (bits, encode function, bytes per vector) for everything that can be built here."""
    xt = torch.from_numpy(x)
    out = {}
    for bits in (2, 4):
        q = tq.TurboQuantMSE(d, bits, seed=0)
        out[f"turbovq-mse{bits}"] = (bits, lambda q=q: q.quantize(xt), q.quantize(xt[:1]).nbytes)
    p = tq.TurboQuantProd(d, 4, seed=0)
    out["turbovq-prod4"] = (4, lambda: p.quantize(xt), p.quantize(xt[:1]).nbytes)
    sq = faiss.IndexScalarQuantizer(d, faiss.ScalarQuantizer.QT_4bit)
    sq.train(train)
    out["faiss-SQ4"] = (4, lambda: sq.sa_encode(x), sq.sa_code_size())
    for bits in (4, 2):
        try:
            idx = faiss.index_factory(d, f"RR,SQtqmse{bits}")
            idx.train(train)
        except RuntimeError as e:  # older faiss: no TurboQuant scalar quantizer
            out[f"faiss-RR,SQtqmse{bits}"] = (bits, None, str(e).splitlines()[0])
            continue
        out[f"faiss-RR,SQtqmse{bits}"] = (bits, lambda idx=idx: idx.sa_encode(x), idx.sa_code_size())
    return out


def throughput(dims, ns, threads_list, repeats) -> tuple[list[dict], dict]:
    rows, unavailable = [], {}
    rng = np.random.default_rng(0)
    for d, n in zip(dims, ns):
        x = rng.standard_normal((n, d), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)  # unit rows: FAISS's tqmse stores no norm
        ms = methods(d, x, x[: min(n, 20_000)])
        for threads in threads_list:
            torch.set_num_threads(threads)
            faiss.omp_set_num_threads(threads)
            block = []
            for name, (bits, fn, size) in ms.items():
                if fn is None:
                    unavailable[name] = size
                    continue
                best, med, cpu = timed(fn, repeats)
                block.append(
                    {
                        "dim": d,
                        "bits": bits,
                        "method": name,
                        "threads": threads,
                        "n": n,
                        "vectors_per_s": n / best,
                        "vectors_per_s_median": n / med,
                        "vectors_per_cpu_s": n / cpu,
                        "bytes_per_vector": size,
                    }
                )
            ref = next(r["vectors_per_s"] for r in block if r["method"] == "faiss-SQ4")
            tqmse = {r["bits"]: r["vectors_per_s"] for r in block if r["method"].startswith("faiss-RR,SQtqmse")}
            for r in block:
                r["ratio_vs_faiss_sq4"] = r["vectors_per_s"] / ref
                r["ratio_vs_faiss_tqmse_same_bits"] = r["vectors_per_s"] / tqmse[r["bits"]] if tqmse else None
                print(
                    f"d={d:5d} t={threads} {r['method']:20s} {r['vectors_per_s']:12,.0f} vec/s  "
                    f"x{r['ratio_vs_faiss_sq4']:.2f} vs SQ4",
                    flush=True,
                )
            rows += block
    return rows, unavailable


def profile(d: int, bits: int, n: int, threads: int, repeats: int) -> dict:
    """Seconds per stage of TurboQuantMSE.quantize, replaying its steps (quantizer.py: quantize, _Group.encode),
    plus torch.profiler's top operators of one real quantize() call (independent of the replay)."""
    torch.set_num_threads(threads)
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(0))
    q = tq.TurboQuantMSE(d, bits, seed=0)
    (g,) = q._groups
    assert g.whole, "the replay below assumes one group over all channels"
    a, _, bounds, _ = g.tensors(x.device)
    names = ["validate (_as_matrix)", "norm", "rotate (x @ A)", "normalize (div_)", "quantize_coordinates", "pack"]
    stages = dict.fromkeys([*names, "norms dtype + torch.cat"], 0.0)
    clock = [0.0]

    def lap(name):  # charge the time since the previous lap to stage `name`
        now = time.perf_counter()
        stages[name] += now - clock[0]
        clock[0] = now

    def run():
        clock[0] = time.perf_counter()
        xm = _as_matrix(x, d)[0]
        lap("validate (_as_matrix)")
        parts = []
        for sl in _chunks(n, d):
            xc = xm[sl]
            norms = torch.linalg.vector_norm(xc, dim=1)
            lap("norm")
            y = xc @ a
            lap("rotate (x @ A)")
            y.div_(norms.clamp_min(1e-30)[:, None])
            lap("normalize (div_)")
            codes = codebook.quantize_coordinates(y, bounds)
            lap("quantize_coordinates")
            parts.append((packing.pack(codes, bits), norms))
            lap("pack")
        torch.cat([p for p, _ in parts]), torch.cat([q._norms_out(m) for _, m in parts])
        lap("norms dtype + torch.cat")

    run()  # warm-up
    stages = dict.fromkeys(stages, 0.0)
    for _ in range(repeats):
        time.sleep(0.2)
        run()
    stages = {k: v / repeats for k, v in stages.items()}
    total = sum(stages.values())
    actual, _, _ = timed(lambda: q.quantize(x), repeats)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        q.quantize(x)
    ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:8]
    top_ops = [{"op": e.key, "calls": e.count, "self_cpu_ms": e.self_cpu_time_total / 1e3} for e in ops]
    print(
        f"\nprofile d={d} b={bits} n={n:,} threads={threads}: sum of stages {total * 1e3:.1f} ms, "
        f"quantize() best {actual * 1e3:.1f} ms ({n / actual:,.0f} vec/s)"
    )
    for k, v in stages.items():
        print(f"  {k:28s} {v * 1e3:8.1f} ms  {100 * v / total:5.1f}%")
    print(
        "  torch.profiler, top self-CPU ops of one quantize(): "
        + ", ".join(f"{o['op']} {o['self_cpu_ms']:.0f} ms" for o in top_ops[:5])
    )
    return {
        "dim": d,
        "bits": bits,
        "n": n,
        "threads": threads,
        "quantize_best_s": actual,
        "stages_s": stages,
        "stages_share": {k: v / total for k, v in stages.items()},
        "torch_profiler_top_ops": top_ops,
    }


def plot(rows: list[dict], path) -> None:
    groups = sorted({(r["dim"], r["threads"]) for r in rows})
    names = list(dict.fromkeys(r["method"] for r in rows))
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(11, 4.8))
    for i, name in enumerate(names):
        vals = [
            next((r["vectors_per_s"] for r in rows if (r["dim"], r["threads"]) == g and r["method"] == name), 0)
            for g in groups
        ]
        ax.bar(np.arange(len(groups)) + (i - (len(names) - 1) / 2) * width, vals, width, label=name)
    ax.set_xticks(np.arange(len(groups)), [f"d={d}\n{t} thread{'s' * (t > 1)}" for d, t in groups])
    ax.set_yscale("log")
    ax.set_ylabel("vectors / s (encode, higher is better)")
    ax.set_title("CPU encode throughput: turbovq vs faiss-cpu")
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def markdown(rows: list[dict]) -> str:
    lines = [
        "| d | threads | method | bytes/vec | vectors/s | vs FAISS SQ4 | vs FAISS RR,SQtqmse (same b) |",
        "|---:|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        tq_ratio = r["ratio_vs_faiss_tqmse_same_bits"]
        lines.append(
            f"| {r['dim']} | {r['threads']} | {r['method']} | {r['bytes_per_vector']} | "
            f"{r['vectors_per_s']:,.0f} | {r['ratio_vs_faiss_sq4']:.2f}x | "
            f"{'-' if tq_ratio is None else f'{tq_ratio:.2f}x'} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dims", type=int, nargs="+", default=[128, 1536])
    ap.add_argument("--n", type=int, nargs="+", default=[200_000, 20_000], help="vectors per dim (one per --dims)")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="smoke run: 20k / 2k vectors, 1 repeat")
    args = ap.parse_args()
    if args.quick:
        args.n, args.repeats = [20_000, 2_000], 1

    busy = busy_processes()
    if busy:
        print("WARNING: other processes are using the CPU, timings will be skewed:\n  " + "\n  ".join(busy))
    rows, unavailable = throughput(args.dims, args.n, args.threads, args.repeats)
    profiles = [profile(d, 4, n, t, args.repeats) for d, n in zip(args.dims, args.n) for t in args.threads]

    name = "encode_cpu_quick" if args.quick else "encode_cpu"
    RESULTS.mkdir(parents=True, exist_ok=True)
    plot(rows, RESULTS / f"{name}.png")
    settings = {
        "repeats": args.repeats,
        "timing": "best of repeats after 1 warm-up, 0.2 s pause before each",
        "data": "unit gaussian rows, float32",
        "faiss_unavailable": unavailable,
        "busy_processes_at_start": busy,
        "busy_processes_at_end": busy_processes(),
    }
    path = write_json(name, {"settings": settings, "rows": rows, "profile": profiles})
    print()
    print(markdown(rows))
    print(f"\nwrote {path} and {path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
