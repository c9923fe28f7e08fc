"""The ``turbovq`` command: demo, theory tables, and quantizing ``.npy`` files."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import typer

import turbovq as tq
from turbovq import codebook
from turbovq.kv.cli import kv_app
from turbovq.search.cli import index_app

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
app.add_typer(index_app, name="index")
app.add_typer(kv_app, name="kv")


def measure(
    dim: int, bits_list, n: int, seed: int = 0, rotation: str = "hadamard", queries: int = 8, block: int = 256
) -> list[dict]:
    """Measured vs exact distortion of TurboQuant_mse/prod on ``n`` random unit vectors, and the IP bias.

    D_prod: each block of ``block`` vectors meets ``queries`` fresh unit y per vector, and every (x_i, y_j) pair of
    the block is an independent sample, so ``n * block * queries`` estimates are averaged. ``ip_slope_*`` are the
    regression slopes of estimated on true inner products for pairs spread over (-1, 1): 1 means unbiased.
    """
    g = torch.Generator().manual_seed(seed * 1000 + dim)
    x = torch.nn.functional.normalize(torch.randn(n, dim, generator=g), dim=1)
    mix = torch.empty(n, 1).uniform_(-3, 3, generator=g)
    partner = torch.nn.functional.normalize(mix * x + torch.randn(n, dim, generator=g) / math.sqrt(dim), dim=1)
    true_pair = (x * partner).sum(1)
    rows = []
    for bits in bits_list:
        mse = tq.TurboQuantMSE(dim, bits, seed=seed, rotation=rotation)
        prod = tq.TurboQuantProd(dim, bits, seed=seed, rotation=rotation)
        cm, cp = mse.quantize(x), prod.quantize(x)
        xm, xp = mse.dequantize(cm), prod.dequantize(cp)
        d_mse = (x - xm).pow(2).sum(1).double()
        sq_err, count = 0.0, 0
        for lo in range(0, n, block):
            y = torch.nn.functional.normalize(torch.randn(min(block, n - lo) * queries, dim, generator=g), dim=1)
            err = prod.inner_product(cp[lo : lo + block], y) - x[lo : lo + block] @ y.T
            sq_err += float(err.double().pow(2).sum())
            count += err.numel()
        lower, upper = tq.distortion_bounds(bits)
        rows.append(
            {
                "dim": dim,
                "bits": bits,
                "d_mse": float(d_mse.mean()),
                "d_mse_stderr": float(d_mse.std() / math.sqrt(n)),
                "d_mse_theory": codebook.mse_distortion(dim, bits),
                "d_prod": dim * sq_err / count,
                "d_prod_theory": codebook.prod_distortion(dim, bits),
                "lower": lower,
                "upper": upper,
                "upper_prod": math.sqrt(3) * math.pi**2 * lower,  # Theorem 2, scaled by d for unit y
                "ip_slope_mse": _slope((xm * partner).sum(1), true_pair),
                "ip_slope_prod": _slope((xp * partner).sum(1), true_pair),
                "bits_per_coordinate_mse": cm.bits_per_coordinate,
                "bits_per_coordinate_prod": cp.bits_per_coordinate,
                "n_vectors": n,
                "n_prod_pairs": count,
            }
        )
    return rows


def _slope(est: torch.Tensor, true: torch.Tensor) -> float:
    t = true - true.mean()
    return float((t * (est - est.mean())).sum() / t.pow(2).sum())


def plot(rows: list[dict], path: Path, title: str) -> None:
    """The paper's figure: distortion vs bits on a log scale, with the lower and upper bounds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dims = sorted({r["dim"] for r in rows})
    fig, axes = plt.subplots(1, len(dims), figsize=(5.5 * len(dims), 4.2), squeeze=False)
    for ax, dim in zip(axes[0], dims):
        rs = [r for r in rows if r["dim"] == dim]
        b = [r["bits"] for r in rs]
        ax.semilogy(
            b, [r["upper_prod"] for r in rs], "C3--", alpha=0.6, label=r"prod upper bound $\sqrt{3}\pi^2 4^{-b}$"
        )
        ax.semilogy(b, [r["upper"] for r in rs], "k--", label=r"mse upper bound $\frac{\sqrt{3}\pi}{2}4^{-b}$")
        ax.semilogy(b, [r["lower"] for r in rs], "k:", label=r"lower bound $4^{-b}$")
        ax.semilogy(b, [r["d_mse_theory"] for r in rs], "C0-", alpha=0.5, label="mse, exact codebook")
        ax.semilogy(b, [r["d_mse"] for r in rs], "C0o", label=r"mse, measured $E\|x-\hat x\|^2$")
        ax.semilogy(b, [r["d_prod_theory"] for r in rs], "C3-", alpha=0.5, label=r"prod, theory $(\pi/2)D_{mse}(b-1)$")
        ax.semilogy(b, [r["d_prod"] for r in rs], "C3s", label=r"prod, measured $d\,E(\langle y,x\rangle-est)^2$")
        ax.set_xlabel("bits per coordinate")
        ax.set_ylabel("distortion")
        ax.set_title(f"{title}, d = {dim}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _table(rows: list[dict]) -> str:
    head = "  b   D_mse meas  exact   | lower   upper  | D_prod meas  theory | IP slope mse  prod"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['bits']:3d}   {r['d_mse']:.5f}  {r['d_mse_theory']:.5f} | {r['lower']:.5f} {r['upper']:.5f} |"
            f"   {r['d_prod']:.4f}    {r['d_prod_theory']:.4f} |    {r['ip_slope_mse']:.3f}   {r['ip_slope_prod']:.3f}"
        )
    return "\n".join(lines)


def search_recall(dim: int, n: int, queries: int = 200, seed: int = 0) -> list[dict]:
    """Recall@1@k of ``TurboQuantIndex`` (default and the paper's data-oblivious setting) against exact search.

    Data: unit vectors with a decaying spectrum (as real embeddings have; the oblivious quantizer cannot use it,
    the default index can) and fresh queries from the same law. Recall@1@k: the true nearest neighbour is in the
    top k. The same arrays go to both indexes, so the comparison is side by side.
    """
    from turbovq.search import TurboQuantIndex

    g = torch.Generator().manual_seed(seed + 1)
    scale = torch.linspace(1.0, 0.05, dim) ** 1.5
    x = torch.nn.functional.normalize(torch.randn(n, dim, generator=g) * scale, dim=1)
    q = torch.nn.functional.normalize(torch.randn(queries, dim, generator=g) * scale, dim=1)
    truth = (q @ x.T).argmax(dim=1).numpy()
    rows = []
    for bits in (2, 4):
        for name, kw in (("turbovq default", {}), ("paper (oblivious)", {"mode": "oblivious", "fit_norms": False})):
            start = time.perf_counter()
            idx = TurboQuantIndex(dim, bits, seed=seed, **kw)
            idx.add(x.numpy())
            index_s = time.perf_counter() - start
            _, ids = idx.search(q.numpy(), 10)
            hit = ids == truth[:, None]
            rows.append(
                {"method": name, "bits": bits, "bytes_per_vector": idx.code_size, "index_s": index_s,
                 "recall_1_at_1": float(hit[:, 0].mean()), "recall_1_at_10": float(hit.any(1).mean())}
            )  # fmt: skip
    return rows


@app.command()
def demo(
    dim: int = typer.Option(128, help="vector dimension (128 = a typical attention head)"),
    n: int = typer.Option(20_000, help="random unit vectors to quantize"),
    out: Path = typer.Option(Path("turbovq_demo.png"), help="where to write the plot"),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
):
    """Quantize random unit vectors at 1..4 bits (distortion vs the paper's bounds, inner-product bias, a plot),
    then search them: recall of the default index and of the paper's data-oblivious setting vs exact search."""
    start = time.perf_counter()
    rows = measure(dim, range(1, 5), n, queries=1)  # (the benchmark samples 8 fresh queries a vector)
    plot(rows, out, "TurboQuant")
    search = search_recall(dim, n)
    if as_json:
        typer.echo(json.dumps({"distortion": rows, "search": search}, indent=1))
        return
    typer.echo(f"TurboQuant on {n} random unit vectors, d = {dim} (seed 0, randomized Hadamard rotation)\n")
    typer.echo(_table(rows))
    typer.echo(
        "\nD_mse: E||x - x_hat||^2, inside the paper's bounds. D_prod: d E[(<y,x> - estimate)^2].\n"
        "IP slope: estimated vs true inner product; TurboQuant_prod is unbiased (1.0), mse shrinks (1 - D_mse)."
    )
    typer.echo(f"\nNearest-neighbour search: {n} vectors with a decaying spectrum, 200 fresh queries, vs exact search")
    typer.echo(f"{'index':20s} {'bits':>4s} {'bytes':>6s} {'R@1@1':>6s} {'R@1@10':>7s} {'index time':>11s}")
    for r in search:
        typer.echo(
            f"{r['method']:20s} {r['bits']:4d} {r['bytes_per_vector']:6d} {r['recall_1_at_1']:6.3f} "
            f"{r['recall_1_at_10']:7.3f} {r['index_s']:10.2f}s"
        )
    typer.echo(f"\nplot: {out}   ({time.perf_counter() - start:.1f} s)")


@app.command()
def distortion(
    dim: int = typer.Option(128, help="vector dimension"),
    max_bits: int = typer.Option(8, help="largest bit width"),
    as_json: bool = typer.Option(False, "--json"),
):
    """Exact distortion of the Lloyd-Max codebooks (no sampling) next to the paper's bounds."""
    rows = []
    for b in range(1, max_bits + 1):
        lower, upper = tq.distortion_bounds(b)
        rows.append(
            {
                "bits": b,
                "d_mse": codebook.mse_distortion(dim, b),
                "d_prod": codebook.prod_distortion(dim, b),
                "lower": lower,
                "upper": upper,
            }
        )
    if as_json:
        typer.echo(json.dumps({"dim": dim, "rows": rows}, indent=1))
        return
    typer.echo(f"d = {dim}\n  b     D_mse      lower      upper   D_mse/lower   D_prod")
    for r in rows:
        typer.echo(
            f"{r['bits']:3d}  {r['d_mse']:.3e}  {r['lower']:.3e}  {r['upper']:.3e}  {r['d_mse'] / r['lower']:8.3f}"
            f"   {r['d_prod']:.3e}"
        )


@app.command()
def quantize(
    src: Path = typer.Argument(..., help="input .npy of shape (n, dim), float"),
    output: Path = typer.Option(..., "-o", "--output", help="output .tvq file"),
    bits: float = typer.Option(4, help="bits per coordinate (1..8, fractional allowed)"),
    prod: bool = typer.Option(False, "--prod", help="TurboQuant_prod (unbiased inner products)"),
    rotation: str = typer.Option("hadamard", help="hadamard or haar"),
    seed: int = typer.Option(0),
    calibrate: bool = typer.Option(False, help="pick outlier channels by RMS (fractional bits)"),
):
    """Quantize a .npy file of vectors into a .tvq file."""
    x = _load_npy(src)
    cls = tq.TurboQuantProd if prod else tq.TurboQuantMSE
    q = _or_exit(lambda: cls(x.shape[-1], bits, seed=seed, rotation=rotation))
    if calibrate:
        _or_exit(lambda: q.calibrate(x))
    c = _or_exit(lambda: q.quantize(x))
    c.save(output)
    typer.echo(
        f"{output}: {len(c)} vectors, {c.bits_per_coordinate:.3f} bits/coordinate, {c.nbytes} bytes "
        f"({x.nbytes / c.nbytes:.1f}x smaller than the input)"
    )


@app.command()
def dequantize(
    src: Path = typer.Argument(..., help="a .tvq file written by `turbovq quantize`"),
    output: Path = typer.Option(..., "-o", "--output", help="output .npy (float32)"),
):
    """Decode a .tvq file back to a float32 .npy file."""
    c = _or_exit(lambda: tq.QuantizedVectors.load(src))
    x = c.quantizer().dequantize(c)
    np.save(output, x.numpy() if isinstance(x, torch.Tensor) else x)
    typer.echo(f"{output}: {tuple(x.shape)} float32")


@app.command()
def info(src: Path = typer.Argument(..., help="a .tvq file")):
    """Show what a .tvq file holds."""
    c = _or_exit(lambda: tq.QuantizedVectors.load(src))
    typer.echo(repr(c))
    typer.echo(json.dumps(c.config))


def _load_npy(path: Path) -> np.ndarray:
    if not path.exists():
        raise typer.BadParameter(f"{path} does not exist")
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as e:
        raise typer.BadParameter(f"{path} is not a readable .npy file ({e})") from None


def _or_exit(fn):
    try:
        return fn()
    except (ValueError, OSError) as e:
        typer.secho(f"error: {e}", fg="red", err=True)
        raise typer.Exit(2) from None


if __name__ == "__main__":  # pragma: no cover
    app()
