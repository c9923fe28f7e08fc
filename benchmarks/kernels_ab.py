"""Two versions of a kernel module side by side, in one run on one GPU (the A/B behind each kernel change).

The other version is a copy of ``turbovq/kernels/decode.py`` (with its ``decode_mma.cu`` beside it) or of
``encode.py`` (with ``encode_mma.cu``), e.g. from git:

    mkdir -p /tmp/old && for f in decode.py decode_mma.cu; do
        git show REV:src/turbovq/kernels/$f > /tmp/old/$f; done
    PYTHONPATH=src python3 benchmarks/kernels_ab.py decode /tmp/old/decode.py --name kernels_decode_ab

* ``decode``: GPU time of one K4/V3 call (Llama-3.1-8B heads, 128-token bf16 tail) replayed as a CUDA graph, for the
  other version, this checkout with programmatic dependent launch off and this checkout as it is, at ``--cells``,
  with bf16 SDPA timed the same way; the outputs' relative difference; per-kernel device times at the first cell.
* ``encode``: ``encode_rows(backend="cuda")`` of both versions on 8 x 8 x 32k bf16 rows (centered, channel scales)
  at head_dim 128 (4, 3, 3.5, 2.5 bits), 64 and 256 (4, 3.5 bits): time, share of copy bandwidth, share of equal
  codes and the largest relative norm difference.

Writes ``<out>/<name>.json``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import kernels as kb
import torch

from turbovq.kernels import decode as kdecode
from turbovq.kernels import encode as kencode
from turbovq.kv.cache import RowCodec


def load(path: str, name: str):
    spec = importlib.util.spec_from_file_location(f"turbovq.kernels._ab_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def per_kernel_us(call, calls: int = 20) -> dict[str, float]:
    for _ in range(5):
        call()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            call()
        torch.cuda.synchronize()
    return {e.key: e.device_time_total / e.count for e in prof.key_averages() if e.device_time_total > 0}


def decode_cell(versions, b: int, t: int, dev, profile: bool) -> dict:
    kc, vc = RowCodec(kb.D, 4, seed=1), RowCodec(kb.D, 3, seed=2)
    q, _, sdpa_g = kb._sdpa_baseline(b, t, dev)
    tk = torch.randn(b, kb.HKV, kb.TAIL, kb.D, device=dev, dtype=torch.bfloat16)
    pk, pv = kb.synthetic_rows(kc, b, t - kb.TAIL, dev, 1), kb.synthetic_rows(vc, b, t - kb.TAIL, dev, 2)
    row, outs, default = {"B": b, "T": t, "sdpa_graph_ms": sdpa_g}, {}, kdecode.PDL
    for _ in range(2):  # each version twice, alternating; the faster of the two
        for name, mod, pdl in versions:
            kdecode.PDL = pdl

            def call(mod=mod):
                return mod.decode_attention(q, pk, pv, tk, tk, None, kb.D**-0.5)

            outs[name] = call().float()
            row[name] = min(row.get(name, float("inf")), kb._graph_ms(call, dev))
            if profile and name not in row.get("kernels_us", {}):
                row.setdefault("kernels_us", {})[name] = per_kernel_us(call)
    kdecode.PDL = default
    ref = outs["other"]
    row["rel_diff_vs_other"] = {k: float((v - ref).norm() / ref.norm()) for k, v in outs.items()}
    row.update({f"{k}_vs_sdpa": sdpa_g / row[k] for k, _, _ in versions})
    print(f"decode B={b} T={t}: " + ", ".join(f"{k} {row[k] * 1e3:.1f} us" for k, _, _ in versions), flush=True)
    return row


def decode_ab(other, cells, dev) -> list[dict]:
    versions = (("other", other, kdecode.PDL), ("this_no_pdl", kdecode, False), ("this", kdecode, kdecode.PDL))
    rows = [decode_cell(versions, b, t, dev, i == 0) for i, (b, t) in enumerate(cells)]
    torch.cuda.empty_cache()
    return rows


def encode_case(other, x, mean, scale, bits, copy_tbs) -> dict:
    dim = x.shape[-1]
    codec = RowCodec(dim, bits, seed=1)
    perm = codec.calibrate(x[:, :, :1024].float() - mean) if codec.num_outliers else None
    mods = (("other", other), ("this", kencode))
    fields = {name: mod.encode_rows(x, codec, perm, mean, scale, backend="cuda") for name, mod in mods}
    nbytes = x.numel() * 2 + sum(v.numel() * v.element_size() for v in fields["this"].values())
    row = {"head_dim": dim, "bits": bits}
    for _ in range(2):
        for name, mod in mods:

            def run(mod=mod):
                return mod.encode_rows(x, codec, perm, mean, scale, backend="cuda")

            row[f"{name}_ms"] = min(row.get(f"{name}_ms", float("inf")), kb.bench(run, rep=50))
    for name, _ in mods:
        row[f"{name}_frac"] = nbytes / row[f"{name}_ms"] / 1e9 / copy_tbs
    o, n = fields["other"], fields["this"]
    row["codes_equal"] = {k: float((o[k] == n[k]).float().mean()) for k in o if k.startswith("codes")}
    row["norm_max_rel_diff"] = {k: float((o[k] / n[k].clamp_min(1e-30) - 1).abs().max()) for k in o
                                if k.startswith("norms")}  # fmt: skip
    print(f"encode d={dim} bits={bits}: other {row['other_frac']:.0%}, this {row['this_frac']:.0%} of copy bw",
          flush=True)  # fmt: skip
    return row


def encode_ab(other, dev, copy_tbs) -> list[dict]:
    rows = []
    for dim in (128, 64, 256):
        x = torch.randn(8, kb.HKV, 32768, dim, device=dev, dtype=torch.bfloat16)
        mean = x.float().mean(2, keepdim=True)
        scale = torch.rand(8, kb.HKV, 1, dim, device=dev) + 0.5
        rows += [encode_case(other, x, mean, scale, bits, copy_tbs) for bits in ((4, 3, 3.5, 2.5) if dim == 128
                                                                                  else (4, 3.5))]  # fmt: skip
        del x
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("kind", choices=("decode", "encode"))
    ap.add_argument("other", help="path of the other version's decode.py or encode.py (its .cu file beside it)")
    ap.add_argument("--cells", default="8x32768,8x131072,1x8192,1x32768,32x32768", help="decode: BxT cells")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--name", default=None)
    args = ap.parse_args()
    dev = torch.device("cuda")
    other = load(args.other, args.kind)
    res = {"device": torch.cuda.get_device_name(dev), "other": str(Path(args.other).resolve())}
    if args.kind == "decode":
        cells = [tuple(int(v) for v in c.split("x")) for c in args.cells.split(",")]
        res["decode"] = decode_ab(other, cells, dev)
    else:
        res["copy_TBps"] = kb.copy_bandwidth(dev)
        res["encode"] = encode_ab(other, dev, res["copy_TBps"])
    path = Path(args.out) / f"{args.name or f'kernels_{args.kind}_ab'}.json"
    path.write_text(json.dumps(res, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
