"""Fused dequantize of packed K/V rows (Triton): unpack, centroids, norms, inverse rotation, scale, mean in one pass.

What multi-token attention over codes needs on the GPU (:func:`turbovq.kv.attention.dequantize_attention`): dense
K/V in the model dtype for SDPA. ``PackedRows.dequantize`` (the reference) makes several float32 passes per group
(unpack, gather, scale, matmul, unpermute, scale, mean); this kernel reads the codes and norms once and writes the
rows once. Per block of ``BLOCK_T`` rows of one (batch, KV head):
``x = sum_i (c_i[codes_i] * ||x||_i) @ R[:, cols_i]^T`` with the fused rotation ``R`` (permutation + every group's
rotation, :func:`~turbovq.kernels.reference.fused_rotation`) as tensor-core products (one-pass tf32 for 16-bit
outputs, 3xTF32 for float32), then ``x * s + mu``. TurboQuant_prod keys add their QJL part
``sqrt(pi/2) / m * ||r|| * signs @ S`` (signs unpacked to +-1 in registers) before the scale and mean.
"""

from __future__ import annotations

import torch

from turbovq.kernels.decode import HAS_TRITON, _rows_layout, codec_supported
from turbovq.kernels.reference import fused_rotation
from turbovq.kv.cache import PackedRows

if HAS_TRITON:
    import triton
    import triton.language as tl

    from turbovq.kernels.decode import _unpack

    @triton.jit
    def _group(acc, codes_ptr, norms_ptr, cent_ptr, rot, row0, t, t_mask, COL0: tl.constexpr, D: tl.constexpr,
               BITS: tl.constexpr, DG: tl.constexpr, CW: tl.constexpr, BLOCK_T: tl.constexpr,
               PREC: tl.constexpr):  # fmt: skip
        """acc += (centroids * norms) of one group's codes @ R[:, COL0 : COL0 + DG]^T, CW columns at a time."""
        nrm = tl.load(norms_ptr + row0 + t, mask=t_mask, other=0.0).to(tl.float32)
        words = (row0 + t) * (DG * BITS // 32)
        for c0 in tl.static_range(0, DG, CW):
            codes = _unpack(codes_ptr.to(tl.pointer_type(tl.int32)), words + c0 * BITS // 32, t_mask, BITS, CW,
                            BLOCK_T)  # fmt: skip
            y = tl.load(cent_ptr + codes) * nrm[:, None]
            r = tl.load(rot + tl.arange(0, D)[:, None] * D + (COL0 + c0 + tl.arange(0, CW))[None, :])  # (D, CW)
            acc += tl.dot(y, tl.trans(r), input_precision=PREC)
        return acc

    @triton.jit
    def _dequantize_kernel(
        out_ptr, c0_ptr, n0_ptr, cent0, c1_ptr, n1_ptr, cent1, rot_ptr, rot_sh, mean_ptr, scale_ptr, n, n_alloc, H,
        qjl_ptr, rn_ptr, s_ptr, qjl_scale,
        D: tl.constexpr, B0: tl.constexpr, D0: tl.constexpr, B1: tl.constexpr, D1: tl.constexpr,
        BLOCK_T: tl.constexpr, HAS_MEAN: tl.constexpr, HAS_SCALE: tl.constexpr, PREC: tl.constexpr,
        QJL: tl.constexpr, RQ: tl.constexpr,
    ):  # fmt: skip
        pid_t = tl.program_id(0)
        pid_bh = tl.program_id(1)
        t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        t_mask = t < n
        dd = tl.arange(0, D)
        rot = rot_ptr + (pid_bh % H) * rot_sh
        row0 = pid_bh.to(tl.int64) * n_alloc
        acc = tl.zeros([BLOCK_T, D], tl.float32)
        acc = _group(acc, c0_ptr, n0_ptr, cent0, rot, row0, t, t_mask, 0, D, B0, D0, min(D0, 64), BLOCK_T, PREC)
        if D1 > 0:
            acc = _group(acc, c1_ptr, n1_ptr, cent1, rot, row0, t, t_mask, D0, D, B1, D1, min(D1, 64), BLOCK_T, PREC)
        if QJL:  # + sqrt(pi/2) / m * ||r|| * signs @ S, 32 sketch rows at a time
            rn = tl.load(rn_ptr + row0 + t, mask=t_mask, other=0.0).to(tl.float32) * qjl_scale
            words = (row0 + t) * (RQ // 32)
            for r0 in tl.static_range(0, RQ, 32):
                bits = _unpack(qjl_ptr.to(tl.pointer_type(tl.int32)), words + r0 // 32, t_mask, 1, 32, BLOCK_T)
                sm = tl.load(s_ptr + (r0 + tl.arange(0, 32))[:, None] * D + dd[None, :])  # (32, D)
                acc += tl.dot((2 * bits - 1).to(tl.float32) * rn[:, None], sm, input_precision=PREC)
        if HAS_SCALE:
            acc = acc * tl.load(scale_ptr + pid_bh * D + dd)[None, :]
        if HAS_MEAN:
            acc = acc + tl.load(mean_ptr + pid_bh * D + dd)[None, :]
        o = out_ptr + (pid_bh.to(tl.int64) * n + t)[:, None] * D + dd[None, :]
        tl.store(o, acc.to(out_ptr.dtype.element_ty), mask=t_mask[:, None])


def supported(rows: PackedRows) -> bool:
    """The kernel handles mse codes in power-of-two groups (as the decode kernels do), and QJL keys, on CUDA."""
    return HAS_TRITON and rows.fields["codes0"].is_cuda and codec_supported(rows.codec, qjl=True)


def dequantize_rows(rows: PackedRows, dtype: torch.dtype, *, block_t: int | None = None) -> torch.Tensor:
    """``rows.dequantize().to(dtype)`` in one kernel: ``(B, H, n, D)`` in ``dtype``."""
    codec = rows.codec
    if not codec_supported(codec, qjl=True):
        raise ValueError(f"dequantize_rows needs codes in power-of-two groups (3 bits: of 32+) and a power-of-two QJL "
                         f"sketch of >= 32 rows, got {codec.groups}, qjl={codec.qjl}")  # fmt: skip
    bsz, heads = rows.fields["norms0"].shape[:2]
    n, dim = rows.length, codec.dim
    fields, n_alloc = _rows_layout(rows.fields, heads)
    dev = fields["codes0"].device
    rot = fused_rotation(codec, rows.perm, dev)
    out = torch.empty(bsz, heads, n, dim, device=dev, dtype=dtype)
    if n == 0:
        return out
    mean, scale = (None if x is None else x.expand(bsz, heads, 1, dim).reshape(-1, dim).float().contiguous()
                   for x in (rows.mean, rows.scale))  # fmt: skip
    k1 = min(1, len(codec.groups) - 1)
    (b0, d0, _), rest = codec.groups[0], codec.groups[1:]
    b1, d1 = (rest[0][0], rest[0][1]) if rest else (b0, 0)
    cents = [codec.tensors(i, dev)[1].float().contiguous() for i in (0, k1)]
    block_t = block_t or (64 if dim <= 128 else 32)  # a (block_t, D) float32 accumulator in registers
    sketch = codec.quantizer.qjl if codec.qjl else None
    qjl_args = (fields["qjl"], fields["rnorms"], sketch.matrix(dev).float().contiguous(),
                sketch.factor) if sketch else (out, out, out, 0.0)  # fmt: skip
    _dequantize_kernel[(triton.cdiv(n, block_t), bsz * heads)](
        out, fields["codes0"], fields["norms0"], cents[0], fields[f"codes{k1}"], fields[f"norms{k1}"], cents[1],
        rot, 0 if rot.shape[0] == 1 else dim * dim, out if mean is None else mean, out if scale is None else scale,
        n, n_alloc, heads, *qjl_args, D=dim, B0=b0, D0=d0, B1=b1, D1=d1, BLOCK_T=block_t, HAS_MEAN=mean is not None,
        HAS_SCALE=scale is not None, PREC="tf32x3" if dtype == torch.float32 else "tf32", QJL=codec.qjl,
        RQ=sketch.rows if sketch else 32,
    )  # fmt: skip
    return out
