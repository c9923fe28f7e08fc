"""TurboQuant quantizers: ``TurboQuantMSE`` (rotation + Lloyd-Max) and ``TurboQuantProd`` (mse + 1-bit QJL).

TurboQuant_mse (paper, Algorithm 1): store ``||x||``, rotate the direction ``u = x / ||x||`` by a seeded random
rotation, and quantize every coordinate with the Lloyd-Max codebook of the exact coordinate law. Its expected
error ``E||x - x_hat||^2 / ||x||^2`` is ``codebook.mse_distortion(dim, bits)``.

TurboQuant_prod (Algorithm 2): (b-1)-bit TurboQuant_mse, then a 1-bit QJL sketch of the residual
``r = x - x_mse``; ``<x_mse, y> + QJL estimate of <r, y>`` is an *unbiased* estimate of ``<x, y>``.

Fractional bits (e.g. 2.5, 3.5): the channels are split into "outlier" channels quantized at ``ceil(bits)``
and the rest at ``floor(bits)`` by two independent quantizers (own rotation, codebook and norm). The outlier
count is chosen so that the average is *exactly* ``bits`` (``(bits - floor(bits)) * dim`` channels), which must
be a whole number. (The paper's 2.5-bit example, 32 channels at 3 bits and 96 at 2 for d = 128, averages
2.25 bits; ask for ``bits=2.25`` to get that split.) Which channels are outliers: ``outliers=`` given, or
``calibrate(x)`` picks the channels of largest RMS, or by default the first ones.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from turbovq import codebook, packing
from turbovq.codes import QuantizedVectors
from turbovq.qjl import QJL
from turbovq.rotation import ROTATIONS, derive_seed, rotation_matrix

_NORM_DTYPES = {"float32": torch.float32, "float16": torch.float16}
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_CHUNK_ELEMENTS = 1 << 22  # rows are processed in chunks of ~4M coordinates (16 MB of float32)
_TINY = 1e-30


def _as_matrix(x, dim: int, name: str = "x") -> tuple[torch.Tensor, bool, bool]:
    """Validate ``x`` ((n, dim) or (dim,), torch or numpy, floating point, finite, non-empty).

    Returns the float32 (n, dim) tensor and whether the input was a single vector / a numpy array.
    """
    is_numpy = isinstance(x, np.ndarray)
    if is_numpy:
        if x.dtype.kind != "f":
            raise ValueError(f"{name} must be floating point (float16/32/64), got numpy dtype {x.dtype}")
        x = torch.from_numpy(np.ascontiguousarray(x) if x.flags.writeable else np.array(x))  # e.g. memory-mapped
    elif not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor or numpy array, got {type(x).__name__}")
    if x.dtype not in _FLOATS:
        raise ValueError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if x.ndim not in (1, 2):
        raise ValueError(f"{name} must have shape (n, {dim}) or ({dim},), got {tuple(x.shape)}")
    vector = x.ndim == 1
    x = x.reshape(1, -1) if vector else x
    if x.shape[1] != dim:
        raise ValueError(f"{name} has dimension {x.shape[1]}, this quantizer was built for dim={dim}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch (0 vectors)")
    finite = torch.isfinite(x.sum(dim=1, dtype=torch.float32))  # one cheap pass; NaN/Inf propagate into the sum
    if not bool(finite.all()):
        bad = int((~finite).nonzero()[0, 0])
        raise ValueError(f"{name} contains NaN or Inf, or values too large for float32 (first in row {bad})")
    return x.to(torch.float32), vector, is_numpy


def _chunks(n: int, dim: int):
    step = max(1, _CHUNK_ELEMENTS // max(dim, 1))
    for lo in range(0, n, step):
        yield slice(lo, min(n, lo + step))


def _output(x: torch.Tensor, meta: dict):
    x = x[0] if meta.get("vector") else x
    return x.cpu().numpy() if meta.get("numpy") else x


def _check_bits(bits, lowest: float, name: str) -> float:
    if isinstance(bits, bool) or not isinstance(bits, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a number, got {bits!r}")
    if not (lowest <= bits <= 8) or math.isnan(bits):
        raise ValueError(f"{name} must be in [{lowest:g}, 8], got {bits!r}")
    return float(bits)


class _Group:
    """One scalar TurboQuant_mse instance on a subset of channels: rotation, codebook, its own norm."""

    def __init__(self, channels: torch.Tensor, bits: int, seed: int, rotation: str, whole: bool):
        self.channels = channels
        self.dim = int(channels.numel())
        self.whole = whole  # the group is all channels in order: no gather needed
        if self.dim < 2:
            raise ValueError(
                f"a channel group of size {self.dim} cannot be rotated; choose bits so that both the outlier "
                "and the regular groups hold at least 2 channels"
            )
        self.bits = bits
        self.seed = seed
        self.rotation = rotation
        self.centroids, self.boundaries = codebook.lloyd_max_codebook(self.dim, bits)
        self._cache: dict = {}

    def tensors(self, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(rotation matrix A, centroids, boundaries, channel index) on ``device``; rotate rows by ``x @ A``."""
        key = str(device)
        if key not in self._cache:
            self._cache[key] = (
                rotation_matrix(self.rotation, self.dim, self.seed, device=device),
                self.centroids.to(device=device, dtype=torch.float32),
                self.boundaries.to(device=device, dtype=torch.float32),
                self.channels.to(device),
            )
        return self._cache[key]

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a, _, bounds, ch = self.tensors(x.device)
        xg = x if self.whole else x[:, ch]
        norms = torch.linalg.vector_norm(xg, dim=1)
        y = (xg @ a).div_(norms.clamp_min(_TINY)[:, None])
        return packing.pack(codebook.quantize_coordinates(y, bounds), self.bits), norms

    def rotated(self, packed: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
        """Reconstruction in the rotated space: ``||x|| * centroids[codes]``, (n, dim)."""
        _, cents, _, _ = self.tensors(packed.device)
        idx = packing.unpack(packed, self.bits, self.dim).long()
        return cents[idx] * norms.to(torch.float32)[:, None]

    def decode_into(self, out: torch.Tensor, packed: torch.Tensor, norms: torch.Tensor) -> None:
        a, _, _, ch = self.tensors(packed.device)
        rec = self.rotated(packed, norms) @ a.T
        if self.whole:
            out.copy_(rec)
        else:
            out[:, ch] = rec

    def inner_product(self, packed: torch.Tensor, norms: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Asymmetric estimate: rotate the queries once, dot with the codebook values, scale by the norm."""
        a, _, _, ch = self.tensors(y.device)
        return self.rotated(packed, norms) @ ((y if self.whole else y[:, ch]) @ a).T


class TurboQuantMSE:
    """TurboQuant_mse: near-optimal mean-squared error at ``bits`` per coordinate, data-oblivious.

    Parameters
    ----------
    dim : vector dimension (>= 2).
    bits : 1..8, or fractional (outlier split, see the module docstring).
    seed : all randomness (rotations) derives from it; same seed -> same codes on any device.
    rotation : ``"hadamard"`` (randomized Hadamard, any d) or ``"haar"`` (exact Haar rotation).
    device : where rotation matrices live; ``None`` follows each input's device.
    outliers : channel indices quantized at ``ceil(bits)`` (fractional bits only).
    norm_dtype : ``"float32"`` (default) or ``"float16"`` (halves the norm overhead; norms must fit float16).
    """

    kind = "mse"

    def __init__(
        self,
        dim: int,
        bits: float = 4,
        seed: int = 0,
        rotation: str = "hadamard",
        device=None,
        outliers: Sequence[int] | None = None,
        norm_dtype: str = "float32",
    ):
        self._set_common(dim, bits, seed, rotation, device, norm_dtype)
        self._set_outliers(outliers)

    def _set_common(self, dim, bits, seed, rotation, device, norm_dtype) -> None:
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 2:
            raise ValueError(f"dim must be an integer >= 2, got {dim!r}")
        if rotation not in ROTATIONS:
            raise ValueError(f"rotation must be one of {ROTATIONS}, got {rotation!r}")
        if norm_dtype not in _NORM_DTYPES:
            raise ValueError(f"norm_dtype must be one of {tuple(_NORM_DTYPES)}, got {norm_dtype!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        self.dim = int(dim)
        self.bits = _check_bits(bits, 1, "bits")
        self.seed = int(seed)
        self.rotation = rotation
        self.device = device
        self.norm_dtype = norm_dtype

    # --- configuration -------------------------------------------------------------------------------------
    @property
    def num_outliers(self) -> int:
        """Channels at ``ceil(bits)`` so that the average is exactly ``bits``."""
        frac = self.bits - math.floor(self.bits)
        count = frac * self.dim
        if abs(count - round(count)) > 1e-6:
            step = 1 / self.dim
            raise ValueError(
                f"bits={self.bits:g} at dim={self.dim} needs {count:g} outlier channels; the average must be a "
                f"multiple of 1/dim = {step:g} (e.g. {math.floor(count) / self.dim + math.floor(self.bits):g})"
            )
        return int(round(count))

    def _set_outliers(self, outliers) -> None:
        n_out = self.num_outliers
        lo = math.floor(self.bits)
        if outliers is None:
            chosen = torch.arange(n_out)
        else:
            if n_out == 0:
                raise ValueError(f"outliers= only applies to fractional bits; bits={self.bits:g} has none")
            chosen = torch.as_tensor(np.asarray(outliers, dtype=np.int64).reshape(-1))
            if chosen.numel() != n_out:
                raise ValueError(
                    f"bits={self.bits:g} at dim={self.dim} needs exactly {n_out} outlier channels, got {chosen.numel()}"
                )
            if chosen.numel() and (chosen.min() < 0 or chosen.max() >= self.dim):
                raise ValueError(f"outlier channels must be in [0, {self.dim}), got {chosen.tolist()}")
            if torch.unique(chosen).numel() != chosen.numel():
                raise ValueError("outlier channels must be distinct")
            chosen = torch.sort(chosen).values
        if n_out == 0:
            self.outliers = None
            self._groups = [_Group(torch.arange(self.dim), lo, self.seed, self.rotation, whole=True)]
            return
        mask = torch.zeros(self.dim, dtype=torch.bool)
        mask[chosen] = True
        self.outliers = chosen
        self._groups = [
            _Group(chosen, lo + 1, derive_seed(self.seed, "outliers"), self.rotation, whole=False),
            _Group((~mask).nonzero()[:, 0], lo, derive_seed(self.seed, "regular"), self.rotation, whole=False),
        ]

    def calibrate(self, x) -> TurboQuantMSE:
        """Choose the outlier channels as the ``num_outliers`` channels of largest RMS over ``x``; returns self."""
        if self.num_outliers == 0:
            raise ValueError(f"calibrate needs fractional bits (outlier channels); bits={self.bits:g} has none")
        x, _, _ = _as_matrix(x, self.dim)
        rms = x.pow(2).mean(dim=0)
        self._set_outliers(torch.topk(rms.cpu(), self.num_outliers).indices)
        return self

    @property
    def config(self) -> dict:
        """JSON-able description; ``from_config(config)`` rebuilds an identical quantizer."""
        return {
            "kind": self.kind,
            "dim": self.dim,
            "bits": self.bits,
            "seed": self.seed,
            "rotation": self.rotation,
            "outliers": None if self.outliers is None else self.outliers.tolist(),
            "norm_dtype": self.norm_dtype,
        }

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(dim={self.dim}, bits={self.bits:g}, seed={self.seed}, rotation={self.rotation!r})"
        )

    def _device(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.device is None else x.to(self.device)

    def _check_codes(self, codes: QuantizedVectors) -> None:
        if not isinstance(codes, QuantizedVectors):
            raise ValueError(f"expected QuantizedVectors, got {type(codes).__name__}")
        if codes.config != self.config:
            diff = {k: (codes.config.get(k), v) for k, v in self.config.items() if codes.config.get(k) != v}
            raise ValueError(f"these codes were made by a different quantizer (codes vs this one: {diff})")

    # --- the algorithm ---------------------------------------------------------------------------------------
    def _norms_out(self, norms: torch.Tensor) -> torch.Tensor:
        dtype = _NORM_DTYPES[self.norm_dtype]
        if dtype == torch.float16 and bool((norms > torch.finfo(torch.float16).max).any()):
            raise ValueError("a vector norm exceeds the float16 range; use norm_dtype='float32'")
        return norms.to(dtype)

    # Chunk-level steps; the public methods run them over row chunks to bound memory.
    def _encode_chunk(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        fields = {}
        for i, g in enumerate(self._groups):
            fields[f"codes{i}"], norms = g.encode(x)
            fields[f"norms{i}"] = self._norms_out(norms)
        return fields

    def _decode_chunk(self, fields: dict[str, torch.Tensor]) -> torch.Tensor:
        out = torch.empty(len(fields["codes0"]), self.dim, device=fields["codes0"].device)
        for i, g in enumerate(self._groups):
            g.decode_into(out, fields[f"codes{i}"], fields[f"norms{i}"])
        return out

    def _inner_chunk(self, fields: dict[str, torch.Tensor], y: torch.Tensor) -> torch.Tensor:
        return sum(g.inner_product(fields[f"codes{i}"], fields[f"norms{i}"], y) for i, g in enumerate(self._groups))

    def _by_chunks(self, fn, fields: dict[str, torch.Tensor], *args) -> torch.Tensor:
        n = len(next(iter(fields.values())))
        return torch.cat([fn({k: v[sl] for k, v in fields.items()}, *args) for sl in _chunks(n, self.dim)])

    def quantize(self, x) -> QuantizedVectors:
        """Quantize ``x`` ((n, dim) or (dim,), any float dtype and norm). Zero vectors decode to exactly zero."""
        x, vector, is_numpy = _as_matrix(x, self.dim)
        x = self._device(x)
        parts = [self._encode_chunk(x[sl]) for sl in _chunks(len(x), self.dim)]
        fields = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        return QuantizedVectors({"quantizer": self.config, "vector": vector, "numpy": is_numpy}, fields)

    def dequantize(self, codes: QuantizedVectors):
        """Reconstruct float32 vectors, in the shape and kind (numpy/torch) of the quantized input."""
        self._check_codes(codes)
        return _output(self._by_chunks(self._decode_chunk, codes.fields), codes.meta)

    def inner_product(self, codes: QuantizedVectors, y) -> torch.Tensor:
        """Estimates of ``<x_i, y_j>`` for y of shape (m, dim) or (dim,): returns (n, m) (numpy in, numpy out)."""
        self._check_codes(codes)
        y_t, vector, is_numpy = _as_matrix(y, self.dim, "y")
        s = self._by_chunks(self._inner_chunk, codes.fields, y_t.to(codes.device))
        s = s[:, 0] if vector else s
        return s.cpu().numpy() if is_numpy else s


class TurboQuantProd(TurboQuantMSE):
    """TurboQuant_prod: (bits-1)-bit TurboQuant_mse + a 1-bit QJL sketch of the residual; unbiased inner products.

    ``bits`` is 1 (QJL alone), 2..8, or fractional >= 2 (the mse stage gets ``bits - 1`` with the outlier split).
    Stores per vector: the mse codes and norms, ``dim`` sign bits, and the residual norm.
    """

    kind = "prod"

    def __init__(
        self,
        dim: int,
        bits: float = 4,
        seed: int = 0,
        rotation: str = "hadamard",
        device=None,
        outliers: Sequence[int] | None = None,
        norm_dtype: str = "float32",
    ):
        self._set_common(dim, bits, seed, rotation, device, norm_dtype)
        if 1 < self.bits < 2:
            raise ValueError(f"TurboQuantProd needs bits == 1 or >= 2 (bits-1 go to the mse stage), got {bits:g}")
        if outliers is not None and self.bits == 1:
            raise ValueError("outliers= only applies to fractional bits")
        self._mse = (
            None if self.bits == 1 else TurboQuantMSE(dim, self.bits - 1, seed, rotation, device, outliers, norm_dtype)
        )
        self.qjl = QJL(self.dim, derive_seed(self.seed, "qjl"))

    @property
    def num_outliers(self) -> int:
        return 0 if self._mse is None else self._mse.num_outliers

    @property
    def outliers(self):
        return None if self._mse is None else self._mse.outliers

    def calibrate(self, x) -> TurboQuantProd:
        if self._mse is None:
            raise ValueError("calibrate needs fractional bits (outlier channels); bits=1 has none")
        self._mse.calibrate(x)
        return self

    def _encode_chunk(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        fields = {} if self._mse is None else self._mse._encode_chunk(x)
        r = x if self._mse is None else x - self._mse._decode_chunk(fields)
        fields["qjl"], rnorms = self.qjl.sketch(r)
        fields["rnorms"] = self._norms_out(rnorms)
        return fields

    def _decode_chunk(self, fields: dict[str, torch.Tensor]) -> torch.Tensor:
        out = self.qjl.reconstruct(fields["qjl"], fields["rnorms"])
        return out if self._mse is None else out + self._mse._decode_chunk(fields)

    def _inner_chunk(self, fields: dict[str, torch.Tensor], y: torch.Tensor) -> torch.Tensor:
        out = self.qjl.inner_product(fields["qjl"], fields["rnorms"], y)
        return out if self._mse is None else out + self._mse._inner_chunk(fields, y)


def from_config(config: dict) -> TurboQuantMSE:
    """Rebuild a quantizer from its ``config`` (as stored with its codes)."""
    classes = {"mse": TurboQuantMSE, "prod": TurboQuantProd}
    cfg = dict(config)
    kind = cfg.pop("kind", None)
    if kind not in classes:
        raise ValueError(f"unknown quantizer kind {kind!r} in config")
    return classes[kind](**cfg)
