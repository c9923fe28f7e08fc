"""Fused TurboQuant encode of K/V rows: center, norms, rotation, bucketize, bit-pack in one pass.

``RowCodec.encode`` makes ~10 passes over memory (float copy, permute, per-group norms, divide, matmul, one
comparison pass per boundary, packing); these kernels read each row once (model dtype) and write only the codes
and norms, so they can run at memory speed. Two implementations of the same arithmetic:

* CUDA (``encode_mma.cu``, compiled by NVRTC, see ``cuda.py``) for bfloat16/float16 rows: tensor-core rotation on
  float16 operands laid out so that each lane's accumulator columns are its own output codes (no exchange between
  lanes), two coordinates per float16-pair comparison; the host side here builds R in fragment order
  (:func:`fragment_rotation`), the lanes' channel map (:func:`lane_coordinates`) and the grid (one wave). Where
  the codec's channel groups use the rotation ``"hadamard"`` (the default) with power-of-two sizes, the same file's
  ``HAD`` kernel applies the rotation in its factored form instead (three rounds of signs and a Kronecker-factored
  Hadamard transform as 16 x 16 tensor-core products, no R in shared memory; :func:`hadamard_supported`,
  :func:`hadamard_lane_constants`); by default at head_dim 128 and 256, where it is as fast or faster (and needs no
  wgmma). Both kernels stage the rows in shared memory with ``cp.async``. On sm_90 the dense kernel also has a wgmma
  build (``WG``, R and Q read by the tensor cores from shared memory in :func:`wgmma_order`), the default at head_dim
  128 there.
* Triton (``_encode_kernel``) for float32 rows and on request, per block of ``BLOCK_T`` rows of one (batch, KV
  head):

  * ``(x - mean) / scale`` (normalized caches), per-group norms over the group's *original* channels
    (``channel_groups``);
  * ``y = x @ R[h][:, cols]`` with the fused rotation (permutation + every group's rotation, see
    ``reference.fused_rotation``), in column chunks of 64, as tensor-core products: one-pass tf32 for 16-bit input
    (as precise as the input), 3xTF32 for float32 (codes then match the float32 reference except where a
    coordinate is within ~1e-6 of a boundary);
  * ``code = #(boundaries < y / ||x_group||)`` (the same strict comparison as ``codebook.quantize_coordinates``),
    counted over the positive half of the symmetric codebook only;
  * pack into int32 words with the little-endian layout of ``packing.py`` and store codes and float32 norms;
  * TurboQuant_prod keys (``RowCodec(qjl=True)``), in the same pass: the residual ``r = x - decode(codes)`` is
    ``e @ R^T`` with ``e = y - norm * centroid[code]`` (the rotated residual, R orthogonal), so its QJL signs
    ``sign(r @ S^T)`` are ``sign(e @ Q)`` with ``Q = R^T S^T`` (built once per layer) and its norm is ``||e||``.
    The rotated residual never leaves registers: one more tensor-core product per column chunk, then the signs are
    packed like 1-bit codes. The CUDA kernel does the same for 16-bit rows of one channel group at head_dim 64/128
    (``QJL``: the residual's float16 pairs are the A fragments of the product with Q, :func:`qjl_fragments`).
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch
import torch.nn.functional as F

from turbovq import packing
from turbovq.kernels import cuda
from turbovq.kernels.decode import HAS_TRITON, byte_tables, codec_supported, sm_count, wave_fill
from turbovq.kernels.reference import channel_groups, fused_rotation, weak_cached
from turbovq.kv.cache import RowCodec
from turbovq.rotation import HADAMARD_ROUNDS, hadamard_signs

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _encode_group(x, nrm, rot, bnd, out_ptr, word_row, COL0: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr,
                      DG: tl.constexpr, CW: tl.constexpr, BLOCK_T: tl.constexpr, t_mask, PREC: tl.constexpr,
                      SYM: tl.constexpr, cent, qmat, proj, ss, QJL: tl.constexpr, RQ: tl.constexpr):  # fmt: skip
        """Rotate, quantize and pack the DG columns of one channel group, CW columns at a time. With QJL, also add
        the group's rotated residual ``e`` to ``proj += e @ Q[cols]`` and ``ss += ||e||^2`` (returned).

        Codes are sign-magnitude labels (``cache.sign_magnitude``). SYM: the Lloyd-Max codebook is symmetric
        (boundary M = 2^(b-1) - 1 is 0, the others come in +- pairs), so the code is ``M + 1 + c`` for y > 0 and
        ``c`` otherwise, c = #(positive boundaries < |y|): 2^(b-1) - 1 comparisons instead of 2^b - 1 (codes differ
        only where |y| equals a boundary exactly)."""
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
                codes = tl.where(y > 0, M + 1 + codes, codes)
            else:
                for k in tl.static_range((1 << BITS) - 1):
                    codes += (y > tl.load(bnd + k)).to(tl.int32)
                codes = tl.where(codes <= M, M - codes, codes)
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
            if QJL:
                e = (y - tl.load(cent + codes)) * nrm[:, None]
                ss += tl.sum(e * e, axis=1)
                qm = tl.load(qmat + (COL0 + c0 + tl.arange(0, CW))[:, None] * RQ + tl.arange(0, RQ)[None, :])
                proj += tl.dot(e, qm, input_precision=PREC)
        return proj, ss

    @triton.jit
    def _encode_kernel(
        x_ptr, sx_b, sx_h, sx_t, mean_ptr, scale_ptr, rot_ptr, rot_stride_h, gid_ptr,
        c0_ptr, n0_ptr, bnd0, cent0, c1_ptr, n1_ptr, bnd1, cent1, qmat_ptr, qmat_stride_h, qjl_ptr, rn_ptr, T, H,
        D: tl.constexpr, B0: tl.constexpr, D0: tl.constexpr, B1: tl.constexpr, D1: tl.constexpr,
        BLOCK_T: tl.constexpr, CW0: tl.constexpr, CW1: tl.constexpr, HAS_MEAN: tl.constexpr, HAS_SCALE: tl.constexpr,
        PREC: tl.constexpr, SYM: tl.constexpr, QJL: tl.constexpr, RQ: tl.constexpr,
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
        qmat = qmat_ptr + h * qmat_stride_h
        proj = tl.zeros([BLOCK_T, RQ], tl.float32)  # with QJL: the residual's projections e @ Q, and ||e||^2
        ss = tl.zeros([BLOCK_T], tl.float32)
        nrm0 = tl.sqrt(tl.sum(tl.where((gid == 0)[None, :], sq, 0.0), axis=1))
        tl.store(n0_ptr + row, nrm0, mask=t_mask)
        proj, ss = _encode_group(x, nrm0, rot, bnd0, c0_ptr, row * (D0 * B0 // 32), 0, D, B0, D0, CW0, BLOCK_T, t_mask,
                                 PREC, SYM, cent0, qmat, proj, ss, QJL, RQ)  # fmt: skip
        if D1 > 0:
            nrm1 = tl.sqrt(tl.sum(tl.where((gid == 1)[None, :], sq, 0.0), axis=1))
            tl.store(n1_ptr + row, nrm1, mask=t_mask)
            proj, ss = _encode_group(x, nrm1, rot, bnd1, c1_ptr, row * (D1 * B1 // 32), D0, D, B1, D1, CW1, BLOCK_T,
                                     t_mask, PREC, SYM, cent1, qmat, proj, ss, QJL, RQ)  # fmt: skip
        if QJL:  # signs (>= 0 -> 1, as QJL.sketch) packed LSB first, 32 per word, and the residual norms
            bits = tl.reshape((proj >= 0).to(tl.int32), (BLOCK_T, RQ // 32, 32))
            words = tl.sum(bits << tl.arange(0, 32)[None, None, :], axis=2)
            tl.store(qjl_ptr + row[:, None] * (RQ // 32) + tl.arange(0, RQ // 32)[None, :], words, mask=t_mask[:, None])
            tl.store(rn_ptr + row, tl.sqrt(ss), mask=t_mask)


def supported(x: torch.Tensor, codec: RowCodec) -> bool:
    return HAS_TRITON and x.is_cuda and codec_supported(codec, qjl=True)


_MMA_SOURCE = Path(__file__).with_name("encode_mma.cu").read_text()
# encode_mma.cu tuning per head_dim (benchmarks/kernels.py --phases encode --tune-encode, H100): warps per block,
# 16-row tiles per warp, blocks per SM the register allocation must allow, prefetch of the next tile's rows into
# registers (PF; not at head_dim 256, where it spills: 1.25 -> 1.03 ms without, kernels_encode_sweep_r8.json) or into
# shared memory (ASYNC buffers per warp); WG: wgmma instead of mma.sync (sm_90a only; mma_tuning drops it elsewhere);
# FLAT (host side, default 1): one block per slot over all rows (_flat_grid), 0 the per-(b, h) grid, for A/B (flat:
# 0.5-4% faster in kernels_encode_flat_r18.json).
# 128: 16 warps with one staging buffer each beat the register prefetch with 4 warps in two runs (3.5 bits: 0.340-0.341
# ms against 0.353-0.371, kernels_encode_r17.json, kernels_encode_r17b.json); with WG 0.310-0.314 against 0.338-0.342,
# bit for bit the same codes (kernels_encode_wg_r17.json, kernels_encode_wga_r18.json).
MMA_TUNING = {64: {"NWARPS": 8, "MT": 1, "MINB": 1, "PF": 1},
              128: {"NWARPS": 16, "MT": 1, "MINB": 1, "PF": 0, "ASYNC": 1, "WG": 1},
              256: {"NWARPS": 8, "MT": 1, "MINB": 1, "PF": 0}}  # fmt: skip


# with TurboQuant_prod keys (QJL): the residual's fragments and the sketch product fill the registers, so the next
# tile's rows are prefetched into shared memory (ASYNC). mma.sync is bound by the tensor pipe's rate: 16 warps, one
# buffer each, 0.486-0.509 ms; two 16-row tiles per warp (MT 2) 0.517. wgmma (WG: a quarter of the B reads, the full
# tensor-core rate) with every column block's product in flight at once (WGA): 0.401 ms against 0.423 without WGA and
# 0.509 for mma.sync in the same run, the same outputs bit for bit (kernels_encode_wga_r18.json). 64 untuned.
QJL_TUNING = {64: {"NWARPS": 8, "MT": 1, "MINB": 1, "PF": 1},
              128: {"NWARPS": 16, "MT": 1, "MINB": 1, "PF": 0, "ASYNC": 1, "WG": 1, "WGA": 1}}  # fmt: skip


def mma_tuning(dim: int, qjl: bool = False, wgmma: bool = True) -> dict[str, int]:
    """The dense kernel's settings; without ``wgmma`` (any card but sm_90) the WG settings run on mma.sync, with the
    same warps: on an H100 built that way, 16 warps (prod keys spill 56 B) beat 12 and 8 (prod 0.463 against 0.478-0.487
    ms, 3.5 bits equal; kernels_encode_nowg_r19.json)."""
    tune = (QJL_TUNING if qjl else MMA_TUNING)[dim]
    return tune if wgmma or not tune.get("WG") else {k: v for k, v in tune.items() if k not in ("WG", "WGA")}


# the HAD kernel's tuning (benchmarks/kernels.py --phases encode --tune-had, H100): warps per block, blocks per SM
# the registers must allow, tiles per warp, staging buffers per warp (ASYNC: the rows are copied into shared memory
# ASYNC - 1 iterations ahead; without, the one-tile register prefetch left the kernel waiting on memory: 3.5 bits at
# 256 0.746 -> 0.670 ms, 4 bits at 128 0.371 -> 0.336, kernels_encode_r17.json; again in kernels_encode_r17b.json).
# One group: 8 warps, 2 blocks, two buffers (fastest or within 1% at 4, 3 and 2 bits, head_dim 128 and 256, both runs).
HAD_TUNING = {"NWARPS": 8, "MINB": 2, "TW": 4, "ASYNC": 2}
# two channel groups (fractional widths at 256): 4 warps, 3 blocks, four buffers (3.5 bits: 0.670-0.671 ms in both
# runs, the fastest; 2.5 bits: 0.598-0.602 against 0.561-0.563 for the one-group setting)
HAD_TUNING_G2 = {"NWARPS": 4, "MINB": 3, "TW": 4, "ASYNC": 4}


def had_tuning(two_groups: bool) -> dict[str, int]:
    return HAD_TUNING_G2 if two_groups else HAD_TUNING


# where encode_rows takes the HAD kernel by default: at head_dim 256 it beats the dense-R kernel (whose R fills shared
# memory there) by 1.5x; at 128, with its rows staged in shared memory, by 8-17% at 4, 3 and 2 bits against the
# mma.sync build (0.334 / 0.293 / 0.262 ms against 0.361 / 0.338 / 0.307, kernels_encode_r17b.json) and within 5%
# of the wgmma build either way (0.329 / 0.296 / 0.269 against 0.322 / 0.295 / 0.267, kernels_encode_r18_table.json;
# 0.325 / 0.285 / 0.256 against 0.310 / 0.299 / 0.247 with the flat grid, kernels_encode_r18_final.json), which only
# sm_90 cards have; at 64 the dense kernel is faster (0.144 / 0.133 against 0.178 / 0.160 at 4 / 3 bits)
HAD_DEFAULT_DIMS = (128, 256)
# the growth of a tile's norm over the three rounds: the kernel's H_8 factors are +-1/2 instead of +-1/sqrt(8)
HAD_GROWTH = {64: 8.0, 128: 2**1.5, 256: 1.0}


def hadamard_supported(codec: RowCodec) -> bool:
    """The HAD kernel: channel groups rotated by ``"hadamard"``, either one (integer widths) at head_dim 64/128/256,
    or two of 128 channels at head_dim 256 (fractional widths such as 2.5 and 3.5)."""
    if codec.qjl or HADAMARD_ROUNDS != 3 or any(g.rotation != "hadamard" for g in codec.mse._groups):
        return False  # (no QJL sketch in it)
    dims = [d for _, d, _ in codec.groups]
    return dims in ([64], [128], [256], [128, 128])


def _layout_dim(codec: RowCodec) -> int:
    """The HAD tile's layout: that of one row of ``dim``, or two rows of 128 for two groups at 256."""
    return codec.groups[0][1]


def tile_place(dim: int, rho: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(row within the tile's ``256 / dim`` rows, coordinate) of entry (rho, c) of the HAD kernel's 16 x 16 tile:
    one row of 256, rows of 128 stacked (row rho / 8), rows of 64 as ``[[a, b], [c, d]]``."""
    if dim == 256:
        return torch.zeros_like(rho), 16 * rho + c
    if dim == 128:
        return rho // 8, 16 * (rho % 8) + c
    return 2 * (rho // 8) + c // 8, 8 * (rho % 8) + c % 8


def _factor(kind: int) -> torch.Tensor:
    """A 16 x 16 tile factor: kind 0 is H_16 / 4, kind 1 blockdiag(H_8, H_8) / 2 (Sylvester order; every entry is
    exact in float16)."""
    i = torch.arange(16)
    parity = torch.tensor([bin(v).count("1") % 2 for v in range(16)])[(i[:, None] & i) & (7 if kind else 15)]
    h = (1 - 2 * parity).float() * (0.5 if kind else 0.25)
    return h * (i[:, None] // 8 == i // 8) if kind else h


def hadamard_factors(dim: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, R) of round k: the round maps its input tile Z to ``L (s_k . Z)^T R``. Round k's input is the canonical
    tile for even k, its transpose for odd k; D = 256 and 64 use one factor on both sides, D = 128 (tile rows = (row,
    i < 8), columns j < 16) maps the canonical Y to ``blockdiag(H_8) Y H_16``, so its factors swap each round."""
    lk = 0 if dim == 256 else 1 if dim == 64 else k % 2
    rk = 0 if dim == 256 else 1 if dim == 64 else 1 - k % 2
    return _factor(lk), _factor(rk)


def load_column(slot: torch.Tensor) -> torch.Tensor:
    """The tile column in B-fragment slot ``slot`` of round 0's input: lane t4 loads columns 4 t4 .. 4 t4 + 3 (one
    8-byte load) into slots 2 t4, 2 t4 + 1, 2 t4 + 8, 2 t4 + 9."""
    return 4 * ((slot % 8) // 2) + 2 * (slot // 8) + slot % 2


def hadamard_lane_constants(dim: int, signs: torch.Tensor) -> torch.Tensor:
    """``(3 rounds, 32 lanes, 12)`` int32, the HAD kernel's per-lane registers: round k's L as A fragments (4), R's
    two column tiles as B fragments (4), and the float16 sign bits its ``s_k`` flips in the tile's registers
    ``2 nu + e`` (4), from the rotation's signs: ``(3, dim)``, or ``(2, 3, 128)`` for two channel groups of 128 (tile
    layout ``dim`` = 128; group r's signs apply to tile rows 8 r ..).

    Fragments (float16 pairs, low half first) of lane l = 4 g + t4: A register j holds entries (g + 8 (j % 2),
    2 t4 + 8 (j / 2) + h); B register j of column tile e holds (2 t4 + 8 j + h, 8 e + g). Round 0's L has its columns
    in load order (:func:`load_column`). Tile register 2 nu + e, half h, holds entry (g + 8 nu, 8 e + 2 t4 + h) of
    the canonical tile in rounds 0 and 2 (in slot order in round 0) and of the transposed tile in round 1.
    """
    lane, j, half = torch.arange(32)[:, None, None], torch.arange(4)[:, None], torch.arange(2)
    g, t4 = lane // 4, lane % 4

    def pairs(v: torch.Tensor) -> torch.Tensor:  # (32, 4, 2) float -> (32, 4) float16 pairs as int64 words
        bits = v.half().view(torch.int16).long() & 0xFFFF
        return bits[..., 0] | bits[..., 1] << 16

    rows, slots = g + 8 * (j // 2), 8 * (j % 2) + 2 * t4 + half  # the tile register's entry
    out = []
    for k, (rho, c) in enumerate(((rows, load_column(slots)), (slots, rows), (rows, slots))):
        left, right = hadamard_factors(dim, k)
        a_cols = 2 * t4 + 8 * (j // 2) + half
        la = pairs(left[(g + 8 * (j % 2)).expand(-1, 4, 2), load_column(a_cols) if k == 0 else a_cols])
        rb = pairs(right[(2 * t4 + 8 * (j % 2) + half).expand(-1, 4, 2), (8 * (j // 2) + g).expand(-1, 4, 2)])
        row, coord = tile_place(dim, *torch.broadcast_tensors(rho, c))
        sk = signs[row, k, coord] if signs.dim() == 3 else signs[k][coord]
        sg = ((sk < 0).long() << (15 + 16 * half)).sum(-1)
        out.append(torch.cat([la, rb, sg], -1))
    m = torch.stack(out)
    return (m - (m >> 31 << 32)).to(torch.int32)  # uint32 words as int32


def store_lane_constants(dim: int, wide: tuple[int, int], two: bool) -> torch.Tensor:
    """``(32, 12)`` int32, the HAD kernel's per-lane store registers for widths with 3-bit runs or two groups.

    Why: after the reduce-scatter each lane holds one 8-code run (``b`` bytes) of the tile, and storing those runs
    (3-byte runs at odd or even offsets, two widths side by side) diverges; the branches serialise the warp and keep
    the compiler from interleaving the tiles in flight. Instead every lane stores one aligned 4-byte word of the
    packed output, built from the runs of at most two lanes (two shuffles): words are numbered over the tile's
    slots (its rows, or the two groups of one row at 256), lane l takes word l. Registers: word 0 = source lanes a,
    b and shifts (bytes a, b, c, d), word 1 the mask of lane b's part, word 2 the slot, word 3 the byte offset in
    the slot's row (-1: no word).
    """
    rpt = 256 // dim
    slots = 2 if two else rpt
    g, t4 = torch.arange(32) // 4, torch.arange(32) % 4
    ur, uo = tile_place(dim, g + 8 * (t4 & 1), 8 * (t4 >> 1))  # the run lane l holds: (slot, unit uo / 8)
    holder = {(int(r), int(o) // 8): lane for lane, (r, o) in enumerate(zip(ur, uo))}
    out = torch.zeros(32, 12, dtype=torch.int64)
    out[:, 3] = -1
    lane = 0
    for slot in range(slots):
        bits = wide[slot] if two else wide[0]
        for j in range(dim * bits // 32):
            a, off = divmod(4 * j, bits)
            src_a = holder[(slot, a)]
            spill = off + 4 > bits  # the word reaches into the next run
            src_b = holder[(slot, a + 1)] if spill else src_a
            out[lane, :4] = torch.tensor([src_a | src_b << 8 | 8 * off << 16 | (8 * (bits - off) if spill else 0) << 24,
                                          -1 if spill else 0, slot, 4 * j])  # fmt: skip
            lane += 1
    return out.to(torch.int32)


class _MmaParams(ctypes.Structure):
    """Mirror of ``struct Params`` in encode_mma.cu (one by-value kernel argument)."""

    _fields_ = (
        [(k, ctypes.c_void_p) for k in ("x", "mean", "iscale", "rfrag", "c0", "n0", "c1", "n1")]
        + [(k, ctypes.c_longlong) for k in ("sxb", "sxh", "sxt", "rstride")]
        + [(k, ctypes.c_int) for k in ("T", "H", "chunk")]
        + [("tp0", ctypes.c_uint32 * 8), ("tp1", ctypes.c_uint32 * 8)]
        + [(k, ctypes.c_void_p) for k in ("perm", "qfrag", "qjl", "rn")]
        + [("qstride", ctypes.c_longlong), ("tc", ctypes.c_uint32 * 8), ("nbh", ctypes.c_int)]
    )


def mma_supported(x: torch.Tensor, codec: RowCodec) -> bool:
    """The CUDA encode handles 16-bit input rows (16-byte aligned), head_dim 64/128/256 and symmetric 2-4 bit
    codebooks in one or two channel groups; float32 input keeps the (float32-accurate) Triton kernel."""
    if not x.is_cuda or not cuda.enabled() or x.dtype not in (torch.float16, torch.bfloat16):
        return False
    if x.shape[-1] not in (64, 128, 256) or x.stride(-1) != 1 or x.data_ptr() % 16:
        return False
    if any(st % 8 for st in x.stride()[:-1]) or not codec_supported(codec, qjl=True):
        return False
    if codec.qjl:  # TurboQuant_prod keys: one group, R and Q = R^T S^T both in shared memory
        rq = codec.quantizer.qjl.rows
        if len(codec.groups) != 1 or x.shape[-1] not in QJL_TUNING or rq % 32 or not 32 <= rq <= 2 * x.shape[-1]:
            return False
    return all(bits in (2, 3, 4) and d % 32 == 0 for bits, d, _ in codec.groups) and _codec_symmetric(codec)


def lane_coordinates(dim: int) -> torch.Tensor:
    """``(4, dim / 4)``: the input channel of lane coordinate q of the lanes with t4 = 0..3 (encode_mma.cu): 16-byte
    chunks, ``32 (q / 8) + 8 t4 + q % 8``."""
    q = torch.arange(dim // 4)
    return 32 * (q // 8) + 8 * torch.arange(4)[:, None] + q % 8


def run_position(u: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """Where column e (0, 1) of column tile u of a channel group lands in a lane's run of codes: the kernel packs the
    code pairs of tiles 4w .. 4w + 3 into one 8-code word with two byte permutes (``pack8`` in encode_mma.cu)."""
    return 8 * (u // 4) + 4 * e + torch.tensor([0, 2, 1, 3])[u % 4]


def accumulator_coordinate(u: torch.Tensor, n: torch.Tensor, d: int) -> torch.Tensor:
    """The group coordinate (of ``d``) that column n of the rotation's column tile u computes: lane t4 = n / 2 owns
    the run of codes ``[t4 d / 4, +d / 4)``, in which the column lands at ``run_position(u, n % 2)``."""
    return (n // 2) * (d // 4) + run_position(u, n % 2)


def fragment_rotation(codec: RowCodec, perm: torch.Tensor | None, device) -> torch.Tensor:
    """The fused rotation as the kernel's mma B fragments, float16: ``(H or 1, D/32, D/16, 2, 32, 2, 4)``.

    Entry ``[h, u4, s, j, lane, i, e]`` is ``R[h][k, col]`` of column tile ``u = 4 u4 + 2 j + i`` (a lane's two
    16-byte loads per k-step s give it the fragments of four tiles): ``k`` is the input channel of the lane's
    coordinate ``4s + e`` (the A fragment of k-step s holds lane coordinates 4s .. 4s + 3; t4 = lane % 4) and
    ``col`` the fused column of column ``n = lane / 4`` of tile u. Group i's tiles come in order, and column n of its
    tile u' is group coordinate ``(n / 2) D_i / 4 + run_position(u', n % 2)``, so accumulator columns 2 t4, 2 t4 + 1
    hold lane t4's own run of codes.
    """

    def build() -> torch.Tensor:
        rot = fused_rotation(codec, perm, device)
        dim = codec.dim
        lane = torch.arange(32)
        s = torch.arange(dim // 16)
        rows = lane_coordinates(dim)[lane % 4][None, :, :].expand(len(s), -1, -1)  # (NK, 32, D/4)
        rows = rows.gather(2, (4 * s[:, None, None] + torch.arange(4)).expand(-1, 32, -1))  # (NK, 32, 4)
        n, u = lane // 4, torch.arange(dim // 8)[:, None]
        cols = torch.cat([off + accumulator_coordinate(u[: d // 8], n, d) for _, d, off in codec.groups])  # (D/8, 32)
        return _fragment_order(rot, rows, cols, dim)

    return weak_cached(_FRAGMENTS, (codec, perm), device, build)


_FRAGMENTS: dict[tuple, tuple] = {}
_QFRAGMENTS: dict[tuple, tuple] = {}


def qjl_fragments(codec: RowCodec, perm: torch.Tensor | None, device) -> torch.Tensor:
    """``Q = R^T S^T`` as the QJL product's mma B fragments, float16, laid out as :func:`fragment_rotation`'s:
    ``(H or 1, RQ/32, D/16, 2, 32, 2, 4)``. Its rows follow the residual's A fragments: k-step s holds the
    accumulator pairs of column tiles 2 s, 2 s + 1 (k = 8 j + 2 t4 + h: tile 2 s + j, column 2 t4 + h, whose rotated
    coordinate is fragment_rotation's column order). Its columns put sign bits where the kernel pushes them: column
    n of tile v is lane n / 2's push p = 8 (v / 4) + 2 (v % 4) + n % 2, bit (bits in its word - 1) - p % 32 of word
    p / 32 of that lane's run of RQ / 4 bits."""

    def build() -> torch.Tensor:
        q = _qjl_projection(codec, perm, device)
        dim, rq = codec.dim, codec.quantizer.qjl.rows
        t4, e4 = torch.arange(32)[None, :, None] % 4, torch.arange(4)
        tile, col = 2 * torch.arange(dim // 16)[:, None, None] + e4 // 2, 2 * t4 + e4 % 2
        rows = accumulator_coordinate(tile, col, dim)  # (NK, 32, 4)
        v, n = torch.arange(rq // 8)[:, None], torch.arange(32) // 4
        push, nb = 8 * (v // 4) + 2 * (v % 4) + n % 2, rq // 4
        cols = (n // 2) * nb + 32 * (push // 32) + (torch.clamp(nb - 32 * (push // 32), max=32) - 1 - push % 32)
        return _fragment_order(q, rows, cols, dim)

    return weak_cached(_QFRAGMENTS, (codec, perm), device, build)


def wgmma_order(frag: torch.Tensor) -> torch.Tensor:
    """The B matrix of :func:`fragment_rotation` / :func:`qjl_fragments` (``(H, U/4, D/16, 2, 32, 2, 4)``) for the
    WG kernel's wgmma: ``(H, U * 8 * D)`` float16 in the no-swizzle K-major core-matrix layout, element (k, n) at
    ``8 D (n / 8) + 64 (k / 8) + 8 (n % 8) + k % 8``. Entry ``[h, u4, s, j, lane, i, e]`` of a fragment is B's
    (k, n) = (16 s + 2 (lane % 4) + e % 2 + 8 (e / 2), 8 (4 u4 + 2 j + i) + lane / 4): mma.sync's B fragment order."""
    heads, u4, nk = frag.shape[:3]
    dim = 16 * nk
    i_u4, i_s, i_j, i_lane, i_i, i_e = torch.meshgrid(*(torch.arange(n) for n in frag.shape[1:]), indexing="ij")
    k = 16 * i_s + 2 * (i_lane % 4) + i_e % 2 + 8 * (i_e // 2)
    n = 8 * (4 * i_u4 + 2 * i_j + i_i) + i_lane // 4
    pos = (8 * dim * (n // 8) + 64 * (k // 8) + 8 * (n % 8) + k % 8).flatten().to(frag.device)
    out = torch.empty(heads, frag[0].numel(), dtype=frag.dtype, device=frag.device)
    out[:, pos] = frag.reshape(heads, -1)
    return out


def _fragment_order(mat: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, dim: int) -> torch.Tensor:
    """``mat[h][rows[s, lane, e], cols[u, lane]]`` as ``(H, U/4, D/16, 2, 32, 2, 4)`` float16 with u = 4 u4 + 2 j + i:
    a lane's two 16-byte loads per k-step give it the B fragments of four column tiles."""
    frag = mat[:, rows[None].to(mat.device), cols[:, None, :, None].to(mat.device)]  # (H, U, NK, 32, 4)
    frag = frag.view(frag.shape[0], -1, 2, 2, dim // 16, 32, 4).permute(0, 1, 4, 2, 5, 3, 6)
    return frag.half().contiguous()


def _encode_hadamard(x, codec, perm, mean_arg, iscale, fields) -> None:
    bsz, heads, rows, dim = x.shape
    dev = x.device
    consts, tp0, tp1 = _had_constants(codec, dev)
    two = len(codec.groups) == 2
    tuning = had_tuning(two)
    # (only two groups have outlier channels to gather)
    perm_arg = None if perm is None or not two else weak_cached(
        _NORMALIZERS, (perm,), dev, lambda: perm.int().contiguous())
    opts = had_options(codec, perm=perm_arg is not None, xt=x.dtype == torch.bfloat16, mean=mean_arg is not None,
                       scale=iscale is not None)  # fmt: skip
    kern = cuda.kernel(_MMA_SOURCE, "tq_encode_had", dev, opts)
    chunk, grid = _row_grid(kern, bsz * heads, rows, 256 // dim * tuning["TW"], tuning["NWARPS"], 0, dev)
    last = "1" if two else "0"
    prm = _MmaParams(
        _ptr(x), _ptr(mean_arg), _ptr(iscale), consts.data_ptr(), fields["codes0"].data_ptr(),
        fields["norms0"].data_ptr(), fields[f"codes{last}"].data_ptr(), fields[f"norms{last}"].data_ptr(),
        x.stride(0), x.stride(1), x.stride(2), 0, rows, heads, chunk, tp0, tp1, _ptr(perm_arg),
    )  # fmt: skip
    kern(grid, 32 * tuning["NWARPS"], prm, cuda.stream(dev))


def had_options(codec: RowCodec, *, perm: bool, xt: bool, mean: bool, scale: bool,
                extra: dict | None = None) -> tuple[str, ...]:  # fmt: skip
    """The HAD kernel's compile options for ``codec`` (one group, or two of 128 at 256, gathered through a head
    permutation when ``perm``), bfloat16 (``xt``) or float16 rows, centered, scaled; its tuning, then ``extra``
    (benchmarks' A/B variants) override."""
    (b0, d0, _), b1 = codec.groups[0], codec.groups[-1][0]
    two = len(codec.groups) == 2
    opts = dict(HAD=1, D=codec.dim, B0=b0, D0=d0, B1=b1, G2=int(two), HAS_PERM=int(perm and two), XT=int(xt),
                HAS_MEAN=int(mean), HAS_SCALE=int(scale)) | had_tuning(two) | (extra or {})  # fmt: skip
    return tuple(f"-D{k}={v}" for k, v in opts.items())


def _had_constants(codec: RowCodec, device) -> tuple:
    """Per codec, built once: the HAD kernel's lane constants (device) and each group's positive boundaries times
    the kernel's growth as float16 pairs."""

    def build():
        td = _layout_dim(codec)
        signs = torch.stack([hadamard_signs(td, g.seed) for g in codec.mse._groups])
        two = len(signs) == 2
        wide = (codec.groups[0][0], codec.groups[-1][0])
        consts = torch.cat([hadamard_lane_constants(td, signs if two else signs[0]),
                            store_lane_constants(td, wide, two)[None]]).to(device)  # fmt: skip
        tps = []
        for i in range(2):
            grp = codec.mse._groups[min(i, len(signs) - 1)]
            tps.append(_pairs(grp.boundaries[(1 << (grp.bits - 1)) :] * HAD_GROWTH[td]))
        return consts, *tps

    return weak_cached(_HAD, (codec,), device, build)


def _encode_cuda(x, codec, perm, mean, scale, fields, hadamard: bool | None = None) -> None:
    bsz, heads, rows, dim = x.shape
    dev = x.device
    mean_arg = None if mean is None else weak_cached(
        _NORMALIZERS, (mean,), dev, lambda: mean.reshape(bsz * heads, dim).float().contiguous())
    iscale = None if scale is None else weak_cached(
        _NORMALIZERS, (scale,), dev, lambda: (1.0 / scale.reshape(bsz * heads, dim).float()).contiguous())
    if hadamard or (hadamard is None and dim in HAD_DEFAULT_DIMS and hadamard_supported(codec)):
        return _encode_hadamard(x, codec, perm, mean_arg, iscale, fields)
    frag, tp, qfrag, tc = _layer_constants(codec, perm, dev)
    (b0, d0, _), rest = codec.groups[0], codec.groups[1:]
    b1, d1 = (rest[0][0], rest[0][1]) if rest else (b0, 0)
    rq = codec.quantizer.qjl.rows if codec.qjl else 0
    tune = mma_tuning(dim, codec.qjl, cuda.has_wgmma(dev))
    opts = dict(tune, D=dim, B0=b0, D0=d0, B1=b1, D1=d1, XT=int(x.dtype == torch.bfloat16),
                HAS_MEAN=int(mean is not None), HAS_SCALE=int(scale is not None))  # fmt: skip
    if codec.qjl:
        opts.update(QJL=1, RQ=rq)
    if tune.get("WG"):  # the B operands in wgmma's layout instead of mma.sync's fragment order
        frag, qfrag = weak_cached(_WGMMA, (codec, perm), dev, lambda: (
            wgmma_order(frag), None if qfrag is None else wgmma_order(qfrag)))  # fmt: skip
    kern = cuda.kernel(_MMA_SOURCE, "tq_encode", dev, tuple(f"-D{k}={v}" for k, v in opts.items()))
    staging = tune.get("ASYNC", 0) * tune["NWARPS"] * 16 * tune["MT"] * dim * 2  # ASYNC tiles of rows per warp
    smem = dim * dim * 2 + dim * rq * 2 + 2 * dim * 4 + staging
    if bsz * heads * rows >= 2**31:  # (tq_encode indexes the rows of all (b, h) with 32-bit integers)
        raise ValueError(f"the CUDA encode takes fewer than 2^31 rows at once, got {bsz * heads * rows}")
    if tune.get("FLAT", 1):
        chunk, grid = _flat_grid(kern, bsz * heads, rows, 16 * tune["MT"], tune["NWARPS"], smem, dev)
    else:  # (A/B only: the grid per (b, h) that the HAD kernel has, where its chunks tile each (b, h) exactly)
        chunk, (per_bh, _, _) = _row_grid(kern, bsz * heads, rows, 16 * tune["MT"], tune["NWARPS"], smem, dev)
        if rows % chunk:
            raise ValueError(f"FLAT 0 needs chunks that tile each (b, h): {rows} rows in chunks of {chunk}")
        grid = (per_bh * bsz * heads, 1, 1)
    prm = _MmaParams(
        _ptr(x), _ptr(mean_arg), _ptr(iscale), frag.data_ptr(),
        fields["codes0"].data_ptr(), fields["norms0"].data_ptr(),
        fields.get("codes1", fields["codes0"]).data_ptr(), fields.get("norms1", fields["norms0"]).data_ptr(),
        x.stride(0), x.stride(1), x.stride(2), 0 if frag.shape[0] == 1 else frag[0].numel() // 2,
        rows, heads, chunk, *tp, None, _ptr(qfrag), _ptr(fields.get("qjl")), _ptr(fields.get("rnorms")),
        0 if qfrag is None or qfrag.shape[0] == 1 else qfrag[0].numel() // 2, tc or (ctypes.c_uint32 * 8)(),
        bsz * heads,
    )  # fmt: skip
    kern(grid, 32 * tune["NWARPS"], prm, cuda.stream(dev), smem=smem)


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _row_grid(kern, bh: int, rows: int, per_warp: int, nwarps: int, smem: int, device) -> tuple[int, tuple]:
    """Rows per block (a multiple of a warp's ``per_warp`` rows) and the grid ``(blocks per (b, h), b h, 1)``, the
    blocks per (b, h) from :func:`_row_splits` over the blocks the card holds at once."""
    slots = sm_count(device) * kern.blocks_per_sm(32 * nwarps, smem)
    splits = _row_splits(bh, -(-rows // (per_warp * nwarps)), slots)
    chunk = -(-rows // splits)
    chunk = -(-chunk // per_warp) * per_warp
    return chunk, (-(-rows // chunk), bh, 1)


def _flat_grid(kern, bh: int, rows: int, per_warp: int, nwarps: int, smem: int, device) -> tuple[int, tuple]:
    """The dense kernel's rows per block over all ``bh`` x ``rows`` rows and its grid ``(blocks, 1, 1)``: one block
    per slot of the card (blocks resident at once), so the one wave keeps every SM busy (a grid per (b, h) left 4 of
    132 SMs idle at B H = 64), and a block crosses into the next (b, h) at most once; where the rows of a (b, h) are
    fewer than that, one block per (b, h)."""
    chunk = flat_chunk(bh, rows, per_warp, sm_count(device) * kern.blocks_per_sm(32 * nwarps, smem))
    return chunk, (-(-bh * rows // chunk), 1, 1)


def flat_chunk(bh: int, rows: int, per_warp: int, slots: int) -> int:
    """Rows per block of :func:`_flat_grid`: all rows over ``slots`` blocks in whole warp tiles, at most ``rows``."""
    chunk = -(-bh * rows // slots)
    return min(-(-chunk // per_warp) * per_warp, rows)


def _row_splits(bh: int, max_splits: int, slots: int) -> int:
    """Blocks per (b, h) so that the grid fills whole waves of the card's ``slots`` (blocks resident at once): a last,
    partial wave leaves most SMs idle while it runs. The fewest splits with >= 90% of the waves' slots busy (each
    block loads R once), else the best."""
    best, best_eff = 1, 0.0
    for k in range(1, max(1, min(max_splits, 64)) + 1):
        eff = wave_fill(k * bh, slots)
        if eff >= 0.9:
            return k
        if eff > best_eff:
            best, best_eff = k, eff
    return best


_CONSTANTS: dict[tuple, tuple] = {}
_WGMMA: dict[tuple, tuple] = {}
_HAD: dict[tuple, tuple] = {}
_NORMALIZERS: dict[tuple, tuple] = {}  # the cache's means and 1 / scales as (B H, D) float32, per layer
_SYMMETRY: dict[tuple, tuple] = {}


def _pairs(values: torch.Tensor) -> ctypes.Array:
    """Up to 8 float values as float16 pairs (the value in both halves), for the kernels' parameter tables."""
    h16 = values.float().half().view(torch.int16).int() & 0xFFFF
    return (ctypes.c_uint32 * 8)(*(h16 * 0x10001).tolist())


def centroid_bytes(codec: RowCodec) -> ctypes.Array:
    """The float16 magnitudes of the first group's positive centroids by level c (c: boundaries below |y|), as the
    byte tables encode_mma.cu's residual2 permutes: up to 4 levels, the low bytes in word 0 and the high bytes in
    word 1; 8 levels (4 bits), the low bytes in words 0-1 and the high bytes in words 2-3."""
    bits = codec.groups[0][0]
    mags = codec.tensors(0, "cpu")[1][(1 << (bits - 1)) :].half()  # level c: sign-magnitude code 2^(b-1) + c
    return (ctypes.c_uint32 * 8)(*byte_tables(F.pad(mags, (0, (4 if bits <= 3 else 8) - len(mags)))))


def _layer_constants(codec: RowCodec, perm, device) -> tuple:
    """Per layer, built once (no host work or device sync per call): R in fragment order, the positive boundaries of
    each group as float16 pairs and, for TurboQuant_prod keys, Q in fragment order and the centroid table (the
    centroids' magnitudes, centroid_bytes)."""

    def build():
        tp = []
        for i in range(2):
            j = min(i, len(codec.groups) - 1)
            tp.append(_pairs(codec.tensors(j, "cpu")[2][(1 << (codec.groups[j][0] - 1)) :]))
        if not codec.qjl:
            return fragment_rotation(codec, perm, device), tp, None, None
        return fragment_rotation(codec, perm, device), tp, qjl_fragments(codec, perm, device), centroid_bytes(codec)

    return weak_cached(_CONSTANTS, (codec, perm), device, build)


def encode_rows(
    x: torch.Tensor,
    codec: RowCodec,
    perm: torch.Tensor | None,
    mean: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    *,
    block_t: int | None = None,
    num_warps: int | None = None,
    precision: str | None = None,
    symmetric: bool | None = None,
    backend: str = "auto",
    hadamard: bool | None = None,
) -> dict[str, torch.Tensor]:
    """Fused ``RowCodec.encode((x - mean) / scale, perm)`` for x of shape (B, H, T, D), any float dtype.

    Returns the same fields (``codes{i}`` uint8 (B, H, T, bytes_i), ``norms{i}`` float32 (B, H, T); with a QJL codec
    also ``qjl`` uint8 (B, H, T, rows / 8) and ``rnorms`` float32 (B, H, T); the CUDA kernel computes them from
    float16 residuals, so a few signs of projections within rounding of zero flip and ``rnorms`` are float16 sums,
    ~1e-3 relative). The CUDA kernel
    (bfloat16/float16 rows) rounds the normalized rows and R to float16 (2^-11 relative, finer than bfloat16 input):
    codes move by one level where a coordinate lies within ~1e-3 of a boundary (under 1% of them); row norms are
    float32 sums, and the two group norms of fractional widths are those of the rotated outputs (at most ~3e-4
    relative, 5e-4 for 32-channel groups: about the float16 rounding of the cache's stored norms). ``precision``
    (Triton): the rotation's ``tl.dot`` precision. ``"tf32x3"`` is float32-accurate; ``"tf32"`` (one pass, about 2x
    faster) rounds the rotation to ~5e-4 relative, so codes may move by one level where a coordinate lies that close
    to a boundary (under 1% of them). The default is tf32 for bfloat16/float16 input, whose own rounding (4e-3 /
    5e-4) is as coarse, and tf32x3 for float32. ``symmetric``: half the comparisons, using the codebook's symmetry
    (default: when the boundaries are symmetric, as Lloyd-Max's are).
    ``backend``: ``"cuda"`` (``encode_mma.cu``, 16-bit input, see :func:`mma_supported`), ``"triton"``, or
    ``"auto"`` (CUDA where it applies; ``TURBOVQ_CUDA=0`` turns it off). ``block_t``, ``num_warps``, ``precision``
    and ``symmetric`` tune the Triton kernel only. ``hadamard`` (CUDA): the factored randomized Hadamard kernel
    (True, where :func:`hadamard_supported`), the dense-R kernel (False), or the faster of the two as measured
    (None: HAD at head_dim 128 and 256, see ``HAD_DEFAULT_DIMS``).
    """
    if backend not in ("auto", "cuda", "triton"):
        raise ValueError(f"backend must be 'auto', 'cuda' or 'triton', got {backend!r}")
    if hadamard and not hadamard_supported(codec):
        raise ValueError(f"hadamard=True needs the rotation 'hadamard' and one channel group at head_dim 64/128/256 "
                         f"or two of 128 at 256, got {codec} with groups {codec.groups} and rotation "
                         f"{codec.mse._groups[0].rotation!r}")  # fmt: skip
    bsz, heads, rows, dim = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    dev = x.device
    fields = {}
    for i, (bits, d, _) in enumerate(codec.groups):
        fields[f"codes{i}"] = torch.empty(bsz, heads, rows, packing.packed_size(d, bits), dtype=torch.uint8, device=dev)
        fields[f"norms{i}"] = torch.empty(bsz, heads, rows, dtype=torch.float32, device=dev)
    if codec.qjl:
        sketch = codec.quantizer.qjl
        if not codec_supported(codec, qjl=True):
            raise ValueError(f"the fused encode needs a power-of-two QJL sketch of >= 32 rows, got {sketch.rows}")
        fields["qjl"] = torch.empty(bsz, heads, rows, sketch.rows // 8, dtype=torch.uint8, device=dev)
        fields["rnorms"] = torch.empty(bsz, heads, rows, dtype=torch.float32, device=dev)
    if rows == 0:
        return fields
    use_cuda = backend != "triton" and mma_supported(x, codec)
    if backend == "cuda" and not use_cuda:
        raise ValueError("backend='cuda' needs 16-bit CUDA rows and a codec that encode_mma.cu handles (mma_supported)")
    if use_cuda:
        _encode_cuda(x, codec, perm, mean, scale, fields, hadamard)
        return fields
    rot = fused_rotation(codec, perm, dev)
    gid = channel_groups(codec, perm, heads, dev)
    if precision is None:
        precision = "tf32" if x.dtype in (torch.bfloat16, torch.float16) else "tf32x3"
    if symmetric is None:
        symmetric = _codec_symmetric(codec)
    args = []
    for i in range(2):
        j = min(i, len(codec.groups) - 1)
        _, cent, bounds = codec.tensors(j, dev)
        args += [fields[f"codes{j}"].view(torch.int32), fields[f"norms{j}"], bounds, cent]
    if codec.qjl:
        qmat = _qjl_projection(codec, perm, dev)
        args += [qmat, 0 if qmat.shape[0] == 1 else qmat[0].numel(), fields["qjl"].view(torch.int32), fields["rnorms"]]
    else:
        args += [x, 0, x, x]
    mean_arg = x if mean is None else mean.reshape(bsz * heads, dim).float().contiguous()
    scale_arg = x if scale is None else scale.reshape(bsz * heads, dim).float().contiguous()
    (b0, d0, _), rest = codec.groups[0], codec.groups[1:]
    b1, d1 = (rest[0][0], rest[0][1]) if rest else (b0, 0)
    block = block_t or (32 if dim >= 256 else 128)
    _encode_kernel[(triton.cdiv(rows, block), bsz * heads)](
        x, x.stride(0), x.stride(1), x.stride(2), mean_arg, scale_arg, rot, 0 if rot.shape[0] == 1 else dim * dim, gid,
        *args, rows, heads,
        D=dim, B0=b0, D0=d0, B1=b1, D1=d1, BLOCK_T=block, CW0=min(d0, 64), CW1=min(max(d1, 16), 64),
        HAS_MEAN=mean is not None, HAS_SCALE=scale is not None, PREC=precision, SYM=symmetric,
        QJL=codec.qjl, RQ=codec.quantizer.qjl.rows if codec.qjl else 32,
        num_warps=num_warps or (8 if codec.qjl else 4),  # QJL holds a (block, rows) tile more (kernels_encode_prod_r9)
    )  # fmt: skip
    return fields


_QJL: dict[tuple, tuple] = {}


def _qjl_projection(codec: RowCodec, perm, device) -> torch.Tensor:
    """``Q = R^T S^T`` per head, (H or 1, D, rows) float32: the rotated residual ``e`` has QJL projections ``e @ Q``
    (``r = e @ R^T``, R the fused rotation, S the sketch matrix); built once per layer."""

    def build():
        rot = fused_rotation(codec, perm, device)
        return (rot.transpose(-1, -2) @ codec.quantizer.qjl.matrix(device).T.to(rot.dtype)).contiguous()

    return weak_cached(_QJL, (codec, perm), device, build)


def _codec_symmetric(codec: RowCodec) -> bool:
    return weak_cached(_SYMMETRY, (codec,), "cpu", lambda: all(
        _symmetric(codec.tensors(i, "cpu")[2]) for i in range(len(codec.groups))))


def _symmetric(bounds: torch.Tensor) -> bool:
    """Boundaries b_0 < ... < b_{2M}: b_M == 0 and b_{M-j} == -b_{M+j} (to float32 rounding)."""
    m = (len(bounds) - 1) // 2
    return bool(bounds[m] == 0) and torch.allclose(bounds, -bounds.flip(0), rtol=0, atol=1e-6)
