"""Pure-torch references of exactly what the Triton kernels compute (CPU and GPU).

Two ideas make the kernels one pass over the codes, and both are checked here on the CPU:

* **One rotation per KV head.** A fractional-bit codec rotates each channel group ``i`` (channels
  ``perm[h][off_i : off_i + d_i]``) by its own ``A_i``. Folding the permutation into a block-diagonal matrix gives
  one orthogonal ``R_h`` (``D x D``) with ``x @ R_h = cat_i(x[perm[h]][off_i : off_i + d_i] @ A_i)``: the query is
  rotated by one matmul and the values are rotated back by ``R_h^T`` once, whatever the number of groups.
* **Split-T partials.** The compressed tokens are cut into ``S`` splits; each split keeps its own running max
  ``m``, sum ``l`` and value accumulator (in the rotated space), the full-precision tail is one more split (in the
  original space), and a reduce step combines them with the usual ``exp(m_s - M)`` weights. Means of a centered
  cache enter as ``<q, mu_k>`` added to every code score and ``(sum_codes p) * mu_v`` added once at the end;
  per-channel scales ``s`` of a normalized cache (codes of ``(x - mu) / s``) multiply the query before its
  rotation (keys) and the code part of the output after the inverse rotation (values).

:func:`decode_reference` is the semantics (``attend_codes``); :func:`split_decode_reference` is the kernel's
algorithm in torch; :func:`encode_reference` is ``RowCodec.encode`` on the (optionally centered) rows.
"""

from __future__ import annotations

import math
import weakref

import torch

from turbovq.kv.attention import _additive_mask, attend_codes
from turbovq.kv.cache import PackedRows, RowCodec

LOG2E = 1.4426950408889634


def weak_cached(store: dict, objs: tuple, device, build):
    """``build()``, memoized in ``store`` on the identity of ``objs`` (None allowed) and ``device``.

    Per-layer constants derive from the cache's codec, permutation, mean and scale, which the cache replaces and
    never mutates; an entry dies with any of its objects, so a recycled ``id`` never returns another layer's value.
    """
    key = (*map(id, objs), str(device))
    entry = store.get(key)
    if entry is not None and all(r is None if o is None else r() is o for r, o in zip(entry[0], objs)):
        return entry[1]

    def drop(_, key=key):
        store.pop(key, None)

    value = build()
    store[key] = (tuple(None if o is None else weakref.ref(o, drop) for o in objs), value)
    return value


_ROTATIONS: dict[tuple, tuple] = {}


def fused_rotation(codec: RowCodec, perm: torch.Tensor | None, device) -> torch.Tensor:
    """``R`` of shape ``(H or 1, D, D)`` float32 with ``x @ R[h]`` = the per-group rotated, permuted ``x``.

    ``R[h][perm[h][k], :] = blockdiag(A_0, A_1, ...)[k, :]``; orthogonal, so ``<x, y> = <x @ R, y @ R>`` and the
    inverse is ``R^T``. Cached per (codec, perm tensor, device): built once per layer, not per decode step.
    """

    def build() -> torch.Tensor:
        dim = codec.dim
        block = torch.zeros(dim, dim, dtype=torch.float32, device=device)
        for i, (_, d, off) in enumerate(codec.groups):
            block[off : off + d, off : off + d] = codec.tensors(i, device)[0]
        if perm is None:
            return block[None].contiguous()
        rot = torch.zeros(perm.shape[0], dim, dim, dtype=torch.float32, device=device)
        rot.scatter_(1, perm.to(device)[:, :, None].expand(-1, -1, dim), block.expand(perm.shape[0], -1, -1))
        return rot.contiguous()

    return weak_cached(_ROTATIONS, (codec, perm), device, build)


def channel_groups(codec: RowCodec, perm: torch.Tensor | None, num_heads: int, device) -> torch.Tensor:
    """``(H, D)`` int32: the channel group of every original channel of every head (the encode kernel's norms)."""
    gid = torch.zeros(codec.dim, dtype=torch.int32)
    for i, (_, d, off) in enumerate(codec.groups):
        gid[off : off + d] = i
    if perm is None:
        return gid.to(device).expand(num_heads, -1).contiguous()
    out = torch.empty(perm.shape, dtype=torch.int32, device=device)
    out.scatter_(1, perm.to(device).long(), gid.to(device).expand(perm.shape[0], -1).contiguous())
    return out


def decode_reference(
    query: torch.Tensor,
    keys: PackedRows,
    values: PackedRows,
    tail_keys: torch.Tensor,
    tail_values: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    softcap: float | None = None,
) -> torch.Tensor:
    """What the decode kernel must return: ``attend_codes`` (``(B, q_len, Hq, D)`` in the query dtype)."""
    return attend_codes(query, keys, values, tail_keys, tail_values, attention_mask, scaling, softcap)


def split_decode_reference(
    query: torch.Tensor,
    keys: PackedRows,
    values: PackedRows,
    tail_keys: torch.Tensor,
    tail_values: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    softcap: float | None = None,
    num_splits: int = 3,
) -> torch.Tensor:
    """The decode kernel's algorithm (q_len = 1) in float32 torch: fused rotation, split partials, reduce.

    Returns ``(B, 1, Hq, D)`` in the query dtype; equals :func:`decode_reference` up to float32 rounding.
    """
    bsz, num_heads, q_len, dim = query.shape
    if q_len != 1:
        raise ValueError(f"the decode kernel handles one query token, got q_len={q_len}")
    num_kv = tail_keys.shape[1]
    groups = num_heads // num_kv
    n, t = keys.length, tail_keys.shape[2]
    kc, vc = keys.codec, values.codec
    q = query.float().reshape(bsz, num_kv, groups, dim)
    q_codes = q if keys.scale is None else q * keys.scale  # codes hold (k - mu) / s: <q, s k'> = <q s, k'>
    q_rot = q_codes @ fused_rotation(kc, keys.perm, q.device)  # (B, H, G, D): one matmul for all groups
    mask = _additive_mask(attention_mask)
    mask = None if mask is None else mask.reshape(mask.shape[0], -1)[:, None, None, :]  # (B|1, 1, 1, n + t)
    k_unit = torch.cat([kc.unit_rotated(keys.fields, i) for i in range(len(kc.groups))], dim=-1)  # (B, H, n, D)
    v_unit = torch.cat([vc.unit_rotated(values.fields, i) for i in range(len(vc.groups))], dim=-1)
    k_norm = [keys.fields[f"norms{i}"].float() for i in range(len(kc.groups))]
    v_norm = [values.fields[f"norms{i}"].float() for i in range(len(vc.groups))]

    def scores_of(s: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        s = s * scaling
        if softcap is not None:
            s = torch.tanh(s / softcap) * softcap
        if mask is not None:
            s = s + mask[..., lo:hi]
        return s * LOG2E  # the kernel works in base 2

    parts = []  # (m, l, acc) per split, acc in the rotated space for code splits
    bounds = [round(s * n / num_splits) for s in range(num_splits + 1)] if n else [0]
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        s = 0.0
        for i, (_, d, off) in enumerate(kc.groups):
            s = (
                s
                + (q_rot[..., off : off + d] @ k_unit[:, :, lo:hi, off : off + d].transpose(-1, -2))
                * k_norm[i][:, :, None, lo:hi]
            )
        if keys.mean is not None:
            s = s + q @ keys.mean.transpose(-1, -2)
        s = scores_of(s, lo, hi)
        m = s.amax(-1).clamp_min(-1e30)  # finite, like the kernel's running max: masked splits give p = 0
        p = torch.exp2(s - m[..., None])
        acc = torch.cat(
            [
                (p * v_norm[i][:, :, None, lo:hi]) @ v_unit[:, :, lo:hi, off : off + d]
                for i, (_, d, off) in enumerate(vc.groups)
            ],
            dim=-1,
        )
        parts.append((m, p.sum(-1), acc))
    tail = None
    if t:
        s = scores_of(q @ tail_keys.float().transpose(-1, -2), n, n + t)
        m = s.amax(-1).clamp_min(-1e30)
        p = torch.exp2(s - m[..., None])
        tail = (m, p.sum(-1), p @ tail_values.float())
    # Reduce: one inverse rotation for all code splits, the tail added in the original space.
    ms = [x[0] for x in parts] + ([tail[0]] if tail else [])
    big = torch.stack(ms).amax(0)
    acc_rot = sum(torch.exp2(m - big)[..., None] * acc for m, _, acc in parts)
    l_codes = sum(torch.exp2(m - big) * total for m, total, _ in parts)
    out = acc_rot @ fused_rotation(vc, values.perm, q.device).transpose(-1, -2)
    if values.scale is not None:
        out = out * values.scale
    if values.mean is not None:
        out = out + l_codes[..., None] * values.mean
    total = l_codes
    if tail:
        w = torch.exp2(tail[0] - big)
        out, total = out + w[..., None] * tail[2], total + w * tail[1]
    out = out / total[..., None]
    return out.reshape(bsz, 1, num_heads, dim).to(query.dtype)


def encode_reference(
    x: torch.Tensor,
    codec: RowCodec,
    perm: torch.Tensor | None,
    mean: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """What the encode kernel must write: ``RowCodec.encode((x - mean) / scale, perm)`` (norms float32)."""
    x = x if mean is None else x.float() - mean
    return codec.encode(x if scale is None else x.float() / scale, perm)


def compressed_bytes(codec: RowCodec, rows: int, norm_bytes: int = 2) -> int:
    """Bytes of codes + norms for ``rows`` (token, head) rows: what the decode kernel must read."""
    return int(math.ceil(codec.bytes_per_row(norm_bytes) * rows))
