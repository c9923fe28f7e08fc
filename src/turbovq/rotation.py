"""Seeded random rotations, regenerated from ``(kind, dim, seed)`` and never stored.

A random rotation makes every coordinate of a unit vector follow the same known law (see ``codebook``), which is
what lets one scalar codebook serve every coordinate of every vector. Two constructions:

* ``"haar"``: the exactly Haar-distributed rotation, Q from the QR decomposition of a standard Gaussian matrix with
  the signs of R's diagonal folded into Q (without that fix Q is not Haar). Exact law for any input.
* ``"hadamard"``: a randomized Hadamard transform, ``O(d log d)`` to apply in a kernel. For d a power of two,
  one round is ``x -> H D x / sqrt(d)`` with D random signs; we use 3 rounds, since one round maps a one-hot
  input to a flat ``±1/sqrt(d)`` vector whose coordinates do not follow the Beta law at all. For any other d,
  with P the largest power of two <= d, each round is: random signs, the Hadamard transform of the first P
  coordinates, random signs again, the Hadamard transform of the last P (the blocks overlap, so every
  coordinate is mixed in every round), then a random permutation. Each step is orthogonal, hence so is the
  whole map; the tests measure that its distortion matches Haar's on adversarial (sparse) inputs.

Randomness comes from a CPU ``torch.Generator`` seeded by ``derive_seed(seed, tag)`` and the matrix is built in
float64 on the CPU, so the same seed gives the same rotation on every device.
"""

from __future__ import annotations

import functools
import hashlib
import math

import torch

ROTATIONS = ("hadamard", "haar")
HADAMARD_ROUNDS = 3


def derive_seed(seed: int, tag: str) -> int:
    """A 63-bit seed for the stream ``tag`` of ``seed``: independent streams from one user seed."""
    digest = hashlib.blake2b(f"turbovq:{int(seed)}:{tag}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def generator(seed: int, tag: str) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(derive_seed(seed, tag))


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal fast Walsh-Hadamard transform (Sylvester order) over the last dim, a power of two."""
    n = x.shape[-1]
    if n & (n - 1):
        raise ValueError(f"fwht needs a power-of-two length, got {n}")
    lead = x.shape[:-1]
    h = 1
    while h < n:
        y = x.reshape(*lead, n // (2 * h), 2, h)
        x = torch.stack((y[..., 0, :] + y[..., 1, :], y[..., 0, :] - y[..., 1, :]), dim=-2)
        h *= 2
    return x.reshape(*lead, n) / math.sqrt(n)


def _draw_signs(gen: torch.Generator, dim: int) -> torch.Tensor:
    """``dim`` random +-1 (int64) from ``gen``: one round's signs of the rotation ``"hadamard"``."""
    return torch.randint(0, 2, (dim,), generator=gen, dtype=torch.int64) * 2 - 1


def hadamard_signs(dim: int, seed: int) -> torch.Tensor:
    """``(HADAMARD_ROUNDS, dim)`` int64 signs of the rotation ``"hadamard"`` for a power-of-two ``dim``: round k maps
    ``x -> fwht(signs[k] * x)``. The GPU encode applies the rotation in this factored form."""
    if dim < 2 or dim & (dim - 1):
        raise ValueError(f"hadamard_signs needs a power-of-two dim >= 2, got {dim}")
    gen = generator(seed, f"hadamard:{dim}")
    return torch.stack([_draw_signs(gen, dim) for _ in range(HADAMARD_ROUNDS)])


def _hadamard_transform(x: torch.Tensor, seed: int) -> torch.Tensor:
    """Apply the randomized Hadamard rotation to the rows of ``x`` (float64, CPU)."""
    d = x.shape[-1]
    p = 1 << (d.bit_length() - 1)
    if p == d:
        for signs in hadamard_signs(d, seed):
            x = fwht(x * signs.to(x.dtype))
        return x
    gen = generator(seed, f"hadamard:{d}")

    def random_signs(x: torch.Tensor) -> torch.Tensor:
        return x * _draw_signs(gen, d).to(x.dtype)

    for _ in range(HADAMARD_ROUNDS):
        x = random_signs(x)
        x = torch.cat((fwht(x[..., :p]), x[..., p:]), dim=-1)
        # Fresh signs before the second block: without them, the overlap holds a piece of a Hadamard column,
        # which the second transform partly folds back into a few spikes.
        x = random_signs(x)
        x = torch.cat((x[..., : d - p], fwht(x[..., d - p :])), dim=-1)
        x = x[..., torch.randperm(d, generator=gen)]
    return x


@functools.lru_cache(maxsize=64)
def _matrix_cpu(kind: str, dim: int, seed: int) -> torch.Tensor:
    if kind == "haar":
        g = torch.randn(dim, dim, generator=generator(seed, f"haar:{dim}"), dtype=torch.float64)
        q, r = torch.linalg.qr(g)
        return (q * torch.sign(torch.diagonal(r))).T.contiguous()
    return _hadamard_transform(torch.eye(dim, dtype=torch.float64), seed)


def rotation_matrix(kind: str, dim: int, seed: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """The orthogonal ``(dim, dim)`` matrix A of rotation ``kind``: a row vector x rotates to ``x @ A``."""
    if kind not in ROTATIONS:
        raise ValueError(f"rotation must be one of {ROTATIONS}, got {kind!r}")
    if not isinstance(dim, int) or dim < 1:
        raise ValueError(f"dim must be a positive integer, got {dim!r}")
    return _matrix_cpu(kind, dim, int(seed)).to(device=device, dtype=dtype)
