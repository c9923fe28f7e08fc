"""Tests of turbovq.search.stream: out-of-core sources (.npy, Parquet, Arrow, directories), streaming builds equal to
in-memory ones byte for byte, and resuming after an exception or a ``kill -9`` without losing or repeating rows."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from turbovq.search import TurboQuantIndex
from turbovq.search.stream import NpySource, build_index, open_source, progress_path, training_rows

pytestmark = pytest.mark.usefixtures("one_thread")

N, DIM, CHUNK = 2300, 32, 500


@pytest.fixture(scope="module")
def x():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((N, DIM)) * np.exp(-0.1 * np.arange(DIM)) + 0.3
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def npy(x, tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "x.npy"
    np.save(path, x)
    return path


@pytest.fixture(scope="module")
def reference(x, tmp_path_factory):
    """The in-memory build a streaming build must reproduce: train on the evenly spaced sample, add everything."""
    idx = TurboQuantIndex(DIM, 4, seed=0)
    idx.train(x[training_rows(N, 20_000)])
    idx.add(x)
    path = tmp_path_factory.mktemp("ref") / "ref.tvq"
    idx.save(path)
    return path.read_bytes()


class FailingSource(NpySource):
    """A .npy source that raises (or kills its process) when asked for rows at or after ``fail_at``."""

    def __init__(self, path, fail_at: int):
        super().__init__(path)
        self.fail_at = fail_at

    def read(self, lo, hi):
        if lo >= self.fail_at:
            raise RuntimeError(f"simulated crash at row {lo}")
        return super().read(lo, hi)


# --- sources ---------------------------------------------------------------------------------------------------------
def test_npy_source_reads_ranges_without_keeping_a_map(npy, x):
    src = open_source(npy)
    assert (src.n, src.dim) == (N, DIM)
    part = src.read(123, 1777)
    np.testing.assert_array_equal(part, x[123:1777])
    assert part.flags.writeable and not isinstance(part, np.memmap) and part.base is None  # a copy, map dropped
    rows = np.array([0, 5, 499, 500, 2299])
    np.testing.assert_array_equal(src.take(rows), x[rows])
    chunks = list(src.iter_chunks(CHUNK, start=400))
    assert [lo for lo, _ in chunks] == [400, 900, 1400, 1900]
    np.testing.assert_array_equal(np.concatenate([c for _, c in chunks]), x[400:])


def test_arrow_parquet_and_directory_sources(x, tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.feather as feather
    import pyarrow.parquet as pq

    d = tmp_path / "shards"
    d.mkdir()
    np.save(d / "a.npy", x[:800])
    # a list column over several row groups, an id column first
    pq.write_table(pa.table({"id": np.arange(800, 1600), "emb": list(x[800:1600])}), d / "b.parquet",
                   row_group_size=300)
    fixed = pa.FixedSizeListArray.from_arrays(pa.array(x[1600:].reshape(-1)), DIM)
    feather.write_feather(pa.table({"vec": fixed}), d / "c.feather", chunksize=256)
    (d / ".hidden.npy").write_bytes(b"ignored")
    (d / "notes.txt").write_text("ignored")

    pqs = open_source(d / "b.parquet")
    assert (pqs.n, pqs.dim) == (800, DIM)
    np.testing.assert_array_equal(pqs.read(250, 700), x[1050:1500])  # crosses two row-group boundaries
    np.testing.assert_array_equal(open_source(d / "c.feather").read(200, 600), x[1800:2200])
    src = open_source(d)
    assert (src.n, src.dim) == (N, DIM)
    np.testing.assert_array_equal(src.read(700, 1700), x[700:1700])  # spans all three files
    np.testing.assert_array_equal(src.take(training_rows(N, 97)), x[training_rows(N, 97)])
    np.testing.assert_array_equal(src.to_array(), x)


def test_source_errors(x, tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    with pytest.raises(FileNotFoundError, match="nope.npy does not exist"):
        open_source(tmp_path / "nope.npy")
    (tmp_path / "x.csv").write_text("1,2")
    with pytest.raises(ValueError, match="expected a .npy"):
        open_source(tmp_path / "x.csv")
    np.save(tmp_path / "ints.npy", np.arange(12).reshape(3, 4))
    with pytest.raises(ValueError, match="expected a float array of shape"):
        open_source(tmp_path / "ints.npy")
    (tmp_path / "junk.npy").write_bytes(b"not numpy")
    with pytest.raises(ValueError, match="not a readable .npy"):
        open_source(tmp_path / "junk.npy")
    pq.write_table(pa.table({"a": [1.0, 2.0]}), tmp_path / "flat.parquet")
    with pytest.raises(ValueError, match="no list column"):
        open_source(tmp_path / "flat.parquet")
    pq.write_table(pa.table({"emb": [[1.0, 2.0], [3.0]]}), tmp_path / "ragged.parquet")
    with pytest.raises(ValueError, match="equal-length.*row 1 has 1"):
        open_source(tmp_path / "ragged.parquet")
    with pytest.raises(ValueError, match="no column 'vec'"):
        open_source(tmp_path / "ragged.parquet", "vec")
    pq.write_table(pa.table({"emb": [[1, 2], [3, 4]]}), tmp_path / "intlists.parquet")
    with pytest.raises(ValueError, match="lists of int64, expected floats"):
        open_source(tmp_path / "intlists.parquet")
    pq.write_table(pa.table({"emb": [[1.0, 2.0], None]}), tmp_path / "nulls.parquet")
    with pytest.raises(ValueError, match="1 null vectors"):
        open_source(tmp_path / "nulls.parquet")
    d = tmp_path / "mixed"
    d.mkdir()
    np.save(d / "a.npy", x[:10])
    np.save(d / "b.npy", x[:10, :16])
    with pytest.raises(ValueError, match="b.npy holds vectors of dimension 16"):
        open_source(d)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .npy"):
        open_source(tmp_path / "empty")


# --- streaming builds ------------------------------------------------------------------------------------------------
def test_streaming_build_equals_in_memory_build(npy, x, reference, tmp_path):
    out = tmp_path / "x.tvq"
    idx = build_index(npy, out, TurboQuantIndex(DIM, 4, seed=0), chunk_rows=CHUNK, progress=False)
    assert len(idx) == N
    assert out.read_bytes() == reference  # same codes, ids, centre, projection: the same file
    assert not progress_path(out).exists()  # a finished build leaves no progress file
    # a directory of the same rows in other formats gives the same index
    d = tmp_path / "parts"
    d.mkdir()
    np.save(d / "0.npy", x[:1000])
    np.save(d / "1.npy", x[1000:])
    build_index(d, tmp_path / "y.tvq", TurboQuantIndex(DIM, 4, seed=0), chunk_rows=777, progress=False)
    assert (tmp_path / "y.tvq").read_bytes() == reference


@pytest.mark.parametrize("checkpoint_every", [1, 2])
def test_resume_after_exception(npy, reference, tmp_path, checkpoint_every):
    out = tmp_path / "x.tvq"
    with pytest.raises(RuntimeError, match="simulated crash at row 1500"):
        build_index(FailingSource(npy, 1500), out, TurboQuantIndex(DIM, 4, seed=0), chunk_rows=CHUNK,
                    checkpoint_every=checkpoint_every, progress=False)
    assert progress_path(out).exists()
    done = len(TurboQuantIndex.load(out))
    assert done == (1500 if checkpoint_every == 1 else 1000)  # the last checkpoint, nothing half-written
    # resume with another chunk size: rows continue at len(index), each exactly once
    idx = build_index(npy, out, TurboQuantIndex(DIM, 4, seed=0), chunk_rows=300, progress=False)
    assert len(idx) == N
    assert out.read_bytes() == reference
    assert not progress_path(out).exists()


def test_resume_after_kill_9(npy, reference, tmp_path):
    out = tmp_path / "x.tvq"
    script = textwrap.dedent(f"""
        import os, signal, sys, torch
        from turbovq.search import TurboQuantIndex
        from turbovq.search.stream import NpySource, build_index
        torch.set_num_threads(1)
        class Dying(NpySource):
            def read(self, lo, hi):
                if lo >= 1000:
                    os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no exception handlers
                return super().read(lo, hi)
        build_index(Dying(sys.argv[1]), sys.argv[2], TurboQuantIndex({DIM}, 4, seed=0), chunk_rows={CHUNK},
                    progress=False)
    """)
    proc = subprocess.run([sys.executable, "-c", script, str(npy), str(out)], capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    assert len(TurboQuantIndex.load(out)) == 1000 and progress_path(out).exists()
    build_index(npy, out, TurboQuantIndex(DIM, 4, seed=0), chunk_rows=CHUNK, progress=False)
    assert out.read_bytes() == reference
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]  # no temporary file left behind


def test_resume_refuses_another_input_or_config(npy, x, tmp_path):
    out = tmp_path / "x.tvq"
    with pytest.raises(RuntimeError):
        build_index(FailingSource(npy, 1000), out, TurboQuantIndex(DIM, 4, seed=0), chunk_rows=CHUNK, progress=False)
    other = tmp_path / "other.npy"
    np.save(other, x[::-1].copy())
    with pytest.raises(ValueError, match="read another input"):
        build_index(other, out, TurboQuantIndex(DIM, 4, seed=0), chunk_rows=CHUNK, progress=False)
    with pytest.raises(ValueError, match="another index configuration"):
        build_index(npy, out, TurboQuantIndex(DIM, 3, seed=0), chunk_rows=CHUNK, progress=False)
    idx = build_index(other, out, TurboQuantIndex(DIM, 4, seed=0), chunk_rows=CHUNK, resume=False, progress=False)
    assert len(idx) == N and not progress_path(out).exists()


def test_crash_before_the_first_checkpoint_ignores_an_older_output(npy, x, reference, tmp_path):
    out = tmp_path / "x.tvq"
    np.save(tmp_path / "other.npy", x[::-1].copy())
    build_index(tmp_path / "other.npy", out, TurboQuantIndex(DIM, 4, seed=0), chunk_rows=CHUNK, progress=False)
    with pytest.raises(RuntimeError, match="row 0"):
        build_index(FailingSource(npy, 0), out, TurboQuantIndex(DIM, 4, seed=0), chunk_rows=CHUNK, progress=False)
    assert progress_path(out).exists() and len(TurboQuantIndex.load(out)) == N  # the older index, untouched
    build_index(npy, out, TurboQuantIndex(DIM, 4, seed=0), chunk_rows=CHUNK, progress=False)
    assert out.read_bytes() == reference  # started over: not a continuation of the older index


def test_build_errors_name_the_rows(x, tmp_path):
    bad = x.copy()
    bad[1234, 3] = np.nan
    np.save(tmp_path / "bad.npy", bad)
    with pytest.raises(ValueError, match=r"bad.npy, rows 1000\.\.1499: .*NaN or Inf \(first in row 234\)"):
        build_index(tmp_path / "bad.npy", tmp_path / "o.tvq", TurboQuantIndex(DIM, 4, mode="oblivious"),
                    chunk_rows=CHUNK, progress=False)
    np.save(tmp_path / "x.npy", x)
    with pytest.raises(ValueError, match="dimension 32, but the index has dim=64"):
        build_index(tmp_path / "x.npy", tmp_path / "o.tvq", TurboQuantIndex(64, 4), progress=False)
    with pytest.raises(ValueError, match="chunk_rows must be a positive integer"):
        build_index(tmp_path / "x.npy", tmp_path / "o.tvq", TurboQuantIndex(DIM, 4), chunk_rows=0, progress=False)
    full = TurboQuantIndex(DIM, 4)
    full.add(x[:10])
    with pytest.raises(ValueError, match="needs an empty index"):
        build_index(tmp_path / "x.npy", tmp_path / "p.tvq", full, progress=False)
