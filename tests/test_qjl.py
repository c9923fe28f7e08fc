import math

import pytest
import torch

from turbovq.qjl import QJL


def test_estimator_is_unbiased_with_the_stated_variance():
    dim, n = 64, 4000
    g = torch.Generator().manual_seed(0)
    r = torch.randn(dim, generator=g)
    y = r + torch.randn(dim, generator=g)  # correlated, so <r, y> is far from 0
    true = torch.dot(r, y).item()
    estimates = []
    for seed in range(n):  # expectation over the sketch matrix
        q = QJL(dim, seed=seed)
        signs, norms = q.sketch(r[None])
        estimates.append(q.inner_product(signs, norms, y[None]).item())
    est = torch.tensor(estimates, dtype=torch.float64)
    var = (math.pi / 2 * r.dot(r) * y.dot(y) - true**2).item() / dim
    assert est.mean().item() == pytest.approx(true, abs=4 * math.sqrt(var / n))
    assert est.var().item() == pytest.approx(var, rel=0.1)


def test_reconstruction_matches_inner_product():
    q = QJL(32, seed=1, rows=80)
    r = torch.randn(5, 32)
    y = torch.randn(3, 32)
    signs, norms = q.sketch(r)
    assert signs.shape == (5, 10) and signs.dtype == torch.uint8
    assert torch.allclose(q.reconstruct(signs, norms) @ y.T, q.inner_product(signs, norms, y), atol=1e-4)
