"""``TurboQuantCache``: a transformers ``Cache`` that keeps the KV cache as TurboQuant codes.

Per full-attention layer, keys and values of shape ``(batch_size, num_kv_heads, seq_len, head_dim)`` are split:

* a full-precision residual window (model dtype) holding the most recent tokens: between ``residual_length`` and
  ``residual_length + flush_block - 1`` of them once the sequence is long enough;
* everything older as packed TurboQuant_mse codes + per-vector norms (float16 by default), flushed from the
  window in blocks of ``flush_block`` tokens. Nothing else is kept, and ``nbytes`` counts exactly these tensors.

Fractional bits (e.g. 3.5) use the core outlier split: ``(bits - floor(bits)) * head_dim`` channels of each KV
head at ``ceil(bits)``, the rest at ``floor(bits)``, each group with its own rotation and norm. With
``outlier_channels="prefill"`` the outlier channels of every (layer, kv head) are the channels of largest RMS over
the tokens seen at the layer's first flush (normally the prompt); ``"fixed"`` takes the first channels.

Keys may use TurboQuant_prod instead (``qjl_keys=True``): ``key_bits - 1`` bits of mse codes plus a 1-bit QJL
sketch of the residual, which makes ``<q, k>`` unbiased (at the cost of variance).

Layers kept as the model expects: sliding-window / chunked layers stay exact ``DynamicSlidingWindowLayer`` (they
hold at most one window); ``full_precision_layers`` stay exact ``DynamicLayer``.

Two ways to attend:

* attention on the codes (``turbovq.kv.attention``, attention implementation ``"turboquant"``): ``update`` returns
  only the full-precision tail, tagged with its layer, and the attention function scores the codes directly;
* any other attention implementation (sdpa, eager, ...): ``update`` returns dequantized keys/values concatenated
  with the tail (a compatibility path that materializes K/V in the model dtype for the duration of the call).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, DynamicLayer, DynamicSlidingWindowLayer

from turbovq import codebook, packing
from turbovq.quantizer import TurboQuantMSE, TurboQuantProd
from turbovq.rotation import derive_seed

ATTN_NAME = "turboquant"  # the attention implementation that runs on the codes (registered by kv.attention)
OUTLIER_MODES = ("prefill", "fixed")
_TINY = 1e-30
_FP16_MAX = float(torch.finfo(torch.float16).max)
_TAG = "_turbovq_codes"


def gather_order(channels: list[int]) -> list[int]:
    """An order of a group's 128 channels in which the HAD encode kernel gathers them without bank conflicts.

    Why: any order within a group is as good for the quantizer (its rotation is random either way), but at head_dim
    256 with two groups the kernel (encode_mma.cu, ``HAS_PERM``) gathers a row's channels from shared memory, where
    read ``k`` of lane ``l`` takes the group's position ``4 l + k``: a read costs one pass per distinct 4-byte word
    in the busiest of the 32 banks. Sorted channels put about three words in one bank per read; here each class of
    positions ``k mod 4`` holds at most one word per bank wherever the greedy below finds one (every case tested).
    """
    words: dict[int, list[int]] = {}
    for c in channels:
        words.setdefault(c >> 1, []).append(c)
    banks: dict[int, list[list[int]]] = {}
    for w, cs in words.items():
        banks.setdefault(w & 31, []).append(cs)
    size = len(channels) // 4
    classes: list[list[int]] = [[] for _ in range(4)]
    seen = [dict() for _ in range(4)]  # words of each bank per class

    def put(k: int, cs: list[int], b: int) -> None:
        classes[k] += cs
        seen[k][b] = seen[k].get(b, 0) + 1

    for b, ws in sorted(banks.items(), key=lambda kv: (-len(kv[1]), kv[0])):  # the busiest banks first
        for cs in sorted(ws, key=lambda cs: (-len(cs), cs)):
            fits = [k for k in range(4) if len(classes[k]) + len(cs) <= size]
            if fits:
                put(min(fits, key=lambda k: (seen[k].get(b, 0), len(classes[k]), k)), cs, b)
            else:  # (a word's two channels in two classes)
                for c in cs:
                    put(min((k for k in range(4) if len(classes[k]) < size), key=lambda k: seen[k].get(b, 0)), [c], b)
    out = [0] * len(channels)
    for k, cls in enumerate(classes):
        out[k::4] = sorted(cls)
    return out


def sign_magnitude(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes in ascending level order -> sign-magnitude labels (and back: the map is its own inverse): the lower
    half's ``k`` becomes ``2^(b-1) - 1 - k``, the upper half is unchanged."""
    half = 1 << (bits - 1)
    return torch.where(codes < half, (half - 1) - codes, codes)


class RowCodec:
    """TurboQuant for the rows of ``(batch_size, num_kv_heads, n, head_dim)`` tensors, vectorized over heads.

    Every head uses the same rotations and codebooks (they depend only on ``seed``); fractional bits put each
    head's outlier channels first through a per-head channel permutation ``perm`` of shape ``(num_kv_heads,
    head_dim)`` (``None``: identity, i.e. the first channels are the outliers).

    Fields of the encoded rows (all ``(batch_size, num_kv_heads, n, ...)``): ``codes{i}`` packed uint8 and
    ``norms{i}`` for each channel group ``i``; with QJL also ``qjl`` (packed signs) and ``rnorms``.

    Codes are labelled sign-magnitude (:func:`sign_magnitude`): for a b-bit group the top bit is set for
    coordinates above the codebook's middle boundary and the low bits count levels out from it, so a symmetric
    codebook's magnitude is looked up by the low bits alone. Why: the split pass decodes 4-bit keys with one mask
    instead of an index flip (3% fewer instructions per unit, decode_mma.cu ``dec4``); any labelling is the same
    quantizer, and :meth:`tensors` gives the centroids in this order.
    """

    def __init__(self, dim: int, bits: float, seed: int = 0, rotation: str = "hadamard", qjl: bool = False):
        self.dim, self.bits, self.qjl = int(dim), float(bits), bool(qjl)
        if qjl:
            if bits < 2:
                raise ValueError(f"QJL keys need key_bits >= 2 (bits - 1 go to the mse codes), got {bits:g}")
            self.quantizer = TurboQuantProd(dim, bits, seed=seed, rotation=rotation)
            self.mse = self.quantizer._mse
        else:
            self.quantizer = TurboQuantMSE(dim, bits, seed=seed, rotation=rotation)
            self.mse = self.quantizer
        self.num_outliers = self.mse.num_outliers
        self._tensors: dict = {}
        # (bits, dim, offset in the permuted channel order) per group; group 0 holds the outliers when present.
        self.groups: list[tuple[int, int, int]] = []
        offset = 0
        for g in self.mse._groups:
            self.groups.append((g.bits, g.dim, offset))
            offset += g.dim

    def __repr__(self) -> str:
        return f"RowCodec(dim={self.dim}, bits={self.bits:g}, qjl={self.qjl})"

    def tensors(self, i: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(rotation A with ``x_rot = x @ A``, centroids by sign-magnitude code, boundaries in ascending order) of
        group ``i`` on ``device``."""
        key = (i, str(device))
        if key not in self._tensors:
            a, cents, bounds, _ = self.mse._groups[i].tensors(device)
            half = cents.numel() // 2
            self._tensors[key] = (a, torch.cat([cents[:half].flip(0), cents[half:]]), bounds)
        return self._tensors[key]

    def bytes_per_row(self, norm_bytes: int = 2) -> float:
        """Bytes per (token, head): packed codes + one norm per group (+ QJL signs and residual norm)."""
        total = sum(packing.packed_size(d, b) + norm_bytes for b, d, _ in self.groups)
        if self.qjl:
            total += packing.packed_size(self.quantizer.qjl.rows, 1) + norm_bytes
        return total

    # --- channel permutation ---------------------------------------------------------------------------------
    def calibrate(self, x: torch.Tensor) -> torch.Tensor | None:
        """Per-head permutation putting the ``num_outliers`` channels of largest RMS over ``x`` first, ``(H, D)``.
        Within a group the channels are ascending, or for two groups of 128 in :func:`gather_order`."""
        if self.num_outliers == 0:
            return None
        ms = x.float().pow(2).mean(dim=(0, 2))  # (H, D)
        top = torch.topk(ms, self.num_outliers, dim=-1).indices.sort(dim=-1).values
        mask = torch.ones_like(ms, dtype=torch.bool).scatter_(-1, top, False)
        rest = torch.arange(self.dim, device=x.device).expand_as(ms)[mask].reshape(ms.shape[0], -1)
        if self.num_outliers == self.dim - self.num_outliers == 128:
            top, rest = (torch.tensor([gather_order(r) for r in g.tolist()], device=x.device) for g in (top, rest))
        return torch.cat([top, rest], dim=-1)

    @staticmethod
    def permute(x: torch.Tensor, perm: torch.Tensor | None) -> torch.Tensor:
        """``x[b, h, :, perm[h]]`` for x of shape (B, H, n, D)."""
        if perm is None:
            return x
        return x.gather(-1, perm[None, :, None, :].expand(x.shape[0], -1, x.shape[2], -1))

    @staticmethod
    def unpermute(x: torch.Tensor, perm: torch.Tensor | None) -> torch.Tensor:
        if perm is None:
            return x
        index = perm[None, :, None, :].expand(x.shape[0], -1, x.shape[2], -1)
        return torch.empty_like(x).scatter_(-1, index, x)

    # --- encode / decode ---------------------------------------------------------------------------------------
    def encode(self, x: torch.Tensor, perm: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Quantize rows of ``x`` (B, H, n, D); norms come back in float32 (the caller picks the storage dtype)."""
        x = x.float()
        xp = self.permute(x, perm)
        fields = {}
        for i, (bits, d, off) in enumerate(self.groups):
            a, _, bounds = self.tensors(i, x.device)
            xg = xp[..., off : off + d]
            norms = torch.linalg.vector_norm(xg, dim=-1)
            y = (xg / norms.clamp_min(_TINY)[..., None]) @ a
            fields[f"codes{i}"] = packing.pack(sign_magnitude(codebook.quantize_coordinates(y, bounds), bits), bits)
            fields[f"norms{i}"] = norms
        if self.qjl:
            r = x - self.decode(fields, perm, with_qjl=False)
            signs, rnorms = self.quantizer.qjl.sketch(r.reshape(-1, self.dim))
            fields["qjl"] = signs.reshape(*x.shape[:3], -1)
            fields["rnorms"] = rnorms.reshape(x.shape[:3])
        return fields

    def unit_rotated(self, fields: dict[str, torch.Tensor], i: int) -> torch.Tensor:
        """Centroids of group ``i`` in the rotated space (unit norm, before scaling): (B, H, n, d_i) float32."""
        bits, d, _ = self.groups[i]
        _, cents, _ = self.tensors(i, fields[f"codes{i}"].device)
        return cents[packing.unpack(fields[f"codes{i}"], bits, d).long()]

    def qjl_signs(self, fields: dict[str, torch.Tensor]) -> torch.Tensor:
        packed = fields["qjl"]
        return self.quantizer.qjl.signs(packed.reshape(-1, packed.shape[-1])).reshape(*packed.shape[:3], -1)

    def decode(self, fields: dict[str, torch.Tensor], perm: torch.Tensor | None, with_qjl: bool = True) -> torch.Tensor:
        """Dequantize to float32 (B, H, n, D)."""
        parts = []
        for i in range(len(self.groups)):
            a, _, _ = self.tensors(i, fields[f"codes{i}"].device)
            parts.append((self.unit_rotated(fields, i) * fields[f"norms{i}"].float()[..., None]) @ a.T)
        out = self.unpermute(torch.cat(parts, dim=-1), perm)
        if self.qjl and with_qjl:
            qjl = self.quantizer.qjl
            signs = self.qjl_signs(fields)
            out = out + qjl.scale(fields["rnorms"])[..., None] * (signs @ qjl.matrix(out.device))
        return out


@dataclass
class PackedRows:
    """A read-only view of the first ``length`` compressed rows of one layer (keys or values).

    The codes encode ``(x - mean) / scale`` per (batch row, KV head, channel); ``mean`` and ``scale`` are
    ``(batch_size, num_kv_heads, 1, head_dim)`` float32, or None (zero mean, unit scale).
    """

    codec: RowCodec
    fields: dict[str, torch.Tensor]
    perm: torch.Tensor | None
    length: int
    mean: torch.Tensor | None = None
    scale: torch.Tensor | None = None

    def dequantize(self) -> torch.Tensor:
        out = self.codec.decode(self.fields, self.perm)
        if self.scale is not None:
            out = out * self.scale
        return out if self.mean is None else out + self.mean

    def rotated_mean(self, i: int) -> torch.Tensor | None:
        """``mean / scale`` on the channels of group ``i``, in that group's rotated space (B, H, 1, d_i); or None."""
        if self.mean is None:
            return None
        _, d, off = self.codec.groups[i]
        a, _, _ = self.codec.tensors(i, self.mean.device)
        m = self.mean if self.scale is None else self.mean / self.scale
        return self.codec.permute(m, self.perm)[..., off : off + d] @ a


def kernels_enabled(x: torch.Tensor) -> bool:
    """Whether the fused GPU kernels may run on ``x``: on CUDA, unless ``TURBOVQ_KERNELS=0`` forces the references."""
    return x.is_cuda and os.environ.get("TURBOVQ_KERNELS", "1") != "0"


def _norm_storage(norms: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if dtype == torch.float16 and bool((norms > _FP16_MAX).any()):
        return norms.float()  # too large for float16: this layer's norms move to float32 (see _append)
    return norms.to(dtype)


def _append(store: dict[str, torch.Tensor], new: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if not store:
        return new
    out = {}
    for k, v in new.items():
        old = store[k]
        if old.dtype != v.dtype:
            old, v = old.float(), v.float()
        out[k] = torch.cat([old, v], dim=2)
    return out


class TurboQuantLayer(DynamicLayer):
    """One full-attention layer: packed key/value codes + norms, and a full-precision residual window.

    ``self.keys`` / ``self.values`` hold only the full-precision window ``(batch_size, num_kv_heads, w, head_dim)``.
    """

    is_croppable = False

    def __init__(
        self,
        key_codec: RowCodec,
        value_codec: RowCodec,
        residual_length: int,
        flush_block: int,
        outlier_channels: str,
        norm_dtype: torch.dtype,
        attn_config,
        center: bool,
        channel_scaling: float,
        sink_tokens: int,
    ):
        super().__init__()
        self.key_codec, self.value_codec = key_codec, value_codec
        self.residual_length, self.flush_block = residual_length, flush_block
        self.outlier_channels, self.norm_dtype, self.center = outlier_channels, norm_dtype, center
        self.channel_scaling, self.sink_tokens = channel_scaling, sink_tokens
        self._attn_config = attn_config  # read at every update: codes attention or dequantized K/V
        self._reset_state()

    def _reset_state(self) -> None:
        self.keys = self.values = self.sink_keys = self.sink_values = None
        self.is_initialized = False
        self.cumulative_length = 0
        self.num_codes = 0
        self.key_fields: dict[str, torch.Tensor] = {}
        self.value_fields: dict[str, torch.Tensor] = {}
        self.key_perm: torch.Tensor | None = None
        self.value_perm: torch.Tensor | None = None
        self.key_mean: torch.Tensor | None = None
        self.value_mean: torch.Tensor | None = None
        self.key_scale: torch.Tensor | None = None
        self.value_scale: torch.Tensor | None = None
        self._calibrated = False

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys, self.values = key_states[..., :0, :], value_states[..., :0, :]
        self.sink_keys, self.sink_values = self.keys, self.values
        self.is_initialized = True

    @property
    def codes_attention(self) -> bool:
        return getattr(self._attn_config, "_attn_implementation", None) == ATTN_NAME

    def packed_keys(self, length: int | None = None) -> PackedRows:
        n = self.num_codes if length is None else length
        fields = {k: v[:, :, :n] for k, v in self.key_fields.items()}
        return PackedRows(self.key_codec, fields, self.key_perm, n, self.key_mean, self.key_scale)

    def packed_values(self, length: int | None = None) -> PackedRows:
        n = self.num_codes if length is None else length
        fields = {k: v[:, :, :n] for k, v in self.value_fields.items()}
        return PackedRows(self.value_codec, fields, self.value_perm, n, self.value_mean, self.value_scale)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append ``(batch_size, num_kv_heads, q_len, head_dim)`` states; return what the attention needs.

        Codes attention: the full-precision tokens (sink + window + new states), tagged with
        ``(layer, num_codes, num_sink)``; in position order the cache is sink, codes, window.
        Otherwise: sink + dequantized codes + window, in the model dtype (all ``seq_len`` positions).
        Tokens leaving the window are quantized *after* the returned tensors were formed, so the current
        step always sees its own tokens at full precision.
        """
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        tail_k = torch.cat([self.keys, key_states], dim=-2)
        tail_v = torch.cat([self.values, value_states], dim=-2)
        self.cumulative_length += key_states.shape[-2]
        num_codes, num_sink = self.num_codes, self.sink_keys.shape[-2]
        if self.codes_attention:
            out_k = torch.cat([self.sink_keys, tail_k], dim=-2)  # a fresh tensor object carrying the tag
            setattr(out_k, _TAG, (self, num_codes, num_sink))
            out = (out_k, torch.cat([self.sink_values, tail_v], dim=-2))
        elif num_codes:
            keys = self.packed_keys().dequantize().to(tail_k.dtype)
            values = self.packed_values().dequantize().to(tail_v.dtype)
            out = (
                torch.cat([self.sink_keys, keys, tail_k], dim=-2),
                torch.cat([self.sink_values, values, tail_v], dim=-2),
            )
        else:
            out = (torch.cat([self.sink_keys, tail_k], dim=-2), torch.cat([self.sink_values, tail_v], dim=-2))
        self.keys, self.values = tail_k, tail_v
        self._flush()
        return out

    def _flush(self) -> None:
        """Quantize the oldest tokens of the window, in whole blocks, keeping at least ``residual_length``.

        At the first flush the sequence's first ``sink_tokens`` move to the exact sink, then the means, scales and
        outlier channels are calibrated on the rest of the window (normally the prompt).
        """
        reserve = self.residual_length + (0 if self._calibrated else self.sink_tokens)
        if self.keys.shape[-2] - reserve < self.flush_block:
            return
        if not self._calibrated:
            s = self.sink_tokens
            self.sink_keys, self.keys = self.keys[..., :s, :].contiguous(), self.keys[..., s:, :]
            self.sink_values, self.values = self.values[..., :s, :].contiguous(), self.values[..., s:, :]
            self._calibrate()
        extra = self.keys.shape[-2] - self.residual_length
        if extra < self.flush_block:
            return
        n = (extra // self.flush_block) * self.flush_block
        kf = self._encode(self.key_codec, self.keys[..., :n, :], self.key_perm, self.key_mean, self.key_scale)
        vf = self._encode(self.value_codec, self.values[..., :n, :], self.value_perm, self.value_mean,
                          self.value_scale)
        for fields in (kf, vf):
            for name in fields:
                if "norms" in name:
                    fields[name] = _norm_storage(fields[name], self.norm_dtype)
        self.key_fields = _append(self.key_fields, kf)
        self.value_fields = _append(self.value_fields, vf)
        self.num_codes += n
        self.keys = self.keys[..., n:, :].contiguous()
        self.values = self.values[..., n:, :].contiguous()

    def _calibrate(self) -> None:
        """Means, channel scales and outlier channels from the tokens in the window (normally the prompt)."""
        for name in ("key", "value"):
            x = (self.keys if name == "key" else self.values).float()
            mean = x.mean(dim=2, keepdim=True) if self.center else None
            scale = None
            if self.channel_scaling:
                xc = x if mean is None else x - mean
                rms = xc.pow(2).mean(dim=2, keepdim=True).sqrt()
                rel = rms / rms.mean(dim=-1, keepdim=True).clamp_min(_TINY)  # (an all-zero head: 0, not NaN)
                scale = rel.clamp_min(1e-3).pow(self.channel_scaling)
            perm = None
            if self.outlier_channels == "prefill":
                perm = getattr(self, f"{name}_codec").calibrate(self._normalized(x, mean, scale))
            setattr(self, f"{name}_mean", mean)
            setattr(self, f"{name}_scale", scale)
            setattr(self, f"{name}_perm", perm)
        self._calibrated = True

    @classmethod
    def _encode(cls, codec: RowCodec, x: torch.Tensor, perm, mean, scale) -> dict[str, torch.Tensor]:
        """Codes of ``(x - mean) / scale``: the fused Triton kernel on CUDA (``TURBOVQ_KERNELS=0``: the reference)."""
        if kernels_enabled(x):
            from turbovq.kernels import encode as kernels_encode

            if kernels_encode.supported(x, codec):
                return kernels_encode.encode_rows(x, codec, perm, mean, scale)
        return codec.encode(cls._normalized(x, mean, scale), perm)

    @staticmethod
    def _normalized(x: torch.Tensor, mean: torch.Tensor | None, scale: torch.Tensor | None) -> torch.Tensor:
        if mean is not None:
            x = x.float() - mean
        return x if scale is None else x.float() / scale

    def get_seq_length(self) -> int:
        return self.cumulative_length

    @property
    def nbytes(self) -> int:
        """Bytes held: codes, norms, QJL fields, channel permutations, means and the full-precision window."""
        tensors = [*self.key_fields.values(), *self.value_fields.values(), self.key_perm, self.value_perm]
        tensors += [self.key_mean, self.value_mean, self.key_scale, self.value_scale]
        if self.is_initialized:
            tensors += [self.keys, self.values, self.sink_keys, self.sink_values]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    # --- batch manipulation (beam search, contrastive search) ------------------------------------------------------
    def _map_batch(self, fn) -> None:
        if not self.is_initialized:
            return
        self.keys, self.values = fn(self.keys), fn(self.values)
        self.sink_keys, self.sink_values = fn(self.sink_keys), fn(self.sink_values)
        self.key_fields = {k: fn(v) for k, v in self.key_fields.items()}
        self.value_fields = {k: fn(v) for k, v in self.value_fields.items()}
        for name in ("key_mean", "value_mean", "key_scale", "value_scale"):
            if getattr(self, name) is not None:
                setattr(self, name, fn(getattr(self, name)))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices, ...])

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("TurboQuantCache layers cannot be cropped (quantized tokens cannot be restored)")

    def reset(self) -> None:
        self._reset_state()

    def offload(self):
        raise NotImplementedError("offloading is not supported by TurboQuantCache")


def _layer_nbytes(layer) -> int:
    if isinstance(layer, TurboQuantLayer):
        return layer.nbytes
    keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
    if not getattr(layer, "is_initialized", False) or keys is None:
        return 0
    return sum(t.numel() * t.element_size() for t in (keys, values))


def _layer_types(text_config) -> tuple[list[str], int | None]:
    """Attention kind of every layer and the sliding window, as transformers' ``DynamicCache(config=...)`` sees them."""
    types = getattr(text_config, "layer_types", None)
    if types is None:
        if getattr(text_config, "sliding_window", None) is not None:
            types = ["sliding_attention"] * text_config.num_hidden_layers
        elif getattr(text_config, "attention_chunk_size", None) is not None:
            types = ["chunked_attention"] * text_config.num_hidden_layers
        else:
            types = ["full_attention"] * text_config.num_hidden_layers
    shared = getattr(text_config, "num_kv_shared_layers", None)
    if shared:
        types = types[:-shared]
    window = getattr(text_config, "sliding_window", None)
    if "chunked_attention" in types:
        window = text_config.attention_chunk_size
    return list(types), window


def _check_bits(bits, name: str) -> float:
    if isinstance(bits, bool) or not isinstance(bits, (int, float)) or not 1 <= bits <= 8 or math.isnan(bits):
        raise ValueError(f"{name} must be a number in [1, 8], got {bits!r}")
    return float(bits)


class TurboQuantCache(Cache):
    """A transformers ``Cache`` storing keys/values as TurboQuant codes (see the module docstring).

    Parameters
    ----------
    config : the model config (``model.config``); its text config gives layer types, heads and ``head_dim``.
    key_bits, value_bits : bits per coordinate, 1..8, fractional allowed (multiples of 1/head_dim).
    residual_length : most recent tokens kept in the model dtype (>= 0).
    full_precision_layers : layer indices kept exact (negative indices count from the end), e.g. ``(0, -1)``.
    outlier_channels : ``"prefill"`` (top-RMS channels per layer and KV head at the first flush) or ``"fixed"``.
    qjl_keys : keys as TurboQuant_prod (``key_bits - 1`` mse bits + 1-bit QJL) instead of TurboQuant_mse.
    flush_block : tokens are quantized in blocks of this many (>= 1).
    center : subtract each (layer, batch row, KV head)'s mean key and value over the first flushed tokens (the
        prompt) before quantizing and add it back when reading. Keys of real models carry a large constant
        component (61-69% of the key energy in Gemma-3's full layers); quantizing only the deviation cuts the
        key error ~3x there and halves Gemma-3's KL at 3.5 bits, but raised SmolLM2's (RoPE'd keys drift away
        from the prompt's mean), so it is off by default.
    channel_scaling : exponent ``a`` of a per-channel scale ``s_c = (rms_c / mean rms)^a`` (prompt statistics, per
        layer, row and KV head) divided out before the rotation and multiplied back when reading (0 disables).
        A rotation spreads the error evenly over channels; real keys/values have channels of very different
        size, and ``a = 0.5`` shrinks the expected error from ``d * sum(rms_c^2)`` to ``(sum rms_c)^2`` (the
        Cauchy-Schwarz optimum when queries are isotropic).
    sink_tokens : the sequence's first tokens kept exact in every quantized layer. They are attention sinks: most
        heads put much of their weight on them, their keys are atypical (far from the mean), so their quantization
        error costs more than any other token's (measured on SmolLM2: centering without sinks raised KL 6x).
    seed, rotation : as in ``TurboQuantMSE``; keys and values use independent seeds.
    norm_dtype : ``"float16"`` (default; a layer switches to float32 if a norm overflows) or ``"float32"``.
    """

    def __init__(
        self,
        config,
        key_bits: float = 4,
        value_bits: float = 4,
        residual_length: int = 128,
        full_precision_layers: Sequence[int] = (),
        outlier_channels: str = "prefill",
        qjl_keys: bool = False,
        flush_block: int = 64,
        seed: int = 0,
        rotation: str = "hadamard",
        norm_dtype: str = "float16",
        center: bool = False,
        channel_scaling: float = 0.5,
        sink_tokens: int = 4,
    ):
        text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        self.key_bits, self.value_bits = _check_bits(key_bits, "key_bits"), _check_bits(value_bits, "value_bits")
        if isinstance(residual_length, bool) or not isinstance(residual_length, int) or residual_length < 0:
            raise ValueError(f"residual_length must be an integer >= 0, got {residual_length!r}")
        if isinstance(flush_block, bool) or not isinstance(flush_block, int) or flush_block < 1:
            raise ValueError(f"flush_block must be an integer >= 1, got {flush_block!r}")
        if outlier_channels not in OUTLIER_MODES:
            raise ValueError(f"outlier_channels must be one of {OUTLIER_MODES}, got {outlier_channels!r}")
        norm_dtypes = {"float16": torch.float16, "float32": torch.float32}
        if norm_dtype not in norm_dtypes:
            raise ValueError(f"norm_dtype must be one of {tuple(norm_dtypes)}, got {norm_dtype!r}")
        self.head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        self.num_layers = int(text.num_hidden_layers)
        fp_layers = set()
        for i in full_precision_layers:
            if not -self.num_layers <= int(i) < self.num_layers:
                raise ValueError(f"full_precision_layers: {i} is out of range for {self.num_layers} layers")
            fp_layers.add(int(i) % self.num_layers)
        self.full_precision_layers = tuple(sorted(fp_layers))
        self.residual_length, self.flush_block, self.qjl_keys = residual_length, flush_block, bool(qjl_keys)
        self.outlier_channels, self.seed, self.rotation = outlier_channels, int(seed), rotation
        self.center = bool(center)
        if isinstance(channel_scaling, bool) or not isinstance(channel_scaling, (int, float)):
            raise ValueError(f"channel_scaling must be a number in [0, 1], got {channel_scaling!r}")
        if not 0 <= channel_scaling <= 1:
            raise ValueError(f"channel_scaling must be a number in [0, 1], got {channel_scaling!r}")
        self.channel_scaling = float(channel_scaling)
        if isinstance(sink_tokens, bool) or not isinstance(sink_tokens, int) or sink_tokens < 0:
            raise ValueError(f"sink_tokens must be an integer >= 0, got {sink_tokens!r}")
        self.sink_tokens = sink_tokens
        self.key_codec = RowCodec(self.head_dim, self.key_bits, derive_seed(self.seed, "keys"), rotation, qjl_keys)
        self.value_codec = RowCodec(self.head_dim, self.value_bits, derive_seed(self.seed, "values"), rotation)

        layer_types, window = _layer_types(text)
        layers = []
        for idx, kind in enumerate(layer_types):
            if kind in ("sliding_attention", "chunked_attention"):
                layers.append(DynamicSlidingWindowLayer(sliding_window=window))
            elif kind != "full_attention":
                raise ValueError(f"TurboQuantCache supports attention layers only; layer {idx} is {kind!r}")
            elif idx in fp_layers:
                layers.append(DynamicLayer())
            else:
                layers.append(
                    TurboQuantLayer(
                        self.key_codec,
                        self.value_codec,
                        residual_length,
                        flush_block,
                        outlier_channels,
                        norm_dtypes[norm_dtype],
                        text,
                        self.center,
                        self.channel_scaling,
                        self.sink_tokens,
                    )
                )
        super().__init__(layers=layers)

    def __repr__(self) -> str:
        return (
            f"TurboQuantCache(key_bits={self.key_bits:g}, value_bits={self.value_bits:g}, "
            f"residual_length={self.residual_length}, quantized_layers={self.quantized_layers}, "
            f"qjl_keys={self.qjl_keys})"
        )

    @property
    def quantized_layers(self) -> list[int]:
        return [i for i, layer in enumerate(self.layers) if isinstance(layer, TurboQuantLayer)]

    @property
    def nbytes(self) -> int:
        """Real bytes held by all layers (codes, norms, full-precision windows, exact layers)."""
        return sum(_layer_nbytes(layer) for layer in self.layers)

    def bytes_per_token(self) -> float:
        """``nbytes`` per cached token (batch rows counted separately); 0 when empty."""
        batch = next((x.keys.shape[0] for x in self.layers if getattr(x, "is_initialized", False)), 1)
        tokens = self.get_seq_length() * batch
        return self.nbytes / tokens if tokens else 0.0
