"""Per-warp timeline of the round-14 persistent split passes (run with persistent_pieces_r14.patch or
persistent_home_r14.patch applied, on a GPU): B = 8, T = 32k, K4/V3, a ``DBG = 7`` build. Each persistent warp
writes one row of 8 int64 at trace[8 (BH + warp id)]: start (after the query wait), first unit in, first piece
ended (pieces patch only), pieces or chunks taken, -, -, end, SM | units << 16; the BH tail blocks' rows come first
(start in column 0, end in column 6). Writes $OUT/<name>.json: {variant: rows}.

    PYTHONPATH=src python3 benchmarks/variants/persistent_trace_r14.py '[{"PW": 1}]' kernels_pw_trace_r14
"""

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import kernels as kb  # noqa: E402

dev = torch.device("cuda")
variants, name = json.loads(sys.argv[1]), sys.argv[2]
b, t = 8, 32768
kc, vc = kb.RowCodec(kb.D, 4, seed=1), kb.RowCodec(kb.D, 3, seed=2)
q = torch.randn(b, kb.HQ, 1, kb.D, device=dev, dtype=torch.bfloat16)
tk = torch.randn(b, kb.HKV, kb.TAIL, kb.D, device=dev, dtype=torch.bfloat16)
pk, pv = kb.synthetic_rows(kc, b, t - kb.TAIL, dev, 1), kb.synthetic_rows(vc, b, t - kb.TAIL, dev, 2)
out = {}
for var in variants:
    with kb.tuned(var), kb.traced(dev) as buf:
        for _ in range(3):
            buf.zero_()
            kb.decode_attention(q, pk, pv, tk, tk, None, kb.D**-0.5)
            torch.cuda.synchronize()
    rows = buf.view(-1, 8)
    out[json.dumps(var)] = rows[: int((rows[:, 0] > 0).nonzero().max()) + 1].cpu().tolist()
    print(var, "rows", len(out[json.dumps(var)]), flush=True)
Path(os.environ.get("OUT", "benchmarks/results"), f"{name}.json").write_text(json.dumps(out))
