"""Summarise an Nsight Compute per-instruction (SASS) profile: warp-stall samples by reason and by opcode.

The profile comes from (on a machine where ncu can read the counters, e.g. the H100 device machine):

    ncu --clock-control none -k regex:tq_decode_split -s 2 -c 1 --section SourceCounters --page source \\
        --print-source sass --csv python3 benchmarks/kernels.py --phases profile-call > ncu_source.csv
    python benchmarks/ncu_stalls.py ncu_source.csv benchmarks/results/kernels_ncu_stalls.json
"""

from __future__ import annotations

import collections
import csv
import json
import sys


def summarise(path: str) -> dict:
    rows = list(csv.reader(open(path)))
    start = next(i for i, r in enumerate(rows) if r and r[0] == "Address")
    header = rows[start]
    data = [r for r in rows[start + 1 :] if len(r) == len(header)]
    reasons = [i for i, h in enumerate(header) if h.startswith("stall_") and "Not Issued" not in h]
    executed = header.index("Instructions Executed")
    by_reason: collections.Counter = collections.Counter()
    by_op: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    exec_by_op: collections.Counter = collections.Counter()
    for r in data:
        words = r[1].split()
        op = (words[1] if words[0].startswith("@") else words[0]).split(".")[0]
        exec_by_op[op] += int(r[executed] or 0)
        for i in reasons:
            n = int(r[i] or 0)
            by_reason[header[i]] += n
            by_op[op][header[i]] += n
    total = sum(by_reason.values())
    ops = sorted(by_op, key=lambda o: -sum(by_op[o].values()))
    return {
        "instructions": len(data),
        "samples": total,
        "by_reason": {k: round(v / total, 4) for k, v in by_reason.most_common()},
        "by_opcode": {
            o: {
                "share": round(sum(by_op[o].values()) / total, 4),
                "warp_instructions_executed": exec_by_op[o],
                "top_reasons": dict(by_op[o].most_common(3)),
            }
            for o in ops[:16]
        },
    }


if __name__ == "__main__":
    out = summarise(sys.argv[1])
    text = json.dumps(out, indent=2) + "\n"
    if len(sys.argv) > 2:
        open(sys.argv[2], "w").write(text)
    print(text)
