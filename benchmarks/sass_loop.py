"""Static statistics of the split pass's unit loop (decode_mma.cu) from its SASS, on any machine (no GPU needed); with
``--kernel encode-had``, of the HAD encode kernel's tile loop (encode_mma.cu); with ``--kernel encode-qjl``, of the
dense encode kernel's tile loop for TurboQuant_prod keys (K4 = 3 bits + QJL at head_dim 128, bfloat16 rows, mean and
scale; sm_90a, so that ``{"WG": 1}`` variants build with wgmma).

Compiles the K4/V3 benchmark configuration (Llama-3.1-8B heads, float16 norms, bfloat16 queries, centered keys, no
mask) for sm_90 with NVRTC, disassembles it with the ``cuobjdump`` that ships with Triton, finds the unit loop (the
innermost backward branch around the ring copies) and reports, per variant:

* its instruction mix and how many run on the integer/logic pipe (which issues a warp instruction every other cycle);
* a rough latency-weighted critical path of one iteration (register dependencies within the loop body, fixed
  latencies per opcode class: an estimate, not a simulation);
* registers and stack.

A variant is decode_mma.cu macros (``MMA_TUNING`` keys and the A/B switches) and optionally ``"source"``, another
version of the file, e.g. from ``git show REV:src/turbovq/kernels/decode_mma.cu``.

    PYTHONPATH=src python3 benchmarks/sass_loop.py --variants '[{}, {"LAZYMAX": 0}]' --name sass_loop
    PYTHONPATH=src python3 benchmarks/sass_loop.py --kernel encode-had \
        --variants '[{}, {"G2": 0, "B0": 3, "HAS_PERM": 0}]'
    PYTHONPATH=src python3 benchmarks/sass_loop.py --kernel encode-qjl --variants '[{}, {"WG": 1, "NWARPS": 12}]'

The HAD encode's base configuration is 3.5 bits at head_dim 256 (two groups of 128, the outlier gather, bfloat16 rows,
mean and scale) with its default tuning; a variant's macros override it (``B0``/``B1``: the groups' bits).

Writes ``<out>/<name>.json``.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import tempfile
from collections import Counter
from pathlib import Path

import torch
import triton

from turbovq.kernels import cuda
from turbovq.kernels import decode as kdecode
from turbovq.kernels import encode as kencode
from turbovq.kv.cache import RowCodec

INT_PIPE = {"PRMT", "LOP3", "SHF", "ISETP", "IADD3", "FMNMX", "FSEL", "SEL", "VIADD", "LEA", "IMNMX", "VIMNMX",
            "VIADDMNMX", "FSETP"}  # fmt: skip
# result latencies in cycles (others: 4)
LATENCY = {"HMMA": 33, "LDS": 30, "SHFL": 26, "MUFU": 18, "MOVM": 20, "LDC": 30, "S2R": 25, "F2FP": 6, "VOTE": 6,
           "IMAD": 5, "HADD2": 5, "PRMT": 5, "SHF": 5, "ISETP": 5, "FSETP": 5}  # fmt: skip
SKIP = {"BRA", "BSSY", "BSYNC", "NOP", "WARPSYNC", "DEPBAR", "LDGDEPBAR", "EXIT"}


def cuobjdump() -> str:
    found = shutil.which("cuobjdump") or Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump"
    if not Path(found).exists():
        raise SystemExit("cuobjdump not found (it ships with Triton's NVIDIA backend)")
    return str(found)


def k4v3_options(tuning: dict) -> tuple[str, ...]:
    return kdecode._mma_options(128, 4, ((4, 128, 4, 0), (True, True)), ((3, 128, 3, 0), (False, False)),
                                torch.float16, torch.float16, torch.bfloat16, None, True, False,
                                dict(kdecode.MMA_TUNING, **tuning))  # fmt: skip


def opcode(text: str) -> str:
    return re.sub(r"^@!?U?P[0-9T]\s+", "", text).split()[0].split(".")[0]


def unit_loop(sass: str, marker: str = "LDGSTS") -> list[tuple[int, str]]:
    """The shortest loop body (backward branch) that holds ``marker`` instructions (the split pass: its ring copies;
    the encode: its tensor-core products)."""
    ins = [(int(m.group(1), 16), m.group(2).strip()) for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+(.*?);", sass)]
    at = {a: i for i, (a, _) in enumerate(ins)}
    best = None
    for i, (a, text) in enumerate(ins):
        target = re.search(r"BRA\s+(?:\S+\s+)?0x([0-9a-f]+)", text)
        if target and int(target.group(1), 16) < a and int(target.group(1), 16) in at:
            body = ins[at[int(target.group(1), 16)] : i + 1]
            if any(opcode(t) == marker for _, t in body) and (best is None or len(body) < len(best)):
                best = body
    if best is None:
        raise SystemExit("no unit loop found in the SASS")
    return best


def critical_path(body: list[tuple[int, str]]) -> int:
    ready: dict[str, int] = {}
    longest = 0
    for _, text in body:
        op = opcode(text)
        operands = re.sub(r"^@!?U?P[0-9T]\s+", "", text).split(None, 1)
        if op in SKIP or len(operands) < 2:
            continue
        args = [x.strip() for x in operands[1].split(",")]
        stores = op in ("STS", "STG", "LDGSTS")
        start = max([ready.get(r, 0) for r in re.findall(r"\b(R\d+|P\d)\b", " ".join(args if stores else args[1:]))]
                    + [0])  # fmt: skip
        done = start + LATENCY.get(op, 4)
        longest = max(longest, done)
        if not stores:
            width = 4 if op == "HMMA" or ".128" in text else 2 if ".64" in text else 1
            for r in re.findall(r"\b(R\d+|P\d)\b", args[0]):
                for k in range(width if r[0] == "R" else 1):
                    ready[f"R{int(r[1:]) + k}" if r[0] == "R" else r] = done
    return longest


def encode_had_options(tuning: dict) -> tuple[str, ...]:
    return kencode.had_options(RowCodec(256, 3.5), perm=True, xt=True, mean=True, scale=True, extra=tuning)


def encode_qjl_options(tuning: dict) -> tuple[str, ...]:
    opts = dict(kencode.mma_tuning(128, qjl=True), D=128, B0=3, D0=128, B1=3, D1=0, XT=1, HAS_MEAN=1, HAS_SCALE=1,
                QJL=1, RQ=128) | tuning  # fmt: skip
    return tuple(f"-D{k}={v}" for k, v in opts.items())


def stats(variant: dict, kernel: str = "decode") -> dict:
    var = dict(variant)
    source = var.pop("source", None)
    encode = kernel.startswith("encode")
    text = Path(source).read_text() if source else (kencode._MMA_SOURCE if encode else kdecode._MMA_SOURCE)
    build = {"decode": ("sm_90", k4v3_options), "encode-had": ("sm_90", encode_had_options),
             "encode-qjl": ("sm_90a", encode_qjl_options)}[kernel]  # fmt: skip
    cubin = cuda.compile_cubin(text, build[0], build[1](var))
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([cuobjdump(), "-sass", f.name], capture_output=True, text=True, check=True).stdout
        res = subprocess.run([cuobjdump(), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    wgmma = kernel == "encode-qjl" and dict(kencode.mma_tuning(128, qjl=True), **var).get("WG")
    body = unit_loop(sass, ("HGMMA" if wgmma else "HMMA") if encode else "LDGSTS")
    mix = Counter(opcode(t) for _, t in body)
    name = {"decode": "tq_decode_split", "encode-had": "tq_encode_had", "encode-qjl": "tq_encode"}[kernel]
    usage = re.search(rf"Function {name}:\s*REG:(\d+) STACK:(\d+)", res)
    return {"variant": variant, "instructions": len(body), "integer_pipe": sum(mix[o] for o in INT_PIPE),
            "critical_path_cycles": critical_path(body), "registers": int(usage.group(1)),
            "stack_bytes": int(usage.group(2)), "mix": dict(mix.most_common())}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--name", default="sass_loop")
    ap.add_argument("--kernel", default="decode", choices=("decode", "encode-had", "encode-qjl"))
    ap.add_argument("--variants", default="[{}]", help='JSON list of the kernel\'s macro dicts (and "source")')
    args = ap.parse_args()
    rows = [stats(v, args.kernel) for v in json.loads(args.variants)]
    for r in rows:
        top = ", ".join(f"{k} {v}" for k, v in list(r["mix"].items())[:6])
        print(f"{json.dumps(r['variant'])}: {r['instructions']} instructions, {r['integer_pipe']} on the integer pipe, "
              f"critical path ~{r['critical_path_cycles']} cycles, {r['registers']} registers, "
              f"{r['stack_bytes']} B stack ({top})")  # fmt: skip
    out = Path(args.out) / f"{args.name}.json"
    config = {"decode": "K4/V3", "encode-had": "HAD encode, 3.5 bits at 256", "encode-qjl": "K4 prod encode at 128"}[
        args.kernel]  # fmt: skip
    arch = "sm_90a" if args.kernel == "encode-qjl" else "sm_90"
    out.write_text(json.dumps({"arch": arch, "config": config, "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
