"""Fused TurboQuant encode of K/V rows (Triton): center, norms, rotation, bucketize, bit-pack in one pass.

``RowCodec.encode`` makes ~10 passes over memory (float copy, permute, per-group norms, divide, matmul, one
comparison pass per boundary, packing); this kernel reads each row once (model dtype) and writes only the codes
and norms, so it can run at memory speed. Per block of ``BLOCK_T`` rows of one (batch, KV head):

* ``(x - mean) / scale`` (normalized caches), per-group norms over the group's *original* channels (``channel_groups``);
* ``y = x @ R[h][:, cols]`` with the fused rotation (permutation + every group's rotation, see
  ``reference.fused_rotation``), in column chunks of 64, as tensor-core products: one-pass tf32 for 16-bit input
  (as precise as the input), 3xTF32 for float32 (codes then match the float32 reference except where a coordinate
  is within ~1e-6 of a boundary);
* ``code = #(boundaries < y / ||x_group||)`` (the same strict comparison as ``codebook.quantize_coordinates``),
  counted over the positive half of the symmetric codebook only;
* pack into int32 words with the little-endian layout of ``packing.py`` and store codes and float32 norms.
"""

from __future__ import annotations

import torch

from turbovq import packing
from turbovq.kernels.decode import HAS_TRITON, codec_supported
from turbovq.kernels.reference import channel_groups, fused_rotation
from turbovq.kv.cache import RowCodec

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _encode_group(x, nrm, rot, bnd, out_ptr, word_row, COL0: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr,
                      DG: tl.constexpr, CW: tl.constexpr, BLOCK_T: tl.constexpr, t_mask, PREC: tl.constexpr,
                      SYM: tl.constexpr):  # fmt: skip
        """Rotate, quantize and pack the DG columns of one channel group, CW columns at a time.

        SYM: the Lloyd-Max codebook is symmetric (boundary M = 2^(b-1) - 1 is 0, the others come in +- pairs), so
        ``#(boundaries < y)`` is ``M + 1 + c`` for y > 0 and ``M - c`` otherwise, c = #(positive boundaries < |y|):
        2^(b-1) - 1 comparisons instead of 2^b - 1 (codes differ only where |y| equals a boundary exactly)."""
        dd = tl.arange(0, D)
        inv = 1.0 / tl.maximum(nrm, 1e-30)
        NG: tl.constexpr = CW // 32  # 3 bits: groups of 32 codes in 3 words
        CPW: tl.constexpr = 32 // BITS  # otherwise: codes per word
        NW: tl.constexpr = CW // CPW
        M: tl.constexpr = (1 << (BITS - 1)) - 1  # SYM: the zero boundary's index
        for c0 in tl.static_range(0, DG, CW):
            r = tl.load(rot + dd[:, None] * D + (COL0 + c0 + tl.arange(0, CW))[None, :])
            y = tl.dot(x, r, input_precision=PREC) * inv[:, None]
            codes = tl.zeros([BLOCK_T, CW], tl.int32)
            if SYM:
                a = tl.abs(y)
                for k in tl.static_range(M):
                    codes += (a > tl.load(bnd + M + 1 + k)).to(tl.int32)
                codes = tl.where(y > 0, M + 1 + codes, M - codes)
            else:
                for k in tl.static_range((1 << BITS) - 1):
                    codes += (y > tl.load(bnd + k)).to(tl.int32)
            if BITS == 3:  # 32 codes -> 3 words: bits [0, 64) from codes 0..21, bits [64, 96) from codes 21..31
                c = tl.reshape(codes, (BLOCK_T, NG, 32)).to(tl.uint64)
                k = tl.arange(0, 32)
                lo = tl.sum(tl.where((k <= 21)[None, None, :], c << (3 * k).to(tl.uint64)[None, None, :], 0), axis=2)
                sh_hi = tl.maximum(3 * k - 64, 0).to(tl.uint64)
                hi = tl.where((k >= 22)[None, None, :], c << sh_hi[None, None, :], 0)
                hi = tl.sum(tl.where((k == 21)[None, None, :], c >> 1, hi), axis=2)
                base = out_ptr + word_row[:, None] + (c0 * 3 // 32) + 3 * tl.arange(0, NG)[None, :]
                m = t_mask[:, None]
                tl.store(base, (lo & 0xFFFFFFFF).to(tl.uint32).to(tl.int32, bitcast=True), mask=m)
                tl.store(base + 1, (lo >> 32).to(tl.uint32).to(tl.int32, bitcast=True), mask=m)
                tl.store(base + 2, (hi & 0xFFFFFFFF).to(tl.uint32).to(tl.int32, bitcast=True), mask=m)
            else:
                c = tl.reshape(codes, (BLOCK_T, NW, CPW))
                words = tl.sum(c << (tl.arange(0, CPW) * BITS)[None, None, :], axis=2)  # disjoint fields: sum == or
                tl.store(out_ptr + word_row[:, None] + (c0 * BITS // 32) + tl.arange(0, NW)[None, :], words,
                         mask=t_mask[:, None])  # fmt: skip

    @triton.jit
    def _encode_kernel(
        x_ptr, sx_b, sx_h, sx_t, mean_ptr, scale_ptr, rot_ptr, rot_stride_h, gid_ptr,
        c0_ptr, n0_ptr, bnd0, c1_ptr, n1_ptr, bnd1, T, H,
        D: tl.constexpr, B0: tl.constexpr, D0: tl.constexpr, B1: tl.constexpr, D1: tl.constexpr,
        BLOCK_T: tl.constexpr, CW0: tl.constexpr, CW1: tl.constexpr, HAS_MEAN: tl.constexpr, HAS_SCALE: tl.constexpr,
        PREC: tl.constexpr, SYM: tl.constexpr,
    ):  # fmt: skip
        pid_t = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        t_mask = t < T
        dd = tl.arange(0, D)
        x = tl.load(x_ptr + b * sx_b + h * sx_h + t[:, None] * sx_t + dd[None, :], mask=t_mask[:, None], other=0.0)
        x = x.to(tl.float32)
        if HAS_MEAN:
            x = x - tl.load(mean_ptr + pid_bh * D + dd)[None, :]
        if HAS_SCALE:
            x = x / tl.load(scale_ptr + pid_bh * D + dd)[None, :]
        gid = tl.load(gid_ptr + h * D + dd)
        sq = x * x
        row = pid_bh * T + t
        rot = rot_ptr + h * rot_stride_h
        nrm0 = tl.sqrt(tl.sum(tl.where((gid == 0)[None, :], sq, 0.0), axis=1))
        tl.store(n0_ptr + row, nrm0, mask=t_mask)
        _encode_group(x, nrm0, rot, bnd0, c0_ptr, row * (D0 * B0 // 32), 0, D, B0, D0, CW0, BLOCK_T, t_mask, PREC, SYM)
        if D1 > 0:
            nrm1 = tl.sqrt(tl.sum(tl.where((gid == 1)[None, :], sq, 0.0), axis=1))
            tl.store(n1_ptr + row, nrm1, mask=t_mask)
            _encode_group(x, nrm1, rot, bnd1, c1_ptr, row * (D1 * B1 // 32), D0, D, B1, D1, CW1, BLOCK_T, t_mask, PREC,
                          SYM)


def supported(x: torch.Tensor, codec: RowCodec) -> bool:
    return HAS_TRITON and x.is_cuda and codec_supported(codec)


def encode_rows(
    x: torch.Tensor,
    codec: RowCodec,
    perm: torch.Tensor | None,
    mean: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    *,
    block_t: int | None = None,
    num_warps: int = 4,
    precision: str | None = None,
    symmetric: bool | None = None,
) -> dict[str, torch.Tensor]:
    """Fused ``RowCodec.encode((x - mean) / scale, perm)`` for x of shape (B, H, T, D), any float dtype.

    Returns the same fields (``codes{i}`` uint8 (B, H, T, bytes_i), ``norms{i}`` float32 (B, H, T)).
    ``precision``: the rotation's ``tl.dot`` precision. ``"tf32x3"`` is float32-accurate; ``"tf32"`` (one pass,
    about 2x faster) rounds the rotation to ~5e-4 relative, so codes may move by one level where a coordinate lies
    that close to a boundary (under 1% of them). The default is tf32 for bfloat16/float16 input, whose own rounding
    (4e-3 / 5e-4) is as coarse, and tf32x3 for float32. ``symmetric``: half the comparisons, using the codebook's
    symmetry (default: when the boundaries are symmetric, as Lloyd-Max's are).
    """
    bsz, heads, rows, dim = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    dev = x.device
    rot = fused_rotation(codec, perm, dev)
    gid = channel_groups(codec, perm, heads, dev)
    fields, args = {}, []
    if precision is None:
        precision = "tf32" if x.dtype in (torch.bfloat16, torch.float16) else "tf32x3"
    if symmetric is None:
        symmetric = all(_symmetric(codec.tensors(i, "cpu")[2]) for i in range(len(codec.groups)))
    for i in range(2):
        j = min(i, len(codec.groups) - 1)
        bits, d, _ = codec.groups[j]
        if i == j:
            fields[f"codes{i}"] = torch.empty(bsz, heads, rows, packing.packed_size(d, bits), dtype=torch.uint8,
                                              device=dev)  # fmt: skip
            fields[f"norms{i}"] = torch.empty(bsz, heads, rows, dtype=torch.float32, device=dev)
        args += [fields[f"codes{j}"].view(torch.int32), fields[f"norms{j}"], codec.tensors(j, dev)[2]]
    mean_arg = x if mean is None else mean.reshape(bsz * heads, dim).float().contiguous()
    scale_arg = x if scale is None else scale.reshape(bsz * heads, dim).float().contiguous()
    (b0, d0, _), rest = codec.groups[0], codec.groups[1:]
    b1, d1 = (rest[0][0], rest[0][1]) if rest else (b0, 0)
    block = block_t or (32 if dim >= 256 else 128)
    _encode_kernel[(triton.cdiv(rows, block), bsz * heads)](
        x, x.stride(0), x.stride(1), x.stride(2), mean_arg, scale_arg, rot, 0 if rot.shape[0] == 1 else dim * dim, gid,
        *args, rows, heads,
        D=dim, B0=b0, D0=d0, B1=b1, D1=d1, BLOCK_T=block, CW0=min(d0, 64), CW1=min(max(d1, 16), 64),
        HAS_MEAN=mean is not None, HAS_SCALE=scale is not None, PREC=precision, SYM=symmetric, num_warps=num_warps,
    )  # fmt: skip
    return fields


def _symmetric(bounds: torch.Tensor) -> bool:
    """Boundaries b_0 < ... < b_{2M}: b_M == 0 and b_{M-j} == -b_{M+j} (to float32 rounding)."""
    m = (len(bounds) - 1) // 2
    return bool(bounds[m] == 0) and torch.allclose(bounds, -bounds.flip(0), rtol=0, atol=1e-6)
