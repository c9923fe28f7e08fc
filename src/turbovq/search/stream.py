"""Out-of-core input and resumable index builds: encode more vectors than fit in memory, in bounded chunks.

Inputs (:func:`open_source`): a ``.npy`` file (read through short-lived memory maps), a Parquet file or an Arrow
IPC / Feather file (a list or fixed-size-list column of floats, read one row group / record batch at a time), or a
directory of such files taken in name order as one matrix. Every source reads a row range ``[lo, hi)`` into its own
memory and drops the mapping afterwards, so resident memory stays at about one chunk whatever the input size.

Builds (:func:`build_index`) train once on an evenly spaced sample of the *whole* input (the same sample
``turbovq index build`` always used), then add chunk after chunk with a progress bar. They are resumable because
the checkpoint *is* the output: after a chunk the index is saved atomically (``turbovq.io``), and since a streaming
build gives row ``r`` the id ``r``, the saved index's length is exactly the number of rows done. A crash (an
exception, ``kill -9``, a power cut) leaves the last checkpoint intact; the next run with the same arguments
loads it and continues at row ``len(index)``, so no row is lost or added twice. A small sidecar file
``<output>.progress.json`` marks an unfinished build and records which input and configuration it belongs to, and
whether ``output`` holds one of its checkpoints yet, so that a resume never mixes two inputs nor picks up an older
index found at ``output``; it is removed when the build completes. A resume before the first checkpoint trains
again on the same sample, which gives the same state.

Cost of a checkpoint: rewriting the codes held so far (``code_size + 8`` bytes a vector, about an eighth of the
float32 input at 4 bits). ``checkpoint_every`` trades that against the work a crash can lose; a
:class:`~turbovq.search.distributed.ShardedIndex` output splits the rewrite over its shards, in parallel.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from turbovq import io

SUFFIXES = (".npy", ".parquet", ".arrow", ".feather", ".ipc")
_PROGRESS_VERSION = 1


class VectorSource:
    """Rows of an ``(n, dim)`` float matrix on disk, read a contiguous range at a time.

    Subclasses set ``path``, ``n`` and ``dim`` and implement :meth:`read`; :meth:`take` may be overridden when a
    source can gather scattered rows more cheaply than range by range.
    """

    path: Path
    n: int
    dim: int

    def __len__(self) -> int:
        return self.n

    def read(self, lo: int, hi: int) -> np.ndarray:
        """Rows ``[lo, hi)`` as a writable float array of shape ``(hi - lo, dim)`` in this process's memory."""
        raise NotImplementedError

    def take(self, rows: np.ndarray) -> np.ndarray:
        """The given rows (sorted, distinct int64), reading at most one chunk of the input at a time."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), self.dim), dtype=np.float32)
        step = max(1, (64 << 20) // (4 * self.dim))  # 64 MB of float32 input per read
        for lo in range(0, self.n, step):
            a, b = np.searchsorted(rows, [lo, lo + step])
            if a < b:
                out[a:b] = self.read(lo, min(self.n, lo + step))[rows[a:b] - lo]
        return out

    def iter_chunks(self, chunk_rows: int, start: int = 0) -> Iterator[tuple[int, np.ndarray]]:
        """``(lo, rows[lo:lo + chunk_rows])`` from row ``start`` to the end."""
        for lo in range(start, self.n, chunk_rows):
            yield lo, self.read(lo, min(self.n, lo + chunk_rows))

    def to_array(self) -> np.ndarray:
        """The whole matrix (only for inputs that fit in memory; ``.npy`` returns a read-only memory map)."""
        return self.read(0, self.n)

    def fingerprint(self) -> dict:
        """What identifies this input for a resume: its files (path, size, modification time) and shape."""
        files = sorted(self.path.iterdir()) if self.path.is_dir() else [self.path]
        return {
            "files": [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in files if _readable(p)],
            "n": self.n,
            "dim": self.dim,
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, n={self.n}, dim={self.dim})"


def _readable(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in SUFFIXES and not p.name.startswith(".")


class NpySource(VectorSource):
    """A 2-D float ``.npy`` file. Each read maps only the rows it needs and unmaps them after copying: a single
    long-lived map of a file larger than memory would keep every page read so far counted in the resident set."""

    def __init__(self, path):
        self.path = Path(path)
        try:  # only to read the header: where the data starts, its shape, dtype and order
            mm = np.load(self.path, mmap_mode="r", allow_pickle=False)
        except ValueError as e:
            raise ValueError(f"{self.path} is not a readable .npy file ({e})") from None
        shape, dtype, fortran, self._offset = mm.shape, mm.dtype, not mm.flags.c_contiguous, mm.offset
        del mm
        if len(shape) != 2 or dtype.kind != "f":
            raise ValueError(f"{self.path}: expected a float array of shape (n, dim), got {dtype} {shape}")
        if fortran and shape[0] > 1 and shape[1] > 1:
            raise ValueError(f"{self.path}: a Fortran-order array cannot be read by rows; save it in C order")
        self.n, self.dim = int(shape[0]), int(shape[1])
        self.dtype = dtype
        expected = self._offset + self.n * self.dim * dtype.itemsize
        if self.path.stat().st_size < expected:  # pragma: no cover - np.load refuses a truncated file first
            raise ValueError(f"{self.path}: truncated ({self.path.stat().st_size} bytes, the header needs {expected})")

    def _map(self, lo: int, hi: int) -> np.memmap:
        offset = self._offset + lo * self.dim * self.dtype.itemsize
        return np.memmap(self.path, dtype=self.dtype, mode="r", offset=offset, shape=(hi - lo, self.dim))

    def read(self, lo: int, hi: int) -> np.ndarray:
        if hi <= lo:
            return np.empty((0, self.dim), dtype=self.dtype)
        mm = self._map(lo, hi)
        out = np.array(mm)
        del mm
        return out

    def take(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        if not len(rows):
            return np.empty((0, self.dim), dtype=self.dtype)
        mm = self._map(0, self.n)
        out = np.array(mm[rows])
        del mm
        return out

    def to_array(self) -> np.ndarray:
        return np.load(self.path, mmap_mode="r", allow_pickle=False)


class _BlockSource(VectorSource):
    """A source stored as blocks of rows (Parquet row groups, Arrow record batches); reads decode whole blocks,
    keeping the last one, so memory is bounded by a chunk plus one block."""

    def _setup(self, block_rows: list[int], schema, column: str | None) -> None:
        self._column = _pick_column(self.path, schema, column)
        self._starts = np.concatenate([[0], np.cumsum(block_rows, dtype=np.int64)])
        self.n = int(self._starts[-1])
        self._cache: tuple[int, np.ndarray] | None = None
        if self.n == 0:
            raise ValueError(f"{self.path}: no rows")
        first = next(i for i, r in enumerate(block_rows) if r)
        self.dim = self._block(first).shape[1]

    def _read_block(self, i: int):
        raise NotImplementedError

    def _block(self, i: int) -> np.ndarray:
        if self._cache is None or self._cache[0] != i:
            self._cache = None  # free the old block before decoding the next
            self._cache = (i, _to_matrix(self._read_block(i), f"{self.path} column {self._column!r}"))
        return self._cache[1]

    def read(self, lo: int, hi: int) -> np.ndarray:
        parts = []
        b = int(np.searchsorted(self._starts, lo, side="right")) - 1
        while lo < hi:
            block = self._block(b)
            if block.shape[1] != self.dim:
                raise ValueError(f"{self.path}: vectors of dimension {block.shape[1]} after some of {self.dim}")
            start = int(self._starts[b])
            stop = min(hi, int(self._starts[b + 1]))
            parts.append(block[lo - start : stop - start])
            lo, b = stop, b + 1
        if not parts:
            return np.empty((0, self.dim), dtype=np.float32)
        return np.concatenate(parts) if len(parts) > 1 else parts[0].copy()


class ParquetSource(_BlockSource):
    """A Parquet file with a list / fixed-size-list column of floats, read one row group at a time."""

    def __init__(self, path, column: str | None = None):
        pq = _pyarrow("parquet")
        self.path = Path(path)
        try:
            self._file = pq.ParquetFile(self.path)
        except Exception as e:  # pyarrow raises ArrowInvalid / OSError for non-Parquet input
            raise ValueError(f"{self.path} is not a readable Parquet file ({e})") from None
        meta = self._file.metadata
        self._setup([meta.row_group(i).num_rows for i in range(meta.num_row_groups)], self._file.schema_arrow, column)

    def _read_block(self, i: int):
        return self._file.read_row_group(i, columns=[self._column]).column(0)


class ArrowSource(_BlockSource):
    """An Arrow IPC (Feather v2) file, memory-mapped, read one record batch at a time."""

    def __init__(self, path, column: str | None = None):
        pa = _pyarrow()
        self.path = Path(path)
        try:
            self._reader = pa.ipc.open_file(pa.memory_map(str(self.path), "r"))
        except Exception as e:
            raise ValueError(f"{self.path} is not a readable Arrow IPC / Feather file ({e})") from None
        rows = [self._reader.get_batch(i).num_rows for i in range(self._reader.num_record_batches)]
        self._setup(rows, self._reader.schema, column)

    def _read_block(self, i: int):
        return self._reader.get_batch(i).column(self._column)


class DirectorySource(VectorSource):
    """A directory of ``.npy`` / Parquet / Arrow files (hidden files skipped), taken in name order as one matrix."""

    def __init__(self, path, column: str | None = None):
        self.path = Path(path)
        files = sorted(p for p in self.path.iterdir() if _readable(p))
        if not files:
            raise ValueError(f"{self.path}: no {', '.join(SUFFIXES)} files in this directory")
        self.parts = [open_source(p, column) for p in files]
        self.dim = self.parts[0].dim
        for p in self.parts[1:]:
            if p.dim != self.dim:
                raise ValueError(f"{p.path} holds vectors of dimension {p.dim}, but {files[0]} of dimension {self.dim}")
        self._starts = np.concatenate([[0], np.cumsum([p.n for p in self.parts], dtype=np.int64)])
        self.n = int(self._starts[-1])

    def read(self, lo: int, hi: int) -> np.ndarray:
        parts = []
        f = int(np.searchsorted(self._starts, lo, side="right")) - 1
        while lo < hi and f < len(self.parts):
            start, stop = int(self._starts[f]), min(hi, int(self._starts[f + 1]))
            if stop > lo:
                parts.append(self.parts[f].read(lo - start, stop - start))
                lo = stop
            f += 1
        if not parts:
            return np.empty((0, self.dim), dtype=np.float32)
        return np.concatenate(parts) if len(parts) > 1 else parts[0]


def _pyarrow(sub: str | None = None):
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError("reading Parquet / Arrow input needs pyarrow: pip install 'turbovq[search]'") from None
    return pq if sub == "parquet" else pa


def _pick_column(path: Path, schema, column: str | None) -> str:
    """The named column, or the first list / fixed-size-list column (how embeddings are usually stored)."""
    pa = _pyarrow()
    names = list(schema.names)
    if column is None:
        lists = [f.name for f in schema if pa.types.is_list(f.type) or pa.types.is_large_list(f.type)
                 or pa.types.is_fixed_size_list(f.type)]
        if not lists:
            raise ValueError(f"{path} has no list column of vectors (columns: {names}); name one with column=")
        return lists[0]
    if column not in names:
        raise ValueError(f"{path} has no column {column!r} (columns: {names})")
    return column


def _to_matrix(arr, what: str) -> np.ndarray:
    """An Arrow list / fixed-size-list array of floats -> ``(rows, dim)`` numpy, zero-copy where Arrow allows."""
    pa = _pyarrow()
    import pyarrow.compute as pc

    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    t = arr.type
    if not (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)):
        raise ValueError(f"{what} holds {t}, expected a list of floats per row")
    if arr.null_count:
        raise ValueError(f"{what} has {arr.null_count} null vectors")
    values = arr.flatten()
    if not pa.types.is_floating(values.type):
        raise ValueError(f"{what} holds lists of {values.type}, expected floats")
    if values.null_count:
        raise ValueError(f"{what} has null values inside vectors")
    if pa.types.is_fixed_size_list(t):
        dim = t.list_size
    else:
        lengths = pc.list_value_length(arr).to_numpy()
        dim = int(lengths[0]) if len(lengths) else 0
        if len(lengths) and (lengths != dim).any():
            bad = int(np.flatnonzero(lengths != dim)[0])
            raise ValueError(f"{what} does not hold equal-length vectors (row {bad} has {lengths[bad]}, row 0 {dim})")
    return values.to_numpy(zero_copy_only=False).reshape(-1, dim)


def open_source(path, column: str | None = None) -> VectorSource:
    """Open a ``.npy`` / ``.parquet`` / ``.arrow`` / ``.feather`` file, or a directory of them, as a VectorSource.

    ``column`` names the Parquet / Arrow column of vectors (default: the first list column).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if path.is_dir():
        return DirectorySource(path, column)
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return NpySource(path)
    if suffix == ".parquet":
        return ParquetSource(path, column)
    if suffix in (".arrow", ".feather", ".ipc"):
        return ArrowSource(path, column)
    raise ValueError(f"{path}: expected a .npy, .parquet, .arrow or .feather file, or a directory of them")


# --- resumable builds ---------------------------------------------------------------------------------------------
def progress_path(output) -> Path:
    """The sidecar that marks an unfinished streaming build of ``output`` (a file, or a sharded index directory)."""
    output = Path(output)
    return output.with_name(output.name + ".progress.json")


def _write_json_atomic(path: Path, obj: dict) -> None:
    with io.atomic_file(path) as f:
        f.write(json.dumps(obj).encode())


def training_rows(n: int, samples: int) -> np.ndarray:
    """The evenly spaced rows an index is trained on (at most ``samples`` of ``n``), as ``turbovq index build``."""
    return np.linspace(0, n - 1, min(n, samples)).astype(np.int64)


def build_index(
    source,
    output,
    index,
    *,
    column: str | None = None,
    chunk_rows: int = 65_536,
    train_samples: int = 20_000,
    checkpoint_every: int = 1,
    resume: bool = True,
    progress: bool = True,
):
    """Encode ``source`` into ``index`` chunk by chunk and save it to ``output``, resumably.

    Parameters
    ----------
    source : a path for :func:`open_source`, or a :class:`VectorSource`.
    output : where ``index.save`` writes (a file for ``TurboQuantIndex``, a directory for ``ShardedIndex``).
    index : an empty :class:`~turbovq.search.index.TurboQuantIndex` or
        :class:`~turbovq.search.distributed.ShardedIndex` that sets the configuration. An untrained index is
        trained on ``train_samples`` evenly spaced rows of the whole input before anything is added.
    chunk_rows : rows read and encoded at a time: with the input's dtype, this bounds the memory the input takes.
    checkpoint_every : save after every this many chunks (and at the end). A crash loses at most that many.
    resume : continue an unfinished build of ``output`` (one whose progress sidecar exists) from its last
        checkpoint. ``False`` starts over. A finished build has no sidecar and is rebuilt.

    Returns the index holding every row of ``source``, row ``r`` with id ``r``. For a resumed build this is the
    index loaded from the checkpoint (``type(index).load(output)``), not the object passed in.
    """
    src = source if isinstance(source, VectorSource) else open_source(source, column)
    for name, v in (("chunk_rows", chunk_rows), ("checkpoint_every", checkpoint_every),
                    ("train_samples", train_samples)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if src.dim != index.dim:
        raise ValueError(f"{src.path} holds vectors of dimension {src.dim}, but the index has dim={index.dim}")
    output = Path(output)
    state_path = progress_path(output)
    if src.n == 0:
        raise ValueError(f"{src.path}: no rows to encode")
    state = {"version": _PROGRESS_VERSION, "source": src.fingerprint(), "config": index.config, "checkpointed": False}
    start = 0
    resumed = False
    if resume and state_path.exists():
        try:
            saved = json.loads(state_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{state_path}: unreadable progress file ({e}); pass resume=False to start over") from None
        if saved.get("source") != state["source"]:
            raise ValueError(f"{state_path}: this unfinished build read another input (or the input changed since); "
                             "pass resume=False to start over")
        if saved.get("config") != state["config"]:
            raise ValueError(f"{state_path}: this unfinished build used another index configuration "
                             f"({saved.get('config')}); pass resume=False to start over")
        # before its first checkpoint, whatever is at ``output`` is not this build's (an older index, say)
        resumed = bool(saved.get("checkpointed")) and output.exists()
    if len(index):
        raise ValueError(f"build_index needs an empty index, this one holds {len(index)} vectors")
    if resumed:
        index = type(index).load(output)
        start = len(index)
        if start > src.n:
            raise ValueError(f"{output} holds {start} vectors, more than the {src.n} rows of {src.path}")
    else:  # training again on a resume before the first checkpoint gives the same state: the sample is fixed
        _write_json_atomic(state_path, state)
        if not index.is_trained:
            index.train(src.take(training_rows(src.n, train_samples)))

    def checkpoint():
        index.save(output)
        if not state["checkpointed"] and not resumed:  # from now on ``output`` is this build's
            state["checkpointed"] = True
            _write_json_atomic(state_path, state)

    from tqdm import tqdm

    since = 0
    with tqdm(total=src.n, initial=start, desc=f"encoding {src.path.name}", unit="vec", unit_scale=True,
              disable=not progress or None, leave=False) as bar:
        for lo, x in src.iter_chunks(chunk_rows, start):
            try:
                index.add(x)
            except ValueError as e:
                raise ValueError(f"{src.path}, rows {lo}..{lo + len(x) - 1}: {e}") from None
            del x
            since += 1
            if since >= checkpoint_every:
                checkpoint()
                since = 0
            bar.update(min(chunk_rows, src.n - lo))
    if since:
        checkpoint()
    state_path.unlink(missing_ok=True)
    return index
