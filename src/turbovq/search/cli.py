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
from turbovq.search.stream import build_index, open_source

index_app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)


def load_vectors(path: Path, column: str | None = None) -> np.ndarray:
    """(n, dim) float array from a .npy file (memory-mapped), a .parquet / .arrow file (a column of float lists) or
    a directory of them (read by :mod:`turbovq.search.stream`)."""
    try:
        return open_source(path, column).to_array()
    except (ValueError, OSError, ImportError) as e:
        raise typer.BadParameter(str(e)) from None


def _or_exit(fn):
    try:
        return fn()
    except (ValueError, OSError, FormatError, ImportError) as e:  # ImportError: --ray without Ray installed
        typer.secho(f"error: {e}", fg="red", err=True)
        raise typer.Exit(2) from None


@index_app.command()
def build(
    data: Path = typer.Argument(..., help="vectors: .npy (n, dim), .parquet / .arrow (a column of float lists), or a "
                                "directory of such files"),
    output: Path = typer.Option(..., "-o", "--output", help="index file to write (.tvq); a directory with --ray"),
    bits: float = typer.Option(4.0, help="bits per coordinate, norms included (bytes/vector = dim*bits/8)"),
    metric: str = typer.Option("ip", help=f"one of {', '.join(METRICS)}"),
    mode: str = typer.Option("pca", help="pca (default), center, or oblivious (data-oblivious, streaming)"),
    seed: int = typer.Option(0),
    column: str = typer.Option(None, help="parquet column holding the vectors (default: the first list column)"),
    batch: int = typer.Option(65_536, help="vectors read and encoded per chunk (bounds memory)"),
    checkpoint_every: int = typer.Option(1, help="save a checkpoint after this many chunks"),
    resume: bool = typer.Option(True, help="continue an interrupted build of OUTPUT from its last checkpoint"),
    ray: bool = typer.Option(False, "--ray", help="build a sharded index on Ray; OUTPUT is then a directory"),
    ray_address: str = typer.Option(None, help="Ray cluster to join (e.g. auto, ray://host:10001); implies --ray"),
    shards: int = typer.Option(2, help="shards of a --ray index (one Ray actor each)"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
    as_json: bool = typer.Option(False, "--json", help="print a JSON summary"),
):
    """Build a flat TurboQuant index (train on a sample, then add in chunks, resumably) and save it.

    DATA may be larger than memory: it is read a chunk at a time (see turbovq.search.stream).
    """
    try:
        src = open_source(data, column)
    except (ValueError, OSError, ImportError) as e:
        raise typer.BadParameter(str(e)) from None
    if ray or ray_address:
        from turbovq.search.distributed import ShardedIndex

        idx = _or_exit(lambda: ShardedIndex(src.dim, bits, metric=metric, seed=seed, num_shards=shards, mode=mode,
                                            address=ray_address))
    else:
        idx = _or_exit(lambda: TurboQuantIndex(src.dim, bits, metric=metric, seed=seed, mode=mode))
    t0 = time.perf_counter()
    idx = _or_exit(lambda: build_index(src, output, idx, chunk_rows=batch, checkpoint_every=checkpoint_every,
                                       resume=resume, progress=not quiet))
    build_s = time.perf_counter() - t0
    summary = {"output": str(output), "ntotal": len(idx), "dim": idx.dim, "code_size": idx.code_size,
               "nbytes": idx.nbytes, "build_s": round(build_s, 3), "config": idx.config}
    if ray or ray_address:
        idx.close()
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
    ray: bool = typer.Option(False, "--ray", help="INDEX is a sharded index directory (`build --ray`): search on Ray"),
    ray_address: str = typer.Option(None, help="Ray cluster to join (e.g. auto, ray://host:10001); implies --ray"),
):
    """Search an index: the k best ids (and scores or distances) for every query."""
    if ray or ray_address:
        from turbovq.search.distributed import ShardedIndex

        idx = _or_exit(lambda: ShardedIndex.load(index, address=ray_address))
    else:
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
