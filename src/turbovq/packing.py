"""Bit-packing of b-bit integer codes (b = 1..8) into bytes, vectorised, for torch (CPU/CUDA) and numpy.

Layout (the contract kernels rely on): each row of ``n`` codes is one little-endian bit stream; code ``j``
occupies bits ``[b*j, b*j + b)`` with its least significant bit first, and bit ``k`` of the stream is bit
``k % 8`` of byte ``k // 8``. A row takes exactly ``ceil(n * b / 8)`` bytes; unused high bits of the last
byte are zero. Eight codes always fill exactly ``b`` bytes, which is how packing is vectorised.
"""

from __future__ import annotations

import functools

import numpy as np
import torch


def packed_size(n: int, bits: int) -> int:
    """Bytes taken by one row of ``n`` codes of ``bits`` bits."""
    return (n * bits + 7) // 8


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an integer in 1..8, got {bits!r}")


def _word_dtype(bits: int) -> torch.dtype:
    return torch.int32 if 8 * bits <= 31 else torch.int64  # 8 codes of 3 bits fit an int32


def _as_torch(x) -> tuple[torch.Tensor, bool]:
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x)), True
    if isinstance(x, torch.Tensor):
        return x, False
    raise TypeError(f"expected a torch.Tensor or numpy array, got {type(x).__name__}")


def pack(codes, bits: int):
    """Pack integer codes in ``[0, 2**bits)`` along the last dim: ``(..., n) -> (..., ceil(n*bits/8))`` uint8."""
    _check_bits(bits)
    t, was_numpy = _as_torch(codes)
    if t.dtype.is_floating_point or t.dtype == torch.bool or t.is_complex():
        raise ValueError(f"codes must be an integer tensor, got {t.dtype}")
    n = t.shape[-1]
    lead = t.shape[:-1]
    if bits == 8:
        out = t.to(torch.uint8)
    elif 8 % bits == 0:  # 1, 2, 4 bits: whole codes per byte, shift-or in uint8 (the hot path)
        per = 8 // bits
        c = torch.nn.functional.pad(t.to(torch.uint8), (0, (-n) % per)).reshape(*lead, (n + per - 1) // per, per)
        out = c[..., 0].clone()
        for k in range(1, per):
            out |= c[..., k] << (k * bits)
    else:  # 3, 5, 6, 7 bits: 8 codes -> one word (24..56 bits) -> `bits` bytes
        groups = (n + 7) // 8
        wt = _word_dtype(bits)
        c = torch.nn.functional.pad(t.to(wt), (0, groups * 8 - n)).reshape(*lead, groups, 8)
        word = c[..., 0].clone()
        for k in range(1, 8):
            word |= c[..., k] << (k * bits)
        out = torch.stack([((word >> (8 * k)) & 0xFF).to(torch.uint8) for k in range(bits)], dim=-1)
        out = out.reshape(*lead, groups * bits)[..., : packed_size(n, bits)].contiguous()
    return out.numpy() if was_numpy else out


@functools.cache
def byte_codes(bits: int) -> torch.Tensor:
    """For ``bits`` in 1, 2, 4, 8: the ``8 // bits`` codes (LSB first) held by each byte value, ``(256, 8 // bits)``
    int64 on the CPU. Byte-wise lookup tables (decoding, scoring) index with it."""
    _check_bits(bits)
    if 8 % bits:
        raise ValueError(f"codes of {bits} bits straddle bytes; byte tables need 1, 2, 4 or 8 bits")
    return unpack(torch.arange(256, dtype=torch.uint8)[:, None], bits, 8 // bits).long()


def unpack(packed, bits: int, n: int):
    """Inverse of :func:`pack`: ``(..., ceil(n*bits/8))`` uint8 -> ``(..., n)`` uint8 codes."""
    _check_bits(bits)
    t, was_numpy = _as_torch(packed)
    if t.dtype != torch.uint8:
        raise ValueError(f"packed codes must be uint8, got {t.dtype}")
    if t.shape[-1] != packed_size(n, bits):
        raise ValueError(f"{n} codes of {bits} bits take {packed_size(n, bits)} bytes, got {t.shape[-1]}")
    lead = t.shape[:-1]
    if bits == 8:
        out = t.clone()
    elif 8 % bits == 0:
        per = 8 // bits
        mask = (1 << bits) - 1
        out = torch.stack([(t >> (k * bits)) & mask for k in range(per)], dim=-1).reshape(*lead, t.shape[-1] * per)
        out = out[..., :n]
        out = out.contiguous()
    else:
        groups = (n + 7) // 8
        wt = _word_dtype(bits)
        b = torch.nn.functional.pad(t.to(wt), (0, groups * bits - t.shape[-1])).reshape(*lead, groups, bits)
        word = b[..., 0].clone()
        for k in range(1, bits):
            word |= b[..., k] << (8 * k)
        mask = (1 << bits) - 1
        out = torch.stack([((word >> (k * bits)) & mask).to(torch.uint8) for k in range(8)], dim=-1)
        out = out.reshape(*lead, groups * 8)[..., :n].contiguous()
    return out.numpy() if was_numpy else out
