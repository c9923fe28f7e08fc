"""KV-cache quality on real LLMs: TurboQuantCache vs full precision and transformers' quanto QuantizedCache.

Perplexity, mean KL(full || method) and top-1 agreement of next-token distributions, with the continuation fed
*through* each cache after a prefilled prefix (so quantization error propagates as in generation), plus
needle-in-a-haystack pass-key retrieval; bytes per token for each. Needs the models prepared first:
``turbovq kv prepare-models``. Writes results/kv_<tag>.json, .md and .png.

    python benchmarks/kv_quality.py --model smollm2-135m --prefix 1024 --continuation 512 --tag smollm2
    python benchmarks/kv_quality.py --quick        # 512 + 256 tokens, a few methods (minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from _common import RESULTS, busy_processes, write_json

from turbovq.kv import eval as kv_eval

QUICK_METHODS = ["full", "quanto-int4", "quanto-int2", "tq-k4v4", "tq-k3.5v3.5", "tq-k3v3", "tq-k2.5v2.5"]


def plot(report: dict, path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, r in report["quality"].items():
        if r.get("error") or name == "full":
            continue
        color = "tab:red" if name.startswith("quanto") else "tab:blue"
        ax.scatter(r["steady_bytes_per_token_fp16"], max(r["kl"], 1e-6), color=color)
        ax.annotate(name, (r["steady_bytes_per_token_fp16"], max(r["kl"], 1e-6)), fontsize=7)
    full = report["quality"].get("full")
    if full:
        ax.axvline(full["steady_bytes_per_token_fp16"], color="gray", ls=":", label="full precision (fp16) bytes")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("steady-state KV bytes per token (all layers, fp16 model)")
    ax.set_ylabel("mean KL(full || cache) per token")
    ax.set_title(f"{report['model']}: KV-cache quality vs memory (blue: TurboQuant, red: quanto)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--methods", default=None, help="comma-separated (default: all)")
    ap.add_argument("--prefix", type=int, default=1024)
    ap.add_argument("--continuation", type=int, default=512)
    ap.add_argument("--segments", type=int, default=1)
    ap.add_argument("--chunk", type=int, default=32)
    ap.add_argument("--residual-length", type=int, default=128)
    ap.add_argument("--needle-lengths", default="", help="comma-separated token lengths; empty skips the needle")
    ap.add_argument("--needle-depths", default="0,0.25,0.5,0.75,1")
    ap.add_argument("--tag", default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--replot", default=None, help="only redraw the plot of an existing results JSON")
    args = ap.parse_args()
    if args.replot:
        path = Path(args.replot)
        plot(json.loads(path.read_text()), path.with_suffix(".png"))
        return
    methods = args.methods.split(",") if args.methods else None
    if args.quick:
        args.prefix, args.continuation, methods = 512, 256, methods or QUICK_METHODS
    busy = busy_processes()
    report = kv_eval.evaluate(
        args.model,
        methods=methods,
        prefix_len=args.prefix,
        continuation=args.continuation,
        segments=args.segments,
        chunk=args.chunk,
        needle_lengths=[int(x) for x in args.needle_lengths.split(",") if x] or None,
        needle_depths=[float(x) for x in args.needle_depths.split(",") if x],
        residual_length=args.residual_length,
    )
    report["busy_processes_at_start"] = busy
    tag = args.tag or (args.model + ("_quick" if args.quick else ""))
    path = write_json(f"kv_{tag}", report)
    table = kv_eval.format_table(report)
    (RESULTS / f"kv_{tag}.md").write_text(table + "\n")
    if report["quality"]:
        plot(report, RESULTS / f"kv_{tag}.png")
    print(table)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
