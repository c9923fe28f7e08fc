"""TurboQuantCache inside tiny random-weight Llama (GQA) and Gemma-3 (sliding window, one KV head) models."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import DynamicCache  # noqa: E402
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer  # noqa: E402

from turbovq import packing  # noqa: E402
from turbovq.kv import TurboQuantCache, TurboQuantLayer, codes_attention  # noqa: E402


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, max_position_embeddings=512,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def gemma():
    torch.manual_seed(0)
    config = transformers.Gemma3TextConfig(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=2,
        num_key_value_heads=1, head_dim=256, sliding_window=16, max_position_embeddings=512,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
    )  # fmt: skip
    return transformers.Gemma3ForCausalLM(config).eval()


def ids_for(model, batch=2, n=100, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (batch, n), generator=g)


@torch.no_grad()
def chunked_logits(model, cache, ids, chunks=(60, 7, 1, 32), attention_mask=None):
    """Prefill then continue in chunks through ``cache``; logits of every position, (B, n, V)."""
    out, pos = [], 0
    for c in chunks:
        mask = None if attention_mask is None else attention_mask[:, : pos + c]
        out.append(model(ids[:, pos : pos + c], attention_mask=mask, past_key_values=cache, use_cache=True).logits)
        pos += c
    return torch.cat(out, dim=1)


def small_cache(model, **kw):
    kw = {"residual_length": 16, "flush_block": 8, **kw}
    return TurboQuantCache(model.config, **kw)


@pytest.mark.parametrize("fixture", ["llama", "gemma"])
@pytest.mark.parametrize("codes", [False, True])
def test_eight_bits_match_dynamic_cache(fixture, codes, request):
    model = request.getfixturevalue(fixture)
    ids = ids_for(model)
    ref = chunked_logits(model, DynamicCache(config=model.config), ids)
    cache = small_cache(model, key_bits=8, value_bits=8)
    if codes:
        with codes_attention(model):
            out = chunked_logits(model, cache, ids)
    else:
        out = chunked_logits(model, cache, ids)
    assert all(layer.num_codes > 0 for layer in cache.layers if isinstance(layer, TurboQuantLayer))
    assert (out - ref).abs().max() < 5e-3 * ref.abs().max()
    low = chunked_logits(model, small_cache(model, key_bits=2, value_bits=2), ids)
    assert (out - ref).abs().mean() < (low - ref).abs().mean() / 4  # 8 bits is much closer than 2 bits


@pytest.mark.parametrize("fixture", ["llama", "gemma"])
@pytest.mark.parametrize(
    "kw", [{"key_bits": 3.5, "value_bits": 2.5}, {"key_bits": 3, "value_bits": 4, "qjl_keys": True}]
)
def test_codes_attention_equals_dequantized_path(fixture, kw, request):
    model = request.getfixturevalue(fixture)
    ids = ids_for(model)
    a = chunked_logits(model, small_cache(model, **kw), ids)
    with codes_attention(model):
        b = chunked_logits(model, small_cache(model, **kw), ids)
    torch.testing.assert_close(a, b, atol=2e-4, rtol=2e-4)


def test_left_padded_batch_matches_single_sequences(llama):
    """Batch of 2 with left padding == each sequence alone (codes attention honours the padding mask)."""
    ids = ids_for(llama, batch=2, n=90)
    pad = 10
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    with codes_attention(llama):
        both = chunked_logits(llama, small_cache(llama, key_bits=4, value_bits=4), ids, (50, 40), mask)
        alone = chunked_logits(llama, small_cache(llama, key_bits=4, value_bits=4), ids[1:, pad:], (40, 40))
    # Row 1's real tokens see the same keys; codes differ only through the shared (batch-wide) calibration.
    diff = (both[1, pad:] - alone[0]).abs().mean() / alone.abs().mean()
    assert diff < 0.05


@pytest.mark.parametrize("fixture", ["llama", "gemma"])
def test_generate_with_cache(fixture, request):
    model = request.getfixturevalue(fixture)
    ids = ids_for(model, batch=2, n=40)
    cache = small_cache(model, key_bits=4, value_bits=3)
    with codes_attention(model):
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), past_key_values=cache, max_new_tokens=12, do_sample=False
        )
    assert out.shape == (2, 52)
    assert cache.get_seq_length() == 51  # the last generated token is never fed back
    ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
    assert (out[:, 40:] == ref[:, 40:]).float().mean() > 0.5  # random model, 4-bit cache: mostly the same tokens


def test_nbytes_counts_exactly_the_packed_storage(llama):
    ids = ids_for(llama, batch=2, n=100)
    cache = small_cache(llama, key_bits=3.5, value_bits=2, full_precision_layers=(-1,))
    chunked_logits(llama, cache, ids)
    b, h, d = 2, 2, 64
    expected = 0
    for layer in cache.layers:
        if isinstance(layer, TurboQuantLayer):
            n, w, sink = layer.num_codes, layer.keys.shape[-2], layer.sink_keys.shape[-2]
            assert n + w + sink == 100 and sink == 4
            assert layer.value_perm is None  # integer value bits: no outlier split
            key_row = packing.packed_size(32, 4) + packing.packed_size(32, 3) + 2 * 2  # two groups, fp16 norms
            value_row = packing.packed_size(64, 2) + 2
            window = 2 * b * h * (w + sink) * d * 4  # float32 model: window and sink tokens
            means = 2 * b * h * d * 4  # float32 key and value channel scales (no means: center=False)
            expected += b * h * n * (key_row + value_row) + window + h * d * 8 + means  # + int64 key permutation
        else:
            assert isinstance(layer, DynamicLayer)
            expected += 2 * b * h * 100 * d * 4
    assert cache.nbytes == expected
    assert cache.key_codec.bytes_per_row() == packing.packed_size(32, 4) + packing.packed_size(32, 3) + 4


def test_residual_window_is_flushed_in_blocks(llama):
    cache = small_cache(llama, key_bits=4, value_bits=4, residual_length=12, flush_block=5)
    ids = ids_for(llama, batch=1, n=60)
    layer = cache.layers[0]
    with torch.no_grad(), codes_attention(llama):
        for t in range(60):
            llama(ids[:, t : t + 1], past_key_values=cache, use_cache=True)
            window, sink = layer.keys.shape[-2], layer.sink_keys.shape[-2]
            assert layer.num_codes + window + sink == t + 1 == cache.get_seq_length()
            assert sink == (4 if t + 1 >= 12 + 5 + 4 else 0)  # taken at the first flush
            assert layer.num_codes % 5 == 0
            assert window < 12 + 5 + (0 if sink else 4)
            assert window >= min(12, t + 1)
    assert layer.key_fields["codes0"].shape[2] == layer.num_codes == layer.value_fields["norms0"].shape[2]


def test_layer_kinds(llama, gemma):
    cache = TurboQuantCache(llama.config, key_bits=4, value_bits=4, full_precision_layers=(0, -1))
    assert [type(x) for x in cache.layers] == [DynamicLayer, TurboQuantLayer, DynamicLayer]
    assert cache.full_precision_layers == (0, 2) and cache.quantized_layers == [1]
    cache = TurboQuantCache(gemma.config, key_bits=4, value_bits=4)
    kinds = [type(x) for x in cache.layers]
    assert kinds == [DynamicSlidingWindowLayer, TurboQuantLayer, DynamicSlidingWindowLayer, TurboQuantLayer]
    assert cache.layers[0].sliding_window == 16


def test_full_precision_layers_are_exact(llama):
    ids = ids_for(llama)
    ref = chunked_logits(llama, DynamicCache(config=llama.config), ids)
    out = chunked_logits(llama, small_cache(llama, key_bits=2, value_bits=2, full_precision_layers=(0, 1, 2)), ids)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_prefill_calibration_and_fixed_mode(llama):
    layer_kwargs = {"key_bits": 2.5, "value_bits": 3.5, "residual_length": 4, "flush_block": 4, "sink_tokens": 0}
    cache = TurboQuantCache(llama.config, **layer_kwargs)
    k = torch.randn(1, 2, 20, 64)
    k[:, 0, :, 40:] *= 30  # head 0: channels 40..63 are loud
    v = torch.randn(1, 2, 20, 64)
    cache.update(k, v, 0)
    layer = cache.layers[0]
    assert layer.num_codes == 16
    assert set(layer.key_perm[0, :32].tolist()) >= set(range(40, 64))
    fixed = TurboQuantCache(llama.config, outlier_channels="fixed", **layer_kwargs)
    fixed.update(k, v, 0)
    assert fixed.layers[0].key_perm is None  # first channels are the outliers


def test_tiny_windows_and_silent_heads_stay_finite(llama):
    """residual_length=0 with sinks (the first flush waits until tokens beyond the sink exist) and all-zero heads
    (no division by a zero RMS) never produce NaN codes."""
    cache = TurboQuantCache(llama.config, key_bits=3, value_bits=3, residual_length=0, flush_block=1, sink_tokens=4)
    for t in range(8):
        k = torch.zeros(1, 2, 1, 64) if t < 6 else torch.randn(1, 2, 1, 64)
        keys, values = cache.update(k, k.clone(), 0)
        assert torch.isfinite(keys).all() and torch.isfinite(values).all()
    layer = cache.layers[0]
    assert layer.sink_keys.shape[-2] == 4 and layer.num_codes == 4 and torch.isfinite(layer.key_scale).all()


def test_sink_tokens_stay_exact_and_statistics_skip_them(llama):
    cache = TurboQuantCache(
        llama.config, key_bits=2, value_bits=2, residual_length=4, flush_block=4, sink_tokens=3, center=True
    )
    k, v = torch.randn(1, 2, 20, 64), torch.randn(1, 2, 20, 64)
    k[:, :, 0] *= 50  # an attention-sink-like first token, far from the rest
    cache.update(k, v, 0)
    layer = cache.layers[0]
    assert torch.equal(layer.sink_keys, k[:, :, :3]) and torch.equal(layer.sink_values, v[:, :, :3])
    assert layer.num_codes == 12 and layer.keys.shape[-2] == 5
    torch.testing.assert_close(layer.key_mean, k[:, :, 3:].mean(dim=2, keepdim=True))  # the sink is not averaged in
    keys, values = cache.update(torch.randn(1, 2, 1, 64), torch.randn(1, 2, 1, 64), 0)  # dequantized path
    assert keys.shape[-2] == 21 and torch.equal(keys[:, :, :3], k[:, :, :3])
    rel = (keys[:, :, 3:15] - k[:, :, 3:15]).norm() / k[:, :, 3:15].norm()
    assert 0.05 < rel < 0.5  # 2-bit codes in position order after the sink


def test_batch_reordering(llama):
    ids = ids_for(llama, batch=3, n=60)
    cache = small_cache(llama, key_bits=4, value_bits=4)
    chunked_logits(llama, cache, ids, chunks=(60,))
    layer = cache.layers[1]
    codes = layer.key_fields["codes0"].clone()
    cache.reorder_cache(torch.tensor([2, 0, 1]))
    assert torch.equal(layer.key_fields["codes0"], codes[[2, 0, 1]])
    cache.batch_select_indices(torch.tensor([1]))
    assert torch.equal(layer.key_fields["codes0"], codes[[0]]) and layer.keys.shape[0] == 1
    with pytest.raises(NotImplementedError):
        cache.crop(-1)


def test_float16_norm_overflow_moves_norms_to_float32(llama):
    cache = TurboQuantCache(llama.config, key_bits=4, value_bits=4, residual_length=0, flush_block=4, sink_tokens=0)
    k = torch.randn(1, 2, 8, 64)
    cache.update(k[:, :, :4], k[:, :, :4], 0)
    assert cache.layers[0].key_fields["norms0"].dtype == torch.float16
    cache.update(k[:, :, 4:] * 1e5, k[:, :, 4:], 0)
    norms = cache.layers[0].key_fields["norms0"]
    assert norms.dtype == torch.float32 and norms.shape[2] == 8
    assert torch.isfinite(cache.layers[0].packed_keys().dequantize()).all()


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"key_bits": 3.3}, "outlier channels"),
        ({"value_bits": 0.5}, "value_bits"),
        ({"residual_length": -1}, "residual_length"),
        ({"flush_block": 0}, "flush_block"),
        ({"outlier_channels": "auto"}, "outlier_channels"),
        ({"full_precision_layers": (3,)}, "out of range"),
        ({"norm_dtype": "bfloat16"}, "norm_dtype"),
        ({"key_bits": 1, "qjl_keys": True}, "QJL"),
        ({"channel_scaling": 2}, "channel_scaling"),
        ({"sink_tokens": -1}, "sink_tokens"),
    ],
)
def test_invalid_arguments(llama, kw, match):
    with pytest.raises(ValueError, match=match):
        TurboQuantCache(llama.config, **kw)


def test_perplexity_kl_through_the_cache(llama):
    """The lockstep evaluator scores exactly ids[prefix:], and the full-precision method matches one forward pass."""
    from turbovq.kv import eval as kv_eval

    ids = ids_for(llama, batch=1, n=90)
    methods = {
        "full": kv_eval.Method("full", lambda config: DynamicCache(config=config), kind="full"),
        "tq": kv_eval._turboquant("tq", 2, 2, residual_length=8, flush_block=8),
    }
    res = kv_eval.perplexity_kl(llama, ids, methods, prefix_len=50, chunk=16, progress=False)
    with torch.no_grad():
        logp = torch.log_softmax(llama(ids).logits[0, 49:-1].float(), dim=-1)
    nll = float(-logp.gather(-1, ids[0, 50:, None]).mean())
    assert res["full"].tokens == 40
    assert abs(res["full"].nll - nll) < 1e-4 and res["full"].kl < 1e-6 and res["full"].top1 == 1.0
    assert res["tq"].kl > 1e-5  # 2-bit codes are attended to (an exact cache gives < 1e-9)
    assert res["tq"].bytes_fp16 < res["full"].bytes_fp16
    assert 0 < res["tq"].steady_bytes_per_token_fp16 < res["full"].steady_bytes_per_token_fp16


def test_kv_cli_commands():
    from typer.testing import CliRunner

    from turbovq.kv.cli import kv_app

    result = CliRunner().invoke(kv_app, ["--help"])
    assert result.exit_code == 0 and "prepare-models" in result.output and "eval" in result.output
    result = CliRunner().invoke(kv_app, ["prepare-models", "--models", "no-such-model"])
    assert result.exit_code != 0


def test_quanto_baseline_on_a_hybrid_model(gemma):
    """transformers' QuantizedCache refuses sliding-window models; the eval builds its quanto layers for the
    full-attention layers only (sliding layers exact), so Gemma-3 gets the same baseline."""
    pytest.importorskip("optimum.quanto")
    from transformers.cache_utils import DynamicSlidingWindowLayer, QuantoQuantizedLayer

    from turbovq.kv import eval as kv_eval

    cache = kv_eval.build_methods(["quanto-int4"])["quanto-int4"].make(gemma.config)
    kinds = [type(layer) for layer in cache.layers]
    assert kinds == [DynamicSlidingWindowLayer, QuantoQuantizedLayer, DynamicSlidingWindowLayer, QuantoQuantizedLayer]
