"""CPU checks of the kernels' pure-torch references (kernels/reference.py); these run in CI.

The split-T algorithm with the fused rotation must equal ``attend_codes`` (float32 rounding only), and the encode
reference must be ``RowCodec.encode``. An optional test runs the Triton kernels in the interpreter on tiny inputs.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from turbovq.kernels.reference import (  # noqa: E402
    channel_groups,
    decode_reference,
    encode_reference,
    fused_rotation,
    split_decode_reference,
)
from turbovq.kv.cache import PackedRows, RowCodec  # noqa: E402


def make_case(d=64, hq=8, hkv=2, b=2, n=50, t=7, key_bits=4.0, value_bits=3.0, center=True, scaled=False, seed=0,
              qjl=False):  # fmt: skip
    """Query (b, hq, 1, d), compressed keys/values of n tokens, a tail of t, with outlier channels, a mean and
    (``scaled``) per-channel scales, as the cache's normalized layers hold them; ``qjl``: TurboQuant_prod keys."""
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(b, hq, 1, d, generator=g)
    keys = torch.randn(b, hkv, n + t, d, generator=g) * 2 + 2.0 * torch.randn(1, hkv, 1, d, generator=g)
    keys[..., :3] *= 4
    values = torch.randn(b, hkv, n + t, d, generator=g)

    def packed(codec, x):
        mean = x.mean(dim=2, keepdim=True) if center else None
        xc = x - mean if center else x
        scale = xc.pow(2).mean(dim=2, keepdim=True).sqrt().clamp_min(1e-3) ** 0.5 if scaled else None
        xc = xc / scale if scaled else xc
        perm = codec.calibrate(xc)
        return PackedRows(codec, codec.encode(xc, perm), perm, n, mean, scale)

    kc, vc = RowCodec(d, key_bits, seed=1, qjl=qjl), RowCodec(d, value_bits, seed=2)
    return query, packed(kc, keys[:, :, :n]), packed(vc, values[:, :, :n]), keys[:, :, n:], values[:, :, n:]


def padding_mask(b, total, pad):
    mask = torch.ones(b, 1, 1, total, dtype=torch.bool)
    mask[-1, ..., :pad] = False
    return mask


@pytest.mark.parametrize("key_bits,value_bits", [(4, 3), (4, 4), (3.5, 3.5), (2.5, 2.5), (2, 4)])
def test_fused_rotation_is_per_group_rotation_of_permuted_channels(key_bits, value_bits):
    _, pk, _, _, _ = make_case(key_bits=key_bits, value_bits=value_bits)
    codec, perm = pk.codec, pk.perm
    x = torch.randn(3, perm.shape[0] if perm is not None else 2, 5, codec.dim)
    rot = fused_rotation(codec, perm, x.device)
    xp = codec.permute(x, perm)
    expect = torch.cat(
        [xp[..., o : o + d] @ codec.tensors(i, "cpu")[0] for i, (_, d, o) in enumerate(codec.groups)], -1
    )
    torch.testing.assert_close(x @ rot[None], expect, atol=1e-5, rtol=1e-5)
    eye = torch.eye(codec.dim).expand_as(rot)
    torch.testing.assert_close(rot @ rot.transpose(-1, -2), eye, atol=1e-5, rtol=0)  # orthogonal: R^T inverts
    assert fused_rotation(codec, perm, x.device) is rot  # cached per layer
    gid = channel_groups(codec, perm, rot.shape[0], "cpu")
    for i, (_, d, o) in enumerate(codec.groups):
        chans = torch.arange(codec.dim) if perm is None else perm[0]
        assert (gid[0, chans[o : o + d]] == i).all()


@pytest.mark.parametrize("key_bits,value_bits", [(4, 3), (3.5, 2.5), (2, 2)])
@pytest.mark.parametrize("center,scaled", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("d,hq,hkv,t,splits", [(64, 8, 2, 7, 3), (128, 4, 4, 0, 1), (32, 4, 1, 3, 7)])
def test_split_decode_equals_attend_codes(key_bits, value_bits, center, scaled, d, hq, hkv, t, splits):
    q, pk, pv, tk, tv = make_case(
        d=d, hq=hq, hkv=hkv, t=t, key_bits=key_bits, value_bits=value_bits, center=center, scaled=scaled
    )
    mask = padding_mask(2, 50 + t, pad=20)  # the padded row masks whole splits: they must contribute nothing
    for softcap in (None, 4.0):
        ref = decode_reference(q, pk, pv, tk, tv, mask, d**-0.5, softcap)
        out = split_decode_reference(q, pk, pv, tk, tv, mask, d**-0.5, softcap, num_splits=splits)
        assert out.shape == (2, 1, hq, d)
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


def test_encode_reference_is_row_codec_encode():
    _, pk, _, _, _ = make_case()
    x = torch.randn(2, 2, 9, 64)
    mean, scale = x.mean(2, keepdim=True), torch.rand(2, 2, 1, 64) + 0.5
    ref = pk.codec.encode((x - mean) / scale, pk.perm)
    out = encode_reference(x.half(), pk.codec, pk.perm, mean, scale)
    assert (ref["codes0"] != out["codes0"]).float().mean() < 0.02  # only the float16 input rounding differs


_INTERPRETER_CHECK = textwrap.dedent(
    """
    import numpy as np, torch, triton.runtime.interpreter as ti
    _orig = ti._patch_lang_tensor
    def _patched(tensor, scope):  # numpy >= 2.4 refuses int() of the interpreter's 1-element scalars
        _orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))
    ti._patch_lang_tensor = _patched
    import test_reference as tr
    from turbovq.kernels.decode import decode_attention
    from turbovq.kernels.encode import encode_rows
    from turbovq.kernels.reference import decode_reference, encode_reference
    cases = [(4, 3, 64, False, False), (3.5, 2.5, 64, True, False), (2, 4, 32, False, False), (4, 3, 64, True, True)]
    for kb, vb, d, scaled, qjl in cases:  # (the last: TurboQuant_prod keys)
        q, pk, pv, tk, tv = tr.make_case(d=d, hq=4, hkv=2, n=70, t=5, key_bits=kb, value_bits=vb, scaled=scaled,
                                         qjl=qjl)  # fmt: skip
        mask = tr.padding_mask(2, 75, pad=9)
        q, tk, tv = q.half(), tk.half(), tv.half()
        ref = decode_reference(q, pk, pv, tk, tv, mask, d**-0.5).float()
        for trans in (True, False):  # both orientations of the split pass
            out = decode_attention(q, pk, pv, tk, tv, mask, d**-0.5, block_t=16, num_splits=3, trans=trans).float()
            err = ((out - ref).norm() / ref.norm()).item()
            assert err < 3e-3, (kb, vb, qjl, trans, err)
        x = torch.randn(1, 2, 21, d)
        e_ref = encode_reference(x, pk.codec, pk.perm, pk.mean[:1], pk.scale[:1] if scaled else None)
        e_out = encode_rows(x, pk.codec, pk.perm, pk.mean[:1], pk.scale[:1] if scaled else None, block_t=16)
        for k in e_ref:
            if k.startswith("codes"):
                assert (e_ref[k] != e_out[k]).float().mean() < 1e-3, k
            else:
                torch.testing.assert_close(e_out[k], e_ref[k], rtol=1e-5, atol=0)
    from turbovq.kv.cache import RowCodec
    for kb, d, rot in [(4, 64, "hadamard"), (3.5, 64, "haar"), (2, 32, "hadamard")]:  # prod keys: mse + QJL signs
        codec = RowCodec(d, kb, seed=3, rotation=rot, qjl=True)
        x = torch.randn(2, 2, 37, d) * 3 + 1
        mean = x.mean(2, keepdim=True)
        perm = codec.calibrate(x - mean)
        e_ref = encode_reference(x, codec, perm, mean)
        e_out = encode_rows(x, codec, perm, mean, block_t=16)
        assert set(e_out) == set(e_ref), (set(e_out), set(e_ref))
        signs = lambda f: codec.qjl_signs(f)  # noqa: E731
        assert (signs(e_ref) != signs(e_out)).float().mean() < 2e-3, kb
        torch.testing.assert_close(e_out["rnorms"], e_ref["rnorms"], rtol=1e-4, atol=1e-6)
        for k in e_ref:
            if k.startswith("codes"):
                assert (e_ref[k] != e_out[k]).float().mean() < 1e-3, k
    from turbovq.kernels.dequantize import dequantize_rows
    for kb, d, scaled, qjl in [(4, 64, False, False), (3.5, 64, True, False), (2.5, 128, True, False),
                               (3, 128, False, False), (4, 256, True, False), (3.5, 64, True, True)]:  # fmt: skip
        q, pk, pv, tk, tv = tr.make_case(d=d, hq=4, hkv=2, n=70, t=5, key_bits=kb, value_bits=kb, scaled=scaled,
                                         qjl=qjl)  # fmt: skip
        ref = pk.dequantize()
        torch.testing.assert_close(dequantize_rows(pk, torch.float32, block_t=16), ref, rtol=1e-4, atol=1e-4)
        half = dequantize_rows(pk, torch.float16, block_t=32).float()
        assert ((half - ref).norm() / ref.norm()).item() < 2e-3, kb
    print("interpreter ok")
    """
)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton (interpreter mode on CPU)")
def test_triton_kernels_in_interpreter():
    """The Triton kernels in TRITON_INTERPRET=1 mode on tiny float16 inputs (the interpreter cannot do bf16 dots)."""
    here = Path(__file__).resolve().parent
    src = here.parent.parent / "src"
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([str(src), str(here)])}
    res = subprocess.run([sys.executable, "-c", _INTERPRETER_CHECK], env=env, capture_output=True, text=True)
    assert res.returncode == 0 and "interpreter ok" in res.stdout, res.stderr[-3000:]


def test_encode_rows_refuses_a_qjl_sketch_it_cannot_pack():  # (before any kernel: no Triton needed)
    from turbovq.kernels.encode import encode_rows
    from turbovq.qjl import QJL

    codec = RowCodec(64, 4, seed=0, qjl=True)
    codec.quantizer.qjl = QJL(64, seed=0, rows=48)  # signs are packed 32 to a word by a power-of-two tile
    with pytest.raises(ValueError, match="QJL sketch of >= 32 rows, got 48"):
        encode_rows(torch.randn(1, 1, 4, 64), codec, None)
