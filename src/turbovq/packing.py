"""Bit-packing of b-bit integer codes (b = 1..8) into bytes, vectorised, for torch (CPU/CUDA) and numpy.

Layout (the contract kernels rely on): each row of ``n`` codes is one little-endian bit stream; code ``j``
occupies bits ``[b*j, b*j + b)`` with its least significant bit first, and bit ``k`` of the stream is bit
``k % 8`` of byte ``k // 8``. A row takes exactly ``ceil(n * b / 8)`` bytes; unused high bits of the last
byte are zero. Eight codes always fill exactly ``b`` bytes, which is how packing is vectorised.
"""

from __future__ import annotations

import numpy as np
import torch


def packed_size(n: int, bits: int) -> int:
    """Bytes taken by one row of ``n`` codes of ``bits`` bits."""
    return (n * bits + 7) // 8


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an integer in 1..8, got {bits!r}")


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
    else:
        groups = (n + 7) // 8
        c = torch.nn.functional.pad(t.to(torch.int64), (0, groups * 8 - n)).reshape(*lead, groups, 8)
        shifts = torch.arange(8, device=t.device, dtype=torch.int64) * bits
        word = (c << shifts).sum(dim=-1, keepdim=True)  # 8 codes -> one integer of 8*bits <= 56 bits
        byte_shifts = torch.arange(bits, device=t.device, dtype=torch.int64) * 8
        out = ((word >> byte_shifts) & 0xFF).to(torch.uint8).reshape(*lead, groups * bits)
        out = out[..., : packed_size(n, bits)].contiguous()
    return out.numpy() if was_numpy else out


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
        b = torch.nn.functional.pad(t.to(torch.int64), (0, groups * bits - t.shape[-1]))
        b = b.reshape(*lead, groups, bits)
        byte_shifts = torch.arange(bits, device=t.device, dtype=torch.int64) * 8
        word = (b << byte_shifts).sum(dim=-1, keepdim=True)
        shifts = torch.arange(8, device=t.device, dtype=torch.int64) * bits
        out = ((word >> shifts) & ((1 << bits) - 1)).to(torch.uint8).reshape(*lead, groups * 8)[..., :n]
        out = out.contiguous()
    return out.numpy() if was_numpy else out
