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


def _options(d, groups, xt, mean, scale):
    (b0, d0), (b1, d1) = groups[0], (groups[1] if len(groups) > 1 else (groups[0][0], 0))
    opts = dict(kencode.mma_tuning(d), D=d, B0=b0, D0=d0, B1=b1, D1=d1, XT=xt, HAS_MEAN=mean, HAS_SCALE=scale)
    return tuple(f"-D{k}={v}" for k, v in opts.items())


@needs_nvrtc
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"d{c[0]}-" + "+".join(f"{b}x{d}" for b, d in c[1]))
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_compiles(cfg, arch):
    cubin = cuda.compile_cubin(kencode._MMA_SOURCE, arch, _options(*cfg))
    assert cubin[:4] == b"\x7fELF" and b"tq_encode" in cubin


def test_params_struct_matches_the_c_layout():
    """8 pointers, 4 int64, 3 int32, two 8-word boundary tables: 172 bytes, padded to 176 (8-byte alignment)."""
    assert ctypes.sizeof(kencode._MmaParams) == 176
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
    return (s * np.uint32(0x10001) + m * np.uint32(0x10001)) ^ (
        _hgt2(y, np.uint32(0)) & np.uint32(((1 << bits) - 1) * 0x10001)
    )


def _byte_perm(x: np.ndarray, y: np.ndarray, sel: int) -> np.ndarray:
    src = [(x >> np.uint32(8 * i)) & np.uint32(0xFF) for i in range(4)] + [
        (y >> np.uint32(8 * i)) & np.uint32(0xFF) for i in range(4)
    ]
    return sum((src[(sel >> (4 * i)) & 7] << np.uint32(8 * i) for i in range(4)), np.zeros_like(x))


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
    return out


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
