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
import time

from _common import RESULTS, write_json

from turbovq.cli import measure, plot


def markdown(rows: list[dict], max_bits: int) -> str:
    lines = [
        "| d | b | D_mse measured | D_mse theory | d·D_prod measured | d·D_prod theory | lower 4^-b "
        "| upper √3π/2·4^-b |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r["bits"] <= max_bits:
            lines.append(
                f"| {r['dim']} | {r['bits']} | {r['d_mse']:.4g} | {r['d_mse_theory']:.4g} | "
                f"{r['d_prod']:.4g} | {r['d_prod_theory']:.4g} | {r['lower']:.4g} | {r['upper']:.4g} |"
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
            rows += measure(d, [b], ns[d], seed=args.seed, rotation=args.rotation, queries=args.queries)
            r = rows[-1]
            print(
                f"d={d:5d} b={b}  mse {r['d_mse']:.5g} (theory {r['d_mse_theory']:.5g})  "
                f"prod {r['d_prod']:.5g} (theory {r['d_prod_theory']:.5g})  IP slope prod {r['ip_slope_prod']:.3f}  "
                f"[{time.perf_counter() - t:.1f}s]",
                flush=True,
            )

    name = "distortion_quick" if args.quick else "distortion"
    RESULTS.mkdir(parents=True, exist_ok=True)
    plot(rows, RESULTS / f"{name}.png", "TurboQuant")
    settings = {"rotation": args.rotation, "seed": args.seed, "queries_per_vector": args.queries, "n_vectors": ns}
    path = write_json(name, {"settings": settings, "rows": rows})
    print()
    print(markdown(rows, args.table_bits))
    print(f"\nwrote {path} and {path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
