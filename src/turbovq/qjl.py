"""Seeded 1-bit Johnson-Lindenstrauss sign sketch (QJL) and its unbiased inner-product estimator.

For a vector r and ``S`` an ``(m, d)`` matrix of i.i.d. N(0, 1) entries, store ``z = sign(S r)`` (one bit per
row, packed) and ``||r||``. For a row s of S, ``E[sign(<s, r>) <s, y>] = sqrt(2/pi) <r, y> / ||r||``, so

    <r, y>  ~=  sqrt(pi/2) / m * ||r|| * <S y, z>

is unbiased, with variance ``(pi/2 ||r||^2 ||y||^2 - <r, y>^2) / m``. S is regenerated from the seed on the CPU
(device-independent) and never stored.
"""

from __future__ import annotations

import functools
import math

import torch

from turbovq import packing
from turbovq.rotation import generator


@functools.lru_cache(maxsize=16)
def _matrix_cpu(rows: int, dim: int, seed: int) -> torch.Tensor:
    return torch.randn(rows, dim, generator=generator(seed, f"qjl:{rows}x{dim}"), dtype=torch.float64)


def sketch_matrix(rows: int, dim: int, seed: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """The ``(rows, dim)`` Gaussian sketch matrix S of ``seed``."""
    return _matrix_cpu(rows, dim, int(seed)).to(device=device, dtype=dtype)


class QJL:
    """1-bit sign sketch with ``rows`` (default ``dim``) Gaussian projections, seeded."""

    def __init__(self, dim: int, seed: int = 0, rows: int | None = None):
        self.dim = dim
        self.rows = dim if rows is None else rows
        self.factor = math.sqrt(math.pi / 2) / self.rows  # the estimator's constant (scale = factor * ||r||)
        self.seed = seed
        self._mats: dict = {}

    def matrix(self, device) -> torch.Tensor:
        key = str(device)
        if key not in self._mats:
            self._mats[key] = sketch_matrix(self.rows, self.dim, self.seed, device=device)
        return self._mats[key]

    def sketch(self, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``r``: (n, dim) float -> (packed signs (n, ceil(rows/8)) uint8, norms (n,) float32)."""
        bits = (r @ self.matrix(r.device).T) >= 0
        return packing.pack(bits.to(torch.uint8), 1), torch.linalg.vector_norm(r, dim=-1)

    def signs(self, packed: torch.Tensor) -> torch.Tensor:
        """Unpack to ±1 float32, shape (n, rows)."""
        return packing.unpack(packed, 1, self.rows).to(torch.float32) * 2 - 1

    def scale(self, norms: torch.Tensor) -> torch.Tensor:
        return self.factor * norms.to(torch.float32)

    def inner_product(self, packed: torch.Tensor, norms: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Unbiased estimates of ``<r_i, y_j>``: (n, m) for y of shape (m, dim)."""
        sy = y @ self.matrix(y.device).T
        return self.scale(norms)[:, None] * (self.signs(packed) @ sy.T)

    def reconstruct(self, packed: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
        """``sqrt(pi/2)/m ||r|| S^T z``: an unbiased reconstruction of r, shape (n, dim)."""
        return self.scale(norms)[:, None] * (self.signs(packed) @ self.matrix(packed.device))
