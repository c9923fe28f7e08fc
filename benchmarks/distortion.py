"""Does turbovq reach the distortion TurboQuant promises?

For random unit vectors x (and independent uniform unit queries y) this measures, for b = 1..8 bits:

* D_mse  = E ||x - x_hat||^2                       (TurboQuantMSE)
* D_prod = d * E[(<y, x> - estimate)^2]            (TurboQuantProd, unbiased inner products)

next to the exact theory of this implementation (``codebook.mse_distortion`` / ``prod_distortion``) and the
paper's bounds: lower 4^-b (any quantizer, both metrics), upper sqrt(3)*pi/2 * 4^-b (Theorem 1, D_mse) and
sqrt(3)*pi^2 * 4^-b (Theorem 2, D_prod scaled by d). Writes results/distortion.json and .png.

    python benchmarks/distortion.py            # d=128: 20k vectors, d=1536: 5k vectors, 8 queries per vector
    python benchmarks/distortion.py --quick
"""

from __future__ import annotations

import argparse
import math
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from _common import RESULTS, write_json

import turbovq as tq
from turbovq.codebook import mse_distortion, prod_distortion


def unit(n: int, d: int, gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(n, d, generator=gen)
    return x / torch.linalg.vector_norm(x, dim=1, keepdim=True)


def measure(dim: int, bits: int, n: int, queries: int, rotation: str, seed: int, block: int = 256) -> dict:
    gen = torch.Generator().manual_seed(seed * 1000 + dim)
    x = unit(n, dim, gen)

    q = tq.TurboQuantMSE(dim, bits, seed=seed, rotation=rotation)
    d_mse = (x - q.dequantize(q.quantize(x))).pow(2).sum(1)

    # D_prod: each block of x meets `queries` fresh y per vector; every (x_i, y_j) pair of the block is an
    # independent (x, y) sample, so all block*block*queries estimates are used.
    p = tq.TurboQuantProd(dim, bits, seed=seed, rotation=rotation)
    sq_err, count = 0.0, 0
    for lo in range(0, n, block):
        xb = x[lo : lo + block]
        y = unit(len(xb) * queries, dim, gen)
        err = p.inner_product(p.quantize(xb), y) - xb @ y.T
        sq_err += float(err.double().pow(2).sum())
        count += err.numel()
    lower, upper = tq.distortion_bounds(bits)
    return {
        "dim": dim,
        "bits": bits,
        "d_mse_measured": float(d_mse.double().mean()),
        "d_mse_stderr": float(d_mse.double().std() / math.sqrt(n)),
        "d_mse_theory": mse_distortion(dim, bits),
        "d_prod_measured": dim * sq_err / count,
        "d_prod_theory": prod_distortion(dim, bits),
        "lower": lower,
        "upper": upper,
        "prod_upper": math.sqrt(3) * math.pi**2 * 4.0**-bits,
        "n_vectors": n,
        "n_prod_pairs": count,
    }


def plot(rows: list[dict], dims: list[int], path) -> None:
    fig, axes = plt.subplots(1, len(dims), figsize=(6 * len(dims), 4.6), squeeze=False)
    for ax, d in zip(axes[0], dims):
        r = [row for row in rows if row["dim"] == d]
        b = [row["bits"] for row in r]
        ax.semilogy(b, [row["d_mse_theory"] for row in r], "-", color="C0", label="D_mse theory (exact)")
        ax.semilogy(b, [row["d_mse_measured"] for row in r], "o", color="C0", label="D_mse measured")
        ax.semilogy(b, [row["d_prod_theory"] for row in r], "-", color="C1", label="d·D_prod theory (exact)")
        ax.semilogy(b, [row["d_prod_measured"] for row in r], "s", color="C1", label="d·D_prod measured")
        ax.semilogy(b, [row["upper"] for row in r], "--", color="C3", label="upper √3π/2·4^-b (mse)")
        ax.semilogy(b, [row["prod_upper"] for row in r], ":", color="C3", label="upper √3π²·4^-b (prod)")
        ax.semilogy(b, [row["lower"] for row in r], "--", color="k", label="lower 4^-b")
        ax.set(title=f"d = {d}", xlabel="bits per coordinate b", ylabel="distortion", xticks=b)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("TurboQuant distortion vs bit-width (unit x, uniform unit y)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def markdown(rows: list[dict], max_bits: int) -> str:
    lines = [
        "| d | b | D_mse measured | D_mse theory | d·D_prod measured | d·D_prod theory | lower 4^-b "
        "| upper √3π/2·4^-b |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r["bits"] <= max_bits:
            lines.append(
                f"| {r['dim']} | {r['bits']} | {r['d_mse_measured']:.4g} | {r['d_mse_theory']:.4g} | "
                f"{r['d_prod_measured']:.4g} | {r['d_prod_theory']:.4g} | {r['lower']:.4g} | {r['upper']:.4g} |"
            )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dims", type=int, nargs="+", default=[128, 1536])
    ap.add_argument("--bits", type=int, nargs="+", default=list(range(1, 9)))
    ap.add_argument("--n", type=int, nargs="+", default=[20_000, 5_000], help="vectors per dim (one per --dims)")
    ap.add_argument("--queries", type=int, default=8, help="fresh unit y per x for D_prod")
    ap.add_argument("--rotation", default="hadamard", choices=["hadamard", "haar"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--table-bits", type=int, default=4, help="bits shown in the printed markdown table")
    ap.add_argument("--quick", action="store_true", help="smoke run: 2k / 500 vectors, b = 1..4")
    args = ap.parse_args()
    if args.quick:
        args.n, args.bits, args.queries = [2_000, 500], [b for b in args.bits if b <= 4], 2
    ns = dict(zip(args.dims, args.n if len(args.n) == len(args.dims) else args.n[:1] * len(args.dims)))

    rows = []
    for d in args.dims:
        for b in args.bits:
            t = time.perf_counter()
            rows.append(measure(d, b, ns[d], args.queries, args.rotation, args.seed))
            r = rows[-1]
            print(
                f"d={d:5d} b={b}  mse {r['d_mse_measured']:.5g} (theory {r['d_mse_theory']:.5g})  "
                f"prod {r['d_prod_measured']:.5g} (theory {r['d_prod_theory']:.5g})  "
                f"[{time.perf_counter() - t:.1f}s]",
                flush=True,
            )

    name = "distortion_quick" if args.quick else "distortion"
    RESULTS.mkdir(parents=True, exist_ok=True)
    plot(rows, args.dims, RESULTS / f"{name}.png")
    settings = {"rotation": args.rotation, "seed": args.seed, "queries_per_vector": args.queries, "n_vectors": ns}
    path = write_json(name, {"settings": settings, "rows": rows})
    print()
    print(markdown(rows, args.table_bits))
    print(f"\nwrote {path} and {path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
