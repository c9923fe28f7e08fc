import math

import pytest
import torch

from turbovq import rotation


@pytest.mark.parametrize("kind", rotation.ROTATIONS)
@pytest.mark.parametrize("dim", [2, 3, 5, 7, 64, 96, 100, 384, 1000])
def test_orthogonal(kind, dim):
    a = rotation.rotation_matrix(kind, dim, seed=3, dtype=torch.float64)
    assert torch.allclose(a @ a.T, torch.eye(dim, dtype=torch.float64), atol=1e-12)


def test_fwht_is_the_sylvester_hadamard():
    h = torch.ones(1, 1, dtype=torch.float64)
    for _ in range(5):
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    x = torch.randn(7, 32, dtype=torch.float64)
    assert torch.allclose(rotation.fwht(x), x @ h.T / math.sqrt(32))
    with pytest.raises(ValueError, match="power-of-two"):
        rotation.fwht(torch.zeros(3, 12))


@pytest.mark.parametrize("kind", rotation.ROTATIONS)
def test_seeded_and_reproducible(kind):
    a = rotation.rotation_matrix(kind, 48, seed=1)
    rotation._matrix_cpu.cache_clear()
    assert torch.equal(a, rotation.rotation_matrix(kind, 48, seed=1))
    assert not torch.allclose(a, rotation.rotation_matrix(kind, 48, seed=2))


@pytest.mark.parametrize("dim", [128, 384, 1536])
def test_hadamard_spreads_one_hot_vectors(dim):
    """Rotated basis vectors look Gaussian: variance 1/d, kurtosis ~3, no coordinate left unmixed."""
    y = rotation.rotation_matrix("hadamard", dim, seed=0, dtype=torch.float64) * math.sqrt(dim)
    assert y.pow(2).mean().item() == pytest.approx(1.0)
    assert y.pow(4).mean().item() == pytest.approx(3 * dim / (dim + 2), abs=0.25)  # Haar's value
    # Worst single input: a Gaussian row's sample kurtosis has std ~sqrt(24/d); allow 8 of them.
    assert y.pow(4).mean(1).max().item() < 3 + 8 * math.sqrt(24 / dim)
    assert y.abs().max().item() < 6.0


def test_haar_is_haar():
    # The first coordinate of a Haar-rotated unit vector has E[t^2] = 1/d and E[t^4] = 3/(d(d+2)).
    dim, n = 16, 4000
    t = torch.stack([rotation.rotation_matrix("haar", dim, seed=s, dtype=torch.float64)[0, 0] for s in range(n)])
    assert t.pow(2).mean().item() == pytest.approx(1 / dim, rel=0.05)
    assert t.pow(4).mean().item() == pytest.approx(3 / (dim * (dim + 2)), rel=0.1)
    assert t.mean().item() == pytest.approx(0.0, abs=4 / math.sqrt(dim * n))


def test_derive_seed_streams_differ():
    assert rotation.derive_seed(0, "a") != rotation.derive_seed(0, "b") != rotation.derive_seed(1, "a")
    assert 0 <= rotation.derive_seed(12345, "qjl") < 2**63


def test_bad_arguments():
    with pytest.raises(ValueError, match="rotation must be"):
        rotation.rotation_matrix("dct", 8, 0)
    with pytest.raises(ValueError, match="dim"):
        rotation.rotation_matrix("haar", 0, 0)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", rotation.ROTATIONS)
def test_same_matrix_on_cuda(cuda, kind):
    assert torch.equal(
        rotation.rotation_matrix(kind, 384, 5, device=cuda).cpu(), rotation.rotation_matrix(kind, 384, 5)
    )


@pytest.mark.parametrize("dim", [2, 64, 128, 256])
def test_hadamard_signs_factor_the_matrix(dim):
    """The GPU encode applies "hadamard" as three rounds of x -> fwht(signs[k] * x): the same map as the matrix."""
    signs = rotation.hadamard_signs(dim, 11)
    assert signs.shape == (rotation.HADAMARD_ROUNDS, dim) and set(signs.unique().tolist()) <= {-1, 1}
    x = torch.randn(5, dim, dtype=torch.float64)
    y = x
    for s in signs:
        y = rotation.fwht(y * s.double())
    torch.testing.assert_close(y, x @ rotation.rotation_matrix("hadamard", dim, 11, dtype=torch.float64))
    with pytest.raises(ValueError, match="power-of-two"):
        rotation.hadamard_signs(96, 11)
