"""``turbovq index build|search|eval``: build a TurboQuantIndex from a .npy/.parquet file, query it, measure recall.

Mounted by ``turbovq.cli`` as ``turbovq index``; usable alone as ``python -m turbovq.search.cli``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import typer

from turbovq.io import FormatError
from turbovq.search.index import METRICS, TurboQuantIndex

index_app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)


def load_vectors(path: Path, column: str | None = None) -> np.ndarray:
    """(n, dim) float array from a .npy file (memory-mapped) or a .parquet column of float lists."""
    if not path.exists():
        raise typer.BadParameter(f"{path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        try:
            x = np.load(path, mmap_mode="r", allow_pickle=False)
        except ValueError as e:
            raise typer.BadParameter(f"{path} is not a readable .npy file ({e})") from None
    elif suffix == ".parquet":
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            raise typer.BadParameter("reading .parquet needs pyarrow: pip install 'turbovq[search]'") from None
        table = pq.read_table(path)
        if column is None:
            lists = [f.name for f in table.schema if pa.types.is_list(f.type) or pa.types.is_fixed_size_list(f.type)]
            if not lists:
                raise typer.BadParameter(f"{path} has no list column of vectors; name one with --column")
            column = lists[0]
        if column not in table.column_names:
            raise typer.BadParameter(f"{path} has no column {column!r} (columns: {table.column_names})")
        col = table.column(column).combine_chunks()
        try:
            x = np.stack(col.to_numpy(zero_copy_only=False)).astype(np.float32)
        except ValueError as e:
            raise typer.BadParameter(f"column {column!r} of {path} does not hold equal-length vectors ({e})") from None
    else:
        raise typer.BadParameter(f"{path}: expected a .npy or .parquet file")
    if x.ndim != 2 or x.dtype.kind != "f":
        raise typer.BadParameter(f"{path}: expected a float array of shape (n, dim), got {x.dtype} {x.shape}")
    return x


def _or_exit(fn):
    try:
        return fn()
    except (ValueError, OSError, FormatError) as e:
        typer.secho(f"error: {e}", fg="red", err=True)
        raise typer.Exit(2) from None


def _progress(total: int, desc: str, quiet: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="vec", unit_scale=True, disable=quiet or None, leave=False)


@index_app.command()
def build(
    data: Path = typer.Argument(..., help="vectors: .npy (n, dim) or .parquet (a column of float lists)"),
    output: Path = typer.Option(..., "-o", "--output", help="index file to write (.tvq)"),
    bits: float = typer.Option(4.0, help="bits per coordinate, norms included (bytes/vector = dim*bits/8)"),
    metric: str = typer.Option("ip", help=f"one of {', '.join(METRICS)}"),
    mode: str = typer.Option("pca", help="pca (default), center, or oblivious (data-oblivious, streaming)"),
    seed: int = typer.Option(0),
    column: str = typer.Option(None, help="parquet column holding the vectors (default: the first list column)"),
    batch: int = typer.Option(65_536, help="vectors encoded per batch"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
    as_json: bool = typer.Option(False, "--json", help="print a JSON summary"),
):
    """Build a flat TurboQuant index (train on a sample, then add in batches) and save it."""
    x = load_vectors(data, column)
    idx = _or_exit(lambda: TurboQuantIndex(x.shape[1], bits, metric=metric, seed=seed, mode=mode))
    t0 = time.perf_counter()
    if idx.mode != "oblivious":
        sample = np.asarray(x[np.linspace(0, len(x) - 1, min(len(x), 20_000)).astype(np.int64)])
        _or_exit(lambda: idx.train(sample))
    with _progress(len(x), "encoding", quiet) as bar:
        for lo in range(0, len(x), batch):
            part = np.asarray(x[lo : lo + batch])
            _or_exit(lambda part=part: idx.add(part))
            bar.update(len(part))
    build_s = time.perf_counter() - t0
    _or_exit(lambda: idx.save(output))
    summary = {"output": str(output), "ntotal": len(idx), "dim": idx.dim, "code_size": idx.code_size,
               "nbytes": idx.nbytes, "build_s": round(build_s, 3), "config": idx.config}
    if as_json:
        typer.echo(json.dumps(summary))
    else:
        typer.echo(f"{output}: {len(idx)} vectors of dim {idx.dim}, {idx.code_size} B/vector of codes "
                   f"({4 * idx.dim / idx.code_size:.1f}x smaller than float32), built in {build_s:.2f} s")


@index_app.command()
def search(
    index: Path = typer.Argument(..., help="an index written by `turbovq index build`"),
    queries: Path = typer.Argument(..., help="query vectors (.npy or .parquet)"),
    k: int = typer.Option(10, "-k", help="neighbours per query"),
    output: Path = typer.Option(None, "-o", "--output", help="write D and I to this .npz"),
    column: str = typer.Option(None, help="parquet column of the queries"),
    as_json: bool = typer.Option(False, "--json", help="print ids and scores as JSON"),
):
    """Search an index: the k best ids (and scores or distances) for every query."""
    idx = _or_exit(lambda: TurboQuantIndex.load(index))
    q = load_vectors(queries, column)
    t0 = time.perf_counter()
    D, ids = _or_exit(lambda: idx.search(np.asarray(q), k))
    elapsed = time.perf_counter() - t0
    if output is not None:
        np.savez(output, D=D, I=ids)
    if as_json:
        typer.echo(json.dumps({"ids": ids.tolist(), "scores": D.round(6).tolist(), "seconds": elapsed}))
        return
    for i in range(min(5, len(ids))):
        pairs = ", ".join(f"{j}:{d:.4f}" for j, d in zip(ids[i], D[i]))
        typer.echo(f"query {i}: {pairs}")
    typer.echo(f"{len(q)} queries in {elapsed:.3f} s ({len(q) / max(elapsed, 1e-9):.0f} queries/s)")


def exact_neighbours(x: np.ndarray, q: np.ndarray, k: int, metric: str) -> np.ndarray:
    """Exact top-k ids by brute force in float32, in chunks of the database."""
    import torch

    qt = torch.from_numpy(np.ascontiguousarray(q, dtype=np.float32))
    if metric == "cosine":
        qt = torch.nn.functional.normalize(qt, dim=1)
    best_s = torch.full((len(q), 0), -float("inf"))
    best_i = torch.zeros((len(q), 0), dtype=torch.int64)
    for lo in range(0, len(x), 50_000):
        xt = torch.from_numpy(np.ascontiguousarray(x[lo : lo + 50_000], dtype=np.float32))
        if metric == "cosine":
            xt = torch.nn.functional.normalize(xt, dim=1)
        s = qt @ xt.T
        if metric == "l2":
            s = 2 * s - (xt * xt).sum(1)[None]
        cat_s = torch.cat([best_s, s], 1)
        cat_i = torch.cat([best_i, torch.arange(lo, lo + len(xt)).expand(len(q), -1)], 1)
        best_s, top = torch.topk(cat_s, min(k, cat_s.shape[1]), dim=1)
        best_i = torch.gather(cat_i, 1, top)
    return best_i.numpy()


@index_app.command("eval")
def evaluate(
    index: Path = typer.Argument(..., help="an index built from DATA with row numbers as ids (`index build`)"),
    data: Path = typer.Argument(..., help="the original vectors (.npy or .parquet)"),
    queries: Path = typer.Argument(..., help="query vectors (.npy or .parquet)"),
    k: int = typer.Option(10, "-k", help="largest k of Recall@1@k; Recall@k@k is reported at this k"),
    column: str = typer.Option(None, help="parquet column of the vectors"),
    as_json: bool = typer.Option(False, "--json"),
):
    """Recall of the index against exact brute-force search on the original vectors."""
    idx = _or_exit(lambda: TurboQuantIndex.load(index))
    x = load_vectors(data, column)
    q = np.asarray(load_vectors(queries, column))
    if len(x) != len(idx):
        raise typer.BadParameter(f"{data} holds {len(x)} vectors, the index {len(idx)}: not the data it was built on")
    truth = exact_neighbours(x, q, k, idx.metric)
    t0 = time.perf_counter()
    _, ids = _or_exit(lambda: idx.search(q, k))
    elapsed = time.perf_counter() - t0
    ks = sorted({kk for kk in (1, 2, 4, 8, 16, 32, 64, k) if kk <= k})
    r1 = {kk: float(np.mean((ids[:, :kk] == truth[:, :1]).any(1))) for kk in ks}
    rkk = float(np.mean([len(np.intersect1d(a, b)) / k for a, b in zip(ids, truth)]))
    out = {"recall_1_at": r1, f"recall_{k}_at_{k}": rkk, "queries": len(q), "ntotal": len(idx),
           "code_size": idx.code_size, "qps": len(q) / max(elapsed, 1e-9)}
    if as_json:
        typer.echo(json.dumps(out))
        return
    typer.echo(f"{len(q)} queries on {len(idx)} vectors, {idx.code_size} B/vector, {out['qps']:.0f} queries/s")
    for kk, r in r1.items():
        typer.echo(f"  Recall@1@{kk:<3d} {r:.4f}")
    typer.echo(f"  Recall@{k}@{k}  {rkk:.4f}")


if __name__ == "__main__":  # pragma: no cover
    index_app()
