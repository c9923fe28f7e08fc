"""``QuantizedVectors``: the packed codes, norms and metadata of a batch of quantized vectors.

A ``QuantizedVectors`` is a bag of tensors that all have one row per vector (``fields``) plus JSON metadata
(``meta``: the quantizer's config and how the input looked). It holds no rotation or sketch matrix: those are
regenerated from the seed in ``meta``, so a file written on one machine decodes on another.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from turbovq import io

FILE_KIND = "quantized_vectors"


class QuantizedVectors:
    """Packed codes + norms of ``n`` vectors. Slice with ``c[i:j]``, join with ``QuantizedVectors.concat``."""

    def __init__(self, meta: dict, fields: dict[str, torch.Tensor]):
        rows = {t.shape[0] for t in fields.values()}
        if len(rows) != 1:
            raise ValueError(f"all fields must have the same number of rows, got {sorted(rows)}")
        self.meta = meta
        self.fields = fields

    @property
    def config(self) -> dict:
        """The config of the quantizer that made these codes (``TurboQuantMSE.from_config`` rebuilds it)."""
        return self.meta["quantizer"]

    @property
    def dim(self) -> int:
        return self.config["dim"]

    @property
    def device(self) -> torch.device:
        return next(iter(self.fields.values())).device

    def __len__(self) -> int:
        return next(iter(self.fields.values())).shape[0]

    @property
    def bytes_per_vector(self) -> int:
        """Exact bytes one vector takes: packed codes plus its norms."""
        return sum(_row_bytes(t) for t in self.fields.values())

    @property
    def nbytes(self) -> int:
        """Exact bytes held: packed codes plus norms of every vector (what memory claims are made from)."""
        return len(self) * self.bytes_per_vector

    @property
    def bits_per_coordinate(self) -> float:
        """Effective bits per coordinate, norms included (e.g. 4.25 for 4-bit codes + a float32 norm at d=128)."""
        return 8 * self.bytes_per_vector / self.dim

    def __getitem__(self, index) -> QuantizedVectors:
        if isinstance(index, int):
            index = slice(index, index + 1 if index != -1 else None)
        return QuantizedVectors(self.meta, {k: v[index] for k, v in self.fields.items()})

    def to(self, device) -> QuantizedVectors:
        return QuantizedVectors(self.meta, {k: v.to(device) for k, v in self.fields.items()})

    def quantizer(self):
        """Rebuild the quantizer that made these codes (from the seed; nothing else is stored)."""
        from turbovq.quantizer import from_config

        return from_config(self.config)

    @staticmethod
    def concat(parts: Sequence[QuantizedVectors]) -> QuantizedVectors:
        if not parts:
            raise ValueError("concat needs at least one QuantizedVectors")
        first = parts[0]
        for p in parts[1:]:
            if p.config != first.config:
                raise ValueError("cannot concat codes made by different quantizers")
        meta = dict(first.meta, vector=False)
        return QuantizedVectors(meta, {k: torch.cat([p.fields[k] for p in parts]) for k in first.fields})

    def save(self, path) -> None:
        """Write to ``path`` atomically with a format version and a checksum (see ``turbovq.io``)."""
        io.save(path, FILE_KIND, self.meta, self.fields)

    @classmethod
    def load(cls, path, device=None, mmap: bool = False) -> QuantizedVectors:
        """Read a file written by :meth:`save`; a corrupt, truncated or foreign file raises ``io.FormatError``."""
        meta, fields = io.load(path, FILE_KIND, mmap=mmap)
        out = cls(meta, fields)
        return out.to(device) if device is not None else out

    def __repr__(self) -> str:
        cfg = self.config
        return (
            f"QuantizedVectors(n={len(self)}, dim={cfg['dim']}, kind={cfg['kind']}, bits={cfg['bits']}, "
            f"bits_per_coordinate={self.bits_per_coordinate:.3f}, nbytes={self.nbytes})"
        )


def _row_bytes(t: torch.Tensor) -> int:
    n = 1
    for s in t.shape[1:]:
        n *= s
    return n * t.element_size()
