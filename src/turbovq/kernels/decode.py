"""Split-T flash-decoding directly on TurboQuant codes (Triton, split pass also in CUDA), one query token per sequence.

Why it can beat bf16 attention: decode attention is a pass over the KV cache, so its time is bytes over bandwidth.
K4/V3 codes + float16 norms are 116 bytes per (token, KV head) at head_dim 128 instead of 512 in bf16.

Algorithm (the torch twin is :func:`turbovq.kernels.reference.split_decode_reference`):

1. Query kernel, grid ``(B * H,)``: ``q_rot = (q * s_k) @ R_k[h]`` (3xTF32 tensor-core dot, float32-accurate;
   ``s``: per-channel scales of a normalized cache, else 1) and ``<q, mu_k>`` into a float32 workspace. ``R``
   folds the outlier permutation and every group's rotation into one orthogonal ``D x D`` matrix per KV head
   (:func:`~turbovq.kernels.reference.fused_rotation`, cached per layer like every other constant here). Where
   the keys use the rotation ``"hadamard"`` (the default) with one channel group (integer widths) and the CUDA split
   pass runs, decode_mma.cu's ``tq_decode_query`` applies it in factored form instead (three rounds of signs and a
   fast Walsh-Hadamard transform in float32, one warp per query head: no R to read).
2. Main kernel, grid ``(S + 1, B * H)``: program ``(s, b, h)`` with ``s < S`` streams its share of the compressed
   tokens in blocks of ``BLOCK_T``, for *all* ``G`` query heads of KV head ``h`` (each code byte is read once):
   turn int32 words of codes into float16 centroids (3- and 4-bit groups: inline-PTX ``prmt`` byte-permute table
   lookups in registers, ~2.5 ALU instructions per code and no memory access; other widths and the interpreter:
   shift/mask unpack + centroid gather), ``tl.dot`` with the rotated queries (tensor cores; the
   ``G`` rows are padded to 16), scale by the norms, online softmax in base 2, ``p * ||v||`` dotted with the value
   centroids into an accumulator in the rotated space. By default (``trans=True``) both products are transposed
   (``s^T = K q^T``, ``acc^T += V^T p^T``): the decoded tile is the tall operand (measured 3-23% faster on an
   H200). Program ``s = S`` does the full-precision tail window in the original space. Centered caches add
   ``<q, mu_k>`` to every code score. ``S`` targets ~8 waves of programs (at most 64 splits; the CUDA split pass
   below takes splits of at least 1024 tokens, at most 32: ``MMA_SPLITS``, and up to a quarter more where that fills
   more of the last wave: :func:`mma_splits`).
   Where it applies (2-, 3- and 4-bit groups of 32, 64, 128 or 256 channels, head_dim 64/128/256, G <= 8) this step
   runs the CUDA kernel in ``decode_mma.cu`` instead (the same programs in a 1-D grid, tails last, and the same
   workspace; the whole call is 1.7x faster at B = 8, T = 32k on an H100; that file says why), compiled once per
   process by NVRTC (:mod:`turbovq.kernels.cuda`). Its tail programs use tensor cores (H100: 14 instead of 32 us
   each, B = 1, T = 8k: 32 -> 24 us per call, kernels_timeline_r11.json, kernels.json).
   TurboQuant_prod keys add ``sqrt(pi/2) / m * ||r|| * <q_qjl, signs>`` to each score, with ``q_qjl = (q * s_k) @
   S^T`` from the query kernel and the 1-bit signs unpacked to +-1 in registers (in the CUDA kernel a third key
   group on tensor cores, for sketches of 32-256 rows: H100, B = 8, T = 32k, K4 prod/V3: 526 -> 179 us,
   kernels_qjl_r12.json).
3. Merge kernel, grid ``(B * H, D / BN)``: combine the ``S + 1`` partials with ``exp2(m_s - M)`` (4 splits'
   loads in flight at a time), rotate the code part of ``BN`` output columns back with ``R_v[h]^T`` (3xTF32 dot),
   multiply by ``s_v``, add ``(sum_codes p) * mu_v`` and the tail part, divide by the total. Where the values use
   one ``"hadamard"`` group and the CUDA split pass runs, decode_mma.cu's ``tq_decode_merge`` does the same with the
   factored inverse rotation, one warp per query head, every partial loaded at once (H100, K4/V3, B = 8, T = 32k:
   both kernels together take the call from 129.4-132.0 to 126.8-127.2 us, kernels_hq_r16.json,
   kernels_qw_r16.json). With
   ``fused_reduce=True`` the last program of each ``(b, h)`` to finish (an arrival counter) merges instead of a
   third launch; measured slower on an H200 (the merge then runs on the critical tail), so it is off by default.

Per call the host only builds a few Python values, allocates the workspace and the output and launches three
kernels (no other torch op, no host synchronisation). On sm_90 they are chained by programmatic dependent launch
(``PDL``): the CUDA split pass starts while the query kernel runs (its first copies under way, it waits before
reading the rotated query) and the merge launches as the split pass's last blocks start (it reads ``R_v``, then
waits for the partials). Float32
``tl.dot(..., input_precision="ieee")`` is avoided: Triton lowers it to a slow FMA loop (~20-30 us per 16 x 128 x 64
product on an H200), which was most of the former fixed per-call cost.

Scores and values use float16 tensor-core operands with float32 accumulation (centroids are in [-1, 1] and the
query is rotated in float32 first); the tail uses the model dtype, as flash attention does.
"""

from __future__ import annotations

import ctypes
import math
import os
import weakref
from pathlib import Path

import torch

from turbovq.kernels import cuda
from turbovq.kernels.reference import fused_rotation, weak_cached
from turbovq.kv.cache import PackedRows, RowCodec
from turbovq.rotation import HADAMARD_ROUNDS, hadamard_signs

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # CPU-only installs: the torch reference is used
    HAS_TRITON = False
try:  # Triton >= 3.3: programmatic dependent launch (see PDL)
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:
    gdc_launch_dependents = gdc_wait = None

_LOG2E = 1.4426950408889634
_PRMT = os.environ.get("TRITON_INTERPRET", "0") != "1"  # inline PTX decoders; the interpreter cannot run PTX

# PRMT decoders (GPU only): a byte permute looks 4 bytes up in an 8-byte table at once, so a b32 word of codes
# becomes float16 centroids in ~2.5 ALU instructions per code, with no memory access (the interpreter uses the
# centroid gather instead). The tables hold the low and high bytes of 8 float16 centroids (4 b32 registers).
# 4 bits (a symmetric table in the cache's sign-magnitude order, c[k] = -c[8 + k]): |c[k]| = P[k & 7], sign = k < 8.
_ASM4 = """{
.reg .b32 idx, idh, la, ha, lb, hb, x, s, r0, r1, r2, r3;
and.b32 idx, $8, 0x77777777;
shr.b32 idh, idx, 16;
prmt.b32 la, $9, $10, idx;
prmt.b32 ha, $11, $12, idx;
prmt.b32 lb, $9, $10, idh;
prmt.b32 hb, $11, $12, idh;
prmt.b32 x, $8, $8, 0x1100;
shl.b32 s, x, 4;
and.b32 s, s, 0x00800080;
and.b32 x, x, 0x80008000;
or.b32 s, s, x;
not.b32 s, s;
and.b32 s, s, 0x80808080;
or.b32 ha, ha, s;
prmt.b32 x, $8, $8, 0x3322;
shl.b32 s, x, 4;
and.b32 s, s, 0x00800080;
and.b32 x, x, 0x80008000;
or.b32 s, s, x;
not.b32 s, s;
and.b32 s, s, 0x80808080;
or.b32 hb, hb, s;
prmt.b32 r0, la, ha, 0x5140;
prmt.b32 r1, la, ha, 0x7362;
prmt.b32 r2, lb, hb, 0x5140;
prmt.b32 r3, lb, hb, 0x7362;
mov.b32 {$0, $1}, r0;
mov.b32 {$2, $3}, r1;
mov.b32 {$4, $5}, r2;
mov.b32 {$6, $7}, r3;
}"""


def _asm3() -> str:
    """32 codes of 3 bits in 3 words ($32..$34) -> 32 float16 ($0..$31); 8-entry table in $35..$38."""
    lines = ["{", ".reg .b32 g, y, t, u, uh, la, ha, lb, hb, r0, r1, r2, r3;"]
    extract = [
        "and.b32 g, $32, 0xFFFFFF;",
        "shf.r.clamp.b32 g, $32, $33, 24;\nand.b32 g, g, 0xFFFFFF;",
        "shf.r.clamp.b32 g, $33, $34, 16;\nand.b32 g, g, 0xFFFFFF;",
        "shr.b32 g, $34, 8;",
    ]
    for q in range(4):  # 8 codes at bits 3i of g -> nibbles 4i of u (bit 3 clear)
        # fmt: off
        lines += [
            extract[q],
            "shl.b32 t, g, 4;", "and.b32 t, t, 0xFFF0000;", "and.b32 y, g, 0xFFF;", "or.b32 y, y, t;",
            "shl.b32 t, y, 2;", "and.b32 t, t, 0x3F003F00;", "and.b32 y, y, 0x3F003F;", "or.b32 y, y, t;",
            "shl.b32 t, y, 1;", "and.b32 t, t, 0x70707070;", "and.b32 u, y, 0x07070707;", "or.b32 u, u, t;",
            "shr.b32 uh, u, 16;",
            "prmt.b32 la, $35, $36, u;", "prmt.b32 ha, $37, $38, u;",
            "prmt.b32 lb, $35, $36, uh;", "prmt.b32 hb, $37, $38, uh;",
            "prmt.b32 r0, la, ha, 0x5140;", "prmt.b32 r1, la, ha, 0x7362;",
            "prmt.b32 r2, lb, hb, 0x5140;", "prmt.b32 r3, lb, hb, 0x7362;",
        ]
        # fmt: on
        lines += [f"mov.b32 {{${8 * q + 2 * j}, ${8 * q + 2 * j + 1}}}, r{j};" for j in range(4)]
    return "\n".join(lines + ["}"])


_ASM3 = _asm3()
_C3 = ",".join(["=h"] * 32 + ["r"] * 7)
if HAS_TRITON:
    _ASM4, _ASM3, _C3 = tl.constexpr(_ASM4), tl.constexpr(_ASM3), tl.constexpr(_C3)
_DOT_BITS = (1, 2, 3, 4, 8)  # code widths the unpacker handles (3 through 96-bit groups of 32 codes)


def _pow2(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


def codec_supported(codec: RowCodec, qjl: bool = False) -> bool:
    """Whether the kernels handle this codec: mse codes, power-of-two groups of >= 16 channels in whole words; with
    ``qjl`` (keys, and the encode) also TurboQuant_prod codecs whose sketch has a power-of-two number of rows >= 32."""
    if not _pow2(codec.dim) or codec.dim < 16:
        return False
    if codec.qjl and not (qjl and _pow2(codec.quantizer.qjl.rows) and codec.quantizer.qjl.rows >= 32):
        return False
    for bits, d, _ in codec.groups:
        if bits not in _DOT_BITS or not _pow2(d) or d < 16 or (d * bits) % 32 or (bits == 3 and d % 32):
            return False
    return True


def supported(query: torch.Tensor, keys: PackedRows, values: PackedRows) -> bool:
    """True when :func:`decode_attention` can run this call (else use ``attend_codes``)."""
    return (
        HAS_TRITON
        and query.is_cuda
        and query.shape[2] == 1
        and query.dtype in (torch.float16, torch.bfloat16, torch.float32)
        and keys.length > 0
        and codec_supported(keys.codec, qjl=True)
        and codec_supported(values.codec)
    )


if HAS_TRITON:

    @triton.jit
    def _unpack(ptr, word_off, t_mask, BITS: tl.constexpr, DG: tl.constexpr, BLOCK_T: tl.constexpr):
        """Codes ``(BLOCK_T, DG)`` int32 of rows starting at int32 word offsets ``word_off`` (packing.py layout)."""
        if BITS == 3:
            # 32 codes = 3 words; code k sits at bit 3k of the 96-bit group: k <= 20 in (w0 | w1 << 32),
            # k >= 21 in (w1 | w2 << 32) at bit 3k - 32.
            NG: tl.constexpr = DG // 32
            base = ptr + word_off[:, None] + 3 * tl.arange(0, NG)[None, :]
            m = t_mask[:, None]
            w0 = tl.load(base, mask=m, other=0).to(tl.uint32).to(tl.uint64)
            w1 = tl.load(base + 1, mask=m, other=0).to(tl.uint32).to(tl.uint64)
            w2 = tl.load(base + 2, mask=m, other=0).to(tl.uint32).to(tl.uint64)
            lo = w0 | (w1 << 32)
            hi = w1 | (w2 << 32)
            k = tl.arange(0, 32)
            first = k <= 20
            src = tl.where(first[None, None, :], lo[:, :, None], hi[:, :, None])
            shift = tl.where(first, 3 * k, 3 * k - 32).to(tl.uint64)
            codes = ((src >> shift[None, None, :]) & 7).to(tl.int32)
        else:
            CPW: tl.constexpr = 32 // BITS
            NW: tl.constexpr = DG // CPW
            w = tl.load(ptr + word_off[:, None] + tl.arange(0, NW)[None, :], mask=t_mask[:, None], other=0)
            shift = tl.arange(0, CPW) * BITS
            codes = (w[:, :, None] >> shift[None, None, :]) & ((1 << BITS) - 1)
        return tl.reshape(codes, (BLOCK_T, DG))

    @triton.jit
    def _tree8(o0, o1, o2, o3, o4, o5, o6, o7):
        """(..., 8) with [..., k] = o_k (joins add a trailing dim: the first join is the slowest)."""
        return tl.join(tl.join(tl.join(o0, o4), tl.join(o2, o6)), tl.join(tl.join(o1, o5), tl.join(o3, o7)))

    @triton.jit
    def _dec4(w, tab):
        """int32 words (BLOCK_T, NW) of 4-bit codes -> float16 centroids (BLOCK_T, NW, 8) (PRMT lookups)."""
        o = tl.inline_asm_elementwise(
            _ASM4, "=h,=h,=h,=h,=h,=h,=h,=h,r,r,r,r,r",
            [w, tl.load(tab), tl.load(tab + 1), tl.load(tab + 2), tl.load(tab + 3)],
            dtype=(tl.float16,) * 8, is_pure=True, pack=1,
        )  # fmt: skip
        return _tree8(o[0], o[1], o[2], o[3], o[4], o[5], o[6], o[7])

    @triton.jit
    def _dec3(w0, w1, w2, tab):
        """int32 words (BLOCK_T, NG) x 3 of 3-bit codes -> float16 centroids (BLOCK_T, NG, 32) (PRMT lookups)."""
        o = tl.inline_asm_elementwise(
            _ASM3, _C3,
            [w0, w1, w2, tl.load(tab), tl.load(tab + 1), tl.load(tab + 2), tl.load(tab + 3)],
            dtype=(tl.float16,) * 32, is_pure=True, pack=1,
        )  # fmt: skip
        # [..., 8a + b]: join over a (slowest) first, then over b
        u0 = tl.join(tl.join(o[0], o[16]), tl.join(o[8], o[24]))
        u1 = tl.join(tl.join(o[1], o[17]), tl.join(o[9], o[25]))
        u2 = tl.join(tl.join(o[2], o[18]), tl.join(o[10], o[26]))
        u3 = tl.join(tl.join(o[3], o[19]), tl.join(o[11], o[27]))
        u4 = tl.join(tl.join(o[4], o[20]), tl.join(o[12], o[28]))
        u5 = tl.join(tl.join(o[5], o[21]), tl.join(o[13], o[29]))
        u6 = tl.join(tl.join(o[6], o[22]), tl.join(o[14], o[30]))
        u7 = tl.join(tl.join(o[7], o[23]), tl.join(o[15], o[31]))
        return _tree8(u0, u1, u2, u3, u4, u5, u6, u7)

    @triton.jit
    def _centroids(ptr, word_off, t_mask, cent, tab, BITS: tl.constexpr, DG: tl.constexpr, BLOCK_T: tl.constexpr,
                   PRMT: tl.constexpr):  # fmt: skip
        """float16 centroids (BLOCK_T, DG) of the code rows at int32 word offsets ``word_off``."""
        if PRMT and BITS == 4:
            w = tl.load(ptr + word_off[:, None] + tl.arange(0, DG // 8)[None, :], mask=t_mask[:, None], other=0)
            out = tl.reshape(_dec4(w, tab), (BLOCK_T, DG))
        elif PRMT and BITS == 3:
            base = ptr + word_off[:, None] + 3 * tl.arange(0, DG // 32)[None, :]
            m = t_mask[:, None]
            w0 = tl.load(base, mask=m, other=0)
            w1 = tl.load(base + 1, mask=m, other=0)
            w2 = tl.load(base + 2, mask=m, other=0)
            out = tl.reshape(_dec3(w0, w1, w2, tab), (BLOCK_T, DG))
        else:
            out = tl.load(cent + _unpack(ptr, word_off, t_mask, BITS, DG, BLOCK_T))
        return out

    @triton.jit
    def _scale_scores(
        s, t, t_mask, b, mask_ptr, stride_mb, stride_mt, scaling, softcap,
        HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, SOFTCAP: tl.constexpr,
    ):  # fmt: skip
        """scaling, optional tanh soft-cap, mask (additive float, or boolean: True = attend), then base 2;
        positions past the block end -> -inf."""
        s = s * scaling
        if SOFTCAP:
            s = softcap * (1.0 - 2.0 / (tl.exp(2.0 * s / softcap) + 1.0))  # tanh, saturating without NaN
        if HAS_MASK:
            mv = tl.load(mask_ptr + b * stride_mb + t * stride_mt, mask=t_mask, other=0)
            if MASK_BOOL:  # False adds float32 min, which becomes -inf in base 2 (as _additive_mask does)
                s = tl.where((mv != 0)[None, :], s, float("-inf"))
            else:
                s = s + mv.to(tl.float32)[None, :]
        s = s * 1.4426950408889634
        return tl.where(t_mask[None, :], s, float("-inf"))

    @triton.jit
    def _prep_kernel(
        ws, q_ptr, stride_qb, stride_qh, kscale_ptr, kmean_ptr, rk_ptr, rk_sh, H, sk_ptr, qoff,
        G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, BN: tl.constexpr,
        HAS_KSCALE: tl.constexpr, HAS_KMEAN: tl.constexpr, PDL: tl.constexpr, QJL: tl.constexpr, RQ: tl.constexpr,
        SPLIT: tl.constexpr = False,
    ):  # fmt: skip
        """Per (b, h): ``q_rot = (q * s_k) @ R_k[h]`` (3xTF32 dot) and ``<q, mu_k>`` into the workspace; with QJL
        keys also ``q_qjl = (q * s_k) @ S^T`` (at word ``qoff``, after the partials). With SPLIT, program (pid_bh, c)
        computes only output column block c (of D / BN, then RQ / BN for q_qjl): the split pass waits for this
        kernel, so its latency, not its work, is what counts."""
        if PDL:  # the split pass may start now: its prologue overlaps this kernel, it waits before reading q_rot
            gdc_launch_dependents()
        pid_bh = tl.program_id(0)
        pid_c = tl.program_id(1)
        BH = tl.num_programs(0)
        b = pid_bh // H
        h = pid_bh % H
        g = tl.arange(0, BLOCK_G)
        gmask = g < G
        dd = tl.arange(0, D)
        q = tl.load(q_ptr + b * stride_qb + (h * G + g)[:, None] * stride_qh + dd[None, :], mask=gmask[:, None],
                    other=0.0).to(tl.float32)  # fmt: skip
        if HAS_KMEAN and pid_c == 0:
            qm = tl.sum(q * tl.load(kmean_ptr + pid_bh * D + dd)[None, :], axis=1)
            tl.store(ws + BH * G * D + pid_bh * G + g, qm, mask=gmask)
        if HAS_KSCALE:
            q = q * tl.load(kscale_ptr + pid_bh * D + dd)[None, :]
        for n0 in tl.static_range(0, D, BN):
            if not SPLIT or pid_c == n0 // BN:
                cols = n0 + tl.arange(0, BN)
                r = tl.load(rk_ptr + h * rk_sh + dd[:, None] * D + cols[None, :])
                o = tl.dot(q, r, input_precision="tf32x3")  # float32-accurate on tensor cores (ieee is ~20x slower)
                tl.store(ws + (pid_bh * G + g)[:, None] * D + cols[None, :], o, mask=gmask[:, None])
        if QJL:
            for n0 in tl.static_range(0, RQ, BN):
                if not SPLIT or pid_c == D // BN + n0 // BN:
                    cols = n0 + tl.arange(0, BN)
                    o = tl.dot(q, tl.load(sk_ptr + dd[:, None] * RQ + cols[None, :]), input_precision="tf32x3")
                    tl.store(ws + qoff + (pid_bh * G + g)[:, None] * RQ + cols[None, :], o, mask=gmask[:, None])

    @triton.jit
    def _combine(
        ws, pid_bh, h, n0, S, BH, rv_ptr, rv_sh, vmean_ptr, vscale_ptr, out_ptr,
        G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, BN: tl.constexpr,
        HAS_VMEAN: tl.constexpr, HAS_VSCALE: tl.constexpr, PDL: tl.constexpr = False, STEP: tl.constexpr = 4,
    ):  # fmt: skip
        """Output columns ``n0 : n0 + BN`` of (b, h): merge the S code splits and the tail split in one pass with a
        running maximum (STEP splits' loads per step; H100, B = 8, T = 32k: 9.1 -> 7.0 us against a first pass for
        the maximum, kernels_decode_ab_r8.json), one inverse rotation ``R_v[h]^T`` (3xTF32 tensor-core dot:
        float32-accurate), then ``* s_v``, ``+ l_codes * mu_v`` and the tail, all divided by the total."""
        PG = BH * (S + 1) * G
        m_ptr = ws + BH * G * (D + 1)
        l_ptr = m_ptr + PG
        acc_ptr = l_ptr + PG
        g = tl.arange(0, BLOCK_G)
        gmask = g < G
        dd = tl.arange(0, D)
        base = pid_bh * (S + 1)
        big = tl.full([BLOCK_G], -1e30, tl.float32)
        acc = tl.zeros([BLOCK_G, D], tl.float32)
        l_codes = tl.zeros([BLOCK_G], tl.float32)
        cols = n0 + tl.arange(0, BN)
        r = tl.load(rv_ptr + h * rv_sh + cols[:, None] * D + dd[None, :])  # R[cols, :] (coalesced rows)
        if PDL:  # (a second launch, started before the split pass ended: R is read meanwhile) wait for the partials
            gdc_wait()
        for s0 in range(0, S, STEP):
            for j in tl.static_range(STEP):
                ok = gmask & (s0 + j < S)
                row = (base + s0 + j) * G + g
                m = tl.load(m_ptr + row, mask=ok, other=-1e30)
                nb = tl.maximum(big, m)
                alpha = tl.exp2(big - nb)
                w = tl.exp2(m - nb)
                l_codes = l_codes * alpha + w * tl.load(l_ptr + row, mask=ok, other=0.0)
                part = tl.load(acc_ptr + row[:, None] * D + dd[None, :], mask=ok[:, None], other=0.0)
                acc = acc * alpha[:, None] + w[:, None] * part
                big = nb
        trow = (base + S) * G + g
        m_tail = tl.load(m_ptr + trow, mask=gmask, other=-1e30)
        nb = tl.maximum(big, m_tail)
        alpha = tl.exp2(big - nb)
        acc = acc * alpha[:, None]
        l_codes = l_codes * alpha
        w_tail = tl.exp2(m_tail - nb)
        inv = 1.0 / tl.where(gmask, l_codes + w_tail * tl.load(l_ptr + trow, mask=gmask, other=0.0), 1.0)
        o = tl.dot(acc * inv[:, None], tl.trans(r), input_precision="tf32x3")  # acc @ R^T[:, cols]
        if HAS_VSCALE:  # the codes hold (v - mu) / s: scale after the inverse rotation, then add mu
            o = o * tl.load(vscale_ptr + pid_bh * D + cols)[None, :]
        if HAS_VMEAN:
            o += (l_codes * inv)[:, None] * tl.load(vmean_ptr + pid_bh * D + cols)[None, :]
        tail = tl.load(acc_ptr + trow[:, None] * D + cols[None, :], mask=gmask[:, None], other=0.0)
        o += (w_tail * inv)[:, None] * tail
        out_rows = pid_bh * G + g  # (b * Hq + h * G + g): out is (B, 1, Hq, D)
        tl.store(out_ptr + out_rows[:, None] * D + cols[None, :], o.to(out_ptr.dtype.element_ty),
                 mask=gmask[:, None])  # fmt: skip

    @triton.jit
    def _split_bases(
        ws, pid_bh, BH, g, gmask, k_alloc, v_alloc, kc0, kn0, kc1, kn1, vc0, vn0, vc1, vn1,
        G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr,
        KB0: tl.constexpr, KD0: tl.constexpr, KB1: tl.constexpr, KD1: tl.constexpr,
        VB0: tl.constexpr, VD0: tl.constexpr, VB1: tl.constexpr, VD1: tl.constexpr, HAS_KMEAN: tl.constexpr,
    ):  # fmt: skip
        """A split program's setup: ``<q, mu_k>`` (the centered cache's constant key component, zero otherwise) and
        the (b, h) row bases of the code words and norms, in int64 (B * H * N_alloc * words can pass 2^31; offsets
        within a row stay int32)."""
        qm = tl.zeros([BLOCK_G], tl.float32)
        if HAS_KMEAN:
            qm = tl.load(ws + BH * G * D + pid_bh * G + g, mask=gmask, other=0.0)
        kb = pid_bh.to(tl.int64) * k_alloc
        vb = pid_bh.to(tl.int64) * v_alloc
        kw0 = kc0.to(tl.pointer_type(tl.int32)) + kb * (KD0 * KB0 // 32)
        kw1 = kc1.to(tl.pointer_type(tl.int32)) + kb * (KD1 * KB1 // 32)
        vw0 = vc0.to(tl.pointer_type(tl.int32)) + vb * (VD0 * VB0 // 32)
        vw1 = vc1.to(tl.pointer_type(tl.int32)) + vb * (VD1 * VB1 // 32)
        return qm, kw0, kw1, vw0, vw1, kn0 + kb, kn1 + kb, vn0 + vb, vn1 + vb

    @triton.jit
    def _qjl_keys(kqc, krn, pid_bh, k_alloc, t, t_mask, qjl_scale, RQ: tl.constexpr, BLOCK_T: tl.constexpr):
        """QJL keys' signs (BLOCK_T, RQ) as +-1 float16 and their factors sqrt(pi/2) / rows * ||r|| (BLOCK_T,): the
        score term is ``factor * <q_qjl, signs>``, as in ``attend_codes``."""
        kb = pid_bh.to(tl.int64) * k_alloc
        words = kqc.to(tl.pointer_type(tl.int32)) + kb * (RQ // 32)
        signs = (2 * _unpack(words, t * (RQ // 32), t_mask, 1, RQ, BLOCK_T) - 1).to(tl.float16)
        return signs, tl.load(krn + kb + t, mask=t_mask, other=0.0).to(tl.float32) * qjl_scale

    @triton.jit
    def _split_trans(
        ws, m_out, pid_bh, pid_s, part, PG, BH, split_len, iters, n, k_alloc, v_alloc,
        kc0, kn0, kc1, kn1, kcent, ktab, vc0, vn0, vc1, vn1, vcent, vtab,
        b, mask_ptr, stride_mb, stride_mt, scaling, softcap, kqc, krn, qoff, qjl_scale,
        G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr,
        KB0: tl.constexpr, KD0: tl.constexpr, KB1: tl.constexpr, KD1: tl.constexpr,
        VB0: tl.constexpr, VD0: tl.constexpr, VB1: tl.constexpr, VD1: tl.constexpr, BLOCK_T: tl.constexpr,
        HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, HAS_KMEAN: tl.constexpr, SOFTCAP: tl.constexpr,
        PRMT: tl.constexpr, QJL: tl.constexpr, RQ: tl.constexpr,
    ):  # fmt: skip
        """One code split in the transposed orientation: ``s^T = K q^T`` and ``acc^T += V^T (p v_n)^T``, so the
        decoded tiles are the tall (M = tokens or coordinates) operand and the G query rows the narrow one."""
        g = tl.arange(0, BLOCK_G)
        gmask = g < G
        tt = tl.arange(0, BLOCK_T)
        m_i = tl.full([BLOCK_G], -1e30, tl.float32)
        l_i = tl.zeros([BLOCK_G], tl.float32)
        lo = pid_s * split_len
        qcol = (pid_bh * G + g)[None, :] * D
        q0 = tl.load(ws + qcol + tl.arange(0, KD0)[:, None], mask=gmask[None, :], other=0.0).to(tl.float16)
        if KD1 > 0:
            q1 = tl.load(ws + qcol + KD0 + tl.arange(0, KD1)[:, None], mask=gmask[None, :], other=0.0)
            q1 = q1.to(tl.float16)
        if QJL:
            qq = tl.load(ws + qoff + (pid_bh * G + g)[None, :] * RQ + tl.arange(0, RQ)[:, None], mask=gmask[None, :],
                         other=0.0).to(tl.float16)  # fmt: skip
        qm, kw0, kw1, vw0, vw1, kn0_b, kn1_b, vn0_b, vn1_b = _split_bases(
            ws, pid_bh, BH, g, gmask, k_alloc, v_alloc, kc0, kn0, kc1, kn1, vc0, vn0, vc1, vn1,
            G, BLOCK_G, D, KB0, KD0, KB1, KD1, VB0, VD0, VB1, VD1, HAS_KMEAN,
        )  # fmt: skip
        acc0 = tl.zeros([VD0, BLOCK_G], tl.float32)
        if VD1 > 0:
            acc1 = tl.zeros([VD1, BLOCK_G], tl.float32)
        for it in range(iters):
            t = lo + it * BLOCK_T + tt
            t_mask = t < n
            kv = _centroids(kw0, t * (KD0 * KB0 // 32), t_mask, kcent, ktab, KB0, KD0, BLOCK_T, PRMT)
            kn = tl.load(kn0_b + t, mask=t_mask, other=0.0).to(tl.float32)
            s = tl.dot(kv, q0) * kn[:, None]  # (BLOCK_T, BLOCK_G)
            if KD1 > 0:
                kv = _centroids(kw1, t * (KD1 * KB1 // 32), t_mask, kcent + (1 << KB0), ktab + 4, KB1, KD1,
                                BLOCK_T, PRMT)  # fmt: skip
                kn = tl.load(kn1_b + t, mask=t_mask, other=0.0).to(tl.float32)
                s += tl.dot(kv, q1) * kn[:, None]
            if QJL:
                sv, rn = _qjl_keys(kqc, krn, pid_bh, k_alloc, t, t_mask, qjl_scale, RQ, BLOCK_T)
                s += tl.dot(sv, qq) * rn[:, None]
            s = (s + qm[None, :]) * scaling
            if SOFTCAP:
                s = softcap * (1.0 - 2.0 / (tl.exp(2.0 * s / softcap) + 1.0))
            if HAS_MASK:
                mv = tl.load(mask_ptr + b * stride_mb + t * stride_mt, mask=t_mask, other=0)
                if MASK_BOOL:
                    s = tl.where((mv != 0)[:, None], s, float("-inf"))
                else:
                    s = s + mv.to(tl.float32)[:, None]
            s = tl.where(t_mask[:, None], s * 1.4426950408889634, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=0))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[None, :])
            l_i = l_i * alpha + tl.sum(p, axis=0)
            m_i = m_new
            vv = _centroids(vw0, t * (VD0 * VB0 // 32), t_mask, vcent, vtab, VB0, VD0, BLOCK_T, PRMT)
            vn = tl.load(vn0_b + t, mask=t_mask, other=0.0).to(tl.float32)
            acc0 = acc0 * alpha[None, :] + tl.dot(tl.trans(vv), (p * vn[:, None]).to(tl.float16))
            if VD1 > 0:
                vv = _centroids(vw1, t * (VD1 * VB1 // 32), t_mask, vcent + (1 << VB0), vtab + 4, VB1, VD1,
                                BLOCK_T, PRMT)  # fmt: skip
                vn = tl.load(vn1_b + t, mask=t_mask, other=0.0).to(tl.float32)
                acc1 = acc1 * alpha[None, :] + tl.dot(tl.trans(vv), (p * vn[:, None]).to(tl.float16))
        acol = m_out + 2 * PG + (part * G + g)[None, :] * D
        tl.store(acol + tl.arange(0, VD0)[:, None], acc0, mask=gmask[None, :])
        if VD1 > 0:
            tl.store(acol + VD0 + tl.arange(0, VD1)[:, None], acc1, mask=gmask[None, :])
        tl.store(m_out + part * G + g, m_i, mask=gmask)
        tl.store(m_out + PG + part * G + g, l_i, mask=gmask)

    @triton.jit(do_not_specialize=["iters", "S"])  # no recompiles as the split count changes
    def _decode_kernel(
        ws, q_ptr, stride_qb, stride_qh,
        kc0, kn0, kc1, kn1, kcent, ktab,
        vc0, vn0, vc1, vn1, vcent, vtab,
        tk_ptr, tv_ptr, st_b, st_h, st_t, t_len,
        mask_ptr, stride_mb, stride_mt,
        cnt_ptr, rv_ptr, rv_sh, vmean_ptr, vscale_ptr, out_ptr,
        n, k_alloc, v_alloc, split_len, iters, S, H, scaling, softcap, kqc, krn, qoff, qjl_scale,
        G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr,
        KB0: tl.constexpr, KD0: tl.constexpr, KB1: tl.constexpr, KD1: tl.constexpr,
        VB0: tl.constexpr, VD0: tl.constexpr, VB1: tl.constexpr, VD1: tl.constexpr,
        BLOCK_T: tl.constexpr, BN: tl.constexpr,
        HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, HAS_KMEAN: tl.constexpr, HAS_VMEAN: tl.constexpr,
        HAS_VSCALE: tl.constexpr, SOFTCAP: tl.constexpr, PRMT: tl.constexpr, FUSED: tl.constexpr,
        QJL: tl.constexpr, RQ: tl.constexpr, TRANS: tl.constexpr = False,
    ):  # fmt: skip
        pid_s = tl.program_id(0)
        pid_bh = tl.program_id(1)
        BH = tl.num_programs(1)
        b = pid_bh // H
        h = pid_bh % H
        g = tl.arange(0, BLOCK_G)
        gmask = g < G
        dd = tl.arange(0, D)
        tt = tl.arange(0, BLOCK_T)
        m_i = tl.full([BLOCK_G], -1e30, tl.float32)
        l_i = tl.zeros([BLOCK_G], tl.float32)
        PG = BH * (S + 1) * G
        m_out = ws + BH * G * (D + 1)  # workspace: q_rot (BH, G, D), <q, mu_k> (BH, G), m, l, acc partials
        part = pid_bh * (S + 1) + pid_s
        if pid_s < S:
            if TRANS:  # transposed products (decoded tiles as the tall operand)
                _split_trans(
                    ws, m_out, pid_bh, pid_s, part, PG, BH, split_len, iters, n, k_alloc, v_alloc,
                    kc0, kn0, kc1, kn1, kcent, ktab, vc0, vn0, vc1, vn1, vcent, vtab,
                    b, mask_ptr, stride_mb, stride_mt, scaling, softcap, kqc, krn, qoff, qjl_scale,
                    G, BLOCK_G, D, KB0, KD0, KB1, KD1, VB0, VD0, VB1, VD1, BLOCK_T,
                    HAS_MASK, MASK_BOOL, HAS_KMEAN, SOFTCAP, PRMT, QJL, RQ,
                )  # fmt: skip
            else:
                lo = pid_s * split_len  # split_len = iters * BLOCK_T; the last split is masked at n
                qrow = (pid_bh * G + g)[:, None] * D
                q0 = tl.load(ws + qrow + tl.arange(0, KD0)[None, :], mask=gmask[:, None], other=0.0).to(tl.float16)
                if KD1 > 0:
                    q1 = tl.load(ws + qrow + KD0 + tl.arange(0, KD1)[None, :], mask=gmask[:, None], other=0.0)
                    q1 = q1.to(tl.float16)
                if QJL:
                    qq = tl.load(ws + qoff + (pid_bh * G + g)[:, None] * RQ + tl.arange(0, RQ)[None, :],
                                 mask=gmask[:, None], other=0.0).to(tl.float16)  # fmt: skip
                qm, kw0, kw1, vw0, vw1, kn0_b, kn1_b, vn0_b, vn1_b = _split_bases(
                    ws, pid_bh, BH, g, gmask, k_alloc, v_alloc, kc0, kn0, kc1, kn1, vc0, vn0, vc1, vn1,
                    G, BLOCK_G, D, KB0, KD0, KB1, KD1, VB0, VD0, VB1, VD1, HAS_KMEAN,
                )  # fmt: skip
                acc0 = tl.zeros([BLOCK_G, VD0], tl.float32)
                if VD1 > 0:
                    acc1 = tl.zeros([BLOCK_G, VD1], tl.float32)
                for it in range(iters):  # a trip count shared by all programs (pipelines; interpreter-friendly)
                    t = lo + it * BLOCK_T + tt
                    t_mask = t < n
                    kv = _centroids(kw0, t * (KD0 * KB0 // 32), t_mask, kcent, ktab, KB0, KD0, BLOCK_T, PRMT)
                    kn = tl.load(kn0_b + t, mask=t_mask, other=0.0).to(tl.float32)
                    s = tl.dot(q0, tl.trans(kv)) * kn[None, :]
                    if KD1 > 0:
                        kv = _centroids(kw1, t * (KD1 * KB1 // 32), t_mask, kcent + (1 << KB0), ktab + 4, KB1, KD1,
                                        BLOCK_T, PRMT)  # fmt: skip
                        kn = tl.load(kn1_b + t, mask=t_mask, other=0.0).to(tl.float32)
                        s += tl.dot(q1, tl.trans(kv)) * kn[None, :]
                    if QJL:
                        sv, rn = _qjl_keys(kqc, krn, pid_bh, k_alloc, t, t_mask, qjl_scale, RQ, BLOCK_T)
                        s += tl.dot(qq, tl.trans(sv)) * rn[None, :]
                    s = _scale_scores(s + qm[:, None], t, t_mask, b, mask_ptr, stride_mb, stride_mt, scaling, softcap,
                                      HAS_MASK, MASK_BOOL, SOFTCAP)  # fmt: skip
                    m_new = tl.maximum(m_i, tl.max(s, axis=1))
                    alpha = tl.exp2(m_i - m_new)
                    p = tl.exp2(s - m_new[:, None])
                    l_i = l_i * alpha + tl.sum(p, axis=1)
                    m_i = m_new
                    vv = _centroids(vw0, t * (VD0 * VB0 // 32), t_mask, vcent, vtab, VB0, VD0, BLOCK_T, PRMT)
                    vn = tl.load(vn0_b + t, mask=t_mask, other=0.0).to(tl.float32)
                    acc0 = acc0 * alpha[:, None] + tl.dot((p * vn[None, :]).to(tl.float16), vv)
                    if VD1 > 0:
                        vv = _centroids(vw1, t * (VD1 * VB1 // 32), t_mask, vcent + (1 << VB0), vtab + 4, VB1, VD1,
                                        BLOCK_T, PRMT)  # fmt: skip
                        vn = tl.load(vn1_b + t, mask=t_mask, other=0.0).to(tl.float32)
                        acc1 = acc1 * alpha[:, None] + tl.dot((p * vn[None, :]).to(tl.float16), vv)
                arow = m_out + 2 * PG + (part * G + g)[:, None] * D
                tl.store(arow + tl.arange(0, VD0)[None, :], acc0, mask=gmask[:, None])
                if VD1 > 0:
                    tl.store(arow + VD0 + tl.arange(0, VD1)[None, :], acc1, mask=gmask[:, None])
                tl.store(m_out + part * G + g, m_i, mask=gmask)
                tl.store(m_out + PG + part * G + g, l_i, mask=gmask)
        else:  # the full-precision tail window, in the original space
            qu = tl.load(q_ptr + b * stride_qb + (h * G + g)[:, None] * stride_qh + dd[None, :],
                         mask=gmask[:, None], other=0.0)  # fmt: skip
            acc = tl.zeros([BLOCK_G, D], tl.float32)
            tbase = b * st_b + h * st_h
            for start in range(0, t_len, BLOCK_T):
                t = start + tt
                t_mask = t < t_len
                k = tl.load(tk_ptr + tbase + t[:, None] * st_t + dd[None, :], mask=t_mask[:, None], other=0.0)
                s = _scale_scores(tl.dot(qu, tl.trans(k)), n + t, t_mask, b, mask_ptr, stride_mb, stride_mt, scaling,
                                  softcap, HAS_MASK, MASK_BOOL, SOFTCAP)  # fmt: skip
                m_new = tl.maximum(m_i, tl.max(s, axis=1))
                alpha = tl.exp2(m_i - m_new)
                p = tl.exp2(s - m_new[:, None])
                l_i = l_i * alpha + tl.sum(p, axis=1)
                m_i = m_new
                v = tl.load(tv_ptr + tbase + t[:, None] * st_t + dd[None, :], mask=t_mask[:, None], other=0.0)
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            tl.store(m_out + 2 * PG + (part * G + g)[:, None] * D + dd[None, :], acc, mask=gmask[:, None])
            tl.store(m_out + part * G + g, m_i, mask=gmask)
            tl.store(m_out + PG + part * G + g, l_i, mask=gmask)
        if FUSED:  # the last of the S + 1 programs of (b, h) to finish merges them (no second launch)
            tl.debug_barrier()  # every thread's partial stores precede the release below
            done = tl.atomic_add(cnt_ptr + pid_bh, 1, sem="acq_rel", scope="gpu")
            if done == S:
                for n0 in tl.static_range(0, D, BN):
                    _combine(ws, pid_bh, h, n0, S, BH, rv_ptr, rv_sh, vmean_ptr, vscale_ptr, out_ptr,
                             G, BLOCK_G, D, BN, HAS_VMEAN, HAS_VSCALE)  # fmt: skip
                tl.store(cnt_ptr + pid_bh, 0)  # ready for the next call on this stream

    @triton.jit(do_not_specialize=["S"])
    def _reduce_kernel(
        ws, S, H, rv_ptr, rv_sh, vmean_ptr, vscale_ptr, out_ptr,
        G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, BN: tl.constexpr,
        HAS_VMEAN: tl.constexpr, HAS_VSCALE: tl.constexpr, PDL: tl.constexpr, STEP: tl.constexpr,
    ):  # fmt: skip
        """The merge as a second launch, grid ``(B * H, D / BN)``: one program per (b, h) and output column chunk."""
        pid_bh = tl.program_id(0)
        _combine(ws, pid_bh, pid_bh % H, tl.program_id(1) * BN, S, tl.num_programs(0), rv_ptr, rv_sh, vmean_ptr,
                 vscale_ptr, out_ptr, G, BLOCK_G, D, BN, HAS_VMEAN, HAS_VSCALE, PDL, STEP)  # fmt: skip


def _rows_layout(fields: dict[str, torch.Tensor], num_heads: int) -> tuple[dict[str, torch.Tensor], int]:
    """Fields as (B, H, N_alloc, ...) row-major storage sliced to n rows; returns them and N_alloc.

    The cache slices ``[:, :, :n]`` of tensors grown by ``torch.cat``, so rows of head ``(b, h)`` start at
    ``(b * H + h) * N_alloc``; anything else (rare) is copied to a contiguous tensor.
    """
    first = fields["norms0"]
    n_alloc = first.stride(1) if first.dim() == 3 else 0
    for t in fields.values():
        st = t.stride()
        row = st[2]  # elements per row (1 for norms): must be dense rows of n_alloc per head
        if st[-1] != 1 or st[1] != n_alloc * row or (st[0] != num_heads * n_alloc * row and t.shape[0] != 1):
            fields = {k: v.contiguous() for k, v in fields.items()}
            return fields, first.shape[2]
        if t.dim() == 4 and row != t.shape[3]:
            fields = {k: v.contiguous() for k, v in fields.items()}
            return fields, first.shape[2]
    return fields, n_alloc


def byte_tables(half: torch.Tensor) -> list[int]:
    """8 words: the low bytes, then the high bytes, of up to 16 float16 centroids (decode_mma.cu's PRMT tables)."""
    u16 = half.float().cpu().half().view(torch.int16).to(torch.int32).tolist()
    u16 = [v & 0xFFFF for v in u16]
    words = []
    for shift in (0, 8):
        b = [(v >> shift) & 0xFF for v in u16]
        words += [sum(b[4 * i + j] << (8 * j) for j in range(4)) for i in range(len(b) // 4)]
    return words + [0] * (8 - len(words))


def _prmt_table(half: torch.Tensor) -> torch.Tensor:
    """4 int32 words: low bytes then high bytes of 8 float16 centroids (3 bits: the table; 4 bits: its upper half)."""
    c = torch.nn.functional.pad(half[-8:].float().cpu(), (0, max(0, 8 - half.numel()))).half()  # other widths: unused
    words = byte_tables(c)[:4]
    return torch.tensor([w - (1 << 32) if w >= 1 << 31 else w for w in words], dtype=torch.int32)


def hadamard_words(codec: RowCodec, perm: torch.Tensor | None) -> list[list[int]] | None:
    """The signs of a codec's rotation as decode_mma.cu's transform reads them (``(3, 8)`` words: bit ``c % 32`` of
    word ``c // 32`` of round k set where round k's sign at coordinate c is -1), or None where the rotation is not
    one ``"hadamard"`` group of 64, 128 or 256 channels without a permutation (then the dense R is used)."""
    groups = codec.mse._groups
    if perm is not None or len(groups) != 1 or groups[0].rotation != "hadamard" or HADAMARD_ROUNDS != 3:
        return None
    if codec.dim not in (64, 128, 256):
        return None
    neg = (hadamard_signs(codec.dim, groups[0].seed) < 0).long().reshape(3, -1, 32)
    words = (neg << torch.arange(32)).sum(-1)
    return [[int(w) for w in row] + [0] * (8 - len(row)) for row in words.tolist()]


class _Side:
    """Per-layer constants of one side (keys or values) on one device, built once: fused rotation, float32
    mean/scale rows, float16 centroid tables (group 0 then group 1) and PRMT tables (4 words per group); for QJL keys
    the sketch matrix transposed (D, rows) and the estimator's factor sqrt(pi/2) / rows."""

    __slots__ = ("rot", "rot_sh", "mean", "scale", "cent", "tab", "consts", "prmt", "mma_tab", "mma_sym", "mma_groups",
                 "qjl", "qjl_rows", "qjl_scale", "sk", "had")  # fmt: skip

    def __init__(self, rows: PackedRows, device):
        codec = rows.codec
        self.rot = fused_rotation(codec, rows.perm, device)
        self.rot_sh = 0 if self.rot.shape[0] == 1 else codec.dim * codec.dim
        flat = lambda x: None if x is None else x.reshape(-1, codec.dim).float().contiguous()  # noqa: E731
        self.mean, self.scale = flat(rows.mean), flat(rows.scale)
        halves = [codec.tensors(min(i, len(codec.groups) - 1), device)[1].half() for i in range(2)]
        self.cent = torch.cat(halves)
        self.tab = torch.cat([_prmt_table(h) for h in halves]).to(device)
        (b0, d0, _), rest = codec.groups[0], codec.groups[1:]
        b1, d1 = (rest[0][0], rest[0][1]) if rest else (b0, 0)
        self.consts = (b0, d0, b1, d1)
        self.prmt = _prmt_ok(codec)
        # decode_mma.cu: per group, whether a 4-bit table is symmetric (then only its upper half is looked up) and
        # the PRMT tables
        self.mma_sym = tuple(b == 4 and sign_symmetric(h) for b, h in zip((b0, b1), halves))
        pad8 = lambda h: torch.nn.functional.pad(h, (0, max(0, 8 - h.numel())))  # noqa: E731 (2 bits: 4 entries)
        tabs = [byte_tables(h[8:] if sym else pad8(h)) for h, sym in zip(halves, self.mma_sym)]
        self.mma_tab = ((ctypes.c_uint32 * 8) * 2)(*((ctypes.c_uint32 * 8)(*t) for t in tabs))
        self.mma_groups = mma_groups_ok(codec)
        self.qjl, sketch = codec.qjl, codec.quantizer.qjl if codec.qjl else None
        self.qjl_rows = sketch.rows if sketch else 32
        self.qjl_scale = sketch.factor if sketch else 0.0
        self.sk = sketch.matrix(device).T.float().contiguous() if sketch else None
        words = hadamard_words(codec, rows.perm)
        self.had = None if words is None else ((ctypes.c_uint32 * 8) * 3)(*((ctypes.c_uint32 * 8)(*w) for w in words))


_LAYERS: dict[tuple, tuple] = {}  # per-layer constants of both sides, see reference.weak_cached


def _layer(keys: PackedRows, values: PackedRows, device) -> tuple[_Side, _Side]:
    objs = (keys.codec, keys.perm, keys.mean, keys.scale, values.codec, values.perm, values.mean, values.scale)
    return weak_cached(_LAYERS, objs, device, lambda: (_Side(keys, device), _Side(values, device)))


_PRMT_OK: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def sign_symmetric(table: torch.Tensor) -> bool:
    """Whether centroids in sign-magnitude order (``RowCodec.tensors``) are symmetric: ``c[k] = -c[2^(b-1) + k]``."""
    half = table.numel() // 2
    return torch.equal(table[:half], -table[half:])


def _prmt_ok(codec: RowCodec) -> bool:
    """Every group decodes through PRMT: 3 bits, or 4 bits with a symmetric float16 table (as Lloyd-Max gives)."""
    ok = _PRMT_OK.get(codec)
    if ok is None:
        ok = True
        for i, (bits, _, _) in enumerate(codec.groups):
            half = codec.tensors(i, "cpu")[1].half()
            ok = ok and (bits == 3 or (bits == 4 and sign_symmetric(half)))
        _PRMT_OK[codec] = ok
    return ok


_MMA_SOURCE = (Path(__file__).with_name("decode_mma.cu")).read_text()
_DTYPE_CODE = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2, torch.bool: 3}


class _MmaParams(ctypes.Structure):
    """Mirror of ``struct Params`` in decode_mma.cu (one by-value kernel argument)."""

    _fields_ = (
        [(k, ctypes.c_void_p) for k in ("ws", "part", "kc0", "kn0", "kc1", "kn1", "vc0", "vn0", "vc1", "vn1")]
        + [(k, ctypes.c_void_p) for k in ("q", "tk", "tv", "mask", "kq", "kqn", "qq")]
        + [(k, ctypes.c_longlong) for k in ("k_alloc", "v_alloc", "sqb", "sqh", "stb", "sth", "stt", "smb", "smt")]
        + [(k, ctypes.c_int) for k in ("n", "t_len", "n_long", "long_len", "n_short", "short_len", "S", "H", "BH")]
        + [(k, ctypes.c_float) for k in ("scaling", "softcap", "qjl_scale")]
        + [("ktab", (ctypes.c_uint32 * 8) * 2), ("vtab", (ctypes.c_uint32 * 8) * 2)]
        + [("trace", ctypes.c_void_p)]  # DBG = 7 timing builds only
        + [(k, ctypes.c_void_p) for k in ("kscale", "kmean")]  # tq_decode_query
        + [("ksg", (ctypes.c_uint32 * 8) * 3), ("early", ctypes.c_int)]
    )


class _MergeParams(ctypes.Structure):
    """Mirror of ``struct MergeParams`` in decode_mma.cu (tq_decode_merge's argument)."""

    _fields_ = [(k, ctypes.c_void_p) for k in ("ws", "out", "vscale", "vmean")] + [
        ("S", ctypes.c_int), ("BH", ctypes.c_int), ("vsg", (ctypes.c_uint32 * 8) * 3)]  # fmt: skip


def mma_groups_ok(codec: RowCodec) -> bool:
    """decode_mma.cu's channel groups: 2, 3 or 4 bits and 32, 64, 128 or 256 channels (its lanes decode whole
    slices of D_i / 4 key and D_i / 8 value codes, sized for these)."""
    return all(bits in (2, 3, 4) and d in (32, 64, 128, 256) for bits, d, _ in codec.groups)


def _mma_ok(query, ks: _Side, vs: _Side, groups: int, fields, mask, kf: dict) -> bool:
    """The CUDA split pass handles 2-, 3- and 4-bit groups of 32-256 channels (one, or two for fractional widths), the
    same norm dtype in both groups, head_dim 64/128/256, G <= 8, and QJL keys (prod) with 32-256 sketch rows."""
    if not query.is_cuda or not _PRMT or not cuda.enabled():  # _PRMT: not the interpreter
        return False
    if groups > 8 or query.shape[-1] not in (64, 128, 256):
        return False
    if not (ks.mma_groups and vs.mma_groups):
        return False
    if mask is not None and mask.dtype not in _DTYPE_CODE:
        return False
    codes, norms = fields[0::2], fields[1::2]
    floats = (torch.float16, torch.bfloat16, torch.float32)
    if ks.qjl:
        if ks.qjl_rows not in (32, 64, 128, 256) or kf["rnorms"].dtype not in floats:
            return False
        codes += (kf["qjl"],)
    aligned = all(c.data_ptr() % 16 == 0 for c in codes)  # 16-byte code loads
    same = norms[0].dtype == norms[1].dtype and norms[2].dtype == norms[3].dtype
    return aligned and same and norms[0].dtype in floats and norms[2].dtype in floats


_DEVICES: dict = {}


def _device(device) -> tuple[int, tuple[int, int]]:
    """(SM count, compute capability) of ``device``, cached (no device query per call); off CUDA, e.g. in the
    interpreter, an H100's SM count and no capability (no sm_90 features)."""
    info = _DEVICES.get(device)
    if info is None:
        props = torch.cuda.get_device_properties(device) if device.type == "cuda" else None
        info = (132, (0, 0)) if props is None else (props.multi_processor_count, (props.major, props.minor))
        _DEVICES[device] = info
    return info


# Programmatic dependent launch between the three kernels of a call (sm_90, Triton >= 3.3): the split pass starts
# while the query kernel runs (its ring fills meanwhile) and the merge launches as the split pass ends
PDL = gdc_wait is not None


# decode_mma.cu tuning (H100, benchmarks/kernels.py --phases tune-cuda, kernels_tune_r7b.json, kernels_tune_r8a.json):
# warps per block, 16-token chunks per unit, blocks per SM that the register allocation must allow, unit slots per
# warp in the shared-memory ring (0: the next unit is prefetched into registers instead)
MMA_TUNING = {"NWARPS": 4, "UC": 2, "MINB": 3, "RING": 2}
# Its splits per (b, h): at least min_tokens each, at most max_splits (H100, kernels_tune_splits.json: fewer, longer
# splits cut the per-block setup and the merge where there is little work, e.g. B = 1, T = 8k: 50 -> 37 us)
MMA_SPLITS = {"min_tokens": 1024, "max_splits": 32}
# Guided pieces (decode_mma.cu's Params): the last ``frac`` of each (b, h)'s codes in pieces ``div`` times shorter than
# the splits, started last, and the splits before them ``grow`` times longer (0: the splits as they are); the merge
# combines ``merge_step`` partials per step. Off by default: H100, K4/V3 (kernels_guide_r11.json), frac 0.2 took B = 8,
# T = 128k from 446 to 436 us but B = 8, T = 32k from 134.5 to 136.7 us (short blocks pay the ring fill again and run
# at ~75% of the long ones' throughput); 8 partials per merge step measured the same as 4. The merge's output columns
# per program (0: 8192 / head_dim) and warps: at head_dim 128 the defaults (64, 4) are the fastest of 16-128 columns
# and 2-8 warps (H100, kernels_merge_r13.json). The query kernel runs one program per output column block (instead
# of per (b, h)) where that makes at most ``prep_split`` x the SM count programs: its latency is on the call's
# critical path (H100, kernels_prep_r13.json: B = 1, T = 8k 23.2 -> 21.5 us, 32k 40.2 -> 38.2 us; at B = 8, T = 8k,
# 128 programs, 50.3 -> 51.9 us, so not there; kernels_prep_r14.json: the same, and 2 or 8 warps for it instead
# of 4 no faster). ``hadamard_query`` / ``hadamard_merge``: decode_mma.cu's query and merge kernels where the keys /
# values use one "hadamard" channel group (0: the Triton kernels with the dense R, for A/B runs).
MMA_GUIDE = {"frac": 0.0, "div": 4, "grow": 1.0, "merge_step": 4, "merge_cols": 0, "merge_warps": 4, "prep_split": 0.5,
             "prep_warps": 4, "hadamard_query": 1, "hadamard_merge": 1}


def guided_pieces(n: int, split_len: int, unit: int) -> tuple[int, int, int, int]:
    """(long pieces, their tokens, short pieces, their tokens) per (b, h) of n codes, from splits of ``split_len``
    tokens and MMA_GUIDE (all lengths whole ``unit``s)."""
    frac = MMA_GUIDE["frac"]
    if frac <= 0:
        return -(-n // split_len), split_len, 0, unit
    long_len = -(-int(split_len * MMA_GUIDE["grow"]) // unit) * unit
    short_len = max(unit, -(-split_len // (MMA_GUIDE["div"] * unit)) * unit)
    n_long = int(n * (1 - frac)) // long_len
    return n_long, long_len, -(-(n - n_long * long_len) // short_len), short_len


_MMA_KERNELS: dict[tuple, tuple] = {}


def _ring_bytes(tuning: dict, kside: tuple, vside: tuple, knorm: torch.dtype, vnorm: torch.dtype, qjl=None) -> int:
    """Dynamic shared memory of decode_mma.cu's ring (its RING_BYTES): per warp RING slots of one unit of every
    array (+16 bytes each for the alignment slack); ``kside``/``vside`` as in ``_Side.consts``, ``qjl``: (sketch
    rows, residual norm dtype) of QJL keys."""
    (kb0, kd0, kb1, kd1), (vb0, vd0, vb1, vd1) = kside, vside
    arrays = [(kb0, kd0, knorm), (kb1, kd1, knorm), (vb0, vd0, vnorm), (vb1, vd1, vnorm)]
    arrays += [(1, qjl[0], qjl[1])] if qjl else []  # (QJL: the signs as 1-bit codes of RQ channels)
    ut = 16 * tuning["UC"]
    slot = sum((ut * d * bits // 8 + 16) + (ut * nd.itemsize + 16) for bits, d, nd in arrays if d)
    return tuning["NWARPS"] * tuning["RING"] * slot


def _mma_kernel(dim, groups, ks, vs, knorm, vnorm, qtype, mask, softcap, qjl, device) -> tuple:
    """(split pass, threads per block, dynamic shared memory, query kernel, merge kernel) of decode_mma.cu for this
    call's configuration, looked up by the raw values (no option strings per call); ``qjl`` as in _ring_bytes. The
    query and merge kernels (tq_decode_query, tq_decode_merge) come from the same module."""
    mdtype, tuning = None if mask is None else mask.dtype, MMA_TUNING
    means = tuple(x is not None for x in (ks.mean, ks.scale, vs.mean, vs.scale))
    key = (dim, groups, ks.consts, ks.mma_sym, vs.consts, vs.mma_sym, knorm, vnorm, qtype, mdtype, means,
           softcap is None, qjl, device, tuple(tuning.items()), id(_MMA_SOURCE))  # fmt: skip
    found = _MMA_KERNELS.get(key)
    if found is None:
        opts = _mma_options(dim, groups, (ks.consts, ks.mma_sym), (vs.consts, vs.mma_sym), knorm, vnorm, qtype,
                            mdtype, means[0], softcap is not None, tuning, qjl, means[1:])  # fmt: skip
        split, query, merge = (cuda.kernel(_MMA_SOURCE, f"tq_decode_{k}", device, opts) for k in ("split", "query",
                                                                                                "merge"))
        found = _MMA_KERNELS[key] = (split, 32 * tuning["NWARPS"], _ring_bytes(tuning, ks.consts, vs.consts, knorm,
                                                                                vnorm, qjl), query, merge)
    return found


def _mma_options(dim, groups, kside, vside, knorm, vnorm, qtype, mdtype, has_kmean, has_softcap,
                 tuning=None, qjl=None, scales=(False, False, False)) -> tuple[str, ...]:  # fmt: skip
    """decode_mma.cu's macros; ``kside``/``vside``: ((bits0, channels0, bits1, channels1), (symmetric0, symmetric1));
    ``tuning``: MMA_TUNING by default; ``qjl`` as in _ring_bytes; ``scales``: whether there are key scales, value
    means and value scales (tq_decode_query, tq_decode_merge)."""
    mtype = 3 if mdtype is None else _DTYPE_CODE[mdtype]  # (3 is also bool: HAS_MASK tells the two apart)
    opts = dict(MMA_TUNING if tuning is None else tuning, D=dim, G=groups, KNORM=_DTYPE_CODE[knorm],
                VNORM=_DTYPE_CODE[vnorm], QTYPE=_DTYPE_CODE[qtype], MTYPE=mtype, HAS_MASK=int(mdtype is not None),
                HAS_KMEAN=int(has_kmean), SOFTCAP=int(has_softcap), HAS_KSCALE=int(scales[0]),
                HAS_VMEAN=int(scales[1]), HAS_VSCALE=int(scales[2]))  # fmt: skip
    for side, ((b0, d0, b1, d1), sym) in (("K", kside), ("V", vside)):
        opts.update({f"{side}B0": b0, f"{side}D0": d0, f"{side}B1": b1, f"{side}D1": d1,
                     f"{side}SYM0": int(sym[0]), f"{side}SYM1": int(sym[1])})  # fmt: skip
    if qjl:
        opts.update(QJL=1, RQ=qjl[0], QNORM=_DTYPE_CODE[qjl[1]])
    return tuple(f"-D{k}={v}" for k, v in opts.items())


def sm_count(device) -> int:
    """The card's SM count (see _device)."""
    return _device(device)[0]


def default_splits(n: int, num_bh: int, min_len: int, device, waves: float = 8.0, max_splits: int = 64) -> int:
    """About ``waves`` x the card's SMs programs (3 fit on an SM at once), at most ``max_splits`` per (b, h) (the
    merge reads them all) and never less than ``min_len`` tokens (a Triton block) per split."""
    return max(1, min(math.ceil(waves * sm_count(device) / num_bh), max_splits, math.ceil(n / min_len)))


def wave_fill(blocks: int, slots: int) -> float:
    """The share of the card's ``slots`` (blocks resident at once) that a grid of ``blocks`` keeps busy over its
    waves: a last, partial wave leaves the rest idle."""
    return blocks / (-(-blocks // slots) * slots)


def mma_splits(n: int, num_bh: int, slots: int, device, waves: float = 8.0) -> int:
    """The CUDA split pass's splits per (b, h): default_splits' count under MMA_SPLITS, or up to a quarter more where
    that fills more of the grid's last wave of ``slots`` blocks (the card's SMs x blocks per SM; ties: fewer). H100,
    kernels_tune_r8b.json, kernels_tune_r8d.json: 18 splits instead of 17 at B = 8, T = 128k, 4% faster (1152 of
    1188 slots busy in the last of three waves instead of 1088); the same at T = 32k."""
    lo = default_splits(n, num_bh, MMA_SPLITS["min_tokens"], device, waves, MMA_SPLITS["max_splits"])
    hi = max(lo, min(lo + lo // 4, MMA_SPLITS["max_splits"], math.ceil(n / MMA_SPLITS["min_tokens"])))
    return max(range(lo, hi + 1), key=lambda s: (wave_fill(s * num_bh, slots), -s))


_COUNTERS: dict = {}


def _counters(device, size: int) -> torch.Tensor:
    """Arrival counters of the fused merge, one per (b, h), zeroed once and reset by the kernel itself; one buffer
    per stream, so calls on one stream (ordered) share it."""
    key = (device, cuda.stream(device) if device.type == "cuda" else 0)
    buf = _COUNTERS.get(key)
    if buf is None or buf.numel() < size:
        buf = _COUNTERS[key] = torch.zeros(max(size, 1024), dtype=torch.int32, device=device)
    return buf


def decode_attention(
    query: torch.Tensor,
    keys: PackedRows,
    values: PackedRows,
    tail_keys: torch.Tensor,
    tail_values: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    softcap: float | None = None,
    *,
    block_t: int = 128,
    num_splits: int | None = None,
    num_warps: int = 4,
    num_stages: int = 1,
    waves: float = 8.0,
    fused_reduce: bool = False,
    trans: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """Attention of one query token over compressed tokens + a full-precision tail (see the module docstring).

    Parameters are those of :func:`turbovq.kv.attention.attend_codes` with ``q_len == 1``; returns
    ``(batch_size, 1, num_heads, head_dim)`` in the query dtype. Per call: three launches (query rotation, split
    pass, merge; two with ``fused_reduce``, where the last program of each (b, h) merges), one workspace and the
    output allocated, no other torch op and no host synchronisation. Layer constants are built once per layer.

    ``backend``: the split pass in CUDA (``decode_mma.cu``, where it applies: see :func:`mma_groups_ok`, head_dim
    64/128/256, at most 8 query heads per KV head), in Triton, or ``"auto"`` (CUDA where it applies; ``TURBOVQ_CUDA=0``
    turns it off). ``block_t``/``num_warps``/``num_stages``/``fused_reduce``/``trans`` tune the
    Triton split pass.
    """
    if backend not in ("auto", "cuda", "triton"):
        raise ValueError(f"backend must be 'auto', 'cuda' or 'triton', got {backend!r}")
    bsz, num_heads, q_len, dim = query.shape
    num_kv = tail_keys.shape[1]
    if q_len != 1 or num_heads % num_kv:
        raise ValueError(f"decode_attention needs q_len == 1 and num_heads % num_kv_heads == 0, got {query.shape}")
    groups = num_heads // num_kv
    n, t_len = keys.length, tail_keys.shape[2]
    dev = query.device
    ks, vs = _layer(keys, values, dev)
    kf, k_alloc = _rows_layout(keys.fields, num_kv)
    vf, v_alloc = _rows_layout(values.fields, num_kv)
    if query.stride(-1) != 1:
        query = query.contiguous()
    mask = attention_mask
    stride_mb = stride_mt = 0
    if mask is not None:
        if mask.shape[-1] != n + t_len:
            raise ValueError(f"attention mask covers {mask.shape[-1]} positions, the cache holds {n} + {t_len}")
        if mask.numel() != mask.shape[0] * mask.shape[-1]:
            raise ValueError(f"decode_attention needs a mask broadcast over heads, got {tuple(mask.shape)}")
        stride_mb = 0 if mask.shape[0] == 1 else mask.stride(0)
        stride_mt = mask.stride(-1)
    tk, tv = tail_keys, tail_values
    if tk.dtype != query.dtype:
        tk, tv = tk.to(query.dtype), tv.to(query.dtype)
    if t_len and (tk.stride() != tv.stride() or tk.stride(-1) != 1):
        tk, tv = tk.contiguous(), tv.contiguous()

    k1, v1 = min(1, len(keys.codec.groups) - 1), min(1, len(values.codec.groups) - 1)
    fields = tuple(f[f"{k}{i}"] for f, i in ((kf, 0), (kf, k1), (vf, 0), (vf, v1)) for k in ("codes", "norms"))
    use_mma = backend != "triton" and _mma_ok(query, ks, vs, groups, fields, mask, kf)
    if backend == "cuda" and not use_mma:
        raise ValueError("the CUDA split pass does not handle this call (see decode_attention's backend)")
    bh = bsz * num_kv
    pdl = PDL and dev.type == "cuda" and _device(dev)[1] >= (9, 0)
    if use_mma:
        qjl = (ks.qjl_rows, kf["rnorms"].dtype) if ks.qjl else None
        # one "hadamard" channel group: decode_mma.cu's query kernel (keys, not QJL) and merge (values)
        hquery = bool(MMA_GUIDE["hadamard_query"]) and ks.had is not None and not ks.qjl
        hmerge = bool(MMA_GUIDE["hadamard_merge"]) and vs.had is not None
        kern, block, smem, qkern, mkern = _mma_kernel(dim, groups, ks, vs, kf["norms0"].dtype, vf["norms0"].dtype,
                                                      query.dtype, mask, softcap, qjl, dev)  # fmt: skip
        slots = kern.blocks_per_sm(block, smem) * sm_count(dev)
        splits = num_splits or mma_splits(n, bh, slots, dev, waves)
    else:
        splits = num_splits or default_splits(n, bh, block_t, dev, waves)
    gran = 16 * MMA_TUNING["UC"] if use_mma else block_t  # split_len: whole units (CUDA) or blocks (Triton)
    split_len = math.ceil(math.ceil(n / splits) / gran) * gran
    splits = math.ceil(n / split_len)
    # The split pass starts while the query kernel runs (the query kernel triggers it at once), except for a grid of
    # long splits under one wave: there it was paced by blocks that started early (H100, B = 1, T = 128k: 82 ->
    # 103 us, likely uneven placement on the SMs the query kernel held; 4k-token splits, 264 blocks of 396 slots),
    # while every other cell measured gained 1-13 us (kernels_decode_pdl_r8.json).
    early = pdl and use_mma and ((splits + 1) * bh >= slots or split_len <= 2048)
    if use_mma:  # (n_long, long_len, n_short, short_len): decode_mma.cu's pieces
        pieces = guided_pieces(n, split_len, gran) if num_splits is None else (splits, split_len, 0, gran)
        splits = pieces[0] + pieces[2]
        hmerge = hmerge and splits <= 32  # (tq_decode_merge: a partial per lane)
    block_g = max(16, triton.next_power_of_2(groups))
    # inverse-rotation columns per merge program: a (BN, D) float32 tile of R_v
    bn = min(dim, (MMA_GUIDE["merge_cols"] if use_mma else 0) or 8192 // dim)
    qoff = bh * groups * (dim + 1) + bh * (splits + 1) * groups * (dim + 2)  # (q_qjl of QJL keys after the partials)
    ws = torch.empty(qoff + (bh * groups * ks.qjl_rows if ks.qjl else 0), device=dev, dtype=torch.float32)
    out = torch.empty(bsz, 1, num_heads, dim, device=dev, dtype=query.dtype)
    kb0, kd0, kb1, kd1 = ks.consts
    vb0, vd0, vb1, vd1 = vs.consts
    prmt = _PRMT and ks.prmt and vs.prmt
    prep_cols = (dim + (ks.qjl_rows if ks.qjl else 0)) // bn
    split_prep = bh * prep_cols <= MMA_GUIDE["prep_split"] * sm_count(dev)
    if not (use_mma and hquery):
        _prep_kernel[(bh, prep_cols if split_prep else 1)](
            ws, query, query.stride(0), query.stride(1), ks.scale if ks.scale is not None else ws,
            ks.mean if ks.mean is not None else ws, ks.rot, ks.rot_sh, num_kv, ks.sk if ks.qjl else ws, qoff,
            G=groups, BLOCK_G=block_g, D=dim, BN=bn, HAS_KSCALE=ks.scale is not None,
            HAS_KMEAN=ks.mean is not None, PDL=early, QJL=ks.qjl, RQ=ks.qjl_rows, SPLIT=split_prep,
            num_warps=MMA_GUIDE["prep_warps"],
        )  # fmt: skip
    if use_mma:
        fused_reduce = False  # the CUDA split pass always leaves the merge to _reduce_kernel
        prm = _MmaParams(
            ws.data_ptr(), ws.data_ptr() + 4 * bh * groups * (dim + 1), *(f.data_ptr() for f in fields),
            query.data_ptr(), tk.data_ptr() if t_len else 0, tv.data_ptr() if t_len else 0,
            0 if mask is None else mask.data_ptr(), kf["qjl"].data_ptr() if qjl else 0,
            kf["rnorms"].data_ptr() if qjl else 0, ws.data_ptr() + 4 * qoff, k_alloc, v_alloc, query.stride(0),
            query.stride(1), tk.stride(0), tk.stride(1), tk.stride(2), stride_mb, stride_mt, n, t_len, *pieces, splits,
            num_kv, bh, float(scaling), float(softcap or 1.0), ks.qjl_scale, ks.mma_tab, vs.mma_tab,
        )  # fmt: skip
        if hquery:
            prm.kscale, prm.kmean = (0 if x is None else x.data_ptr() for x in (ks.scale, ks.mean))
            prm.ksg, prm.early = ks.had, early
            qkern((bh, 1, 1), 32 * groups, prm, cuda.stream(dev))
        kern((bh * (splits + 1), 1, 1), block, prm, cuda.stream(dev), smem, pdl=pdl)
        if hmerge:
            vscale, vmean = (0 if x is None else x.data_ptr() for x in (vs.scale, vs.mean))
            mprm = _MergeParams(ws.data_ptr(), out.data_ptr(), vscale, vmean, splits, bh, vs.had)
            mkern((bh * groups, 1, 1), 32, mprm, cuda.stream(dev), 0, pdl=pdl)
            return out
    else:
        cnt = _counters(dev, bh) if fused_reduce else ws
        _decode_kernel[(splits + 1, bh)](
            ws, query, query.stride(0), query.stride(1),
            kf["codes0"], kf["norms0"], kf[f"codes{k1}"], kf[f"norms{k1}"], ks.cent, ks.tab,
            vf["codes0"], vf["norms0"], vf[f"codes{v1}"], vf[f"norms{v1}"], vs.cent, vs.tab,
            tk, tv, tk.stride(0), tk.stride(1), tk.stride(2), t_len,
            ws if mask is None else mask, stride_mb, stride_mt,
            cnt, vs.rot, vs.rot_sh, ws if vs.mean is None else vs.mean, ws if vs.scale is None else vs.scale, out,
            n, k_alloc, v_alloc, split_len, split_len // block_t, splits, num_kv, float(scaling), float(softcap or 1.0),
            kf.get("qjl", ws), kf.get("rnorms", ws), qoff, ks.qjl_scale,
            G=groups, BLOCK_G=block_g, D=dim, KB0=kb0, KD0=kd0, KB1=kb1, KD1=kd1, VB0=vb0, VD0=vd0, VB1=vb1,
            VD1=vd1, BLOCK_T=block_t, BN=bn, HAS_MASK=mask is not None,
            MASK_BOOL=mask is not None and mask.dtype == torch.bool, HAS_KMEAN=ks.mean is not None,
            HAS_VMEAN=vs.mean is not None, HAS_VSCALE=vs.scale is not None, SOFTCAP=softcap is not None, PRMT=prmt,
            FUSED=fused_reduce, QJL=ks.qjl, RQ=ks.qjl_rows, TRANS=trans, num_warps=num_warps, num_stages=num_stages,
        )  # fmt: skip
    if not fused_reduce:
        _reduce_kernel[(bh, dim // bn)](
            ws, splits, num_kv, vs.rot, vs.rot_sh, ws if vs.mean is None else vs.mean,
            ws if vs.scale is None else vs.scale, out,
            G=groups, BLOCK_G=block_g, D=dim, BN=bn, HAS_VMEAN=vs.mean is not None,
            HAS_VSCALE=vs.scale is not None, PDL=pdl, STEP=MMA_GUIDE["merge_step"],
            num_warps=MMA_GUIDE["merge_warps"] if use_mma else 4, launch_pdl=pdl,
        )  # fmt: skip
    return out
