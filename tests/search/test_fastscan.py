"""Tests of turbovq.search.fastscan: the compiled decode and top-k merge against torch references, the index's
results with and without them, and the fallback when no compiler is available."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from turbovq import packing
from turbovq.search import TurboQuantIndex, fastscan

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def lib():
    lib = fastscan.library()
    if lib is None:
        pytest.skip("no C compiler: the compiled scan is unavailable (the torch path is tested elsewhere)")
    return lib


def reference_decode(codes, bits, dim, centroids, scales, dtype):
    vals = centroids[packing.unpack(codes, bits, dim).long()] * scales[:, None]
    if dtype == torch.int8:
        return vals.round().clamp(-127, 127).to(torch.int8)
    return vals.to(dtype)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("dim", [1, 7, 8, 9, 63, 64, 65, 130, 300])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8])
def test_decode_matches_unpack(lib, bits, dim, dtype):
    g = torch.Generator().manual_seed(bits * 1000 + dim)
    n = 37
    codes = packing.pack(torch.randint(0, 1 << bits, (n, dim), generator=g), bits)
    centroids = torch.randn(1 << bits, generator=g)
    scales = torch.rand(n, generator=g) * 30 if dtype == torch.int8 else torch.rand(n, generator=g)
    want = reference_decode(codes, bits, dim, centroids, scales, dtype)
    out = torch.full((n, dim + 3), 99, dtype=dtype)  # wider than dim: the row stride is honoured, the rest untouched
    fastscan.decode(lib, [(codes, bits, dim, centroids, scales, out[:, :dim])])
    assert torch.equal(out[:, :dim], want)
    assert (out[:, dim:] == 99).all()
    rows = torch.randint(0, n, (50,), generator=g)  # gathered rows, repeats allowed
    got = torch.empty(50, dim, dtype=dtype)
    fastscan.decode(lib, [(codes, bits, dim, centroids, scales, got)], rows=rows)
    assert torch.equal(got, want[rows])


def test_decode_errors(lib):
    codes = packing.pack(torch.zeros(4, 16, dtype=torch.int64), 4)
    cents, scales = torch.zeros(16), torch.ones(4)
    with pytest.raises(ValueError, match="out"):
        fastscan.decode(lib, [(codes, 4, 16, cents, scales, torch.empty(4, 16, dtype=torch.float64))])
    with pytest.raises(ValueError, match="disagree"):
        fastscan.decode(lib, [(codes, 4, 16, cents, torch.ones(3), torch.empty(4, 16))])
    with pytest.raises(ValueError, match="out of range"):
        fastscan.decode(lib, [(codes, 4, 16, cents, scales, torch.empty(1, 16))], rows=torch.tensor([4]))
    with pytest.raises(ValueError, match="unsupported"):
        fastscan.decode(lib, [(codes, 4, 17, cents, scales, torch.empty(4, 17))])  # 17 codes take 9 bytes, not 8
    with pytest.raises(ValueError, match="unsupported"):
        big = torch.zeros(1, fastscan.MAX_DIM + 1, dtype=torch.uint8)
        fastscan.decode(lib, [(big, 8, fastscan.MAX_DIM + 1, torch.zeros(256), torch.ones(1),
                               torch.empty(1, fastscan.MAX_DIM + 1))])  # fmt: skip


@pytest.mark.parametrize("stype", [torch.float32, torch.bfloat16, torch.int32])
@pytest.mark.parametrize("keep", [1, 7, 40])
@pytest.mark.parametrize("affine", [False, True])
def test_topk_merge_equals_one_topk(lib, stype, keep, affine):
    """Merging tile by tile (with the row scale and column bias) = one topk over all affine scores."""
    g = torch.Generator().manual_seed(keep)
    m, n = 9, 1000
    raw = (torch.randn(m, n, generator=g) * 1000).to(stype)
    raw[3, 500:] = raw[3, 500:] + 5000  # a late tile that beats everything
    row_scale = torch.rand(m, generator=g) + 0.5 if affine else None
    col_bias = torch.randn(n, generator=g) if affine else None
    full = raw.float() * (row_scale[:, None] if affine else 1) + (col_bias if affine else 0)
    best_s, best_p = torch.full((m, keep), -math.inf), torch.full((m, keep), -1, dtype=torch.int64)
    for lo in range(0, n, 130):
        hi = min(n, lo + 130)
        bias = col_bias[lo:hi].contiguous() if affine else None
        fastscan.topk_merge(lib, raw[:, lo:hi], lo, best_s, best_p, row_scale, bias)
    ref_s, _ = torch.topk(full, keep, dim=1)
    torch.testing.assert_close(best_s, ref_s)
    torch.testing.assert_close(torch.gather(full, 1, best_p), ref_s)  # positions hold those scores


def anisotropic(n: int, dim: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim)) * np.exp(-0.05 * np.arange(dim)) + 0.3
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize("mode", ["pca", "oblivious"])
def test_index_same_with_and_without_compiled_scan(lib, monkeypatch, metric, mode):
    """float32 scans give the same (D, I) through the compiled helpers and through torch; the int8 scan (compiled
    only) returns float32-exact scores of nearly the same neighbours."""
    x, q = anisotropic(3000, 48, 0), anisotropic(40, 48, 1)
    idx = TurboQuantIndex(48, 3, metric=metric, mode=mode, scan_precision="float32")
    idx.add(x)
    d_c, i_c = idx.search(q, k=10)
    idx.scan_precision = "int8"
    d_8, i_8 = idx.search(q, k=10)
    monkeypatch.setattr(fastscan, "library", lambda: None)
    idx.scan_precision = "float32"
    d_t, i_t = idx.search(q, k=10)
    np.testing.assert_allclose(d_c, d_t, rtol=1e-5, atol=1e-5)
    assert (i_c == i_t).mean() > 0.99  # (ties may order differently)
    np.testing.assert_allclose(d_8, d_t, rtol=1e-5, atol=1e-5)
    assert (i_8 == i_t).mean() > 0.98
    idx.scan_precision = "int8"  # without the compiled helpers int8 falls back to another precision
    np.testing.assert_allclose(idx.search(q, k=10)[0], d_t, rtol=1e-5, atol=1e-5)


def test_no_compiler_falls_back_with_a_warning(monkeypatch, tmp_path):
    monkeypatch.setenv("TURBOVQ_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "/bin/false")
    fastscan.library.cache_clear()
    try:
        with pytest.warns(UserWarning, match="compiled scan unavailable"):
            assert fastscan.library() is None
        assert list((tmp_path / "native").iterdir()) == []  # nothing half-written left behind
        monkeypatch.setenv("TURBOVQ_NATIVE", "0")
        fastscan.library.cache_clear()
        assert fastscan.library() is None
    finally:
        fastscan.library.cache_clear()


def test_lut_scan_matches_decoded_products(lib):
    """Table lookups (byte tables for 1/2/4/8 bits, code tables otherwise) = decode then dot, over all widths."""
    g = torch.Generator().manual_seed(9)
    n = 300
    groups, want = [], torch.zeros(n)
    for bits, dim in zip(range(1, 9), [11, 30, 63, 64, 80, 9, 7, 5]):
        codes = packing.pack(torch.randint(0, 1 << bits, (n, dim), generator=g), bits)
        cents, scales, q = torch.randn(1 << bits, generator=g), torch.rand(n, generator=g), torch.randn(dim)
        vals = torch.empty(n, dim)
        fastscan.decode(lib, [(codes, bits, dim, cents, scales, vals)])
        want += vals @ q
        groups.append((codes, bits, dim, scales, fastscan.lut_tables(cents, bits, q)))
    out = torch.empty(n)
    fastscan.lut_scan(lib, groups, n, out)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="tables"):
        fastscan.lut_scan(lib, [(*groups[0][:4], groups[0][4][:-1])], n, out)


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_one_query_lookup_scan_equals_batch_scan(lib, metric):
    """A query or two go through the lookup scan; their results equal the same queries inside a batch."""
    x, q = anisotropic(3000, 48, 2), anisotropic(30, 48, 3)
    idx = TurboQuantIndex(48, 4, metric=metric)
    idx.add(x)
    d_batch, i_batch = idx.search(q, k=5)
    for j in range(3):
        d_one, i_one = idx.search(q[j : j + 1], k=5)
        np.testing.assert_allclose(d_one[0], d_batch[j], rtol=1e-4, atol=1e-4)
        assert (i_one[0] == i_batch[j]).mean() >= 0.8  # (near-ties may swap)
