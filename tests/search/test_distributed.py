"""Tests of turbovq.search.distributed: a ShardedIndex on a local Ray gives the results of a single TurboQuantIndex
with the same seed (bit for bit with float32 scans), survives a killed shard actor, refuses missing or corrupt shard
files by name, and resumes an interrupted streaming build; plus the ``--ray`` command line.

Every shard actor is a new process importing torch (seconds on 2 cores), so the tests share a few indexes."""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest
import torch

ray = pytest.importorskip("ray")

import turbovq.io as tio  # noqa: E402
from turbovq.io import FormatError  # noqa: E402
from turbovq.search import TurboQuantIndex  # noqa: E402
from turbovq.search.distributed import ShardedIndex  # noqa: E402
from turbovq.search.stream import NpySource, build_index, progress_path, training_rows  # noqa: E402

DIM = 32


@pytest.fixture(scope="module", autouse=True)
def cluster():
    """A local Ray with 2 CPUs for the module; one BLAS thread in the driver, as in the shard actors."""
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(11)
    basis, _ = np.linalg.qr(rng.standard_normal((DIM, DIM)))
    scale = np.exp(-0.08 * np.arange(DIM))

    def draw(n):
        v = (rng.standard_normal((n, DIM)) * scale) @ basis.T + 0.4 * basis[:, 0]
        return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)

    return draw(2400), draw(40)


def build_pair(x, num_shards=2, **kw):
    """The same data, added in the same two batches, to a single index and to a sharded one."""
    single = TurboQuantIndex(DIM, 4, seed=7, **kw)
    sharded = ShardedIndex(DIM, 4, seed=7, num_shards=num_shards, **kw)
    for part in (x[:1500], x[1500:]):  # the first batch trains both (mode pca / center)
        np.testing.assert_array_equal(single.add(part), sharded.add(part))
    return single, sharded


@pytest.fixture(scope="module")
def pair(data):
    single, sharded = build_pair(data[0], scan_precision="float32")
    yield single, sharded
    sharded.close()


def assert_same_search(a, b, q, k=10):
    d0, i0 = a.search(q, k)
    d1, i1 = b.search(q, k)
    np.testing.assert_array_equal(i1, i0)
    np.testing.assert_array_equal(d1, d0)  # bit for bit, not approximately


# --- identical results -----------------------------------------------------------------------------------------------
def test_identical_to_single_machine(pair, data):
    single, sharded = pair
    _, q = data
    assert len(sharded) == len(single) == 2400 and sharded.code_size == single.code_size
    for k in (1, 10, 50):
        assert_same_search(single, sharded, q, k)
    assert_same_search(single, sharded, q[:1], 5)  # one query: other BLAS shapes
    # the fitted state is shared: each shard alone holds the codes the single index holds for its rows
    assert sharded.nbytes > 2400 * sharded.code_size


@pytest.mark.parametrize("metric,mode,num_shards", [("l2", "center", 2), ("cosine", "pca", 1)])
def test_identical_other_metrics_and_modes(data, metric, mode, num_shards):
    """l2 merges ascending distances; cosine normalises (twice on the first batch, as TurboQuantIndex does)."""
    x, q = data
    single, sharded = build_pair(x * 3.0, num_shards, metric=metric, mode=mode, scan_precision="float32")
    try:
        assert_same_search(single, sharded, q)
    finally:
        sharded.close()


# --- persistence and faults ------------------------------------------------------------------------------------------
def test_save_load_and_restart_of_a_dead_shard(pair, data, tmp_path):
    single, sharded = pair
    x, q = data
    d = tmp_path / "sidx"
    sharded.save(d)
    sharded.save(d)  # a second save replaces the first generation of files
    assert sorted(p.name.split(".")[0] for p in d.iterdir()) == ["manifest", "shard-00000", "shard-00001", "template"]
    loaded = ShardedIndex.load(d)
    try:
        assert len(loaded) == 2400 and loaded.config == sharded.config
        assert_same_search(single, loaded, q)
        victim = loaded._shards[1].actor
        old_pid = ray.get(victim.pid.remote())
        ray.kill(victim)  # the process dies, as on a lost node
        assert_same_search(single, loaded, q)  # restarted from shard-00001's file, query retried
        assert loaded.restarts == 1
        assert ray.get(loaded._shards[1].actor.pid.remote()) != old_pid
        # vectors added since the save exist only in the actors: a death now is reported, not hidden
        loaded.add(x[:4])
        ray.kill(loaded._shards[0].actor)
        with pytest.raises(RuntimeError, match="shard 0 of 2 lost its actor .* never saved"):
            loaded.search(q, 10)
    finally:
        loaded.close()


# --- errors, ids -------------------------------------------------------------------------------------------------
def test_bad_input_errors(pair, data):
    single, sharded = pair
    x, q = data
    with pytest.raises(ValueError, match="dimension 16, but the index has dim=32"):
        sharded.add(x[:5, :16])
    bad = q.copy()
    bad[3, 0] = np.nan
    with pytest.raises(ValueError, match=r"NaN or Inf \(first in row 3\)"):
        sharded.search(bad, 5)
    with pytest.raises(ValueError, match="larger than the number of vectors"):
        sharded.search(q, 5000)
    with pytest.raises(ValueError, match="k must be a positive integer"):
        sharded.search(q, 0)
    with pytest.raises(ValueError, match="ids must be distinct"):
        sharded.add_with_ids(x[:2], [9000, 9000])
    with pytest.raises(ValueError, match="ids must be integers"):
        sharded.add_with_ids(x[:2], [1.5, 2.5])
    # id 2400 goes to shard 0 (accepted there), id 5 to shard 1 (already there): nothing may stay behind
    with pytest.raises(ValueError, match="id 5 is already in the index"):
        sharded.add_with_ids(x[:2], [2400, 5])
    assert len(sharded) == 2400
    assert_same_search(single, sharded, q)
    with pytest.raises(ValueError, match="the index is empty"):
        ShardedIndex(DIM, 4, num_shards=2).search(q, 1)
    with pytest.raises(ValueError, match="num_shards must be an integer >= 1"):
        ShardedIndex(DIM, 4, num_shards=0)


def test_add_with_ids_and_remove_ids_match(pair, data):
    single, sharded = pair
    x, q = data
    for idx in (single, sharded):
        idx.add_with_ids(x[:3] * 0.5, [5000, 5001, 7777])
    assert single.remove_ids([3, 5001, 99_999]) == sharded.remove_ids([3, 5001, 99_999]) == 2
    assert len(single) == len(sharded) == 2401
    assert_same_search(single, sharded, q, 20)
    assert sharded.add(x[:2]).tolist() == single.add(x[:2]).tolist() == [7778, 7779]


def test_missing_ray_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ImportError, match=r'pip install "turbovq\[dist\]"'):
        ShardedIndex(DIM, 4)


# --- streaming build into shards, and the command line ---------------------------------------------------------------
class FailingSource(NpySource):
    def read(self, lo, hi):
        if lo >= 1000:
            raise RuntimeError("simulated crash")
        return super().read(lo, hi)


def test_streaming_sharded_build_resumes_cli_and_damaged_files(data, tmp_path):
    from typer.testing import CliRunner

    from turbovq.search.cli import index_app

    x, q = data
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "q.npy", q)
    out = tmp_path / "sidx"
    # a crash after two chunks of 500 (the CLI's configuration: bits 4.0, pca, default scan precision); one shard
    # keeps the actor start-ups down, the shard logic is covered above
    with pytest.raises(RuntimeError, match="simulated crash"):
        build_index(FailingSource(tmp_path / "x.npy"), out, ShardedIndex(DIM, 4.0, seed=7, num_shards=1),
                    chunk_rows=500, progress=False)
    assert progress_path(out).exists()
    assert tio.load(out / "manifest.tvq", "turbovq_sharded_index")[0]["ntotal"] == 1000  # the last checkpoint
    # `turbovq index build --ray` with the same arguments resumes it
    runner = CliRunner()
    args = ["build", str(tmp_path / "x.npy"), "-o", str(out), "--ray", "--shards", "1", "--seed", "7", "--batch",
            "500", "-q", "--json"]
    res = runner.invoke(index_app, args)
    assert res.exit_code == 0, res.output
    assert json.loads(res.output.strip().splitlines()[-1])["ntotal"] == 2400
    assert not progress_path(out).exists()
    res = runner.invoke(index_app, ["search", str(out), str(tmp_path / "q.npy"), "-k", "10", "--ray", "--json"])
    assert res.exit_code == 0, res.output
    got = np.array(json.loads(res.output)["ids"])
    single = TurboQuantIndex(DIM, 4.0, seed=7)
    single.train(x[training_rows(len(x), 20_000)])
    single.add(x)
    _, want = single.search(q, 10)
    assert (got == want).mean() >= 0.99  # equal up to bf16-scan rounding (see test_identical_other_metrics)
    res = runner.invoke(index_app, ["search", str(tmp_path / "nowhere"), str(tmp_path / "q.npy"), "--ray"])
    assert res.exit_code == 2 and "does not exist" in res.output
    check_missing_truncated_and_corrupt_files(out, tmp_path)


def check_missing_truncated_and_corrupt_files(good, tmp_path):
    """Each damaged copy of a saved sharded index is refused with the shard and its file named."""

    def copy(name):
        shutil.copytree(good, tmp_path / name)
        return tmp_path / name, next((tmp_path / name).glob("shard-00000.*.tvq"))

    d, shard = copy("missing")
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=rf"shard 0 of 1: .*{shard.name} is missing"):
        ShardedIndex.load(d)
    d, shard = copy("truncated")
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(FormatError, match=rf"shard 0 of 1: .*{shard.name} has \d+ bytes, the manifest says"):
        ShardedIndex.load(d)
    d, shard = copy("corrupt")
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with pytest.raises(FormatError, match=rf"shard 0 of 1: .*{shard.name}: checksum mismatch"):
        ShardedIndex.load(d)  # found by the shard's actor, reported by name
    d, _ = copy("bad_manifest")
    raw = bytearray((d / "manifest.tvq").read_bytes())
    raw[-40] ^= 0xFF
    (d / "manifest.tvq").write_bytes(bytes(raw))
    with pytest.raises(FormatError, match="manifest.tvq: checksum mismatch"):
        ShardedIndex.load(d)
    (d / "manifest.tvq").unlink()
    with pytest.raises(FileNotFoundError, match="has no manifest.tvq"):
        ShardedIndex.load(d)
