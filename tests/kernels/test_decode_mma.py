"""decode_mma.cu without a GPU: every supported configuration compiles (NVRTC, sm_80 and sm_90), the PRMT tables
hold the centroids, and the ctypes mirror of ``struct Params`` has the C layout. The kernel itself is checked
against the reference on the GPU in test_triton.py (backend="cuda")."""

from __future__ import annotations

import ctypes
import itertools

import pytest
import torch

from turbovq import packing
from turbovq.kernels import cuda
from turbovq.kernels import decode as kdecode
from turbovq.kv.cache import RowCodec

needs_nvrtc = pytest.mark.skipif(not cuda.nvrtc_available(), reason="libnvrtc not installed")

NAMES = (b"tq_decode_split", b"tq_decode_query", b"tq_decode_merge")
# (D, G, key groups, value groups, symmetric 4-bit tables, norm dtype, query dtype, mask dtype, mask, k mean,
# softcap[, QJL keys: (sketch rows, residual norm dtype)]); groups are (bits, channels), outliers first
CONFIGS = [
    (128, 4, [(4, 128)], [(3, 128)], 1, 0, 1, 3, 1, 1, 0),  # Llama-3.1-8B, K4/V3, bool mask, centered keys
    (128, 4, [(4, 128)], [(4, 128)], 1, 1, 0, 0, 1, 1, 0),  # K4/V4, additive float16 mask
    (128, 4, [(4, 128)], [(4, 128)], 0, 2, 2, 3, 0, 0, 0),  # asymmetric 4-bit tables, float32 norms and queries
    (128, 4, [(4, 64), (3, 64)], [(4, 64), (3, 64)], 1, 0, 1, 3, 1, 1, 0),  # 3.5 bits: two groups per side
    (64, 8, [(3, 64)], [(3, 64)], 0, 0, 0, 2, 1, 1, 1),  # 3-bit slices straddling words, soft-capping
    (64, 3, [(4, 64)], [(3, 64)], 1, 0, 1, 1, 1, 0, 0),  # G = 3, bfloat16 mask
    (256, 8, [(3, 256)], [(4, 256)], 0, 1, 0, 1, 3, 0, 1),
    (256, 2, [(4, 128), (3, 128)], [(3, 128), (4, 128)], 1, 0, 0, 3, 0, 0, 0),
    (128, 4, [(3, 64), (2, 64)], [(3, 64), (2, 64)], 1, 0, 1, 3, 1, 1, 0),  # 2.5 bits (value slices: half words)
    (64, 8, [(2, 64)], [(2, 64)], 0, 1, 0, 3, 0, 1, 0),
    (256, 2, [(2, 256)], [(3, 128), (2, 128)], 0, 0, 1, 3, 1, 0, 0),
    (64, 3, [(4, 32), (3, 32)], [(4, 32), (3, 32)], 1, 0, 1, 3, 1, 1, 0),  # 3.5 bits at d 64: 4-code value slices
    (64, 8, [(3, 32), (2, 32)], [(3, 32), (2, 32)], 0, 1, 0, 1, 1, 0, 1),
    (128, 4, [(3, 128)], [(3, 128)], 0, 0, 1, 3, 1, 1, 0, (128, 0)),  # prod K4 (3 mse bits + QJL), Llama shape
    (64, 3, [(3, 32), (2, 32)], [(3, 64)], 0, 1, 0, 3, 0, 0, 1, (64, 1)),  # prod keys, two mse groups
    (256, 8, [(3, 256)], [(4, 256)], 0, 2, 1, 3, 0, 0, 0, (256, 2)),
    (64, 2, [(2, 64)], [(2, 64)], 0, 0, 0, 3, 0, 0, 0, (32, 0)),
]


DTYPES = {code: dtype for dtype, code in kdecode._DTYPE_CODE.items()}


def _options(d, g, kg, vg, sym, norm, qt, mt, mask, kmean, softcap, qjl=None, **tune):
    """decode.py's macros for a CONFIGS row (dtype codes as in _DTYPE_CODE; ``tune`` overrides MMA_TUNING)."""
    sides = []
    for groups in (kg, vg):
        (b0, d0), (b1, d1) = groups[0], (groups[1] if len(groups) > 1 else (groups[0][0], 0))
        sides.append(((b0, d0, b1, d1), (bool(sym and b0 == 4), bool(sym and b1 == 4))))
    opts = kdecode._mma_options(d, g, *sides, DTYPES[norm], DTYPES[norm], DTYPES[qt], DTYPES[mt] if mask else None,
                                kmean, softcap, None, qjl and (qjl[0], DTYPES[qjl[1]]))  # fmt: skip
    return tuple(o for o in opts if o.split("=")[0][2:] not in tune) + tuple(f"-D{k}={v}" for k, v in tune.items())


@pytest.mark.parametrize("mask", [None, torch.bool, torch.float16])
def test_mask_macros(mask):
    """A boolean mask has the same MTYPE code as no mask (3): HAS_MASK must tell them apart."""
    opts = kdecode._mma_options(128, 4, ((4, 128, 4, 0), (True, False)), ((3, 128, 3, 0), (False, False)),
                                torch.float16, torch.float16, torch.bfloat16, mask, True, False)  # fmt: skip
    assert f"-DHAS_MASK={int(mask is not None)}" in opts
    assert f"-DMTYPE={0 if mask == torch.float16 else 3}" in opts


@needs_nvrtc
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"d{c[0]}-g{c[1]}-k{len(c[2])}x{c[2][0][0]}-v{c[3][0][0]}"
                         + (f"-qjl{c[11][0]}" if c[11:] else ""))  # fmt: skip
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_compiles(cfg, arch):
    cubin = cuda.compile_cubin(kdecode._MMA_SOURCE, arch, _options(*cfg))
    assert cubin[:4] == b"\x7fELF" and all(n in cubin for n in NAMES)


@needs_nvrtc
@pytest.mark.parametrize("cfg", [c for c in CONFIGS if not c[11:]][:8], ids=lambda c: f"d{c[0]}-g{c[1]}-k{len(c[2])}")
def test_scaled_builds_compile(cfg):
    """tq_decode_query with key scales, tq_decode_merge with value means and scales (normalized caches)."""
    opts = _options(*cfg, HAS_KSCALE=1, HAS_VMEAN=1, HAS_VSCALE=1)
    cubin = cuda.compile_cubin(kdecode._MMA_SOURCE, "sm_90", opts)
    assert all(n in cubin for n in NAMES)


@needs_nvrtc
@pytest.mark.parametrize("uc,minb,nwarps,ring,vpair,tails_last", [(1, 3, 4, 4, 1, 1), (2, 1, 8, 0, 1, 1),
                                                                    (2, 2, 4, 0, 0, 0)])  # fmt: skip
def test_tuning_variants_compile(uc, minb, nwarps, ring, vpair, tails_last):
    opts = _options(*CONFIGS[0], UC=uc, MINB=minb, NWARPS=nwarps, RING=ring, VPAIR=vpair, TAILS_LAST=tails_last)
    assert NAMES[0] in cuda.compile_cubin(kdecode._MMA_SOURCE, "sm_90", opts)


@needs_nvrtc
@pytest.mark.parametrize("dbg", [1, 2, 3, 4, 7, 8, 9, 10, 11, 12])
def test_timing_experiments_compile(dbg):
    """The DBG builds behind the report's subtractive timings (wrong results on purpose) still compile."""
    assert NAMES[0] in cuda.compile_cubin(kdecode._MMA_SOURCE, "sm_90", _options(*CONFIGS[0], DBG=dbg))


@needs_nvrtc
def test_compile_error_carries_the_log():
    with pytest.raises(cuda.CudaCompileError, match="NVRTC failed"):
        cuda.compile_cubin("__global__ void k() { undefined_thing(); }", "sm_90")


@pytest.mark.parametrize("bits", [3, 4])
def test_byte_tables_hold_the_centroids(bits):
    """Low and high bytes per table word give back the float16 centroids (the whole table, or its upper half)."""
    half = RowCodec(128, bits, seed=0).tensors(0, "cpu")[1].half()
    for cents in ([half] if bits == 3 else [half, half[8:]]):
        words = kdecode.byte_tables(cents)
        k = cents.numel()
        lo = [(words[i // 4] >> (8 * (i % 4))) & 0xFF for i in range(k)]
        hi = [(words[k // 4 + i // 4] >> (8 * (i % 4))) & 0xFF for i in range(k)]
        back = torch.tensor([lo[i] | (hi[i] << 8) for i in range(k)], dtype=torch.int32).to(torch.int16).view(
            torch.float16
        )
        assert torch.equal(back, cents)
        assert len(words) == 8 and all(0 <= w < 2**32 for w in words)


def _prmt(a: int, b: int, sel: int) -> int:
    """``prmt.b32`` with its sign-replicate mode: a selector nibble with bit 3 set gives 0xFF or 0x00 by the top bit
    of the byte it selects."""
    src = [(a >> (8 * i)) & 0xFF for i in range(4)] + [(b >> (8 * i)) & 0xFF for i in range(4)]
    out = 0
    for k in range(4):
        n = (sel >> (4 * k)) & 0xF
        byte = src[n & 7]
        out |= ((0xFF if byte & 0x80 else 0) if n & 8 else byte) << (8 * k)
    return out


def _byte_perm(a: int, b: int, sel: int) -> int:
    """``__byte_perm``: byte k of the result is byte (nibble k of sel) & 7 of the 8 bytes b:a (no sign-replicate)."""
    return _prmt(a, b, sel & 0x7777)


def _blend(a, b, m):  # (a & m) | (b & ~m), on ints or int64 tensors of 32-bit words
    return (a & m) | (b & (~m & 0xFFFFFFFF))


def _spread3_pairs(u):  # transcribed from decode_mma.cu (32-bit words)
    y = _blend(u, (u << 4) & 0xFFFFFFFF, 0xFFF)
    return _blend(y, (y << 2) & 0xFFFFFFFF, 0x3F003F)


def _lookup8(y: int, t: list[int]) -> list[int]:  # transcribed from decode_mma.cu
    yh = y >> 16
    la, ha = _byte_perm(t[0], t[1], y), _byte_perm(t[2], t[3], y)
    lb, hb = _byte_perm(t[0], t[1], yh), _byte_perm(t[2], t[3], yh)
    return [_byte_perm(la, ha, 0x5140), _byte_perm(la, ha, 0x7362), _byte_perm(lb, hb, 0x5140),
            _byte_perm(lb, hb, 0x7362)]  # fmt: skip


def _dec3(u: int, t: list[int]) -> list[int]:  # u: a 32-bit word, codes in bits 0-23
    y = _spread3_pairs(u)
    return _lookup8((y & 0x07070707) | ((y << 1) & 0x70707070), t)


def _dec2(w: int, hb: int, t: list[int]) -> list[int]:
    y = _byte_perm(w, 0, 0x4140 + 0x202 * hb)
    y = (y & 0x000F000F) | ((y << 4) & 0x0F000F00)
    y = (y & 0x03030303) | ((y << 2) & 0x30303030)
    return _lookup8(y, t)


def _dec1(b: int) -> list[int]:  # transcribed from decode_mma.cu, with QJL's table (float16 -1, +1)
    y = (b & 0xF) | ((b & 0xF0) << 12)
    y = (y | (y << 6)) & 0x03030303
    return _lookup8((y | (y << 3)) & 0x11111111, [0, 0, 0x3CBC, 0])


def _dec4_sym(w: int, t: list[int]) -> list[int]:  # transcribed from decode_mma.cu (dec4<true>)
    w4 = (w << 4) & 0xFFFFFFFF
    ma, mb = _prmt(w4, w, 0xD9C8), _prmt(w4, w, 0xFBEA)
    idx = w & 0x77777777
    idh = idx >> 16
    la, lb = _prmt(t[0], t[1], idx), _prmt(t[0], t[1], idh)
    ha = _prmt(t[2], t[3], idx) | (~ma & 0x80808080)
    hb = _prmt(t[2], t[3], idh) | (~mb & 0x80808080)
    return [_byte_perm(la, ha, 0x5140), _byte_perm(la, ha, 0x7362), _byte_perm(lb, hb, 0x5140),
            _byte_perm(lb, hb, 0x7362)]  # fmt: skip


def test_symmetric_4bit_decoder_reads_sign_magnitude_codes():
    """dec4<SYM> on the cache's sign-magnitude codes (the table: the centroids' upper half) gives every code's
    centroid, as RowCodec.tensors orders them; the table is symmetric in that order (decode.sign_symmetric)."""
    half = RowCodec(128, 4, seed=0).tensors(0, "cpu")[1].half()
    assert kdecode.sign_symmetric(half) and not kdecode.sign_symmetric(torch.cat([half[:8].flip(0), half[8:]]))
    t = kdecode.byte_tables(half[8:])
    g = torch.Generator().manual_seed(4)
    for _ in range(64):
        codes = torch.randint(0, 16, (8,), generator=g).tolist()
        out = _dec4_sym(sum(c << (4 * i) for i, c in enumerate(codes)), t)
        pairs = torch.tensor([[w & 0xFFFF, w >> 16] for w in out], dtype=torch.int32).reshape(-1)
        assert torch.equal(pairs.to(torch.int16).view(torch.float16), half[codes]), codes


@pytest.mark.parametrize("rows", [32, 64, 128, 256])
def test_sign_slices_decode_to_plus_minus_one(rows):
    """QJL keys: decode_slice's 1-bit path (lane t4's RQ / 4 signs, from the bytes of its raw words as it selects
    them) gives +-1 in coordinate pairs, bit set = +1, for the bits as QJL.sketch packs them."""
    g = torch.Generator().manual_seed(rows)
    bits = torch.randint(0, 2, (rows,), generator=g)
    words = packing.pack(bits.to(torch.uint8), 1).view(torch.int32).tolist()  # the kernel's view of one row
    nc = rows // 4
    for t4 in range(4):
        c0 = t4 * nc
        raw = [words[(c0 >> 5) + i] & 0xFFFFFFFF for i in range(max(1, nc // 32))]
        sh = c0 & 31
        out = []
        for j in range(nc // 8):
            src = raw[0] >> sh if nc in (8, 16) else raw[j // 4]
            out += _dec1((src >> (8 * (j % 4))) & 0xFF)
        pairs = torch.tensor([[w & 0xFFFF, w >> 16] for w in out], dtype=torch.int32).reshape(-1)
        got = pairs.to(torch.int16).view(torch.float16).float()
        assert torch.equal(got, bits[c0 : c0 + nc].float() * 2 - 1), t4


def _funnel_r(lo: int, hi: int, sh: int) -> int:
    return ((hi << 32 | lo) >> sh) & 0xFFFFFFFF


@pytest.mark.parametrize("bits", [2, 3])
def test_slice_decoders_give_the_centroids_in_coordinate_pairs(bits):
    """The 2- and 3-bit paths of ``decode_slice`` (a Python transcription of their bit operations) turn a packed
    slice into half2 words of (coordinate 2j, 2j + 1) centroids, for every code and both halves of a 2-bit word;
    4-code slices (32-channel groups) from any start bit, across a word boundary at 3 bits."""
    half = RowCodec(128, bits, seed=0).tensors(0, "cpu")[1].half()
    t = kdecode.byte_tables(torch.nn.functional.pad(half, (0, 8 - half.numel())))  # as _Side pads 2-bit tables
    g = torch.Generator().manual_seed(bits)
    for _ in range(50):
        codes = torch.randint(0, 2**bits, (16,), generator=g).tolist()
        word = sum(c << (bits * i) for i, c in enumerate(codes))  # LSB first, as RowCodec packs
        if bits == 2:
            out = _dec2(word, 0, t) + _dec2(word, 1, t)  # NC = 16: j & 1; NC = 8: the half at sh >> 4
        else:
            out = _dec3(word & 0xFFFFFFFF, t) + _dec3((word >> 24) & 0xFFFFFFFF, t)  # as decode_slice: no mask
        pairs = torch.tensor([[w & 0xFFFF, w >> 16] for w in out], dtype=torch.int32).reshape(-1)
        got = pairs.to(torch.int16).view(torch.float16)
        assert torch.equal(got, half[codes]), (codes, got)
        for lane in range(8):  # NC = 4: value slice of lane g = lane starts at bit 4 bits g of its row
            bit = 4 * bits * lane
            row = sum(c << (bits * i) for i, c in enumerate(codes + codes))  # 32 codes
            w0, w1 = (row >> (32 * (bit // 32))) & 0xFFFFFFFF, (row >> (32 * (bit // 32 + 1))) & 0xFFFFFFFF
            sh = bit % 32
            out = _dec2(w0 >> sh, 0, t) if bits == 2 else _dec3(_funnel_r(w0, w1, sh) & 0xFFF, t)
            pairs = torch.tensor([[w & 0xFFFF, w >> 16] for w in out[:2]], dtype=torch.int32).reshape(-1)
            want = (codes + codes)[4 * lane : 4 * lane + 4]
            assert torch.equal(pairs.to(torch.int16).view(torch.float16), half[want]), (lane, want)


def test_spread3_over_every_input():
    """spread3's one-op steps leave bits that later masks drop: for every 24-bit input, and any junk in bits 24-31,
    code k ends in nibble k with each nibble's top bit (PRMT's sign-replicate flag) clear."""
    u = torch.arange(1 << 24, dtype=torch.int64)
    junk = torch.randint(0, 256, (1 << 24,), generator=torch.Generator().manual_seed(0), dtype=torch.int64) << 24
    y = _spread3_pairs(u | junk)
    y = (y & 0x07070707) | ((y << 1) & 0x70707070)
    want = sum(((u >> (3 * k)) & 7) << (4 * k) for k in range(8))
    assert torch.equal(y, want)


def _vslot(i: int) -> int:
    return 8 * (i // 8) + (2 * (i % 8) if i % 8 < 4 else 2 * (i % 8) - 7)


def test_value_pairs_give_token_pairs_per_coordinate():
    """VPAIR (value_group): the 3-bit value slices of two tokens (16 codes each, lane g's slice starts at bit 48 g of
    a 128-channel row), read as three half words (``halfw3``), spread, nibble-interleaved and looked up, give one half2
    per coordinate holding (token a, token b) at that coordinate, in ``vslot`` order."""
    half = RowCodec(128, 3, seed=0).tensors(0, "cpu")[1].half()
    t = kdecode.byte_tables(half)
    g = torch.Generator().manual_seed(0)
    for lane in range(8):
        rows = [torch.randint(0, 8, (128,), generator=g).tolist() for _ in range(2)]  # tokens a, b
        packed = [sum(c << (3 * i) for i, c in enumerate(r)) for r in rows]
        raws = []
        for p in packed:  # load_slice<3, 16, 2>: half words 3 g .. 3 g + 2, each block's 24 bits in a word
            h0, h1, h2 = ((p >> (16 * (3 * lane + k))) & 0xFFFF for k in range(3))
            raws.append([(h1 * 0x10000 + h0) & 0xFFFFFFFF, (h2 * 0x100 + (h1 >> 8)) & 0xFFFFFFFF])
        regs = []
        for j in range(2):
            ya, yb = (_spread3_pairs(raw[j]) for raw in raws)  # code_block<3, 16, 2>
            ze = (ya & 0x07070707) | ((yb << 4) & 0x70707070)
            zo = ((ya >> 3) & 0x07070707) | ((yb << 1) & 0x70707070)
            regs += _lookup8(ze, t) + _lookup8(zo, t)
        for i, w in enumerate(regs):
            c = 16 * lane + _vslot(i)
            got = torch.tensor([w & 0xFFFF, w >> 16], dtype=torch.int32).to(torch.int16).view(torch.float16)
            assert torch.equal(got, half[[rows[0][c], rows[1][c]]]), (lane, i)
    assert sorted(_vslot(i) for i in range(16)) == list(range(16))


def test_ring_bytes():
    """The host sizes decode_mma.cu's shared-memory ring as RING_BYTES does: per warp and slot, one 32-token unit of
    each code and norm array plus 16 bytes of alignment slack each."""
    tuning = {"NWARPS": 4, "UC": 2, "MINB": 3, "RING": 2}
    k4v3 = kdecode._ring_bytes(tuning, (4, 128, 4, 0), (3, 128, 3, 0), torch.float16, torch.float16)
    assert k4v3 == 4 * 2 * ((2048 + 16) + (1536 + 16) + 2 * (64 + 16))
    two = kdecode._ring_bytes(tuning, (4, 64, 3, 64), (4, 64, 3, 64), torch.float32, torch.bfloat16)
    assert two == 4 * 2 * (2 * ((1024 + 16) + (768 + 16)) + 2 * (128 + 16) + 2 * (64 + 16))
    assert kdecode._ring_bytes({**tuning, "RING": 0}, (4, 128, 4, 0), (3, 128, 3, 0), torch.float16,
                               torch.float16) == 0  # fmt: skip
    prod = kdecode._ring_bytes(tuning, (3, 128, 3, 0), (3, 128, 3, 0), torch.float16, torch.float16,
                               (128, torch.bfloat16))  # fmt: skip
    assert prod == 4 * 2 * (2 * ((1536 + 16) + (64 + 16)) + (512 + 16) + (64 + 16))  # + signs and residual norms


@pytest.mark.parametrize(
    "dim,bits,ok", [(128, 4, True), (64, 3.5, True), (64, 2.5, True), (256, 2.5, True), (128, 3.25, False),
                    (256, 3.25, False), (128, 1, False), (128, 3.75, False)],
)  # fmt: skip
def test_mma_groups(dim, bits, ok):
    """The CUDA split pass takes 2-4-bit groups of 32/64/128/256 channels: not 3.25 bits' 96- or 192-channel
    groups (no kernel does: codec_supported) nor 1-bit codes (Triton)."""
    assert kdecode.mma_groups_ok(RowCodec(dim, bits)) is ok


def test_params_struct_matches_the_c_layout():
    """17 pointers, 9 int64, 9 int32, 3 float32, four 8-word tables, the trace pointer (8-byte aligned), the query
    kernel's two pointers, 3 x 8 sign words and a flag: 512 bytes; MergeParams: 4 pointers, 2 int32, 3 x 8 words:
    136 bytes."""
    fields = dict(kdecode._MmaParams._fields_)
    assert ctypes.sizeof(kdecode._MmaParams) == 512
    assert kdecode._MmaParams.ktab.offset == 17 * 8 + 9 * 8 + 9 * 4 + 3 * 4
    assert kdecode._MmaParams.vtab.offset == kdecode._MmaParams.ktab.offset + 64
    assert kdecode._MmaParams.trace.offset == 384
    assert (kdecode._MmaParams.ksg.offset, kdecode._MmaParams.early.offset) == (408, 504)
    assert fields["scaling"] is ctypes.c_float and list(itertools.islice(fields, 2)) == ["ws", "part"]
    assert ctypes.sizeof(kdecode._MergeParams) == 136 and kdecode._MergeParams.vsg.offset == 40


def _lane_hadamard(x: torch.Tensor, words, inverse: bool = False) -> torch.Tensor:
    """decode_mma.cu's flip_signs / sylvester as written, on (32 lanes, EC) float64: the forward rotation
    (tq_decode_query, with HNORM) or its inverse (tq_decode_merge)."""
    ec = x.shape[1]
    lane = torch.arange(32)[:, None]
    coord = ec * lane + torch.arange(ec)

    def flip(x, w):
        bits = torch.tensor(w, dtype=torch.int64)[coord >> 5] >> (coord & 31) & 1
        return x * (1 - 2 * bits)

    def sylvester(x):
        x = x.clone()
        h = 1
        while h < ec:
            for i in range(ec):
                if not i & h:
                    a, b = x[:, i].clone(), x[:, i + h].clone()
                    x[:, i], x[:, i + h] = a + b, a - b
            h *= 2
        for m in (1, 2, 4, 8, 16):
            sg = torch.where(lane & m != 0, -1.0, 1.0).double()
            x = x * sg + x[lane[:, 0] ^ m]
        return x

    if inverse:
        x = sylvester(x)
        for k in (2, 1):
            x = sylvester(flip(x, words[k]))
        x = flip(x, words[0])
    else:
        for k in range(3):
            x = sylvester(flip(x, words[k]))
    return x / (32 * ec) ** 1.5


@pytest.mark.parametrize("dim", [64, 128, 256])
def test_lane_hadamard_is_the_codecs_rotation(dim):
    """The sign words (hadamard_words) read by decode_mma.cu's lane transform give the codec's rotation, x @ A, and
    its inverse; fractional widths (two groups) and a permutation fall back to the dense R (None)."""
    codec = RowCodec(dim, 3, seed=5)
    words = kdecode.hadamard_words(codec, None)
    a = codec.tensors(0, "cpu")[0].double()
    x = torch.randn(dim, dtype=torch.float64)
    y = _lane_hadamard(x.reshape(32, -1), words).reshape(-1)
    torch.testing.assert_close(y, x @ a)
    back = _lane_hadamard(y.reshape(32, -1), words, inverse=True).reshape(-1)
    torch.testing.assert_close(back, x)
    assert kdecode.hadamard_words(RowCodec(dim, 3.5, seed=5), None) is None
    assert kdecode.hadamard_words(codec, torch.arange(dim)[None]) is None
    assert kdecode.hadamard_words(RowCodec(dim, 3, seed=5, rotation="haar"), None) is None


def test_launch_config_mirrors_the_driver_structs():
    """cuda.py's ctypes mirrors of CUlaunchAttribute (id, padding, 64-byte value union) and CUlaunchConfig (grid,
    block, shared memory, stream, attributes) for the programmatic dependent launch."""
    assert ctypes.sizeof(cuda._LaunchAttribute) == 72 and cuda._LaunchAttribute.value.offset == 8
    assert ctypes.sizeof(cuda._LaunchConfig) == 56
    assert (cuda._LaunchConfig.stream.offset, cuda._LaunchConfig.attrs.offset) == (32, 40)
    assert cuda._LaunchConfig.num_attrs.offset == 48


@pytest.mark.parametrize("n,bh,want", [(8064, 8, 8), (32640, 8, 32), (130944, 8, 32), (8064, 64, 8), (32640, 64, 17),
                                       (32640, 256, 5), (100, 8, 1)])  # fmt: skip
def test_cuda_split_counts(n, bh, want):
    """The CUDA path's splits per (b, h) on a 132-SM card: >= 1024 tokens each, at most 32, ~8 waves of programs
    (the counts measured best or near it in kernels_tune_splits.json)."""
    ms = kdecode.MMA_SPLITS
    got = kdecode.default_splits(n, bh, ms["min_tokens"], torch.device("cpu"), max_splits=ms["max_splits"])
    assert got == want


@pytest.mark.parametrize("n,bh,slots,want", [(130944, 64, 396, 18), (32640, 64, 396, 18), (32640, 64, 528, 21),
                                             (32640, 256, 396, 6), (8064, 8, 396, 8), (32640, 8, 396, 32),
                                             (130944, 64, 1088, 17)])  # fmt: skip
def test_cuda_splits_fill_the_last_wave(n, bh, slots, want):
    """Up to a quarter more splits than default_splits where that fills more of the last wave of ``slots`` blocks
    (17 -> 18 at bh 64 on 396 slots: 1152 of 1188 busy instead of 1088); never past the caps; an exact fit stays."""
    got = kdecode.mma_splits(n, bh, slots, torch.device("cpu"))
    assert got == want
    lo = kdecode.default_splits(n, bh, 1024, torch.device("cpu"), max_splits=32)
    assert lo <= got <= max(lo, min(lo + lo // 4, 32, -(-n // 1024)))


@pytest.mark.parametrize("frac,div,grow", [(0.0, 4, 1.0), (0.25, 4, 1.0), (0.3, 3, 1.5), (0.9, 8, 2.0)])
@pytest.mark.parametrize("n", [20, 1000, 8064, 32640, 130944])
def test_guided_pieces_cover_the_codes(monkeypatch, n, frac, div, grow):
    """Long pieces then short ones tile [0, n) in whole units, none empty; without guidance (frac 0) they are the
    splits."""
    monkeypatch.setitem(kdecode.MMA_GUIDE, "frac", frac)
    monkeypatch.setitem(kdecode.MMA_GUIDE, "div", div)
    monkeypatch.setitem(kdecode.MMA_GUIDE, "grow", grow)
    split_len = -(-n // (18 * 32)) * 32
    n_long, long_len, n_short, short_len = kdecode.guided_pieces(n, split_len, 32)
    assert long_len % 32 == 0 and short_len % 32 == 0 and n_long >= 0 and n_short >= 0
    last = n_long * long_len + (n_short - 1) * short_len if n_short else (n_long - 1) * long_len
    assert n_long * long_len + n_short * short_len >= n > last  # covered, and the last piece not empty
    if frac == 0:
        assert (n_long, long_len, n_short) == (-(-n // split_len), split_len, 0)
    else:
        assert n_short >= 1 and short_len <= max(32, split_len // div + 32)
        assert n_long * long_len <= n * (1 - frac)
