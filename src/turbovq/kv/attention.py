"""Attention computed on TurboQuant codes (the pure-torch reference path for CPU and GPU).

For one layer with ``n`` compressed tokens and a full-precision tail of ``t`` tokens, per query head (GQA/MQA:
query head ``h * G + g`` reads KV head ``h``), with channel groups ``i`` (one, or outliers + regular), rotations
``A_i`` (``x_rot = x @ A_i``), centroids ``c_i``, codes ``k_ij`` and norms ``||k_j||_i``:

    score_j  = scaling * (<q, mu_k> + sum_i ||k_j||_i * <q[ch_i] @ A_i, c_i[k_ij]>)   (+ QJL term for prod keys)
    out      = sum_i scatter_{ch_i}( (sum_j p_j (||v_j||_i c_i[v_ij] + mu_v[ch_i] @ A_i)) @ A_i^T ) + sum_{tail} p_j v_j

(``mu_k``, ``mu_v``: the per-head means a centered cache subtracted before encoding; zero otherwise. With per-channel
scales ``s`` the codes hold ``(x - mu) / s``: the query is multiplied by ``s_k`` before its rotation and the value
output by ``s_v`` after the inverse rotation, with ``mu_v / s_v`` in place of ``mu_v``.)

The query is rotated once per group; keys are scored from the codebook (centroid lookups scaled by the norm);
values are accumulated in the rotated space and rotated back once at the end. The compressed tokens are visited
in blocks of ``block_size`` with an online softmax, so at most one block of centroid values is ever
materialized, never the dequantized K/V. Fused GPU kernels should reproduce :func:`attend_codes`.

Usage: ``with codes_attention(model): model.generate(..., past_key_values=TurboQuantCache(model.config, ...))``.
The context manager registers the ``"turboquant"`` attention implementation (and its additive-mask builder) in
transformers' registries and restores the model's previous implementation on exit. Layers that are not quantized
(exact boundary layers, sliding-window layers) fall back to transformers' sdpa attention. On CUDA, single-token
steps run the fused decode kernels and multi-token steps over codes (a later chat turn, chunked prefill) run
:func:`dequantize_attention` (55-120x faster than this reference there; ``TURBOVQ_KERNELS=0`` keeps the reference).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from turbovq.kv.cache import _TAG, ATTN_NAME, PackedRows, kernels_enabled


def _additive_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    """Boolean (True = attend) or additive float mask -> additive float32 mask."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill(
            ~mask, torch.finfo(torch.float32).min
        )
    return mask.float()


def attend_codes(
    query: torch.Tensor,
    keys: PackedRows,
    values: PackedRows,
    tail_keys: torch.Tensor,
    tail_values: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    softcap: float | None = None,
    block_size: int = 512,
) -> torch.Tensor:
    """Softmax attention over ``keys.length`` compressed tokens followed by a full-precision tail.

    Parameters
    ----------
    query : (batch_size, num_heads, q_len, head_dim).
    keys, values : compressed rows, fields of shape (batch_size, num_kv_heads, n, ...).
    tail_keys, tail_values : (batch_size, num_kv_heads, t, head_dim), the tokens after the compressed ones.
    attention_mask : None, or (batch_size | 1, 1, q_len, n + t), boolean (True = attend) or additive float.
    scaling : multiplies the scores; softcap: optional ``tanh`` soft-capping of the scaled scores.

    Returns
    -------
    (batch_size, q_len, num_heads, head_dim) in the query dtype (the layout transformers' attention functions return).
    """
    bsz, num_heads, q_len, dim = query.shape
    num_kv = tail_keys.shape[1]
    if num_heads % num_kv:
        raise ValueError(f"{num_heads} query heads are not a multiple of {num_kv} KV heads")
    groups = num_heads // num_kv
    n, t = keys.length, tail_keys.shape[-2]
    mask = _additive_mask(attention_mask)
    if mask is not None and mask.shape[-1] != n + t:
        raise ValueError(f"attention mask covers {mask.shape[-1]} positions, the cache holds {n} + {t}")
    # Query heads grouped by KV head: (B, H, G*Q, D), float32 accumulation throughout.
    q = query.float().reshape(bsz, num_kv, groups * q_len, dim)
    kc, vc = keys.codec, values.codec
    q_codes = q if keys.scale is None else q * keys.scale  # <q, s * k'> = <q * s, k'>
    q_perm = kc.permute(q_codes, keys.perm)
    q_rot = [q_perm[..., off : off + d] @ kc.tensors(i, q.device)[0] for i, (_, d, off) in enumerate(kc.groups)]
    q_qjl = q_codes @ kc.quantizer.qjl.matrix(q.device).T if kc.qjl else None
    # Normalized caches store k' = (k - mean) / scale: <q, k> = <q, mean> + <q * scale, k'>; values are accumulated
    # as sum_j p_j (v'_j + mean / scale) in the rotated space, then multiplied by the scale once at the end.
    q_mean = None if keys.mean is None else q @ keys.mean.transpose(-1, -2)  # (B, H, G*Q, 1)
    v_mean = [values.rotated_mean(i) for i in range(len(vc.groups))]

    run_max = torch.full((bsz, num_kv, groups * q_len), float("-inf"), device=q.device)
    run_sum = torch.zeros_like(run_max)
    acc_rot = [q.new_zeros(bsz, num_kv, groups * q_len, d) for _, d, _ in vc.groups]
    acc_tail = q.new_zeros(bsz, num_kv, groups * q_len, dim)

    def softmax_step(scores: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        scores = scores * scaling
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        if mask is not None:
            view = scores.view(bsz, num_kv, groups, q_len, hi - lo) + mask[:, :, None, :, lo:hi]
            scores = view.reshape(bsz, num_kv, groups * q_len, hi - lo)
        new_max = torch.maximum(run_max, scores.amax(dim=-1))
        correction = torch.exp(run_max - new_max)
        p = torch.exp(scores - new_max[..., None])
        run_sum.mul_(correction).add_(p.sum(dim=-1))
        run_max.copy_(new_max)
        for acc in (*acc_rot, acc_tail):
            acc.mul_(correction[..., None])
        return p

    for lo in range(0, n, block_size):
        hi = min(n, lo + block_size)
        kf = {k: v[:, :, lo:hi] for k, v in keys.fields.items()}
        scores = sum(
            (q_rot[i] @ kc.unit_rotated(kf, i).transpose(-1, -2)) * kf[f"norms{i}"].float()[:, :, None, :]
            for i in range(len(kc.groups))
        )
        if q_qjl is not None:
            scale = kc.quantizer.qjl.scale(kf["rnorms"])[:, :, None, :]
            scores = scores + scale * (q_qjl @ kc.qjl_signs(kf).transpose(-1, -2))
        if q_mean is not None:
            scores = scores + q_mean
        p = softmax_step(scores, lo, hi)
        vf = {k: v[:, :, lo:hi] for k, v in values.fields.items()}
        for i in range(len(vc.groups)):
            acc_rot[i] += (p * vf[f"norms{i}"].float()[:, :, None, :]) @ vc.unit_rotated(vf, i)
            if v_mean[i] is not None:
                acc_rot[i] += p.sum(dim=-1, keepdim=True) * v_mean[i]
    if t:
        p = softmax_step(q @ tail_keys.float().transpose(-1, -2), n, n + t)
        acc_tail += p @ tail_values.float()

    out = acc_tail
    if n:
        parts = [acc_rot[i] @ vc.tensors(i, q.device)[0].T for i in range(len(vc.groups))]
        codes_out = vc.unpermute(torch.cat(parts, dim=-1), values.perm)
        out = out + (codes_out if values.scale is None else codes_out * values.scale)
    out = out / run_sum[..., None]
    out = out.reshape(bsz, num_kv, groups, q_len, dim).reshape(bsz, num_heads, q_len, dim)
    return out.transpose(1, 2).contiguous().to(query.dtype)


_DEQUANT_BYTES = 1 << 30  # dequantize_attention's K/V working set per batch chunk


def _batch_rows(p: PackedRows, b0: int, b1: int) -> PackedRows:
    """The batch rows [b0, b1) of compressed rows (means/scales broadcast over the batch stay as they are)."""
    pick = lambda x: x if x is None or x.shape[0] == 1 else x[b0:b1]  # noqa: E731
    fields = {k: v[b0:b1] for k, v in p.fields.items()}
    return PackedRows(p.codec, fields, p.perm, p.length, pick(p.mean), pick(p.scale))


def _dense(rows: PackedRows, dtype: torch.dtype) -> torch.Tensor:
    """Dequantized rows in ``dtype``: the fused kernel on CUDA where it applies, else the reference."""
    if kernels_enabled(rows.fields["codes0"]):
        from turbovq.kernels import dequantize as kernels_dequantize

        if kernels_dequantize.supported(rows):
            return kernels_dequantize.dequantize_rows(rows, dtype)
    return rows.dequantize().to(dtype)


def dequantize_attention(
    query: torch.Tensor,
    keys: PackedRows,
    values: PackedRows,
    tail_keys: torch.Tensor,
    tail_values: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
) -> torch.Tensor:
    """Multi-token attention over codes + tail: dequantize the codes to the query dtype, then SDPA (flash).

    Same arguments and result layout as :func:`attend_codes` (no soft-capping, mse keys). Why: for q_len > 1 the
    work is a matrix product per token block, which SDPA does at tensor-core speed once K/V are dense, while the
    reference's float32 blocks are 55-120x slower on a GPU. The K/V are rebuilt in the query dtype (as flash
    attention would read them from a bf16 cache; the fused dequantize kernel on CUDA) for at most ~1 GiB of
    sequences at a time.
    """
    bsz, num_heads, q_len, dim = query.shape
    num_kv = tail_keys.shape[1]
    if num_heads % num_kv:
        raise ValueError(f"{num_heads} query heads are not a multiple of {num_kv} KV heads")
    n, t = keys.length, tail_keys.shape[-2]
    if attention_mask is not None and attention_mask.shape[-1] != n + t:
        raise ValueError(f"attention mask covers {attention_mask.shape[-1]} positions, the cache holds {n} + {t}")
    per_seq = 2 * num_kv * (n + t) * dim * (4 + query.element_size())
    step = max(1, _DEQUANT_BYTES // max(per_seq, 1))
    outs = []
    for b0 in range(0, bsz, step):
        b1 = min(bsz, b0 + step)

        k = torch.cat([_dense(_batch_rows(keys, b0, b1), query.dtype), tail_keys[b0:b1].to(query.dtype)], 2)
        v = torch.cat([_dense(_batch_rows(values, b0, b1), query.dtype), tail_values[b0:b1].to(query.dtype)], 2)
        mask = attention_mask
        if mask is not None and mask.shape[0] == bsz:
            mask = mask[b0:b1]
        outs.append(
            torch.nn.functional.scaled_dot_product_attention(
                query[b0:b1], k, v, attn_mask=mask, scale=scaling, enable_gqa=num_heads != num_kv
            )
        )
        del k, v
    out = outs[0] if len(outs) == 1 else torch.cat(outs)
    return out.transpose(1, 2).contiguous()


def codes_first_mask(mask: torch.Tensor | None, num_sink: int, num_codes: int) -> torch.Tensor | None:
    """Reorder mask columns from position order (sink, codes, window) to the order of ``attend_codes``'s inputs
    (codes, then the full-precision tokens: sink followed by window)."""
    if mask is None or not num_sink:
        return mask
    cols = [mask[..., num_sink : num_sink + num_codes], mask[..., :num_sink], mask[..., num_sink + num_codes :]]
    return torch.cat(cols, dim=-1)


def turboquant_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    softcap: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention-interface function: codes attention on TurboQuant layers, sdpa elsewhere."""
    tag = getattr(key, _TAG, None)
    # No codes in this layer yet (a prompt's prefill): every token is exact and in position order, so this is plain
    # attention; sdpa does it without the (q_len x seq_len) float32 scores the reference would hold.
    if tag is None or (tag[1] == 0 and softcap is None):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if dropout and module.training:
        raise ValueError("attention on TurboQuant codes is inference-only (dropout > 0 in training mode)")
    layer, num_codes, num_sink = tag
    attention_mask = codes_first_mask(attention_mask, num_sink, num_codes)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    keys, values = layer.packed_keys(num_codes), layer.packed_values(num_codes)
    # On CUDA: single-token decode through the fused kernels (same result, reads the codes once), multi-token steps
    # through dequantize + SDPA. TURBOVQ_KERNELS=0 forces the reference everywhere.
    if kernels_enabled(query):
        if query.shape[2] == 1:
            from turbovq.kernels import decode as kernels_decode

            if kernels_decode.supported(query, keys, values):
                out = kernels_decode.decode_attention(query, keys, values, key, value, attention_mask, scaling, softcap)
                return out, None
        elif softcap is None:
            return dequantize_attention(query, keys, values, key, value, attention_mask, scaling), None
    out = attend_codes(query, keys, values, key, value, attention_mask, scaling, softcap)
    return out, None


def _codes_mask(*args, **kwargs):
    """Mask builder for ``"turboquant"``: always a materialized additive float mask (transformers' eager mask)."""
    from transformers.masking_utils import eager_mask

    return eager_mask(*args, **kwargs)


def register() -> None:
    """Register ``"turboquant"`` in transformers' attention and mask registries (idempotent, additive)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_NAME, turboquant_attention_forward)
    AttentionMaskInterface.register(ATTN_NAME, _codes_mask)


@contextmanager
def codes_attention(model):
    """Run ``model`` with attention on TurboQuant codes inside the block; restores its attention implementation."""
    register()
    previous = model.config._attn_implementation
    model.set_attn_implementation(ATTN_NAME)
    try:
        yield model
    finally:
        model.set_attn_implementation(previous)
