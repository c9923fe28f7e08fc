"""encode_mma.cu without a GPU: every supported configuration compiles (NVRTC), the ctypes mirror of ``struct Params``
has the C layout, and a torch emulation of the kernel's data movement (lane coordinates, R in fragment order, the
mma fragment layouts, the float16-pair quantizer and the nibble packing, transcribed operation for operation) writes
the codes ``RowCodec.encode`` writes. The kernel itself is compared with the reference on the GPU in test_triton.py
(``backend="cuda"``)."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch
from conftest import assert_codes_match

from turbovq.kernels import cuda
from turbovq.kernels import encode as kencode
from turbovq.kernels.reference import encode_reference, fused_rotation
from turbovq.kv.cache import RowCodec
from turbovq.rotation import hadamard_signs

needs_nvrtc = pytest.mark.skipif(not cuda.nvrtc_available(), reason="libnvrtc not installed")

# (D, groups (bits, channels), outliers first; input dtype code, mean, scale)
CONFIGS = [
    (128, [(4, 128)], 1, 0, 1),  # Llama-3.1-8B keys at 4 bits, bfloat16, channel scales (the cache default)
    (128, [(3, 128)], 0, 1, 0),  # float16, centered
    (128, [(4, 64), (3, 64)], 1, 1, 1),  # 3.5 bits
    (128, [(3, 64), (2, 64)], 1, 0, 0),  # 2.5 bits
    (64, [(4, 32), (3, 32)], 0, 0, 1),
    (64, [(2, 64)], 1, 0, 0),
    (256, [(4, 256)], 1, 1, 1),
    (256, [(3, 128), (2, 128)], 0, 0, 0),
]


def _options(d, groups, xt, mean, scale, tune=None, arch="sm_90a"):
    (b0, d0), (b1, d1) = groups[0], (groups[1] if len(groups) > 1 else (groups[0][0], 0))
    tune = tune or kencode.mma_tuning(d, wgmma=arch.endswith("a"))
    opts = dict(tune, D=d, B0=b0, D0=d0, B1=b1, D1=d1, XT=xt, HAS_MEAN=mean, HAS_SCALE=scale)
    return tuple(f"-D{k}={v}" for k, v in opts.items())


@needs_nvrtc
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"d{c[0]}-" + "+".join(f"{b}x{d}" for b, d in c[1]))
@pytest.mark.parametrize("arch", ["sm_80", "sm_90", "sm_90a"])
def test_compiles(cfg, arch):
    cubin = cuda.compile_cubin(kencode._MMA_SOURCE, arch, _options(*cfg, arch=arch))
    assert cubin[:4] == b"\x7fELF" and b"tq_encode" in cubin


@needs_nvrtc
@pytest.mark.parametrize("d,bits", [(256, 4), (128, 3), (64, 2), (256, 3.5), (256, 2.5)])
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_hadamard_kernel_compiles(d, bits, arch):
    opts = kencode.had_options(RowCodec(d, bits), perm=True, xt=True, mean=True, scale=False)  # (the gather: 2 groups)
    cubin = cuda.compile_cubin(kencode._MMA_SOURCE, arch, opts)
    assert cubin[:4] == b"\x7fELF" and b"tq_encode_had" in cubin


@needs_nvrtc
@pytest.mark.parametrize("d,bits,rq", [(128, 3, 128), (64, 2, 64), (128, 3, 256)])
@pytest.mark.parametrize("arch", ["sm_80", "sm_90", "sm_90a"])
def test_qjl_kernel_compiles(d, bits, rq, arch):
    tune = kencode.mma_tuning(d, qjl=True, wgmma=arch.endswith("a"))
    opts = dict(tune, D=d, B0=bits, D0=d, B1=bits, D1=0, XT=1, HAS_MEAN=1, HAS_SCALE=1, QJL=1, RQ=rq)
    cubin = cuda.compile_cubin(kencode._MMA_SOURCE, arch, tuple(f"-D{k}={v}" for k, v in opts.items()))
    assert cubin[:4] == b"\x7fELF" and b"tq_encode" in cubin


@needs_nvrtc
@pytest.mark.parametrize("cfg", [c for c in CONFIGS if c[0] == 128], ids=lambda c: "+".join(f"{b}" for b, _ in c[1]))
def test_wgmma_build_compiles(cfg):
    """The WG build (the default at head_dim 128: wgmma, sm_90a) of the mse and QJL kernels, with WGA (every column
    block's product in flight at once) where there is one group; no wgmma before sm_90a."""
    for wga in (0, 1) if len(cfg[1]) == 1 else (0,):
        tune = dict(kencode.MMA_TUNING[128], WGA=wga)
        assert b"tq_encode" in cuda.compile_cubin(kencode._MMA_SOURCE, "sm_90a", _options(*cfg, tune=tune))
    b0 = cfg[1][0][0]
    qjl = dict(kencode.QJL_TUNING[128], D=128, B0=b0, D0=128, B1=b0, D1=0, XT=1, HAS_MEAN=1, HAS_SCALE=1, QJL=1, RQ=128)
    for wga in (0, 1):
        qjl_opts = tuple(f"-D{k}={v}" for k, v in dict(qjl, WGA=wga).items())
        assert b"tq_encode" in cuda.compile_cubin(kencode._MMA_SOURCE, "sm_90a", qjl_opts)
    with pytest.raises(cuda.CudaCompileError):
        cuda.compile_cubin(kencode._MMA_SOURCE, "sm_80", _options(*cfg, tune=kencode.MMA_TUNING[128]))


def test_wgmma_settings_fall_back_to_mma_sync():
    for qjl in (False, True):
        assert kencode.mma_tuning(128, qjl)["WG"] == 1
        assert not {"WG", "WGA"} & set(kencode.mma_tuning(128, qjl, wgmma=False))


def test_hadamard_kernel_applies_to_one_hadamard_group():
    assert kencode.hadamard_supported(RowCodec(128, 4)) and kencode.hadamard_supported(RowCodec(256, 2, seed=3))
    assert kencode.hadamard_supported(RowCodec(256, 3.5)) and kencode.hadamard_supported(RowCodec(256, 2.5))
    assert not kencode.hadamard_supported(RowCodec(128, 3.5))  # two channel groups of 64
    assert not kencode.hadamard_supported(RowCodec(256, 3.25))  # groups of 64 and 192
    assert not kencode.hadamard_supported(RowCodec(128, 4, rotation="haar"))
    assert not kencode.hadamard_supported(RowCodec(96, 4))
    x = torch.randn(1, 1, 4, 128)
    with pytest.raises(ValueError, match="hadamard=True"):
        kencode.encode_rows(x, RowCodec(128, 4, rotation="haar"), None, hadamard=True)


@pytest.mark.parametrize("bh,rows,slots", [(64, 32768, 132), (64, 1000, 132), (64, 16, 132), (1024, 16, 264),
                                           (3, 7, 132), (8, 4096, 396), (64, 200, 132)])  # fmt: skip
def test_flat_grid_covers_every_row_once(bh, rows, slots):
    """tq_encode's blocks over flat_chunk's rows, split into segments at (b, h) boundaries as the kernel does: every
    row once, at most one boundary crossed per block, and no more blocks than slots unless a (b, h) has fewer rows."""
    chunk = kencode.flat_chunk(bh, rows, 16, slots)
    blocks, seen = -(-bh * rows // chunk), torch.zeros(bh * rows, dtype=torch.int32)
    assert blocks <= slots or chunk == rows
    for i in range(blocks):
        end, f, segments = min((i + 1) * chunk, bh * rows), i * chunk, 0
        while f < end:
            b, lo = divmod(f, rows)
            hi = min(rows, lo + end - f)
            seen[b * rows + lo : b * rows + hi] += 1
            f, segments = f + hi - lo, segments + 1
        assert segments <= 2
    assert bool((seen == 1).all())


def test_params_struct_matches_the_c_layout():
    """8 pointers, 4 int64, 3 int32, two 8-word boundary tables (172 bytes, padded to 176), then the permutation and
    the three QJL pointers, an int64, the 8-word centroid table and an int32 (padded to 256)."""
    assert ctypes.sizeof(kencode._MmaParams) == 256 and kencode._MmaParams.perm.offset == 176
    assert kencode._MmaParams.qstride.offset == 208 and kencode._MmaParams.tc.offset == 216
    assert kencode._MmaParams.nbh.offset == 248
    assert kencode._MmaParams.T.offset == 8 * 8 + 4 * 8
    assert kencode._MmaParams.tp0.offset == 8 * 8 + 4 * 8 + 3 * 4
    assert kencode._MmaParams.tp1.offset == kencode._MmaParams.tp0.offset + 32


# ---- the emulation: numpy uint32 transcriptions of quantize2 / pack8 / put, torch for the products ----


def _hgt2(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """set.gt.u32.f16x2: 0xFFFF per half where a > b (float16 pairs in uint32 words)."""

    def halves(w):
        return [((w >> sh) & 0xFFFF).astype(np.uint16).view(np.float16) for sh in (0, 16)]

    (a0, a1), (b0, b1) = halves(a), halves(np.broadcast_to(b, a.shape))
    return (np.where(a0 > b0, 0xFFFF, 0) | np.where(a1 > b1, 0xFFFF0000, 0)).astype(np.uint32)


def _quantize2(y0: torch.Tensor, y1: torch.Tensor, scale: torch.Tensor | None, tp: list[int], bits: int) -> np.ndarray:
    m = np.uint32((1 << (bits - 1)) - 1)
    y0, y1 = y0.half(), y1.half()
    if scale is not None:  # mul.rn.f16x2 by the row's float16 factor
        y0, y1 = (y0.float() * scale.half().float()).half(), (y1.float() * scale.half().float()).half()
    lo = y0.view(torch.int16).numpy().astype(np.uint16).astype(np.uint32)
    hi = y1.view(torch.int16).numpy().astype(np.uint16).astype(np.uint32)
    y = lo | (hi << np.uint32(16))
    a = y & np.uint32(0x7FFF7FFF)
    s = np.zeros_like(y)
    for k in range(int(m)):
        s = s + _hgt2(a, np.uint32(tp[k]))
    return (s * np.uint32(0xFFFEFFFF)) | (_hgt2(y, np.uint32(0)) & np.uint32((m + 1) * 0x10001))  # sign-magnitude


def _byte_perm(x: np.ndarray, y: np.ndarray, sel) -> np.ndarray:
    """__byte_perm: byte i of the result is byte (nibble i of sel) & 7 of y:x (sel a number or one per element)."""
    x, y, sel = np.broadcast_arrays(np.asarray(x, np.uint32), np.asarray(y, np.uint32), np.asarray(sel, np.uint32))
    src = np.stack([(w >> np.uint32(8 * i)) & np.uint32(0xFF) for w in (x, y) for i in range(4)])
    pick = [np.take_along_axis(src, ((sel >> np.uint32(4 * i)) & np.uint32(7))[None].astype(np.intp), 0)[0]
            for i in range(4)]  # fmt: skip
    return sum((p << np.uint32(8 * i) for i, p in enumerate(pick)), np.zeros_like(x))


def _pack8(p: list[np.ndarray], bits: int) -> np.ndarray:
    u = np.uint32
    x = _byte_perm(p[0], p[1], 0x6240) + (_byte_perm(p[2], p[3], 0x6240) << u(4))
    if bits == 3:
        x = (x & u(0x07070707)) | ((x >> u(1)) & u(0x38383838))
        x = (x & u(0x003F003F)) | ((x >> u(2)) & u(0x0FC00FC0))
        x = (x & u(0x00000FFF)) | ((x >> u(4)) & u(0x00FFF000))
    elif bits == 2:
        x = (x & u(0x03030303)) | ((x >> u(2)) & u(0x0C0C0C0C))
        x = (x & u(0x000F000F)) | ((x >> u(4)) & u(0x00F000F0))
        x = (x & u(0x000000FF)) | ((x >> u(8)) & u(0x0000FF00))
    return x


# Group norms of fractional widths come from the float16-operand rotation's outputs: typically ~1e-4 relative, at
# most ~3e-4 (4.5e-4 with 32-channel groups) over 2M rows (kernels_encode_ab_r8.json), about the float16 rounding of
# the cache's stored norms
GROUP_NORM_RTOL = 5e-4


def emulate(x, codec, perm, mean, scale) -> dict[str, torch.Tensor]:
    """What encode_mma.cu computes, with the same index maps and bit operations (float16 operands, float32 sums)."""
    bsz, heads, rows, dim = x.shape
    v = x.float()
    if mean is not None:
        v = v - mean
    if scale is not None:
        v = v * (1.0 / scale)
    total = v.pow(2).sum(-1).sqrt()
    xs = (v / total.clamp_min(1e-30)[..., None]).half().float()  # divided by the row norm
    nk = dim // 16
    lanes = xs[..., kencode.lane_coordinates(dim)].view(bsz, heads, rows, 4, nk, 4)  # [b, h, t, p = t4, s, e]
    frag = kencode.fragment_rotation(codec, perm, "cpu").float()  # (Hr, U/4, NK, 2, 32, 2, 4), lane = 4 n + t4
    frag = frag.permute(0, 1, 3, 5, 2, 4, 6).reshape(frag.shape[0], dim // 8, nk, 8, 4, 4)  # [h, u, s, n, p, e]
    acc = torch.einsum("bhtpse,husnpe->bhtun", lanes.double(), frag.double()).float()  # (B, H, T, U, 8 columns)
    out, u0 = {}, 0
    for i, (bits, d, _) in enumerate(codec.groups):
        # two groups: the norm of the group's outputs (times the row norm); they are divided by it (float16 factor)
        gn = acc[..., u0 : u0 + d // 8, :].pow(2).sum((-2, -1)).sqrt()
        factor = torch.where(gn > 0, 1 / gn, 0).clamp_max(65504) if len(codec.groups) > 1 else None
        out[f"norms{i}"] = gn * total if factor is not None else total
        bounds = codec.tensors(i, "cpu")[2].float()
        h16 = bounds[(1 << (bits - 1)) :].half().view(torch.int16).int() & 0xFFFF
        tp = (h16 * 0x10001).tolist()
        words = np.zeros((bsz, heads, rows, 4, (d * bits // 32 + 3) // 4 + 1), dtype=np.uint32)  # per lane run
        for t4 in range(4):
            for w in range(d // 32):
                pairs = [_quantize2(acc[..., u0 + 4 * w + j, 2 * t4], acc[..., u0 + 4 * w + j, 2 * t4 + 1], factor, tp,
                                    bits) for j in range(4)]  # fmt: skip
                val, pos = _pack8(pairs, bits).astype(np.uint64), 8 * bits * w
                words[..., t4, pos // 32] += (val << np.uint64(pos % 32)).astype(np.uint32)
                if pos % 32 + 8 * bits > 32:
                    words[..., t4, pos // 32 + 1] += (val >> np.uint64(32 - pos % 32)).astype(np.uint32)
        lane_bytes = d * bits // 32
        run = words.view(np.uint8)[..., :lane_bytes]  # little-endian words -> bytes
        out[f"codes{i}"] = torch.from_numpy(run.reshape(bsz, heads, rows, 4 * lane_bytes).copy())
        u0 += d // 8
    if codec.qjl:
        out.update(_emulate_qjl(acc, total, codec, perm))
    return out


@pytest.mark.parametrize("bits", [2, 3, 4, 5])
def test_centroid_bytes_give_each_level_its_centroid(bits):
    """residual2's byte permutes (selector from levels2h's value) over encode.centroid_bytes' tables read the float16
    magnitude of the centroid of every pair of levels (the upper half of the sign-magnitude table)."""
    codec = RowCodec(128, bits, qjl=True)
    b = codec.groups[0][0]
    m = (1 << (b - 1)) - 1
    cents = codec.tensors(0, "cpu")[1].float()[m + 1 :].half().view(torch.int16).numpy().astype(np.uint32) & 0xFFFF
    tc = np.array(list(kencode.centroid_bytes(codec)), dtype=np.uint32)
    c0, c1 = (a.ravel().astype(np.uint32) for a in np.meshgrid(np.arange(m + 1), np.arange(m + 1)))
    v = c0 | (c1 << np.uint32(16))  # levels2h: c in each half
    d = v + (v >> np.uint32(8))
    if b <= 3:
        cabs = _byte_perm(tc[0], tc[1], d * np.uint32(0x11) + np.uint32(0x4040))
    else:
        sel = d * np.uint32(0x11)
        cabs = (_byte_perm(tc[0], tc[1], sel) & np.uint32(0x00FF00FF)) | (
            _byte_perm(tc[2], tc[3], sel) & np.uint32(0xFF00FF00))  # fmt: skip
    np.testing.assert_array_equal(cabs, cents[c0] | (cents[c1] << np.uint32(16)))


def _emulate_qjl(acc, total, codec, perm) -> dict[str, torch.Tensor]:
    """The QJL part (TurboQuant_prod keys): float16 residual pairs (residual2: y minus the centroid's float16
    magnitude by count, signed), the product with Q in fragment order, the sign pushes of qjl_sketch and the float16
    sums of squares."""
    bsz, heads, rows, units, _ = acc.shape
    bits, rq = codec.groups[0][0], codec.quantizer.qjl.rows
    m = (1 << (bits - 1)) - 1
    y = acc.half()
    bounds = codec.tensors(0, "cpu")[2].float()[m + 1 :].half()
    cents = codec.tensors(0, "cpu")[1].float()[m + 1 :]
    count = sum((y.abs() > bounds[k]).long() for k in range(m))
    cabs = cents.half()[count]  # (the kernel's byte tables hold these float16 magnitudes)
    e = (y.float() - torch.where(y > 0, cabs, -cabs).float()).half()  # (B, H, T, U, 8): tile u, column n
    # A fragment of k-step s: k = 8 j + 2 t4 + h is tile 2 s + j, column 2 t4 + h
    a = e.view(bsz, heads, rows, units // 2, 2, 8).reshape(bsz, heads, rows, units // 2, 16).float()
    q = kencode.qjl_fragments(codec, perm, "cpu").float()  # (Hq, RQ/32, NK, 2, 32, 2, 4) [h, v4, s, j, lane, i, e4]
    q = q.permute(0, 1, 3, 5, 2, 4, 6).reshape(q.shape[0], rq // 8, units // 2, 8, 4, 4)  # [h, v, s, n = g, t4, e4]
    k_of = (8 * (torch.arange(4) // 2)[None, :] + 2 * torch.arange(4)[:, None] + torch.arange(4) % 2)  # (t4, e4)
    b = torch.zeros(q.shape[0], rq // 8, units // 2, 16, 8)
    b[:, :, :, k_of.flatten(), :] = q.permute(0, 1, 2, 4, 5, 3).reshape(q.shape[0], rq // 8, units // 2, 16, 8)
    proj = torch.einsum("bhtsk,hvskn->bhtvn", a.double(), b.double()).float()  # (B, H, T, V, 8 columns)
    nb = rq // 4
    bits_out = np.zeros((bsz, heads, rows, 4, (nb + 31) // 32), dtype=np.uint64)
    for t4 in range(4):
        for v in range(rq // 8):
            for ee in range(2):
                push = 8 * (v // 4) + 2 * (v % 4) + ee
                wd = bits_out[..., t4, push // 32]
                bits_out[..., t4, push // 32] = 2 * wd + (proj[..., v, 2 * t4 + ee] >= 0).numpy().astype(np.uint64)
    lane_bytes = bits_out.astype(np.uint32).view(np.uint8)[..., : nb // 8]
    signs = torch.from_numpy(lane_bytes.reshape(bsz, heads, rows, rq // 8).copy())
    sq = torch.zeros(bsz, heads, rows, 4, 2, dtype=torch.float16)  # per lane (t4) and half: fma.rn.f16x2 in order
    for s in range(units // 2):
        for j in range(2):
            for h in range(2):
                ev = e[..., 2 * s + j, :].view(bsz, heads, rows, 4, 2)[..., h]  # column 2 t4 + h
                sq[..., h] = (sq[..., h].float() + ev.float() ** 2).half()
    rnorms = total * sq.float().sum((-2, -1)).sqrt()
    return {"qjl": signs, "rnorms": rnorms}


@pytest.mark.parametrize(
    "d,bits,dtype,center,scaled",
    [(128, 4, torch.bfloat16, False, True), (128, 3, torch.float16, True, False),
     (128, 3.5, torch.bfloat16, True, True), (128, 2.5, torch.float16, False, False),
     (64, 3.5, torch.bfloat16, False, True), (64, 2, torch.float16, True, True), (256, 4, torch.bfloat16, True, False)],
)  # fmt: skip
def test_emulated_kernel_writes_the_reference_codes(d, bits, dtype, center, scaled):
    """Codes as RowCodec.encode writes them except where float16 operands move a coordinate across a boundary (one
    level, under 1% of codes); row norms to float32 rounding, group norms (from the rotated outputs) to 5e-4; the
    rotation products to float16 accuracy."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 3, 97, d, generator=g) * 3 + 0.5).to(dtype)
    x[1, 2, 5] = 0  # a zero row: every code is the one for y = 0
    codec = RowCodec(d, bits, seed=2)
    mean = x.float().mean(2, keepdim=True) if center else None
    scale = torch.rand(2, 3, 1, d, generator=g) + 0.5 if scaled else None
    perm = codec.calibrate(x.float() - (0 if mean is None else mean)) if codec.num_outliers else None
    ref = encode_reference(x, codec, perm, mean, scale)
    out = emulate(x, codec, perm, mean, scale)
    assert_codes_match(out, ref, codec, mismatch=1e-2, norm_rtol=GROUP_NORM_RTOL if codec.num_outliers else 1e-5)
    if mean is None:  # the zero row: every code is the one for y = 0
        assert all(torch.equal(out[k][1, 2, 5], ref[k][1, 2, 5]) for k in ref if k.startswith("codes"))


def test_fragment_rotation_is_r_in_fragment_order():
    """Every entry of R appears exactly once, as float16, in the fragment-ordered copy."""
    codec = RowCodec(128, 3.5, seed=1)
    perm = codec.calibrate(torch.randn(1, 2, 64, 128))
    rot = fused_rotation(codec, perm, "cpu")
    frag = kencode.fragment_rotation(codec, perm, "cpu")
    assert frag.shape == (2, 4, 8, 2, 32, 2, 4) and frag.dtype == torch.float16
    assert torch.equal(frag.float().flatten(1).sort(1).values, rot.half().float().flatten(1).sort(1).values)



@pytest.mark.parametrize("qjl", [False, True])
def test_wgmma_order_holds_the_fragments_b_in_core_matrices(qjl):
    """The WG kernel's B (R, or Q for prod keys) in the no-swizzle K-major core-matrix layout is the matrix that
    mma.sync's fragments hold: entry (k, n) at 8 D (n / 8) + 64 (k / 8) + 8 (n % 8) + k % 8."""
    codec = RowCodec(64, 3, seed=2, qjl=qjl)
    frag = (kencode.qjl_fragments if qjl else kencode.fragment_rotation)(codec, None, "cpu")
    wg = kencode.wgmma_order(frag)
    heads, u4s, nk = frag.shape[:3]
    dim, cols = 16 * nk, 32 * u4s
    assert wg.shape == (heads, dim * cols) and torch.equal(wg.sort(1).values, frag.flatten(1).sort(1).values)
    k, n = torch.meshgrid(torch.arange(dim), torch.arange(cols), indexing="ij")
    dense = wg[:, 8 * dim * (n // 8) + 64 * (k // 8) + 8 * (n % 8) + k % 8]  # (H, D, cols)
    for u in range(cols // 8):
        for st in range(nk):
            regs = frag[:, u // 4, st, (u % 4) // 2, :, u % 2, :].view(heads, 32, 2, 2)
            assert torch.equal(dense[:, 16 * st : 16 * st + 16, 8 * u : 8 * u + 8], _b_matrix(regs))


# ---- the HAD kernel (factored randomized Hadamard): the same kind of emulation, at the level of lane registers ----

_G, _T4 = torch.arange(32) // 4, torch.arange(32) % 4


def _a_matrix(regs: torch.Tensor) -> torch.Tensor:
    """mma A fragments (..., 32 lanes, 4 registers, 2 halves) -> the (..., 16, 16) matrix they hold."""
    out = torch.zeros(*regs.shape[:-3], 16, 16, dtype=regs.dtype)
    for j in range(4):
        for h in range(2):
            out[..., _G + 8 * (j % 2), 2 * _T4 + h + 8 * (j // 2)] = regs[..., j, h]
    return out


def _b_matrix(regs: torch.Tensor) -> torch.Tensor:
    """mma B fragments (..., 32, 2 registers, 2 halves) -> the (..., 16, 8) matrix: register j, half h of lane
    (g, t4) is entry (2 t4 + h + 8 j, g)."""
    out = torch.zeros(*regs.shape[:-3], 16, 8, dtype=regs.dtype)
    for j in range(2):
        for h in range(2):
            out[..., 2 * _T4 + h + 8 * j, _G] = regs[..., j, h]
    return out


def _c_regs(mat: torch.Tensor) -> torch.Tensor:
    """A (..., 16, 8) accumulator -> (..., 32, 4): c0, c1 = row g, columns 2 t4, + 1; c2, c3 = row g + 8."""
    return torch.stack([mat[..., _G + 8 * (i // 2), 2 * _T4 + i % 2] for i in range(4)], -1)


def _halves(words: torch.Tensor) -> torch.Tensor:
    """int32 words of float16 pairs (...) -> (..., 2) float16, low half first."""
    w = words.long() & 0xFFFFFFFF
    return torch.stack([w & 0xFFFF, w >> 16], -1).to(torch.int16).view(torch.float16)


def emulate_hadamard(x, codec, perm, mean, scale) -> dict[str, torch.Tensor]:
    """What the HAD kernel computes, register for register: loads, row (group) norms, sign masks, the six mma steps
    with float16 operands, movmatrix, the float16-pair quantizer, the reduce-scatter of the code runs and the word
    stores. Two channel groups (fractional widths at 256): the tile of a permuted row is that of two rows of 128."""
    bsz, heads, rows, dim = x.shape
    td, groups = kencode._layout_dim(codec), len(codec.groups)
    rpt = 256 // td  # tile rows of td coordinates: rows of x, or the two groups of one row
    v = x.float()
    if mean is not None:
        v = v - mean
    if scale is not None:
        v = v * (1.0 / scale)
    v = RowCodec.permute(v, perm)
    pad = -rows % rpt if groups == 1 else 0
    v = torch.nn.functional.pad(v, (0, 0, 0, pad)).reshape(-1, rpt, td)  # (tiles, rows of a tile, td)
    tiles = v.shape[0]
    # lane loads: tile row g + 8 nu, columns 4 t4 .. + 3 -> (row, coordinates)
    r, o = kencode.tile_place(td, _G[:, None] + 8 * torch.arange(2), 4 * _T4[:, None].expand(-1, 2))  # (32, 2)
    vals = v[:, r[..., None], o[..., None] + torch.arange(4)]  # (tiles, 32, 2 nu, 4)
    inv = 1 / v.pow(2).sum(-1).sqrt().clamp_min(1e-30)  # (tiles, rpt): the row sums the shuffles give
    z = (vals * inv[:, r][..., None]).half().reshape(tiles, 32, 4, 2)  # z[2 nu + e] = values 2 e, 2 e + 1
    signs = torch.stack([hadamard_signs(td, g.seed) for g in codec.mse._groups])
    consts = kencode.hadamard_lane_constants(td, signs[0] if groups == 1 else signs)  # (3, 32, 12)
    for k in range(3):
        la, rb = _halves(consts[k, :, :4]), _halves(consts[k, :, 4:8]).view(32, 2, 2, 2).transpose(0, 1)
        m = consts[k, :, 8:].numpy().astype(np.uint32)
        bits16 = z.view(torch.int16).numpy().astype(np.uint16).astype(np.uint32)
        bits16 ^= np.stack([m & 0xFFFF, m >> 16], -1) & 0xFFFF
        zs = torch.from_numpy(bits16.astype(np.uint16).view(np.int16)).view(torch.float16)
        # float16 accumulation: each product's sums rounded once to float16 (the hardware rounds along the way)
        c = [_c_regs(_a_matrix(la).float() @ _b_matrix(zs[:, :, 2 * nu : 2 * nu + 2]).float()) for nu in range(2)]
        a = torch.stack([torch.stack([c[j // 2][..., 2 * (j % 2)], c[j // 2][..., 2 * (j % 2) + 1]], -1)
                         for j in range(4)], -2).half()  # fmt: skip
        d = [_c_regs(_a_matrix(a).float() @ _b_matrix(rb[e]).float()) for e in range(2)]
        z = torch.stack([d[e][..., 2 * nu : 2 * nu + 2] for nu in range(2) for e in range(2)], -2).half()
    # movmatrix: register 2 nu + e <- the transpose of 8 x 8 block (e, nu) (lane (g, t4) half h: its (2 t4 + h, g))
    y = torch.zeros_like(z)
    for nu in range(2):
        for e in range(2):
            for h in range(2):
                lanes = 4 * (2 * _T4 + h) + _G // 2  # lane (g' = 2 t4 + h, t4' = g / 2)
                y[:, :, 2 * nu + e, h] = z[:, lanes, 2 * e + nu, _G % 2]
    tps = kencode._had_constants(codec, "cpu")[1:]
    wide = [codec.groups[min(nu, groups - 1)][0] for nu in range(2)]  # bits of tile rows 8 nu ..
    out = np.zeros((tiles, 32, 4), dtype=np.uint32)
    for j in range(4):
        bits, tp = wide[j // 2], tps[min(j // 2, groups - 1)]
        q = _quantize2(y[:, :, j, 0].float(), y[:, :, j, 1].float(), None, list(tp), bits)
        out[:, :, j] = ((q & 0xFFFF) | ((q >> 16) << bits)) << (2 * bits * _T4.numpy().astype(np.uint32))
    # reduce-scatter over the 4 lanes of a row: lane t4 keeps unit (nu, e) = (t4 & 1, t4 >> 1)
    runs = np.zeros((tiles, 32), dtype=np.uint32)
    for lane in range(32):
        t4 = lane % 4
        quad = range(lane - t4, lane - t4 + 4)
        runs[:, lane] = np.bitwise_or.reduce(out[:, list(quad), 2 * (t4 & 1) + (t4 >> 1)], axis=1)
    codes = [np.zeros((tiles, rpt, td * wide[i] // 8), dtype=np.uint8) for i in range(2)]
    if groups == 2 or wide[0] == 3:  # (WORDS) lane l stores word l, two runs shifted together
        sw = kencode.store_lane_constants(td, tuple(wide), groups == 2).numpy().astype(np.int64)
        for lane in range(32):
            (w0, mask, slot, off) = sw[lane, :4]
            if off < 0:
                continue
            a, b, sa, sb = w0 & 0xFF, (w0 >> 8) & 0xFF, (w0 >> 16) & 0xFF, (w0 >> 24) & 0xFF
            word = (runs[:, a] >> np.uint32(sa)) | ((runs[:, b] << np.uint32(sb)) & np.uint32(mask & 0xFFFFFFFF))
            grp, row = (slot, slot) if groups == 2 else (0, slot)  # (two groups: group i is row i)
            for i in range(4):
                codes[grp][:, row, off + i] = (word >> np.uint32(8 * i)) & 0xFF
    else:  # each lane stores its run
        ur, uo = kencode.tile_place(td, _G + 8 * (_T4 & 1), 8 * (_T4 >> 1))
        for lane in range(32):
            start = int(uo[lane]) // 8 * wide[0]
            for i in range(wide[0]):
                codes[0][:, int(ur[lane]), start + i] = (runs[:, lane] >> np.uint32(8 * i)) & 0xFF
    norms = (1 / inv).reshape(-1, rpt)
    if groups == 1:
        return {"codes0": torch.from_numpy(codes[0]).reshape(bsz, heads, rows + pad, -1)[:, :, :rows],
                "norms0": norms.reshape(bsz, heads, rows + pad)[:, :, :rows]}  # fmt: skip
    return {f"codes{i}": torch.from_numpy(codes[i][:, i]).reshape(bsz, heads, rows, -1) for i in range(2)} | {
        f"norms{i}": norms[:, i].reshape(bsz, heads, rows) for i in range(2)}


@pytest.mark.parametrize("d,bits,dtype,center,scaled",
                         [(256, 4, torch.bfloat16, True, True), (256, 3, torch.float16, False, False),
                          (128, 4, torch.bfloat16, False, True), (128, 3, torch.float16, True, False),
                          (128, 2, torch.bfloat16, True, True), (64, 4, torch.float16, False, True),
                          (64, 3, torch.bfloat16, True, False), (256, 3.5, torch.bfloat16, True, True),
                          (256, 2.5, torch.float16, False, False)])  # fmt: skip
def test_emulated_hadamard_kernel_writes_the_reference_codes(d, bits, dtype, center, scaled):
    """The HAD kernel's index maps (tile layouts, the load-order slots of round 0, the sign masks of each round's
    orientation, the factors per round, the final transposition, the code runs) give RowCodec.encode's codes, except
    where the six float16 roundings move a coordinate across a boundary (one level, under 1%); a wrong sign mask or
    factor leaves about half the codes wrong."""
    g = torch.Generator().manual_seed(d + int(10 * bits))
    x = (torch.randn(2, 2, 37, d, generator=g) * 3 + 0.5).to(dtype)
    codec = RowCodec(d, bits, seed=5)
    assert kencode.hadamard_supported(codec)
    mean = x.float().mean(2, keepdim=True) if center else None
    scale = torch.rand(2, 2, 1, d, generator=g) + 0.5 if scaled else None
    perm = codec.calibrate(x.float() - (0 if mean is None else mean)) if codec.num_outliers else None
    ref = encode_reference(x, codec, perm, mean, scale)
    assert_codes_match(emulate_hadamard(x, codec, perm, mean, scale), ref, codec, mismatch=1e-2, norm_rtol=1e-5)


@pytest.mark.parametrize("d,bits,dtype", [(128, 4, torch.bfloat16), (64, 3, torch.float16), (128, 3, torch.float16)])
def test_emulated_kernel_sketches_the_residual(d, bits, dtype):
    """TurboQuant_prod keys in encode_mma.cu (QJL): the mse codes as for any codec; the QJL signs and residual norms
    as QJL.sketch gives them for the residual of the emulated kernel's own codes (signs of projections within float16
    rounding of zero may flip: under 1%; norms to the float16 sums' 1e-3). A column order of Q that did not match
    the kernel's sign pushes would flip about half the signs."""
    g = torch.Generator().manual_seed(d + bits)
    x = (torch.randn(2, 2, 45, d, generator=g) * 2 + 1).to(dtype)
    codec = RowCodec(d, bits, seed=3, qjl=True)
    mean = x.float().mean(2, keepdim=True)
    scale = torch.rand(2, 2, 1, d, generator=g) + 0.5
    xn = (x.float() - mean) / scale
    out = emulate(x, codec, None, mean, scale)
    assert_codes_match(out, encode_reference(x, codec, None, mean, scale), codec, mismatch=1e-2)
    sketch = codec.quantizer.qjl
    r = xn - codec.decode(out, None, with_qjl=False)
    signs, rnorms = sketch.sketch(r.reshape(-1, d))
    mismatch = (sketch.signs(signs) != sketch.signs(out["qjl"].reshape(-1, sketch.rows // 8))).float().mean()
    assert mismatch < 1e-2, mismatch
    torch.testing.assert_close(out["rnorms"].reshape(-1), rnorms, rtol=3e-3, atol=1e-6)
