import math

import numpy as np
import pytest
import torch
from conftest import relative_error, sparse_vectors, unit

import turbovq as tq
from turbovq import codebook

DIMS = [64, 128, 384, 1536]  # 384 is not a power of two


def gaussian(n, dim, seed=0, scale=3.0):
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)) * scale


@pytest.mark.parametrize("rotation", ["hadamard", "haar"])
@pytest.mark.parametrize("dim", DIMS)
def test_mse_distortion_matches_exact_codebook(dim, rotation):
    x = gaussian(10_000, dim)
    for bits in range(1, 5):
        q = tq.TurboQuantMSE(dim, bits, seed=1, rotation=rotation)
        measured = relative_error(x, q.dequantize(q.quantize(x)))
        exact = codebook.mse_distortion(dim, bits)
        assert measured == pytest.approx(exact, rel=0.02), (bits, measured, exact)
        lower, upper = tq.distortion_bounds(bits)
        assert lower < measured < upper


@pytest.mark.parametrize("rotation", ["hadamard", "haar"])
@pytest.mark.parametrize("dim", DIMS)
def test_rotation_makes_sparse_inputs_follow_the_law(dim, rotation):
    """The rotation, averaged over seeds, turns adversarial sparse inputs into Beta-distributed coordinates."""
    seeds = 2 if dim == 1536 else 4
    x = sparse_vectors(12_000 // seeds, dim)
    for bits in (1, 2, 4):
        measured = np.mean(
            [
                relative_error(x, q.dequantize(q.quantize(x)))
                for q in (tq.TurboQuantMSE(dim, bits, seed=s, rotation=rotation) for s in range(seeds))
            ]
        )
        assert measured == pytest.approx(codebook.mse_distortion(dim, bits), rel=0.03), bits


@pytest.mark.parametrize("dim", DIMS)
def test_sparse_inputs_have_teeth(dim):
    """Control for the test above: without a rotation the same inputs miss the law by far."""
    x = unit(sparse_vectors(3000, dim))
    c, b = (v.float() for v in tq.lloyd_max_codebook(dim, 2))
    error = relative_error(x, c[torch.bucketize(x, b)])
    assert error > 2 * codebook.mse_distortion(dim, 2)


@pytest.mark.parametrize("dim", [64, 384])
def test_prod_inner_product_error_matches_theory(dim):
    # Many x and many y: for one fixed sketch S the error of a given y varies with ||S y|| (~sqrt(2/m)).
    x = unit(gaussian(10_000, dim, seed=2))
    y = unit(gaussian(256, dim, seed=3))
    for bits in range(1, 5):
        p = tq.TurboQuantProd(dim, bits, seed=4)
        err = p.inner_product(p.quantize(x), y) - x @ y.T
        measured = dim * err.pow(2).mean().item()
        assert measured == pytest.approx(codebook.prod_distortion(dim, bits), rel=0.05), bits


def _slope(est: torch.Tensor, true: torch.Tensor) -> float:
    t = true - true.mean()
    return float((t * (est - est.mean())).sum() / t.pow(2).sum())


def _correlated_pairs(n, dim, seed):
    """Unit x and unit y whose inner products spread over (-1, 1)."""
    g = torch.Generator().manual_seed(seed)
    x = unit(torch.randn(n, dim, generator=g))
    mix = torch.empty(n, 1).uniform_(-3, 3, generator=g)
    y = unit(mix * x + torch.randn(n, dim, generator=g) / math.sqrt(dim))
    return x, y


@pytest.mark.parametrize("bits", [1, 2, 3])
def test_prod_is_unbiased_while_mse_shrinks(bits):
    dim = 128
    x, y = _correlated_pairs(20_000, dim, seed=5)
    true = (x * y).sum(1)
    p = tq.TurboQuantProd(dim, bits, seed=6)
    c = p.quantize(x)
    est = (p.dequantize(c) * y).sum(1)
    assert _slope(est, true) == pytest.approx(1.0, abs=0.03)
    # Same estimate through the asymmetric path (rotated query dotted with codes).
    direct = torch.stack([p.inner_product(c[i], y[i]) for i in range(50)]).reshape(-1)
    assert torch.allclose(direct, est[:50], atol=1e-4)
    if bits == 1:
        # 1-bit mse is biased: E[<y, x_hat>] = (1 - D_mse(1)) <y, x> ~ 2/pi <y, x> (the paper's motivation for prod).
        m = tq.TurboQuantMSE(dim, 1, seed=6)
        shrink = _slope((m.dequantize(m.quantize(x)) * y).sum(1), true)
        assert shrink == pytest.approx(1 - codebook.mse_distortion(dim, 1), abs=0.03)
        assert shrink == pytest.approx(2 / math.pi, abs=0.03)


@pytest.mark.parametrize("dim,bits,outliers", [(128, 2.5, 64), (128, 3.5, 64), (128, 2.25, 32), (96, 3.75, 72)])
def test_fractional_bits_average_exactly(dim, bits, outliers):
    q = tq.TurboQuantMSE(dim, bits)
    assert q.num_outliers == outliers
    c = q.quantize(gaussian(33, dim))
    code_bytes = sum(c.fields[k].shape[1] for k in c.fields if k.startswith("codes"))
    assert code_bytes * 8 == pytest.approx(bits * dim, abs=8)  # each group rounds up to whole bytes at most
    norm_bits = 2 * 32
    assert c.bits_per_coordinate == pytest.approx((code_bytes * 8 + norm_bits) / dim)
    lo, hi = codebook.mse_distortion(outliers, math.ceil(bits)), codebook.mse_distortion(dim - outliers, int(bits))
    x = gaussian(10_000, dim, seed=7)
    measured = relative_error(x, q.dequantize(q.quantize(x)))
    assert hi * 1.02 > measured > lo * 0.98


def test_fractional_bits_must_be_reachable():
    with pytest.raises(ValueError, match="multiple of 1/dim"):
        tq.TurboQuantMSE(100, 2.333)
    with pytest.raises(ValueError, match="at least 2 channels"):
        tq.TurboQuantMSE(128, 2 + 1 / 128)


def test_calibrate_picks_outlier_channels_and_helps():
    dim = 128
    g = torch.Generator().manual_seed(8)
    scale = torch.ones(dim)
    heavy = torch.randperm(dim, generator=g)[:32]
    scale[heavy] = 20.0
    x = torch.randn(8000, dim, generator=g) * scale
    q = tq.TurboQuantMSE(dim, 2.25).calibrate(x[:1000])
    assert set(q.outliers.tolist()) == set(heavy.tolist())
    plain = tq.TurboQuantMSE(dim, 2.25)
    assert relative_error(x, q.dequantize(q.quantize(x))) < 0.8 * relative_error(x, plain.dequantize(plain.quantize(x)))
    explicit = tq.TurboQuantMSE(dim, 2.25, outliers=heavy.tolist())
    assert torch.equal(explicit.quantize(x).fields["codes0"], q.quantize(x).fields["codes0"])


def test_prod_fractional_and_calibrate():
    dim = 128
    x = gaussian(10_000, dim, seed=9)
    p = tq.TurboQuantProd(dim, 3.5).calibrate(x[:500])
    assert p.num_outliers == 64
    y = unit(gaussian(3, dim, seed=10))
    err = p.inner_product(p.quantize(unit(x)), y) - unit(x) @ y.T
    assert dim * err.pow(2).mean().item() < codebook.prod_distortion(dim, 3) * 1.05


@pytest.mark.parametrize("cls", [tq.TurboQuantMSE, tq.TurboQuantProd])
def test_seeds_determine_codes(cls):
    x = gaussian(500, 96)
    a, b, c = cls(96, 3, seed=1).quantize(x), cls(96, 3, seed=1).quantize(x), cls(96, 3, seed=2).quantize(x)
    for k in a.fields:
        assert torch.equal(a.fields[k], b.fields[k])
    assert not torch.equal(a.fields["codes0"], c.fields["codes0"])


@pytest.mark.parametrize("cls", [tq.TurboQuantMSE, tq.TurboQuantProd])
def test_zero_vectors_decode_to_zero(cls):
    x = gaussian(4, 64)
    x[1] = 0
    q = cls(64, 3)
    out = q.dequantize(q.quantize(x))
    assert torch.equal(out[1], torch.zeros(64))
    assert torch.all(out[0] != 0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_input_dtypes_and_kinds(dtype):
    x = gaussian(20, 64).to(dtype)
    q = tq.TurboQuantMSE(64, 4)
    out = q.dequantize(q.quantize(x))
    assert out.dtype == torch.float32 and out.shape == x.shape
    assert relative_error(x.float(), out) < 0.05
    vec = q.dequantize(q.quantize(x[0]))
    assert vec.shape == (64,)
    if dtype != torch.bfloat16:
        arr = q.dequantize(q.quantize(x.numpy()))
        assert isinstance(arr, np.ndarray) and arr.dtype == np.float32
        assert np.allclose(arr, out.numpy())
        s = q.inner_product(q.quantize(x.numpy()), x[:3].float().numpy())
        assert isinstance(s, np.ndarray) and s.shape == (20, 3)


def test_norms_are_stored_separately():
    x = gaussian(200, 64)
    q = tq.TurboQuantMSE(64, 4)
    a, b = q.quantize(x), q.quantize(1000 * x)
    assert torch.equal(a.fields["codes0"], b.fields["codes0"])
    assert torch.allclose(q.dequantize(b), 1000 * q.dequantize(a), rtol=1e-5, atol=1e-2)


def test_float16_norms():
    x = gaussian(1000, 64)
    q = tq.TurboQuantMSE(64, 4, norm_dtype="float16")
    c = q.quantize(x)
    assert c.bits_per_coordinate == pytest.approx(4 + 16 / 64)
    assert relative_error(x, q.dequantize(c)) == pytest.approx(codebook.mse_distortion(64, 4), rel=0.05)
    with pytest.raises(ValueError, match="float16 range"):
        q.quantize(x * 1e6)


BAD_INPUTS = [
    (lambda: torch.full((3, 64), float("nan")), "NaN or Inf"),
    (lambda: torch.tensor([[float("inf")] + [0.0] * 63]), "NaN or Inf"),
    (lambda: torch.zeros(3, 65), "dimension 65"),
    (lambda: torch.zeros(0, 64), "empty batch"),
    (lambda: torch.zeros(2, 3, 64), "shape"),
    (lambda: torch.zeros(3, 64, dtype=torch.int64), "float16, bfloat16"),
    (lambda: np.zeros((3, 64), dtype=np.int32), "floating point"),
    (lambda: [[0.0] * 64], "torch.Tensor or numpy"),
]


@pytest.mark.parametrize("make,message", BAD_INPUTS)
@pytest.mark.parametrize("cls", [tq.TurboQuantMSE, tq.TurboQuantProd])
def test_bad_inputs_raise(cls, make, message):
    with pytest.raises(ValueError, match=message):
        cls(64, 3).quantize(make())


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(dim=1),
        dict(dim=64, bits=0),
        dict(dim=64, bits=9),
        dict(dim=64, bits="4"),
        dict(dim=64, rotation="dct"),
        dict(dim=64, bits=4, outliers=[1, 2]),
        dict(dim=64, bits=2.5, outliers=[0]),
        dict(dim=64, bits=2.5, outliers=[64] * 32),
        dict(dim=64, norm_dtype="int8"),
        dict(dim=64, seed=1.5),
    ],
)
def test_bad_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        tq.TurboQuantMSE(**kwargs)


def test_prod_rejects_bits_between_1_and_2():
    with pytest.raises(ValueError, match="bits == 1 or >= 2"):
        tq.TurboQuantProd(64, 1.5)
    for kwargs in (dict(dim=1), dict(dim=64, rotation="dct"), dict(dim=64, seed="x"), dict(dim=64, outliers=[1])):
        with pytest.raises(ValueError):  # validated even when there is no mse stage (bits=1)
            tq.TurboQuantProd(bits=1, **kwargs)


def test_codes_from_another_quantizer_are_refused():
    x = gaussian(10, 64)
    c = tq.TurboQuantMSE(64, 4, seed=0).quantize(x)
    with pytest.raises(ValueError, match="different quantizer"):
        tq.TurboQuantMSE(64, 4, seed=1).dequantize(c)
    with pytest.raises(ValueError, match="different quantizer"):
        tq.TurboQuantProd(64, 4, seed=0).inner_product(c, x)
    assert torch.equal(c.quantizer().dequantize(c), tq.TurboQuantMSE(64, 4, seed=0).dequantize(c))


@pytest.mark.gpu
def test_cpu_and_cuda_agree(cuda):
    x = gaussian(4000, 384)
    for cls in (tq.TurboQuantMSE, tq.TurboQuantProd):
        q = cls(384, 3.5, seed=3)
        a, b = q.quantize(x), q.quantize(x.to(cuda))
        for k, t in a.fields.items():
            if t.dtype == torch.uint8:  # codes: differ only where float rounding crosses a boundary
                assert (t == b.fields[k].cpu()).float().mean().item() > 0.999, k
            else:
                assert torch.allclose(t, b.fields[k].cpu(), rtol=1e-5), k
        assert torch.allclose(q.dequantize(b.to("cpu")), q.dequantize(a), atol=1e-3)
