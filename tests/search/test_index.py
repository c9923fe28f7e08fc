"""Tests of turbovq.search: the flat TurboQuantIndex (scoring parity with the core quantizers, recall floors,
metrics, ids, persistence, errors) and its memory planning."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import turbovq.io as tio
from turbovq import TurboQuantMSE, TurboQuantProd, packing
from turbovq.search import TurboQuantIndex
from turbovq.search import index as index_mod
from turbovq.search.index import allocate_bits, plan_bits

pytestmark = pytest.mark.usefixtures("one_thread")


def anisotropic(n: int, dim: int, seed: int = 0, decay: float = 0.05, offset: float = 0.5) -> np.ndarray:
    """Unit vectors with a decaying spectrum and a common mean, like real sentence embeddings."""
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    scales = np.exp(-decay * np.arange(dim))
    x = (rng.standard_normal((n, dim)) * scales) @ basis.T + offset * basis[:, -1] * scales[0]
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def recall_at(ids_found: np.ndarray, truth: np.ndarray) -> float:
    """Recall@1@k: the fraction of queries whose true nearest neighbour is among the k returned."""
    return float(np.mean([truth[i] in ids_found[i] for i in range(len(truth))]))


@pytest.fixture(scope="module")
def data():
    x = anisotropic(3000, 64, seed=1)
    q = anisotropic(200, 64, seed=2)
    return x, q


# --- memory planning -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dim", [24, 64, 100, 384, 1536])
@pytest.mark.parametrize("bits", [2, 3, 3.5, 4, 6])
def test_plan_bits_fits_budget(dim, bits):
    budget = int(np.floor(dim * bits / 8))
    q_bits = plan_bits(dim, bits)
    idx = TurboQuantIndex(dim, bits, mode="oblivious")
    assert idx.quantizer.bits == pytest.approx(q_bits)
    assert idx.code_size <= budget
    assert idx.code_size >= budget - 4  # uses the budget: at most ~a norm's worth left over


def test_plan_bits_prod_and_too_small():
    assert TurboQuantIndex(384, 4, mode="center", estimator="prod").code_size <= 192
    with pytest.raises(ValueError, match="no room"):
        plan_bits(384, 2, "prod")  # 1 bit of mse + 1 bit of QJL leaves nothing for the norms
    with pytest.raises(ValueError, match="no room"):
        TurboQuantIndex(16, 1, mode="oblivious")


def test_allocate_bits_water_filling():
    var = np.exp(-0.05 * np.arange(128))
    groups = allocate_bits(var, 64)
    bits = np.concatenate([np.full(b - a, nb) for a, b, nb in groups])
    assert all(b - a >= 2 for a, b, _ in groups)
    assert np.all(np.diff(bits) <= 0)  # larger variance, more bits
    assert bits[0] > bits[-1]
    cost = sum(packing.packed_size(b - a, nb) + 2 for a, b, nb in groups)
    assert 64 - 8 <= cost <= 64
    flat = allocate_bits(np.ones(128), 66)  # equal variances: equal bits, up to a partly filled last level
    assert len(flat) <= 2 and flat[0][2] - flat[-1][2] <= 1
    with pytest.raises(ValueError, match="cannot hold"):
        allocate_bits(np.ones(16), 2)


# --- scoring parity with the core quantizers (the reference) ---------------------------------------------------
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("dim", [9, 33])
def test_scores_match_quantizer_inner_product(bits, dim):
    """Oblivious mode with fit_norms=False is plain TurboQuant_mse: scores must equal the core estimator."""
    rng = np.random.default_rng(bits * 100 + dim)
    x = rng.standard_normal((300, dim)).astype(np.float32) * 3
    q = rng.standard_normal((17, dim)).astype(np.float32)
    idx = TurboQuantIndex(dim, bits, mode="oblivious", fit_norms=False, seed=5)
    idx.add(x)
    ref = TurboQuantMSE(dim, bits, seed=5, rotation="haar")
    s_ref = ref.inner_product(ref.quantize(x), q).T  # (m, n)
    D, ids = idx.search(q, k=len(x))
    s_idx = np.take_along_axis(s_ref, ids, axis=1)
    np.testing.assert_allclose(D, s_idx, rtol=1e-4, atol=1e-4)
    assert np.all(np.diff(D, axis=1) <= 1e-6)  # sorted best first


@pytest.mark.parametrize("bits", [2.5, 4])
def test_scores_match_prod_inner_product(bits):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((200, 48)).astype(np.float32)
    q = rng.standard_normal((11, 48)).astype(np.float32)
    idx = TurboQuantIndex(48, bits, mode="oblivious", estimator="prod", fit_norms=False, seed=2)
    idx.add(x)
    ref = TurboQuantProd(48, bits, seed=2, rotation="haar")
    s_ref = ref.inner_product(ref.quantize(x), q).T
    D, ids = idx.search(q, k=50)
    np.testing.assert_allclose(D, np.take_along_axis(s_ref, ids, axis=1), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(D, -np.sort(-s_ref, axis=1)[:, :50], rtol=1e-4, atol=1e-4)


def test_tiles_merge_like_one_tile(data, monkeypatch):
    x, q = data
    idx = TurboQuantIndex(64, 4)
    idx.add(x)
    D1, I1 = idx.search(q, k=20)
    monkeypatch.setattr(index_mod, "_TILE_ELEMENTS", 64 * 300)  # 300-row tiles: 10 tiles, a ragged last one
    monkeypatch.setattr(index_mod, "_QUERY_BLOCK", 64)
    D2, I2 = idx.search(q, k=20)
    np.testing.assert_allclose(D1, D2, rtol=1e-5, atol=1e-5)
    assert (I1 == I2).mean() > 0.99  # ties may swap


# --- quality -----------------------------------------------------------------------------------------------------
def test_recall_floors_and_pca_beats_oblivious(data):
    x, q = data
    truth = (q @ x.T).argmax(1)
    rec = {}
    for mode in ("pca", "center", "oblivious"):
        idx = TurboQuantIndex(64, 3, mode=mode)
        idx.add(x)
        assert idx.code_size <= 24
        _, ids = idx.search(q, k=10)
        rec[mode] = (recall_at(ids[:, :1], truth), recall_at(ids, truth))
    assert rec["oblivious"][1] >= 0.9
    assert rec["pca"][1] >= 0.95
    assert rec["pca"][0] >= 0.5
    assert rec["pca"][0] > rec["oblivious"][0] + 0.05  # data-aware allocation pays on anisotropic data


def test_rerank_runs_and_keeps_recall(data):
    x, q = data
    truth = (q @ x.T).argmax(1)
    idx = TurboQuantIndex(64, 5, mode="center", estimator="prod", rerank=4)
    idx.add(x)
    D, ids = idx.search(q, k=10)
    assert recall_at(ids, truth) >= 0.95
    assert np.all(np.diff(D, axis=1) <= 1e-6)


@pytest.mark.parametrize("mode", ["pca", "center", "oblivious"])
def test_l2_distances(mode):
    x = anisotropic(1500, 32, seed=4) * np.linspace(0.5, 2, 1500, dtype=np.float32)[:, None] + 0.3
    q = anisotropic(50, 32, seed=5) + 0.3
    exact = ((q[:, None, :] - x[None]) ** 2).sum(-1)
    idx = TurboQuantIndex(32, 6, metric="l2", mode=mode)
    idx.add(x)
    D, ids = idx.search(q, k=10)
    assert np.all(np.diff(D, axis=1) >= -1e-6)  # ascending
    true_d = np.take_along_axis(exact, ids, axis=1)
    assert np.median(np.abs(D - true_d) / true_d) < 0.1
    assert np.abs(D - true_d).max() < 0.15 * exact.mean()
    assert recall_at(ids, exact.argmin(1)) >= 0.95


def test_l2_pca_accounts_for_dropped_components():
    """At 1.5 bits on a steep spectrum some components get 0 bits; their energy must still enter ||x - mu||^2."""
    x = anisotropic(1000, 64, seed=6, decay=0.15) * np.linspace(0.5, 3, 1000, dtype=np.float32)[:, None]
    idx = TurboQuantIndex(64, 1.5, metric="l2")
    idx.add(x)
    assert sum(b - a for a, b, _ in idx.groups) < 64  # something was dropped
    idx._consolidate()
    exact = ((x - idx.mean.numpy()) ** 2).sum(1)
    np.testing.assert_allclose(idx._norm_sq(idx._fields).numpy(), exact, rtol=2e-3)


def test_cosine_ignores_scale(data):
    x, q = data
    scale = np.random.default_rng(0).uniform(0.1, 10, len(x)).astype(np.float32)[:, None]
    a = TurboQuantIndex(64, 4, metric="cosine")
    a.add(x * scale)
    b = TurboQuantIndex(64, 4, metric="cosine")
    b.add(x)
    Da, Ia = a.search(q * 3, k=5)
    Db, Ib = b.search(q, k=5)
    np.testing.assert_allclose(Da, Db, atol=1e-4)
    assert (Ia == Ib).mean() > 0.99
    assert np.all(Da <= 1.05)


def test_ip_scores_estimate_inner_products(data):
    x, q = data
    idx = TurboQuantIndex(64, 8)
    idx.add(x + 1.0)  # a large common offset: the centre carries it exactly
    D, ids = idx.search(q, k=5)
    exact = np.take_along_axis(q @ (x + 1.0).T, ids, axis=1)
    np.testing.assert_allclose(D, exact, atol=0.01)


def test_seed_determinism_and_torch_input(data):
    x, q = data
    a, b = TurboQuantIndex(64, 3, seed=11), TurboQuantIndex(64, 3, seed=11)
    a.add(x)
    b.add(torch.from_numpy(x).double())
    Da, Ia = a.search(q, k=5)
    Db, Ib = b.search(torch.from_numpy(q), k=5)
    np.testing.assert_array_equal(Ia, Ib)
    np.testing.assert_allclose(Da, Db, atol=1e-5)
    c = TurboQuantIndex(64, 3, seed=12)
    c.add(x)
    assert not np.array_equal(c.search(q, k=5)[0], Da)


# --- ids -----------------------------------------------------------------------------------------------------------
def test_ids_add_remove(data):
    x, q = data
    idx = TurboQuantIndex(64, 4)
    ids0 = idx.add(x[:1000])
    ids1 = idx.add(x[1000:2000])
    np.testing.assert_array_equal(np.concatenate([ids0, ids1]), np.arange(2000))
    custom = idx.add_with_ids(x[2000:], np.arange(10_000, 11_000))
    assert len(idx) == idx.ntotal == 3000 and custom[0] == 10_000
    assert idx.add(x[:1])[0] == 11_000  # continues after the largest id
    with pytest.raises(ValueError, match="already in the index"):
        idx.add_with_ids(x[:1], [5])
    with pytest.raises(ValueError, match="distinct"):
        idx.add_with_ids(x[:2], [20_000, 20_000])
    with pytest.raises(ValueError, match="ids"):
        idx.add_with_ids(x[:2], [1])
    _, top = idx.search(q, k=1)
    removed = idx.remove_ids(np.unique(top[:, 0]).tolist() + [999_999])
    assert removed == len(np.unique(top[:, 0])) and len(idx) == 3001 - removed
    _, after = idx.search(q, k=10)
    assert not np.isin(after, top[:, 0]).any()
    assert idx.remove_ids([]) == 0


def test_batched_adds_equal_one_add(data):
    x, q = data
    a = TurboQuantIndex(64, 4)
    a.train(x)
    for part in np.array_split(x, 7):
        a.add(part)
    b = TurboQuantIndex(64, 4)
    b.add(x)
    np.testing.assert_array_equal(a.search(q, k=5)[1], b.search(q, k=5)[1])


def test_code_size_is_what_is_stored(data):
    x, _ = data
    for kw in ({}, {"metric": "l2"}, {"mode": "center"}, {"mode": "oblivious", "fit_norms": False},
               {"mode": "center", "estimator": "prod"}):
        idx = TurboQuantIndex(64, 4, **kw)
        idx.add(x[:100])
        idx._consolidate()
        stored = sum(t[0].numel() * t.element_size() for t in idx._fields.values())
        assert stored == idx.code_size, kw
        assert idx.nbytes >= 100 * (idx.code_size + 8)


# --- errors ----------------------------------------------------------------------------------------------------------
def test_errors(data):
    x, q = data
    idx = TurboQuantIndex(64, 4)
    with pytest.raises(ValueError, match="empty"):
        idx.search(q, k=1)
    idx.add(x[:50])
    with pytest.raises(ValueError, match="dimension 32"):
        idx.search(q[:, :32], k=1)
    with pytest.raises(ValueError, match="larger than the number of vectors"):
        idx.search(q, k=51)
    bad = q.copy()
    bad[3, 5] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        idx.search(bad, k=1)
    with pytest.raises(ValueError, match="NaN"):
        idx.add(bad)
    with pytest.raises(ValueError, match="k must be"):
        idx.search(q, k=0)
    with pytest.raises(ValueError, match="train before"):
        idx.train(x)
    with pytest.raises(ValueError, match="metric"):
        TurboQuantIndex(64, 4, metric="dot")
    with pytest.raises(ValueError, match="rerank"):
        TurboQuantIndex(64, 4, rerank=2)
    with pytest.raises(ValueError, match="prod"):
        TurboQuantIndex(64, 4, estimator="prod")  # mode pca scores mse codes only
    with pytest.raises(ValueError, match="nothing to train"):
        TurboQuantIndex(64, 4, mode="oblivious").train(x)


# --- persistence -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw", [{}, {"metric": "l2"}, {"mode": "center", "estimator": "prod", "rerank": 3}])
@pytest.mark.parametrize("mmap", [True, False])
def test_save_load_roundtrip(tmp_path, data, kw, mmap):
    x, q = data
    idx = TurboQuantIndex(64, 4, seed=3, **kw)
    idx.add_with_ids(x[:1000], np.arange(1000) * 2)
    idx.remove_ids([0, 2])
    path = tmp_path / "a.tvq"
    idx.save(path)
    back = TurboQuantIndex.load(path, mmap=mmap)
    assert back.config == idx.config and len(back) == len(idx) and back.code_size == idx.code_size
    D1, I1 = idx.search(q, k=7)
    D2, I2 = back.search(q, k=7)
    np.testing.assert_array_equal(I1, I2)
    np.testing.assert_allclose(D1, D2, rtol=1e-6)
    new = back.add(x[1000:1010])  # a loaded (memory-mapped) index still grows and shrinks
    assert new[0] == 1998 + 1 and len(back) == len(idx) + 10
    assert back.remove_ids(new[:3]) == 3


def test_load_rejects_corrupt_and_foreign(tmp_path, data):
    x, _ = data
    idx = TurboQuantIndex(64, 4)
    idx.add(x[:100])
    path = tmp_path / "a.tvq"
    idx.save(path)
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    bad = tmp_path / "bad.tvq"
    bad.write_bytes(bytes(raw))
    with pytest.raises(tio.FormatError, match="checksum"):
        TurboQuantIndex.load(bad)
    (tmp_path / "short.tvq").write_bytes(bytes(raw[:-100]))
    with pytest.raises(tio.FormatError, match="truncated"):
        TurboQuantIndex.load(tmp_path / "short.tvq")
    other = tmp_path / "codes.tvq"
    TurboQuantMSE(64, 4).quantize(x[:10]).save(other)
    with pytest.raises(tio.FormatError, match="expected a 'turbovq_index'"):
        TurboQuantIndex.load(other)
    future = tmp_path / "future.tvq"
    tio.save(future, "turbovq_index", {"index_version": 99}, {"ids": torch.zeros(1, dtype=torch.int64)})
    with pytest.raises(tio.FormatError, match="index version 99"):
        TurboQuantIndex.load(future)


def test_interrupted_save_keeps_the_old_index(tmp_path, data, monkeypatch):
    x, q = data
    idx = TurboQuantIndex(64, 4)
    idx.add(x[:100])
    path = tmp_path / "a.tvq"
    idx.save(path)
    before = path.read_bytes()
    idx.add(x[100:200])

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tio.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        idx.save(path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tvq"]  # no temporary left behind
    assert len(TurboQuantIndex.load(path)) == 100


@pytest.mark.parametrize("low", ["bfloat16", "int8"])
def test_low_precision_scan_matches_float32(data, low):
    """A bf16 or int8 scan only picks a shortlist; the scores returned are re-computed exactly in float32."""
    x, q = data
    q = q[:40]  # low precision is used only while the shortlists (40 * 26 rows) are smaller than the collection
    res = {}
    for prec in ("float32", low):
        idx = TurboQuantIndex(64, 4, scan_precision=prec, metric="l2")
        idx.add(x)
        res[prec] = idx.search(q, k=10)
    assert idx._scan_dtype(int8_ok=True) == getattr(torch, low)
    np.testing.assert_allclose(res[low][0], res["float32"][0], rtol=1e-5, atol=1e-5)
    assert (res[low][1] == res["float32"][1]).mean() > 0.99
    with pytest.raises(ValueError, match="scan_precision"):
        TurboQuantIndex(64, 4, scan_precision="int4")


# --- command line ----------------------------------------------------------------------------------------------------
def test_cli_build_search_eval(tmp_path, data):
    import json

    from typer.testing import CliRunner

    from turbovq.search.cli import index_app

    x, q = data
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "q.npy", q[:20])
    runner = CliRunner()
    out = tmp_path / "x.tvq"
    res = runner.invoke(index_app, ["build", str(tmp_path / "x.npy"), "-o", str(out), "--bits", "4", "-q", "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output.strip().splitlines()[-1])
    assert summary["ntotal"] == len(x) and summary["code_size"] <= 32
    res = runner.invoke(index_app, ["search", str(out), str(tmp_path / "q.npy"), "-k", "5", "--json"])
    assert res.exit_code == 0, res.output
    ids = np.array(json.loads(res.output)["ids"])
    assert ids.shape == (20, 5)
    np.testing.assert_array_equal(ids, TurboQuantIndex.load(out).search(q[:20], 5)[1])
    res = runner.invoke(index_app, ["eval", str(out), str(tmp_path / "x.npy"), str(tmp_path / "q.npy"), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["recall_1_at"]["8"] >= 0.9
    # clear errors: k too large, wrong dimension, a corrupt file
    res = runner.invoke(index_app, ["search", str(out), str(tmp_path / "q.npy"), "-k", "100000"])
    assert res.exit_code == 2 and "larger than the number of vectors" in res.output
    np.save(tmp_path / "bad.npy", q[:, :10])
    res = runner.invoke(index_app, ["search", str(out), str(tmp_path / "bad.npy")])
    assert res.exit_code == 2 and "dimension 10" in res.output
    raw = bytearray(out.read_bytes())
    raw[-100] ^= 1
    out.write_bytes(bytes(raw))
    res = runner.invoke(index_app, ["search", str(out), str(tmp_path / "q.npy")])
    assert res.exit_code == 2 and "checksum" in res.output


def test_cli_parquet(tmp_path, data):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    from turbovq.search.cli import load_vectors

    x, _ = data
    pq.write_table(pa.table({"id": np.arange(10), "emb": list(x[:10])}), tmp_path / "x.parquet")
    np.testing.assert_array_equal(load_vectors(tmp_path / "x.parquet"), x[:10])
    np.testing.assert_array_equal(load_vectors(tmp_path / "x.parquet", "emb"), x[:10])


# --- IVF -------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_ivf_recall_grows_with_nprobe(data, metric):
    from turbovq.search.ivf import TurboQuantIVFIndex

    x, q = data
    if metric == "l2":
        exact = ((q[:, None, :] - x[None]) ** 2).sum(-1)
        truth = exact.argmin(1)
    else:
        truth = (q @ x.T).argmax(1)
    ivf = TurboQuantIVFIndex(64, 4, nlist=16, metric=metric, nprobe=2)
    ids_added = ivf.add(x)
    assert len(ivf) == len(x) and ids_added[-1] == len(x) - 1 and ivf.code_size <= 32
    rec = {}
    for nprobe in (1, 4, 16):
        D, ids = ivf.search(q, k=10, nprobe=nprobe)
        rec[nprobe] = recall_at(ids, truth)
        assert np.all(np.diff(D, axis=1) >= -1e-5) if metric == "l2" else np.all(np.diff(D, axis=1) <= 1e-5)
    assert rec[1] < rec[16] and rec[4] <= rec[16] + 0.02
    assert rec[16] >= 0.95
    flat = TurboQuantIndex(64, 4, metric=metric)
    flat.add(x)
    assert rec[16] >= recall_at(flat.search(q, k=10)[1], truth) - 0.03  # all lists probed: as good as flat
    if metric == "l2":  # the distances are estimates of the true ones
        D, ids = ivf.search(q, k=5, nprobe=16)
        true_d = np.take_along_axis(exact, ids, axis=1)
        assert np.median(np.abs(D - true_d) / true_d) < 0.1


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_ivf_save_load_roundtrip(data, metric, tmp_path):
    from turbovq.search.ivf import TurboQuantIVFIndex

    x, q = data
    ivf = TurboQuantIVFIndex(64, 3.5, nlist=16, metric=metric, nprobe=5, rotation="hadamard")
    ivf.add_with_ids(x, np.arange(len(x)) * 3)
    ivf.remove_ids([0, 3])
    before = ivf.search(q, k=7)
    ivf.save(tmp_path / "x.tvq")
    for mmap in (True, False):
        back = TurboQuantIVFIndex.load(tmp_path / "x.tvq", mmap=mmap)
        assert back.config == ivf.config and len(back) == len(ivf) == len(x) - 2
        for a, b in zip(back.search(q, k=7), before):
            np.testing.assert_array_equal(a, b)
    back.add(x[:3])  # a loaded index keeps growing: new ids continue after the largest
    assert len(back) == len(x) + 1 and back._all_ids().max() == 3 * (len(x) - 1) + 3
    raw = bytearray((tmp_path / "x.tvq").read_bytes())
    raw[-100] ^= 0xFF
    (tmp_path / "bad.tvq").write_bytes(bytes(raw))
    with pytest.raises(tio.FormatError):
        TurboQuantIVFIndex.load(tmp_path / "bad.tvq")
    with pytest.raises(tio.FormatError, match="turbovq_index|kind"):  # a flat index file is not an IVF index
        flat = TurboQuantIndex(64, 4)
        flat.add(x[:50])
        flat.save(tmp_path / "flat.tvq")
        TurboQuantIVFIndex.load(tmp_path / "flat.tvq")
    with pytest.raises(ValueError, match="not trained"):
        TurboQuantIVFIndex(64, 4, nlist=4).save(tmp_path / "empty.tvq")


def test_ivf_ids_and_errors(data):
    from turbovq.search.ivf import TurboQuantIVFIndex

    x, q = data
    ivf = TurboQuantIVFIndex(64, 4, nlist=8)
    ivf.train(x)
    ivf.add_with_ids(x[:500], np.arange(500) + 1000)
    D, ids = ivf.search(q[:5], k=3, nprobe=8)
    assert ids.min() >= 1000
    assert ivf.remove_ids(ids[:, 0]) == len(np.unique(ids[:, 0]))
    assert not np.isin(ivf.search(q[:5], k=3, nprobe=8)[1], ids[:, 0]).any()
    with pytest.raises(ValueError, match="larger than"):
        ivf.search(q, k=10_000)
    with pytest.raises(ValueError, match="already in the index"):  # ids are unique across lists, not only within one
        ivf.add_with_ids(x[500:1000], np.arange(500) + 1000)
    with pytest.raises(ValueError, match="must be integers"):
        ivf.add_with_ids(x[:2], [0.5, 1.5])
    with pytest.raises(ValueError, match="nprobe"):
        ivf.nprobe = 0
    with pytest.raises(ValueError, match="at least 8"):
        TurboQuantIVFIndex(64, 4, nlist=8).train(x[:4])


def test_numpy_input_kinds(tmp_path, data):
    """float64, float16, non-contiguous and memory-mapped (read-only) numpy inputs all work and agree."""
    x, q = data
    ref = TurboQuantIndex(64, 4)
    ref.add(x)
    want = ref.search(q, k=5)[1]
    np.save(tmp_path / "x.npy", x)
    for variant in (x.astype(np.float64), np.asfortranarray(x), np.load(tmp_path / "x.npy", mmap_mode="r")):
        idx = TurboQuantIndex(64, 4)
        idx.add(variant)
        np.testing.assert_array_equal(idx.search(q.astype(np.float64), k=5)[1], want)
    with pytest.raises(ValueError, match="floating point"):
        ref.search(q.astype(np.int32), k=1)


@pytest.mark.parametrize("keep", [1, 7, 40])
def test_tiled_topk_merge_equals_one_topk(keep):
    """The running merge (dense top-k while filling, sparse above-threshold gathering after) = one global topk."""
    from turbovq.search.index import _merge_topk

    g = torch.Generator().manual_seed(keep)
    scores = torch.randn(9, 1000, generator=g)
    scores[3, 500:] += 5  # a late tile that beats everything (dense fallback path)
    best_s, best_p = torch.full((9, 0), -math.inf), torch.zeros((9, 0), dtype=torch.int64)
    for lo in range(0, 1000, 64):
        best_s, best_p = _merge_topk(best_s, best_p, scores[:, lo : lo + 64], lo, keep)
    ref_s, ref_p = torch.topk(scores, keep, dim=1)
    torch.testing.assert_close(best_s, ref_s)
    assert torch.equal(best_p, ref_p)


@pytest.mark.gpu
@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_gpu_search_matches_cpu(cuda, metric):
    """Codes moved with ``to("cuda")`` score the same there (bf16 tiles, float32 re-scoring of the shortlist);
    an index built on the GPU finds the same neighbours."""
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(6000, 96, generator=g) * torch.linspace(2, 0.1, 96)).numpy()
    q = x[:50] + 0.01
    cpu = TurboQuantIndex(96, 4, metric=metric, scan_precision="float32")
    cpu.add(x)
    d_cpu, i_cpu = cpu.search(q, 10)
    d_gpu, i_gpu = cpu.to(cuda).search(q, 10)
    assert (i_cpu[:, 0] == i_gpu[:, 0]).mean() > 0.95
    np.testing.assert_allclose(d_gpu[:, 0], d_cpu[:, 0], rtol=1e-4, atol=1e-4)
    built = TurboQuantIndex(96, 4, metric=metric).to(cuda)
    built.add(x)
    assert (built.search(q, 10)[1][:, 0] == np.arange(50)).mean() > 0.95
    built.remove_ids(np.arange(10))
    assert len(built) == 5990 and not np.isin(built.search(q, 10)[1], np.arange(10)).any()


def test_to_cpu_is_a_no_op_and_cuda_absence_is_reported():
    idx = TurboQuantIndex(16, 4)
    idx.add(np.random.default_rng(0).standard_normal((100, 16)).astype(np.float32))
    before = idx.search(np.ones((1, 16), np.float32), 3)
    assert idx.to("cpu") is idx
    np.testing.assert_array_equal(idx.search(np.ones((1, 16), np.float32), 3)[1], before[1])
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            idx.to("cuda")
