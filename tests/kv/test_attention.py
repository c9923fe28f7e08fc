"""Attention on TurboQuant codes vs dequantize-then-attend and vs exact attention."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("transformers")

from turbovq import TurboQuantMSE, packing  # noqa: E402
from turbovq.kv import attention as kv_attention  # noqa: E402
from turbovq.kv.attention import attend_codes, codes_attention, dequantize_attention  # noqa: E402
from turbovq.kv.cache import PackedRows, RowCodec, gather_order, sign_magnitude  # noqa: E402


def reference_attention(query, keys, values, mask, scaling):
    """Exact softmax attention, GQA by repeating KV heads: (B, Hq, Q, D) -> (B, Q, Hq, D), float64."""
    groups = query.shape[1] // keys.shape[1]
    k = keys.double().repeat_interleave(groups, dim=1)
    v = values.double().repeat_interleave(groups, dim=1)
    scores = query.double() @ k.transpose(-1, -2) * scaling
    if mask is not None:
        scores = scores + (mask.double() if mask.dtype != torch.bool else torch.where(mask, 0.0, -math.inf))
    return (torch.softmax(scores, dim=-1) @ v).transpose(1, 2)


def make_inputs(b=2, hq=6, hkv=2, q=3, n=40, t=5, d=64, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(b, hq, q, d, generator=g)
    keys = torch.randn(b, hkv, n + t, d, generator=g) * scale
    keys[..., :3] *= 4  # a few outlier channels, as real keys have
    values = torch.randn(b, hkv, n + t, d, generator=g)
    return query, keys, values


def packed(codec: RowCodec, x: torch.Tensor, calibrate=True, center=False, scaled=False) -> PackedRows:
    mean = x.mean(dim=2, keepdim=True) if center else None
    scale = x.std(dim=2, keepdim=True).sqrt() if scaled else None
    xc = x - mean if center else x
    xc = xc / scale if scaled else xc
    perm = codec.calibrate(xc) if calibrate else None
    return PackedRows(codec, codec.encode(xc, perm), perm, x.shape[2], mean, scale)


def causal_padding_mask(b, q, total, pad: int) -> torch.Tensor:
    """Boolean (b, 1, q, total): causal for the last q positions, batch row 1 left-padded by ``pad`` tokens."""
    pos_q = torch.arange(total - q, total)[:, None]
    mask = (torch.arange(total)[None, :] <= pos_q).expand(b, 1, q, total).clone()
    mask[1, :, :, :pad] = False
    return mask


@pytest.mark.parametrize("d,hq,hkv", [(64, 6, 2), (128, 4, 4), (256, 4, 1)])
@pytest.mark.parametrize("key_bits,value_bits,qjl", [(4, 4, False), (3.5, 2.5, False), (3, 4, True)])
@pytest.mark.parametrize("center,scaled", [(False, False), (True, False), (True, True)])
def test_codes_attention_equals_dequantize_then_attend(d, hq, hkv, key_bits, value_bits, qjl, center, scaled):
    query, keys, values = make_inputs(hq=hq, hkv=hkv, d=d)
    keys = keys + 2.0 * torch.randn(1, hkv, 1, d)  # a constant component per head, as real keys carry
    n = 40
    kc = RowCodec(d, key_bits, seed=1, qjl=qjl)
    vc = RowCodec(d, value_bits, seed=2)
    pk = packed(kc, keys[:, :, :n], center=center, scaled=scaled)
    pv = packed(vc, values[:, :, :n], center=center, scaled=scaled)
    mask = causal_padding_mask(2, 3, n + 5, pad=7)
    out = attend_codes(query, pk, pv, keys[:, :, n:], values[:, :, n:], mask, d**-0.5, block_size=16)
    k_hat = torch.cat([pk.dequantize(), keys[:, :, n:]], dim=2)
    v_hat = torch.cat([pv.dequantize(), values[:, :, n:]], dim=2)
    ref = reference_attention(query, k_hat, v_hat, mask, d**-0.5)
    assert out.shape == (2, 3, hq, d)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("center,scaled", [(False, False), (True, True)])
@pytest.mark.parametrize("mask_kind", ["bool", "additive", None])
def test_dequantize_attention_matches_attend_codes(center, scaled, mask_kind, monkeypatch):
    """The multi-token CUDA path (dequantize + SDPA) gives attend_codes' result, also when batch rows are processed
    in chunks (forced here with a tiny working-set budget) and means/scales are per batch row."""
    query, keys, values = make_inputs(b=3, hq=6, hkv=2, q=5, n=40, t=6, d=64)
    n = 40
    pk = packed(RowCodec(64, 3.5, seed=1), keys[:, :, :n], center=center, scaled=scaled)
    pv = packed(RowCodec(64, 3, seed=2), values[:, :, :n], center=center, scaled=scaled)
    mask = causal_padding_mask(3, 5, n + 6, pad=7)
    if mask_kind == "additive":
        mask = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    elif mask_kind is None:
        mask = None
    tk, tv = keys[:, :, n:], values[:, :, n:]
    ref = attend_codes(query, pk, pv, tk, tv, mask, 64**-0.5)
    for budget in (1 << 30, 1):  # one chunk; one batch row at a time
        monkeypatch.setattr(kv_attention, "_DEQUANT_BYTES", budget)
        out = dequantize_attention(query, pk, pv, tk, tv, mask, 64**-0.5)
        assert out.shape == ref.shape == (3, 5, 6, 64)
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    with pytest.raises(ValueError, match="attention mask covers"):
        dequantize_attention(query, pk, pv, tk, tv, mask[..., 1:] if mask is not None else torch.ones(3, 1, 5, 3,
                             dtype=torch.bool), 64**-0.5)  # fmt: skip


def test_high_bits_close_to_exact_attention():
    query, keys, values = make_inputs(n=64, t=0, scale=1.0)
    exact = reference_attention(query, keys, values, None, 0.125)
    errors = {}
    for bits in (2, 4, 8):
        kc, vc = RowCodec(64, bits, seed=3), RowCodec(64, bits, seed=4)
        out = attend_codes(query, packed(kc, keys), packed(vc, values), keys[:, :, :0], values[:, :, :0], None, 0.125)
        errors[bits] = float((out.double() - exact).norm() / exact.norm())
    # Peaked softmax over random keys amplifies key error; each extra bit halves it (x16 from 4 to 8 bits).
    assert errors[8] < 0.02, errors
    assert errors[2] > 2 * errors[4] > 16 * errors[8], errors


def test_block_size_and_empty_parts():
    query, keys, values = make_inputs(n=50, t=6)
    kc, vc = RowCodec(64, 3, seed=5), RowCodec(64, 3, seed=6)
    pk, pv = packed(kc, keys[:, :, :50]), packed(vc, values[:, :, :50])
    tail_k, tail_v = keys[:, :, 50:], values[:, :, 50:]
    a = attend_codes(query, pk, pv, tail_k, tail_v, None, 0.125, block_size=7)
    b = attend_codes(query, pk, pv, tail_k, tail_v, None, 0.125, block_size=4096)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # no codes at all: exact attention over the tail
    empty_k = PackedRows(kc, {k: v[:, :, :0] for k, v in pk.fields.items()}, pk.perm, 0)
    empty_v = PackedRows(vc, {k: v[:, :, :0] for k, v in pv.fields.items()}, pv.perm, 0)
    out = attend_codes(query, empty_k, empty_v, tail_k, tail_v, None, 0.125)
    torch.testing.assert_close(out.double(), reference_attention(query, tail_k, tail_v, None, 0.125), atol=1e-5, rtol=0)


def test_boolean_and_additive_masks_agree_and_size_is_checked():
    query, keys, values = make_inputs()
    kc, vc = RowCodec(64, 4, seed=7), RowCodec(64, 4, seed=8)
    pk, pv = packed(kc, keys[:, :, :40]), packed(vc, values[:, :, :40])
    mask = causal_padding_mask(2, 3, 45, pad=11)
    additive = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    a = attend_codes(query, pk, pv, keys[:, :, 40:], values[:, :, 40:], mask, 0.125)
    b = attend_codes(query, pk, pv, keys[:, :, 40:], values[:, :, 40:], additive, 0.125)
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="mask covers"):
        attend_codes(query, pk, pv, keys[:, :, 40:], values[:, :, 40:], mask[..., 1:], 0.125)


def test_row_codec_matches_core_quantizer_bit_exactly():
    """Per-head codes equal TurboQuantMSE(outliers=that head's top channels).quantize of the same rows, up to the
    cache's sign-magnitude labels."""
    _, keys, _ = make_inputs(n=30, t=0, d=64)
    codec = RowCodec(64, 2.5, seed=9)
    perm = codec.calibrate(keys)
    fields = codec.encode(keys, perm)
    for h in range(keys.shape[1]):
        outliers = perm[h, : codec.num_outliers]
        q = TurboQuantMSE(64, 2.5, seed=9, outliers=outliers.tolist())
        ref = q.quantize(keys[0, h])
        for i in range(2):
            bits, d, _ = codec.groups[i]
            labels = sign_magnitude(packing.unpack(ref.fields[f"codes{i}"], bits, d), bits)
            assert torch.equal(fields[f"codes{i}"][0, h], packing.pack(labels, bits))
            torch.testing.assert_close(fields[f"norms{i}"][0, h], ref.fields[f"norms{i}"].float())
        torch.testing.assert_close(codec.decode(fields, perm)[0, h], q.dequantize(ref), atol=1e-5, rtol=1e-5)


def test_calibration_picks_largest_channels():
    x = torch.randn(1, 2, 100, 64)
    x[:, 0, :, [5, 9]] *= 50
    x[:, 1, :, [60, 61]] *= 50
    codec = RowCodec(64, 3 + 2 / 64, seed=0)  # exactly two outlier channels
    perm = codec.calibrate(x)
    assert perm[0, :2].tolist() == [5, 9] and perm[1, :2].tolist() == [60, 61]
    assert torch.equal(perm.sort(dim=-1).values, torch.arange(64).expand(2, 64))  # a permutation per head
    assert RowCodec(64, 3).calibrate(x) is None  # integer bits: no outliers


def _bank_passes(order: list[int]) -> list[int]:
    """Shared-memory passes of each of the HAD kernel's 4 gather reads (read k of lane l: position 4 l + k): the
    most distinct 4-byte words (channel // 2) any one of the 32 banks serves."""
    passes = []
    for k in range(4):
        banks: dict[int, set[int]] = {}
        for c in order[k::4]:
            banks.setdefault((c >> 1) & 31, set()).add(c >> 1)
        passes.append(max(len(w) for w in banks.values()))
    return passes


def test_two_groups_of_128_come_in_a_conflict_free_gather_order():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, 200, 256, generator=g) * (torch.rand(3, 1, 256, generator=g) * 4 + 0.1)
    perm = RowCodec(256, 3.5).calibrate(x)
    ms = x.pow(2).mean(dim=(0, 2))
    for h in range(3):
        top, rest = perm[h, :128].tolist(), perm[h, 128:].tolist()
        assert sorted(top) == sorted(torch.topk(ms[h], 128).indices.tolist())  # the same channels as before
        assert sorted(top + rest) == list(range(256))
        assert _bank_passes(top) == _bank_passes(rest) == [1, 1, 1, 1]
        assert max(_bank_passes(sorted(top))) > 1  # (the ascending order has conflicts)
    for chans in (list(range(128)), list(range(0, 256, 2)), list(range(64, 192))):  # structured groups
        assert sorted(gather_order(chans)) == chans and _bank_passes(gather_order(chans)) == [1, 1, 1, 1]


def test_codes_attention_context_is_reversible():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config)
    before = model.config._attn_implementation
    with codes_attention(model):
        assert model.config._attn_implementation == "turboquant"
    assert model.config._attn_implementation == before
    with pytest.raises(RuntimeError), codes_attention(model):
        raise RuntimeError("boom")
    assert model.config._attn_implementation == before


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(dtype):
    query, keys, values = make_inputs(n=40, t=5, scale=1.0)
    kc, vc = RowCodec(64, 3.5, seed=10), RowCodec(64, 3.5, seed=11)
    pk, pv = packed(kc, keys[:, :, :40].to(dtype)), packed(vc, values[:, :, :40].to(dtype))
    out = attend_codes(query.to(dtype), pk, pv, keys[:, :, 40:].to(dtype), values[:, :, 40:].to(dtype), None, 0.125)
    assert out.dtype == dtype
    k_hat = torch.cat([pk.dequantize(), keys[:, :, 40:].to(dtype).float()], dim=2)
    v_hat = torch.cat([pv.dequantize(), values[:, :, 40:].to(dtype).float()], dim=2)
    ref = reference_attention(query.to(dtype), k_hat, v_hat, None, 0.125)
    torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=2e-2)


def test_centering_reduces_key_error_on_offset_keys():
    """Keys with a large shared component: quantizing the deviation from the mean is ~|mu|^2/|k - mu|^2 times
    more accurate than quantizing the keys, and the codes attention follows the exact attention more closely."""
    query, keys, values = make_inputs(b=1, hq=4, hkv=1, q=2, n=200, t=0, d=128)
    keys = keys + 6.0 * torch.randn(1, 1, 1, 128)  # a shared component of twice the per-token norm
    codec = RowCodec(128, 3)
    plain, centered = packed(codec, keys), packed(codec, keys, center=True)
    err_plain = (plain.dequantize() - keys).pow(2).mean()
    err_centered = (centered.dequantize() - keys).pow(2).mean()
    assert err_centered < err_plain / 3
    exact = reference_attention(query, keys, values, None, 128**-0.5)
    vals = packed(RowCodec(128, 3, seed=5), values)
    empty = keys[:, :, :0]
    out = {
        name: attend_codes(query, k, vals, empty, empty, None, 128**-0.5).double()
        for name, k in (("plain", plain), ("centered", centered))
    }
    assert (out["centered"] - exact).abs().mean() < (out["plain"] - exact).abs().mean()
