"""Does building scale out, and does a streaming build stay within a memory cap?

1. Encode throughput of 1M x 384 float32 vectors (random, seeded, written to a temporary .npy and read back in
   chunks of 65,536 rows), in one run each: the plain in-process ``TurboQuantIndex`` (torch's default threads, and
   1 thread), and a ``ShardedIndex`` on a local Ray with 1 and with 2 shard workers (1 thread each). Every path
   trains on the same 20k-row sample first (timed apart); the timed part is reading + encoding every chunk. Ray's
   actor start-up is timed apart too (``ShardedIndex.start``).
2. Peak memory of a streaming build (``turbovq.search.stream.build_index`` with a checkpoint after every chunk) of
   a dataset twice as large as a memory cap set here (1 GiB): a directory of two .npy files, 2 GiB of float32 in
   all, read in chunks of cap/16. Measured in a fresh child process as its peak resident set size, ``VmHWM`` of
   ``/proc/self/status`` (imports included), with a psutil trace of RSS over time for the plot. Not
   ``ru_maxrss``: on Linux a child started by fork + exec inherits the parent's RSS at the fork as its ru_maxrss
   (the benchmark's parent holds GBs by then). The cap is not enforced by the OS: it sets the chunk size, and the
   result says whether the peak stayed under it. One torch thread (see below).

The machine is shared with other work: the JSON records the load average before and after every run and the
processes using CPU. Writes results/scale.json and results/scale.png.

    python benchmarks/scale.py                       # 1M x 384, cap 1 GiB (needs ~4 GB of temporary disk)
    python benchmarks/scale.py --n 100000 --cap-mib 128   # a quick check of the script
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from _common import RESULTS, busy_processes, write_json

from turbovq.search import TurboQuantIndex
from turbovq.search.stream import build_index, open_source, training_rows

DIM, BITS, SEED, CHUNK = 384, 4, 0, 65_536


def make_data(path: Path, n: int, seed: int) -> None:
    """Seeded Gaussian rows with a decaying spectrum (so the PCA mode has something to learn), written in chunks."""
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, DIM))
    rng = np.random.default_rng(seed)
    scale = np.exp(-0.01 * np.arange(DIM)).astype(np.float32)
    for lo in range(0, n, CHUNK):
        hi = min(n, lo + CHUNK)
        out[lo:hi] = rng.standard_normal((hi - lo, DIM), dtype=np.float32) * scale
    out.flush()
    del out


def encode_run(name: str, path: Path, make_index) -> dict:
    """Train on the sample, start the workers, then time reading + adding every chunk."""
    load_before = os.getloadavg()
    src = open_source(path)
    idx = make_index()
    t0 = time.perf_counter()
    idx.train(src.take(training_rows(src.n, 20_000)))
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    if hasattr(idx, "start"):
        idx.start()
    startup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _, x in src.iter_chunks(CHUNK):
        idx.add(x)
    encode_s = time.perf_counter() - t0
    assert len(idx) == src.n
    row = {"name": name, "n": src.n, "train_s": train_s, "startup_s": startup_s, "encode_s": encode_s,
           "vectors_per_s": src.n / encode_s, "loadavg_before": load_before, "loadavg_after": os.getloadavg()}
    if hasattr(idx, "close"):
        idx.close()
    print(f"{name:28s} {row['vectors_per_s']:>10,.0f} vectors/s  ({encode_s:.1f} s; start-up {startup_s:.1f} s, "
          f"load {row['loadavg_before'][0]:.1f})", flush=True)
    return row


def child_stream(src_dir: str, out: str, chunk_rows: int) -> None:
    """Run in a fresh process: stream-build the directory, report peak RSS and an RSS trace as JSON on stdout."""
    import psutil

    torch.set_num_threads(1)  # on this shared 2-core machine 2 threads run several times slower (see throughput)
    proc, trace, done = psutil.Process(), [], threading.Event()
    t_start = time.perf_counter()

    def sample():
        while not done.is_set():
            trace.append((time.perf_counter() - t_start, proc.memory_info().rss))
            time.sleep(0.1)

    base_rss = proc.memory_info().rss  # after importing torch and turbovq
    threading.Thread(target=sample, daemon=True).start()
    t0 = time.perf_counter()
    idx = build_index(src_dir, out, TurboQuantIndex(DIM, BITS, seed=SEED), chunk_rows=chunk_rows, progress=False)
    seconds = time.perf_counter() - t0
    done.set()
    status = Path("/proc/self/status").read_text()
    peak = int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1]) * 1024
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"peak_rss_bytes": peak, "ru_maxrss_bytes_includes_parent_at_fork": maxrss,
                      "rss_after_imports_bytes": base_rss, "seconds": seconds,
                      "ntotal": len(idx), "index_file_bytes": os.path.getsize(out), "code_size": idx.code_size,
                      "torch_threads": torch.get_num_threads(), "rss_trace": trace}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--cap-mib", type=int, default=1024, help="memory cap; the streaming dataset is twice this")
    ap.add_argument("--tmp", default=None, help="directory for the temporary data (default: the system's)")
    ap.add_argument("--child-stream", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_stream:
        return child_stream(args.child_stream[0], args.child_stream[1], int(args.child_stream[2]))

    import ray

    from turbovq.search.distributed import ShardedIndex

    busy_start = busy_processes()
    with tempfile.TemporaryDirectory(dir=args.tmp, prefix="turbovq-scale-") as tmp:
        tmp = Path(tmp)
        data = tmp / "x.npy"
        t0 = time.perf_counter()
        make_data(data, args.n, SEED)
        print(f"wrote {data} ({data.stat().st_size / 2**30:.2f} GiB) in {time.perf_counter() - t0:.1f} s", flush=True)

        # 1. throughput --------------------------------------------------------------------------------------------
        default_threads = torch.get_num_threads()
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        runs = []
        for workers in (1, 2):
            runs.append(encode_run(f"ray, {workers} worker{'s' * (workers > 1)} x 1 thread", data,
                                   lambda w=workers: ShardedIndex(DIM, BITS, seed=SEED, num_shards=w)))
        ray.shutdown()
        torch.set_num_threads(1)
        runs.append(encode_run("in-process, 1 thread", data, lambda: TurboQuantIndex(DIM, BITS, seed=SEED)))
        torch.set_num_threads(default_threads)
        runs.append(encode_run(f"in-process, {default_threads} threads (default)", data,
                               lambda: TurboQuantIndex(DIM, BITS, seed=SEED)))
        one_thread = next(r for r in runs if r["name"] == "in-process, 1 thread")["vectors_per_s"]
        for r in runs:
            r["ratio_vs_in_process_default_threads"] = r["vectors_per_s"] / runs[-1]["vectors_per_s"]
            r["ratio_vs_in_process_1_thread"] = r["vectors_per_s"] / one_thread
        one_worker, two_workers = runs[0]["vectors_per_s"], runs[1]["vectors_per_s"]

        # 2. streaming build under a memory cap --------------------------------------------------------------------
        cap = args.cap_mib << 20
        big = tmp / "stream"
        big.mkdir()
        rows_needed = -(-2 * cap // (4 * DIM))  # 2x the cap in float32 rows
        first = min(args.n, rows_needed)
        os.symlink(data, big / "a.npy")  # the throughput file, plus a second file for the rest
        if rows_needed > first:
            make_data(big / "b.npy", rows_needed - first, SEED + 1)
        dataset_bytes = rows_needed * 4 * DIM
        chunk_rows = cap // 16 // (4 * DIM)
        load_before = os.getloadavg()
        proc = subprocess.run([sys.executable, __file__, "--child-stream", str(big), str(tmp / "stream.tvq"),
                               str(chunk_rows)], capture_output=True, text=True, check=True)
        mem = json.loads(proc.stdout.strip().splitlines()[-1])
        trace = mem.pop("rss_trace")
        mem.update({
            "method": "peak RSS of a fresh child process: VmHWM in /proc/self/status (imports included); trace: "
                      "psutil RSS every 0.1 s. ru_maxrss is not used: after fork + exec it starts at the parent's RSS",
            "cap_bytes": cap, "dataset_bytes": dataset_bytes, "dataset_over_cap": dataset_bytes / cap,
            "rows": rows_needed, "chunk_rows": chunk_rows, "chunk_input_bytes": chunk_rows * 4 * DIM,
            "checkpoint_every_chunks": 1, "codes_in_memory_bytes": rows_needed * (mem["code_size"] + 8),
            "peak_under_cap": mem["peak_rss_bytes"] < cap, "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
        })
        print(f"streaming build of {dataset_bytes / 2**30:.2f} GiB with a {cap / 2**30:.2f} GiB cap: peak RSS "
              f"{mem['peak_rss_bytes'] / 2**20:,.0f} MiB ({mem['seconds']:.1f} s)", flush=True)

    payload = {
        "settings": {"dim": DIM, "bits": BITS, "seed": SEED, "mode": "pca (default)", "chunk_rows": CHUNK,
                     "data": "seeded Gaussian rows with a decaying spectrum, float32 .npy in a temporary directory",
                     "timing": "one run each; encode_s = reading + encoding every chunk (training and Ray start-up "
                               "timed apart)",
                     "machine_note": "2-core CPU VM shared with other work (see loadavg per run and busy processes)",
                     "busy_processes_at_start": busy_start, "busy_processes_at_end": busy_processes()},
        "throughput": runs,
        "ray_2_vs_1_workers": two_workers / one_worker,
        "streaming_memory": mem,
    }
    path = write_json("scale", payload)
    plot(runs, mem, trace, RESULTS / "scale.png")
    print(f"wrote {path} and scale.png")


def plot(runs: list[dict], mem: dict, trace: list, path: Path) -> None:
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.2))
    names = [r["name"] for r in runs]
    vals = [r["vectors_per_s"] / 1e3 for r in runs]
    a.barh(names, vals, color=["#4a7", "#2a5", "#aaa", "#888"])
    for i, v in enumerate(vals):
        a.text(v, i, f" {v:,.0f}k", va="center")
    a.set_xlabel("thousand vectors / s (1M x 384, 4 bits, pca)")
    a.set_title("encode throughput (one run, shared 2-core CPU)")
    a.invert_yaxis()
    if trace:
        t, rss = zip(*trace)
        b.plot(t, np.array(rss) / 2**20, label="RSS (psutil)")
    b.axhline(mem["cap_bytes"] / 2**20, color="r", ls="--", label=f"cap {mem['cap_bytes'] / 2**30:.0f} GiB")
    b.axhline(mem["peak_rss_bytes"] / 2**20, color="k", ls=":", label="peak (VmHWM)")
    b.set_xlabel("seconds")
    b.set_ylabel("MiB")
    b.set_title(f"streaming build of {mem['dataset_bytes'] / 2**30:.1f} GiB of float32")
    b.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
