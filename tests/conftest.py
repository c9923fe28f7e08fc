import pytest
import torch


def sparse_vectors(n: int, dim: int, seed: int = 0, max_k: int = 8) -> torch.Tensor:
    """k-hot vectors (k = 1..max_k, Gaussian values): the adversarial input for a rotation.

    Random Gaussian inputs cannot test a rotation (their direction is uniform whatever the rotation does);
    without a good rotation, sparse vectors have coordinates far from the Beta law (see test_quantizer).
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, dim)
    for k in range(1, max_k + 1):
        rows = torch.arange(k - 1, n, max_k)
        cols = torch.stack([torch.randperm(dim, generator=g)[:k] for _ in range(len(rows))])
        x[rows[:, None], cols] = torch.randn(len(rows), k, generator=g)
    return x * 7.0


def unit(x: torch.Tensor) -> torch.Tensor:
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True)


def relative_error(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Mean of ||x - x_hat||^2 / ||x||^2: D_mse for inputs of any norm."""
    return ((x - x_hat).pow(2).sum(1) / x.pow(2).sum(1)).mean().item()


def assert_codes_match(out: dict, ref: dict, codec, mismatch: float, norm_rtol: float = 1e-5) -> None:
    """Encoded fields vs the reference: norms to ``norm_rtol`` (float32 rounding by default); codes off by at most
    one level, on under ``mismatch`` of the coordinates (a rotation rounded finer than float32 moves those lying
    that close to a boundary)."""
    from turbovq import packing
    from turbovq.kv.cache import sign_magnitude

    for i, (bits, d, _) in enumerate(codec.groups):
        torch.testing.assert_close(out[f"norms{i}"], ref[f"norms{i}"], rtol=norm_rtol, atol=1e-30)
        a, r = (sign_magnitude(packing.unpack(f[f"codes{i}"], bits, d).int(), bits) for f in (out, ref))  # levels
        assert a.shape == r.shape and (a - r).abs().max() <= 1
        assert (a != r).float().mean() < mismatch


@pytest.fixture
def cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    return torch.device("cuda")


@pytest.fixture(scope="module")
def one_thread():
    """One BLAS thread for a module: bit-exact comparisons need one thread count throughout (MKL rounds differently
    across counts), and small matrices on a shared, loaded machine avoid spin-wait stalls. Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
