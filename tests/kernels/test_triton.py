"""The GPU kernels (Triton, and the CUDA ones with backend="cuda") vs their pure-torch references (skipped without
CUDA and triton).

Tolerances: decode output vs ``attend_codes`` (float32) by ||out - ref|| / ||ref||: < 4e-3 for float16 queries,
< 1e-2 for bfloat16 (the output rounding alone is ~2e-3 in bf16; float16 tensor-core operands for centroids and
``p * ||v||`` add ~5e-4). Encode: norms to 1e-5 relative (the CUDA kernel's group norms of fractional widths to
5e-4); codes as ``RowCodec.encode`` writes them except
coordinates within rounding of a boundary, each off by one level: < 1e-4 of codes with a float32-accurate rotation
(3xTF32), < 1e-2 with tf32 or float16 operands (the CUDA kernel).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
pytest.importorskip("transformers")

from conftest import assert_codes_match  # noqa: E402

from turbovq.kernels import encode as kencode  # noqa: E402
from turbovq.kernels.decode import decode_attention, mma_groups_ok, supported  # noqa: E402
from turbovq.kernels.encode import encode_rows  # noqa: E402
from turbovq.kernels.reference import decode_reference, encode_reference  # noqa: E402
from turbovq.kv.cache import PackedRows, RowCodec  # noqa: E402

pytestmark = pytest.mark.gpu


def make_case(dev, d, hq, hkv, b, n, t, key_bits, value_bits, dtype, center, seed=0, qjl=False):
    """Normalized (mean + per-channel scale) when ``center == "scaled"``, as the cache's default layers are;
    ``qjl``: TurboQuant_prod keys."""
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(b, hq, 1, d, generator=g)
    keys = torch.randn(b, hkv, n + t, d, generator=g) * 2 + 3.0 * torch.randn(1, hkv, 1, d, generator=g)
    keys[..., :4] *= 5
    values = torch.randn(b, hkv, n + t, d, generator=g)
    query, keys, values = query.to(dev), keys.to(dev), values.to(dev)

    def packed(codec, x):
        mean = x.mean(dim=2, keepdim=True) if center else None
        xc = x - mean if center else x
        scale = xc.pow(2).mean(dim=2, keepdim=True).sqrt().clamp_min(1e-3) ** 0.5 if center == "scaled" else None
        xc = xc if scale is None else xc / scale
        perm = codec.calibrate(xc)
        fields = codec.encode(xc, perm)
        fields = {k: (v.half() if "norms" in k else v) for k, v in fields.items()}  # the cache stores float16
        return PackedRows(codec, fields, perm, n, mean, scale)

    kc, vc = RowCodec(d, key_bits, seed=1, qjl=qjl), RowCodec(d, value_bits, seed=2)
    tk, tv = keys[:, :, n:].to(dtype), values[:, :, n:].to(dtype)
    return query.to(dtype), packed(kc, keys[:, :, :n]), packed(vc, values[:, :, :n]), tk, tv


# (head_dim, q heads, kv heads, batch, compressed n, tail t, key bits, value bits, dtype, center, mask, softcap
#  [, TurboQuant_prod keys])
DECODE_CASES = [
    (128, 32, 8, 2, 1000, 130, 4, 3, torch.bfloat16, "scaled", True, None),  # Llama-3.1-8B heads
    (128, 32, 8, 1, 777, 0, 4, 4, torch.float16, False, False, None),
    (128, 8, 8, 3, 513, 64, 3.5, 3.5, torch.bfloat16, True, False, None),  # MHA
    (128, 16, 2, 2, 300, 17, 2.5, 2.5, torch.float16, "scaled", True, None),
    (64, 12, 4, 2, 450, 5, 2, 3, torch.float16, True, False, 30.0),  # soft-capping
    (64, 9, 3, 2, 129, 33, 3.5, 2.5, torch.bfloat16, "scaled", True, None),  # SmolLM2 heads, G = 3
    (256, 4, 1, 2, 700, 40, 4, 3, torch.bfloat16, True, True, None),  # Gemma-3 heads, MQA
    (256, 8, 2, 1, 200, 0, 2.5, 3.5, torch.float16, False, False, None),
    (128, 32, 8, 4, 5000, 100, 4, 3, torch.bfloat16, True, False, None),
    (64, 64, 8, 1, 300, 10, 4, 2, torch.float16, True, False, None),  # G = 8
    (64, 8, 1, 2, 300, 20, 3, 3, torch.float16, True, True, 30.0),  # CUDA split: 3-bit slices straddle words
    (128, 4, 4, 2, 999, 7, 3, 4, torch.float32, "scaled", False, None),  # G = 1, float32 queries
    (256, 16, 2, 1, 2000, 0, 3, 3, torch.bfloat16, False, True, None),  # no tail window
    (128, 8, 2, 2, 20, 3, 4, 3, torch.float16, False, True, None),  # fewer codes than one 32-token unit
    (128, 32, 8, 2, 900, 70, 3.5, 3.5, torch.bfloat16, "scaled", True, None),  # CUDA split: two groups per side
    (256, 8, 2, 1, 700, 20, 3.5, 4, torch.float16, True, False, None),
    (128, 32, 8, 2, 1000, 50, 2, 2, torch.bfloat16, "scaled", True, None),  # CUDA split: 2-bit slices
    (64, 16, 2, 2, 333, 9, 2.5, 2, torch.float16, False, False, None),  # 2-bit value slices of half a word
    (64, 16, 2, 2, 700, 12, 3.5, 3.5, torch.float16, True, False, None),  # CUDA split: 32-channel groups, G = 8
    (128, 32, 8, 2, 1000, 130, 4, 3, torch.bfloat16, "scaled", True, None, True),  # QJL keys
    (64, 12, 4, 2, 450, 5, 3.5, 3, torch.float16, True, False, 30.0, True),  # QJL keys, two mse groups, soft-capping
    (256, 8, 2, 1, 300, 20, 2, 4, torch.float16, False, True, None, True),  # QJL keys with 1-bit mse codes (Triton)
    (256, 8, 2, 1, 300, 20, 4, 4, torch.float16, False, True, None, True),  # QJL keys, 256-row sketch (CUDA: 2 words)
]


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: f"d{c[0]}-h{c[1]}/{c[2]}-b{c[3]}-n{c[4]}-k{c[6]}v{c[7]}"
                         + ("-qjl" if c[12:] else ""))  # fmt: skip
def test_decode_matches_reference(cuda, case, backend):
    d, hq, hkv, b, n, t, kb, vb, dtype, center, with_mask, softcap, *qjl = case
    q, pk, pv, tk, tv = make_case(cuda, d, hq, hkv, b, n, t, kb, vb, dtype, center, qjl=bool(qjl))
    if backend == "cuda" and not _cuda_split_applies(q, pk, pv, hq // hkv):
        pytest.skip("outside decode_mma.cu's scope")
    mask = None
    if with_mask:
        mask = torch.ones(b, 1, 1, n + t, dtype=torch.bool, device=cuda)
        mask[-1, ..., : n // 3] = False  # left padding of the last row
    assert supported(q, pk, pv)
    ref = decode_reference(q, pk, pv, tk, tv, mask, d**-0.5, softcap).float()
    # (splits, fused: last program merges, trans=False: the (G x T) @ (T x D) orientation); "cuda": decode_mma.cu
    variants = [(None, False, True), (1, False, True), (7, False, True)]
    if backend == "triton":
        variants += [(7, True, True), (None, False, False)]
    for splits, fused, trans in variants:
        for _ in range(2):  # the second call reuses the cached layer constants and the arrival counters
            out = decode_attention(q, pk, pv, tk, tv, mask, d**-0.5, softcap, num_splits=splits, fused_reduce=fused,
                                   trans=trans, backend=backend)  # fmt: skip
        assert out.shape == (b, 1, hq, d) and out.dtype == dtype
        assert torch.isfinite(out).all()
        err = ((out.float() - ref).norm() / ref.norm()).item()
        assert err < (4e-3 if dtype == torch.float16 else 1e-2), (splits, fused, backend, err)
    if mask is not None:  # an additive float mask in the model dtype gives the same result as the boolean one
        fmask = torch.zeros(mask.shape, dtype=dtype, device=cuda).masked_fill(~mask, torch.finfo(dtype).min)
        out_f = decode_attention(q, pk, pv, tk, tv, fmask, d**-0.5, softcap)
        torch.testing.assert_close(out_f, decode_attention(q, pk, pv, tk, tv, mask, d**-0.5, softcap))


HADAMARD_CASES = [c for c in DECODE_CASES if float(c[6]).is_integer() and float(c[7]).is_integer() and not c[12:]]


@pytest.mark.parametrize("case", HADAMARD_CASES, ids=lambda c: f"d{c[0]}-h{c[1]}/{c[2]}-n{c[4]}-k{c[6]}v{c[7]}")
def test_hadamard_query_and_merge_match_the_dense_kernels(cuda, monkeypatch, case):
    """decode_mma.cu's query and merge kernels (the rotation "hadamard" in factored form, float32) give the output of
    the Triton query and merge kernels (the dense R, 3xTF32) to within the float16 rounding of the rotated query."""
    from turbovq.kernels import decode as kdecode

    d, hq, hkv, b, n, t, kb, vb, dtype, center, with_mask, softcap = case
    q, pk, pv, tk, tv = make_case(cuda, d, hq, hkv, b, n, t, kb, vb, dtype, center)
    if not _cuda_split_applies(q, pk, pv, hq // hkv):
        pytest.skip("outside decode_mma.cu's scope")
    assert kdecode.hadamard_words(pk.codec, pk.perm) and kdecode.hadamard_words(pv.codec, pv.perm)
    mask = torch.ones(b, 1, 1, n + t, dtype=torch.bool, device=cuda) if with_mask else None
    out = decode_attention(q, pk, pv, tk, tv, mask, d**-0.5, softcap, backend="cuda").float()
    monkeypatch.setitem(kdecode.MMA_GUIDE, "hadamard_query", 0)
    monkeypatch.setitem(kdecode.MMA_GUIDE, "hadamard_merge", 0)
    dense = decode_attention(q, pk, pv, tk, tv, mask, d**-0.5, softcap, backend="cuda").float()
    assert ((out - dense).norm() / dense.norm()).item() < 2e-3


def _cuda_split_applies(q, pk, pv, groups) -> bool:
    """decode_mma.cu's scope: its channel groups (mma_groups_ok), QJL sketches of 32-256 rows, head_dim 64/128/256,
    G <= 8."""
    rows = pk.codec.quantizer.qjl.rows if pk.codec.qjl else 32
    ok = mma_groups_ok(pk.codec) and mma_groups_ok(pv.codec) and rows in (32, 64, 128, 256)
    return ok and q.shape[-1] in (64, 128, 256) and groups <= 8


def test_cuda_backend_refuses_what_it_cannot_run(cuda):
    q, pk, pv, tk, tv = make_case(cuda, 128, 16, 1, 1, 100, 4, 4, 3, torch.float16, False)  # G = 16 heads per KV head
    with pytest.raises(ValueError, match="CUDA split pass"):
        decode_attention(q, pk, pv, tk, tv, None, 128**-0.5, backend="cuda")
    with pytest.raises(ValueError, match="backend"):
        decode_attention(q, pk, pv, tk, tv, None, 128**-0.5, backend="cutlass")


ENCODE_CASES = [
    (128, 4, torch.bfloat16, True),
    (128, 3, torch.float16, False),
    (128, 3.5, torch.bfloat16, True),
    (128, 2.5, torch.float32, True),
    (64, 2, torch.float16, False),
    (64, 3.5, torch.bfloat16, False),
    (256, 4, torch.bfloat16, True),
    (256, 2.5, torch.float16, True),
]


@pytest.mark.parametrize("d,bits,dtype,center", ENCODE_CASES)
def test_encode_matches_row_codec(cuda, d, bits, dtype, center):
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(3, 4, 1001, d, generator=g) * 2 + 1).to(cuda, dtype)
    x[0, 1, 7] = 0  # a zero row: the epsilon path
    codec = RowCodec(d, bits, seed=3)
    mean = x.float().mean(2, keepdim=True) if center else None
    scale = torch.rand(3, 4, 1, d, device=cuda) + 0.5 if center else None
    perm = codec.calibrate(x.float() - (0 if mean is None else mean))
    ref = encode_reference(x, codec, perm, mean, scale)
    # (float32-accurate rotation: codes differ only at float32 ties; one-pass tf32: where |y| is within ~1e-3 of a
    # boundary, i.e. a small fraction of coordinates, each by one level)
    exact = {"precision": "tf32x3", "backend": "triton"}
    cuda_kernel = dtype != torch.float32  # the default for 16-bit input: float16 operands, group norms to 5e-4
    default_tol, default_norm = (1e-2, 5e-4 if codec.num_outliers else 1e-5) if cuda_kernel else (1e-4, 1e-5)
    for kw, tol, norm_tol in (
        (exact, 1e-4, 1e-5),
        ({**exact, "symmetric": False}, 1e-4, 1e-5),
        ({"precision": "tf32", "backend": "triton"}, 1e-2, 1e-5),
        ({}, default_tol, default_norm),
    ):
        out = encode_rows(x, codec, perm, mean, scale, **kw)
        assert_codes_match(out, ref, codec, mismatch=tol, norm_rtol=norm_tol)


ENCODE_CUDA_CASES = [  # (head_dim, bits, dtype, centered, channel scales)
    (d, bits, dtype, center, scaled)
    for d in (64, 128, 256)
    for bits in (4, 3, 2, 3.5, 2.5)
    for dtype, center, scaled in ((torch.bfloat16, False, True), (torch.float16, True, False))
]


@pytest.mark.parametrize("d,bits,dtype,center,scaled", ENCODE_CUDA_CASES)
def test_encode_cuda_matches_row_codec(cuda, d, bits, dtype, center, scaled):
    """encode_mma.cu, both kernels: norms to float32 rounding (group norms of fractional widths, from the rotated
    outputs, to 5e-4); codes as RowCodec.encode's except where the float16 operands move a coordinate across a
    boundary (one level, under 1%); rows of a strided window (the cache's flush) and a tail of rows that fills no
    whole tile (nor a whole HAD tile of 2 or 4 rows)."""
    from turbovq.kernels.encode import mma_supported

    g = torch.Generator().manual_seed(d + int(10 * bits))
    window = (torch.randn(2, 3, 1200, d, generator=g) * 2 + 1).to(cuda, dtype)
    x = window[:, :, :1001]  # strided like self.keys[..., :n, :]
    window[0, 1, 7] = 0  # a zero row: the epsilon path
    codec = RowCodec(d, bits, seed=3)
    mean = x.float().mean(2, keepdim=True) if center else None
    scale = torch.rand(2, 3, 1, d, device=cuda) + 0.5 if scaled else None
    perm = codec.calibrate(x.float() - (0 if mean is None else mean)) if codec.num_outliers else None
    assert mma_supported(x, codec)
    ref = encode_reference(x, codec, perm, mean, scale)
    # integer widths: the factored Hadamard kernel and the dense-R one
    for hadamard in (True, False) if kencode.hadamard_supported(codec) else (None,):
        out = encode_rows(x, codec, perm, mean, scale, backend="cuda", hadamard=hadamard)
        assert_codes_match(out, ref, codec, mismatch=1e-2, norm_rtol=5e-4 if codec.num_outliers else 1e-5)
        if mean is None:  # the zero row
            assert all(torch.equal(out[k][0, 1, 7], ref[k][0, 1, 7]) for k in ref if k.startswith("codes"))


@pytest.mark.parametrize("d,bits,dtype", [(64, 4, torch.bfloat16), (128, 4, torch.float32), (128, 3.5, torch.float16),
                                          (256, 3, torch.bfloat16), (128, 2, torch.float32), (128, 4, torch.bfloat16),
                                          (128, 3, torch.float16)])  # fmt: skip
def test_encode_qjl_matches_row_codec(cuda, d, bits, dtype):
    """TurboQuant_prod keys: mse codes as for any codec; the QJL signs and residual norms as QJL.sketch gives them for
    the residual of the kernel's own codes (where a code moved by one level at a boundary, so does the residual):
    float32-accurate for float32 rows (tf32x3), a few signs of projections within ~1e-3 of zero for 16-bit rows
    (one-pass tf32 in Triton, float16 residuals in CUDA, whose residual norms are float16 sums: 1e-2); and the inner
    products they give are unbiased: over 64 query directions (QJL is unbiased over
    its random sketch; for one fixed sketch, single directions scatter by ~1%), <q, k_hat> regresses on <q, k> with
    slope 1, while the mse codes alone give 0.64-0.97 here (tens of standard errors off)."""
    g = torch.Generator().manual_seed(d + int(10 * bits))
    x = (torch.randn(2, 4, 700, d, generator=g) * 2 + 1).to(cuda, dtype)
    codec = RowCodec(d, bits, seed=3, qjl=True)
    mean = x.float().mean(2, keepdim=True)
    scale = (torch.rand(2, 4, 1, d, generator=g) + 0.5).to(cuda)
    xn = (x.float() - mean) / scale
    perm = codec.calibrate(xn)
    assert kencode.supported(x, codec)
    ref = encode_reference(x, codec, perm, mean, scale)
    exact = dtype == torch.float32
    q = torch.randn(d, 64, generator=g).to(cuda)
    a = xn.reshape(-1, d) @ q
    # encode_mma.cu (16-bit rows, one group at head_dim 64/128: float16 residuals and sums) and the Triton kernel
    for backend in ("cuda", "triton") if kencode.mma_supported(x, codec) else ("auto",):
        out = encode_rows(x, codec, perm, mean, scale, backend=backend)
        assert_codes_match(out, ref, codec, mismatch=1e-4 if exact else 1e-2)
        sketch = codec.quantizer.qjl
        r = xn - codec.decode(out, perm, with_qjl=False)
        signs, rnorms = sketch.sketch(r.reshape(-1, d))
        mismatch = (sketch.signs(signs) != sketch.signs(out["qjl"].reshape(-1, out["qjl"].shape[-1]))).float().mean()
        assert mismatch < (1e-4 if exact else 1e-2), (backend, mismatch)
        torch.testing.assert_close(out["rnorms"].reshape(-1), rnorms, rtol=1e-5 if exact else 1e-2, atol=1e-6)
        for with_qjl in (True, False):
            b = codec.decode(out, perm, with_qjl=with_qjl).reshape(-1, d) @ q
            slope, se = (a * b).sum() / (a * a).sum(), (b - a).std() / (a * a).sum().sqrt()
            assert ((slope - 1).abs() < 6 * se) == with_qjl, (backend, with_qjl, slope, se)


@pytest.mark.parametrize("wga", [0, 1])
@pytest.mark.parametrize("bits,qjl", [(4, True), (3, True), (3.5, False), (4, False)])
def test_encode_wgmma_matches_mma_sync(cuda, monkeypatch, bits, qjl, wga):
    """The dense kernel's wgmma build (WG, the default at head_dim 128 on sm_90; WGA: every column block's product in
    flight at once, one group) writes what its mma.sync build writes, bit for bit (the same float16 operands, float32
    accumulation in the same order): codes, norms, QJL signs and residual norms, with per-head rotations and a tail
    of rows that fills no warpgroup's 64."""
    from turbovq.kernels import cuda as kcuda

    if not kcuda.has_wgmma(torch.device(cuda)):
        pytest.skip("wgmma needs an sm_90 card")
    g = torch.Generator().manual_seed(7)
    x = (torch.randn(2, 4, 700, 128, generator=g) * 2 + 1).to(cuda, torch.bfloat16)
    codec = RowCodec(128, bits, seed=3, qjl=qjl)
    mean = x.float().mean(2, keepdim=True)
    scale = (torch.rand(2, 4, 1, 128, generator=g) + 0.5).to(cuda)
    perm = codec.calibrate(x.float() - mean) if codec.num_outliers else None
    if wga and codec.num_outliers:
        pytest.skip("WGA takes one channel group")
    table = kencode.QJL_TUNING if qjl else kencode.MMA_TUNING
    wg = dict(table[128], WG=1, WGA=wga)
    monkeypatch.setitem(table, 128, {k: v for k, v in wg.items() if k not in ("WG", "WGA")})
    ref = encode_rows(x, codec, perm, mean, scale, backend="cuda", hadamard=False)
    monkeypatch.setitem(table, 128, wg)
    out = encode_rows(x, codec, perm, mean, scale, backend="cuda", hadamard=False)
    assert set(out) == set(ref) and all(torch.equal(out[k], ref[k]) for k in ref), [
        (k, (out[k] != ref[k]).float().mean().item()) for k in ref]  # fmt: skip


def test_encode_cuda_refuses_what_it_cannot_run(cuda):
    codec = RowCodec(128, 4, seed=0)
    with pytest.raises(ValueError, match="backend='cuda'"):
        encode_rows(torch.randn(1, 2, 10, 128, device=cuda), codec, None, backend="cuda")  # float32 input
    with pytest.raises(ValueError, match="backend"):
        encode_rows(torch.randn(1, 2, 10, 128, device=cuda), codec, None, backend="cutlass")


def _tiny_llama(cuda, head_dim=128):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=96, hidden_size=256, intermediate_size=256, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=2, head_dim=head_dim, max_position_embeddings=1024,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config).to(cuda, torch.bfloat16).eval()


def _cache_logits(model, ids, monkeypatch, env, step, **cache_kw):
    """``step(cache)`` after a 290-token prefill into a K4/V3 TurboQuantCache (``cache_kw``: more of its arguments,
    e.g. ``qjl_keys``), with TURBOVQ_KERNELS=env."""
    from turbovq.kv import TurboQuantCache, codes_attention

    monkeypatch.setenv("TURBOVQ_KERNELS", env)
    cache_kw = {"key_bits": 4, "value_bits": 3, **cache_kw}
    cache = TurboQuantCache(model.config, residual_length=32, flush_block=16, **cache_kw)
    with codes_attention(model), torch.no_grad():
        model(ids[:, :290], past_key_values=cache, use_cache=True)
        return step(cache)


@pytest.mark.parametrize("head_dim,key_bits", [(128, 4), (256, 3.5)])
def test_cache_uses_kernel_and_matches_reference(cuda, monkeypatch, head_dim, key_bits):
    """TurboQuantCache + codes_attention on CUDA: flushes and decode steps go through the kernels, logits match
    TURBOVQ_KERNELS=0; the flushes take the HAD encode (encode.HAD_DEFAULT_DIMS; at 256 with fractional keys: two
    channel groups and the calibrated outlier permutation)."""
    from turbovq.kernels import decode as kdecode

    model = _tiny_llama(cuda, head_dim)
    ids = torch.randint(0, 96, (2, 300), device=cuda)
    calls, encodes, had = [], [], []
    real, real_encode, real_had = kdecode.decode_attention, kencode.encode_rows, kencode._encode_hadamard
    monkeypatch.setattr(kdecode, "decode_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(kencode, "encode_rows", lambda *a, **k: encodes.append(1) or real_encode(*a, **k))
    monkeypatch.setattr(kencode, "_encode_hadamard", lambda *a, **k: had.append(a[1].bits) or real_had(*a, **k))

    def step(cache):
        return torch.cat([model(ids[:, i : i + 1], past_key_values=cache).logits for i in range(290, 300)], 1)

    ref = _cache_logits(model, ids, monkeypatch, "0", step, key_bits=key_bits)
    assert not calls and not encodes
    out = _cache_logits(model, ids, monkeypatch, "1", step, key_bits=key_bits)
    assert len(calls) == 10 * 2  # every decode step, every layer
    assert len(encodes) >= 2 * 2  # the flushes encode keys and values of every layer through the kernel
    assert key_bits in had and 3 in had, had  # keys and values through HAD
    assert ((out.float() - ref.float()).norm() / ref.float().norm()).item() < 2e-2


def test_qjl_key_cache_runs_on_the_kernels(cuda, monkeypatch):
    """TurboQuant_prod keys (qjl_keys=True): flushes encode through the fused kernel (mse codes and QJL signs in one
    pass), decode steps run the split pass with the QJL score term, logits match TURBOVQ_KERNELS=0."""
    from turbovq.kernels import decode as kdecode

    model = _tiny_llama(cuda)
    ids = torch.randint(0, 96, (2, 300), device=cuda)
    qjl_encodes, calls = [], []
    real_encode, real = kencode.encode_rows, kdecode.decode_attention

    def encode(x, codec, *a, **k):
        qjl_encodes.append(codec.qjl)
        return real_encode(x, codec, *a, **k)

    monkeypatch.setattr(kencode, "encode_rows", encode)
    monkeypatch.setattr(kdecode, "decode_attention", lambda q, keys, *a, **k: calls.append(keys.codec.qjl) or real(
        q, keys, *a, **k))  # fmt: skip

    def step(cache):
        return torch.cat([model(ids[:, i : i + 1], past_key_values=cache).logits for i in range(290, 300)], 1)

    ref = _cache_logits(model, ids, monkeypatch, "0", step, qjl_keys=True)
    assert not qjl_encodes and not calls
    out = _cache_logits(model, ids, monkeypatch, "1", step, qjl_keys=True)
    assert sum(qjl_encodes) >= 2  # the keys' flushes of both layers
    assert len(calls) == 10 * 2 and all(calls)  # every decode step, every layer, with QJL keys
    assert ((out.float() - ref.float()).norm() / ref.float().norm()).item() < 2e-2


@pytest.mark.parametrize("qjl_keys", [False, True])
def test_multi_token_steps_over_codes_use_dequantize_sdpa(cuda, monkeypatch, qjl_keys):
    """A later multi-token step (chat turn, chunked prefill) over a cache with codes goes through dequantize + SDPA
    on CUDA and gives the reference's logits (TURBOVQ_KERNELS=0) to bf16 accuracy; QJL keys too."""
    from turbovq.kv import attention as kv_attention

    model = _tiny_llama(cuda)
    ids = torch.randint(0, 96, (2, 340), device=cuda)
    calls = []
    real = kv_attention.dequantize_attention
    monkeypatch.setattr(kv_attention, "dequantize_attention", lambda *a, **k: calls.append(1) or real(*a, **k))

    def step(cache):
        return model(ids[:, 290:], past_key_values=cache).logits

    ref = _cache_logits(model, ids, monkeypatch, "0", step, qjl_keys=qjl_keys)
    assert not calls
    out = _cache_logits(model, ids, monkeypatch, "1", step, qjl_keys=qjl_keys)
    assert len(calls) == 2  # the 50-token step, every layer
    assert ((out.float() - ref.float()).norm() / ref.float().norm()).item() < 2e-2


@pytest.mark.parametrize("d,bits,center,qjl", [(128, 4, "scaled", False), (128, 3, False, False),
                                               (128, 3.5, True, False), (64, 2.5, "scaled", False),
                                               (256, 4, True, False), (64, 2, False, False), (128, 4, "scaled", True),
                                               (256, 3.5, True, True)])  # fmt: skip
def test_dequantize_rows_matches_reference(cuda, d, bits, center, qjl):
    """The fused dequantize (multi-token attention's K/V; ``qjl``: TurboQuant_prod keys, with their QJL part): float32
    to 1e-4 of PackedRows.dequantize, bfloat16 and float16 to their own rounding."""
    from turbovq.kernels.dequantize import dequantize_rows

    _, pk, _, _, _ = make_case(cuda, d, 8, 2, 3, 1000, 0, bits, bits, torch.bfloat16, center, qjl=qjl)
    ref = pk.dequantize()
    torch.testing.assert_close(dequantize_rows(pk, torch.float32), ref, rtol=1e-4, atol=1e-4)
    for dtype, tol in ((torch.bfloat16, 5e-3), (torch.float16, 1e-3)):
        out = dequantize_rows(pk, dtype)
        assert out.dtype == dtype and out.shape == ref.shape
        assert ((out.float() - ref).norm() / ref.norm()).item() < tol, dtype
