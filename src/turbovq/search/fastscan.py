"""Compiled inner loops of the CPU scan (``fastscan.c``): tile decoding and the running top-k merge.

With BLAS doing the products, what is left of a scan -- turning packed codes into the matrix BLAS multiplies and
keeping each query's best scores -- took as long as the products when written as torch tensor passes. In C each
is one pass at a few instructions per value. The source is compiled once with the system C compiler
(``$CC`` or ``cc``, ``-O3 -march=native``) into ``~/.cache/turbovq/native`` (``$TURBOVQ_CACHE``), keyed by
the source, the flags and the CPU; the build is written atomically, so concurrent processes are safe.

Without a compiler, or with ``TURBOVQ_NATIVE=0``, :func:`library` returns ``None`` and the index uses its torch
path, which gives the same results.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch

from turbovq import packing

_SOURCE = Path(__file__).with_name("fastscan.c")
MAX_DIM = 8192  # TVQ_MAX_DIM in fastscan.c


def _cache_dir() -> Path:
    root = os.environ.get("TURBOVQ_CACHE")
    return Path(root) / "native" if root else Path.home() / ".cache" / "turbovq" / "native"


def _cpu_id() -> str:
    """What -march=native depends on: the CPU's model and flags (a cache shared by two machines must not mix)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in info.splitlines() if ln.startswith(("model name", "flags", "Features"))][:2]
        return "\n".join(lines)
    except OSError:
        return platform.processor() + platform.machine()


def _compile(out: Path) -> None:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        raise RuntimeError("no C compiler found (set $CC)")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        built = Path(tmp) / out.name
        errors = []
        for flags in (["-O3", "-march=native"], ["-O3"]):
            cmd = [cc, *flags, "-fPIC", "-shared", "-o", str(built), str(_SOURCE), "-lm"]
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
            if r.returncode == 0:
                os.replace(built, out)  # atomic: another process sees the old file or the whole new one
                return
            errors.append(f"{' '.join(cmd)}: {r.stderr.strip()[-500:]}")
        raise RuntimeError("; ".join(errors))


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled helpers, building them on first use; ``None`` if unavailable (the torch path is used)."""
    if os.environ.get("TURBOVQ_NATIVE", "1") == "0" or sys.byteorder != "little":
        return None
    key = hashlib.sha256(_SOURCE.read_bytes() + _cpu_id().encode() + sys.platform.encode()).hexdigest()[:16]
    path = _cache_dir() / f"fastscan-{key}.so"
    try:
        if not path.exists():
            _compile(path)
        lib = ctypes.CDLL(str(path))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        warnings.warn(f"turbovq: compiled scan unavailable, using the slower torch path ({e})", stacklevel=2)
        return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.tvq_decode.argtypes = [ptr, ptr, i64, i64, ctypes.c_int, ctypes.c_int, ptr, ptr, ptr, i64, ctypes.c_int]
    lib.tvq_decode.restype = ctypes.c_int
    lib.tvq_topk_merge.argtypes = [ptr, i64, i64, i64, ctypes.c_int, ptr, ptr, i64, i64, ptr, ptr]
    lib.tvq_topk_merge.restype = None
    lib.tvq_lut_scan.argtypes = [ctypes.c_int, ptr, ptr, ptr, ptr, ptr, ptr, i64, ptr]
    lib.tvq_lut_scan.restype = None
    return lib


_TYPES = {torch.float32: 0, torch.bfloat16: 1}


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _check(name: str, t: torch.Tensor, dtypes) -> None:
    if t.dtype not in dtypes or t.stride(-1) != 1:
        raise ValueError(f"{name}: expected {' or '.join(map(str, dtypes))} with unit column stride, got {t.dtype}")


def decode(lib, jobs: list[tuple], rows: torch.Tensor | None = None) -> None:
    """For each job ``(codes, bits, dim, centroids, scales, out)``: ``out[i, :dim] = centroids[codes[r]] * scales[r]``
    with ``r = rows[i]`` (all rows in order if ``rows`` is None); int8 out is rounded and clamped to +-127.

    codes (n, bytes) uint8 and out (len(rows) or n, >= dim) float32/bfloat16/int8, both with unit column stride;
    centroids, scales (float32) and rows (int64, each in [0, n)) contiguous. All jobs (e.g. the channel groups of
    one tile) share ``rows``."""
    if rows is not None and (rows.dtype != torch.int64 or not rows.is_contiguous()):
        raise ValueError(f"rows: expected contiguous torch.int64, got {rows.dtype}")
    lo_hi = (int(rows.min()), int(rows.max())) if rows is not None and len(rows) else None
    for codes, bits, dim, centroids, scales, out in jobs:
        _check("codes", codes, (torch.uint8,))
        _check("out", out, (torch.float32, torch.bfloat16, torch.int8))
        for name, t in (("centroids", centroids), ("scales", scales)):
            if t.dtype != torch.float32 or not t.is_contiguous():
                raise ValueError(f"{name}: expected contiguous torch.float32, got {t.dtype}")
        count = len(codes) if rows is None else len(rows)
        if len(scales) != len(codes) or len(out) != count or centroids.numel() != 1 << bits:
            raise ValueError("decode: codes, scales, centroids and out disagree in size")
        if not 1 <= bits <= 8 or dim > MAX_DIM or codes.shape[1] != (dim * bits + 7) // 8 or out.shape[1] < dim:
            raise ValueError(f"decode: unsupported group (bits={bits}, dim={dim}; dim must be <= {MAX_DIM})")
        if lo_hi is not None and (lo_hi[0] < 0 or lo_hi[1] >= len(codes)):
            raise ValueError("decode: row index out of range")
        lib.tvq_decode(_ptr(codes), _ptr(rows), count, codes.stride(0), bits, dim, _ptr(centroids), _ptr(scales),
                       _ptr(out), out.stride(0), _TYPES.get(out.dtype, 2))


def topk_merge(lib, scores: torch.Tensor, offset: int, best_s: torch.Tensor, best_p: torch.Tensor,
               row_scale: torch.Tensor | None = None, col_bias: torch.Tensor | None = None) -> None:
    """Merge ``row_scale[i] * scores[i, j] + col_bias[j]`` (m, T), rows ``offset..offset+T``, into the running
    best ``best_s`` (float32, descending) / ``best_p`` (int64) of shape (m, keep), in place.

    scores float32, bfloat16 or int32 with unit column stride; row_scale (m,) and col_bias (T,) contiguous float32
    or None."""
    _check("scores", scores, (torch.float32, torch.bfloat16, torch.int32))
    m, width = scores.shape
    for t, size in ((row_scale, m), (col_bias, width)):
        if t is not None and (t.dtype != torch.float32 or not t.is_contiguous() or t.numel() != size):
            raise ValueError("topk_merge: row_scale / col_bias must be contiguous float32 of length m / T")
    if not (best_s.dtype == torch.float32 and best_p.dtype == torch.int64 and best_s.is_contiguous()
            and best_p.is_contiguous() and best_s.shape == best_p.shape and len(best_s) == m and best_s.shape[1]):
        raise ValueError("topk_merge: best_s / best_p must be contiguous float32 / int64 (m, keep), keep >= 1")
    lib.tvq_topk_merge(_ptr(scores), m, width, scores.stride(0), _TYPES.get(scores.dtype, 2), _ptr(row_scale),
                       _ptr(col_bias), offset, best_s.shape[1], _ptr(best_s), _ptr(best_p))


def lut_tables(centroids: torch.Tensor, bits: int, q: torch.Tensor) -> torch.Tensor:
    """The lookup tables of one group for one rotated query ``q`` (d,): per code byte ``(bytes, 256)`` (the sum of
    ``q_j * centroid`` over the byte's 8/b codes) for 1/2/4/8 bits, else per code ``(d, 2^b)``."""
    if 8 % bits:
        return (q.float()[:, None] * centroids[None, :]).contiguous()
    per = 8 // bits
    values = centroids[packing.byte_codes(bits)]  # (256, per): the centroids of the codes in each byte value
    q = torch.nn.functional.pad(q.float(), (0, (-len(q)) % per)).view(-1, per)
    return (q @ values.T).contiguous()  # (bytes, 256)


def lut_scan(lib, groups: list[tuple], n: int, out: torch.Tensor) -> None:
    """``out[i] = sum_g scales_g[i] * <q_g, centroids[codes_g[i]]>`` for one query, by table lookups.

    ``groups``: ``(codes (n, bytes) uint8, bits, dim, scales (n,) float32, tables from lut_tables)`` each."""
    for codes, bits, dim, scales, lut in groups:  # (the C loop trusts these shapes: check them all)
        _check("codes", codes, (torch.uint8,))
        if scales.dtype != torch.float32 or not scales.is_contiguous() or len(codes) != n or len(scales) != n:
            raise ValueError("lut_scan: codes and scales must have n rows (scales contiguous float32)")
        nbytes = (dim * bits + 7) // 8
        want = (nbytes, 256) if 8 % bits == 0 else (dim, 1 << bits)
        if not 1 <= bits <= 8 or dim > MAX_DIM or codes.shape[1] != nbytes:
            raise ValueError(f"lut_scan: unsupported group (bits={bits}, dim={dim}, {codes.shape[1]} bytes a row)")
        if lut.dtype != torch.float32 or not lut.is_contiguous() or tuple(lut.shape) != want:
            raise ValueError(f"lut_scan: tables must be contiguous float32 of shape {want} (see lut_tables)")
    if out.dtype != torch.float32 or not out.is_contiguous() or out.numel() != n:
        raise ValueError("lut_scan: out must be contiguous float32 of n values")
    k = len(groups)
    arr = lambda ctype, vals: (ctype * k)(*vals)  # noqa: E731
    args = (
        arr(ctypes.c_void_p, [_ptr(g[0]) for g in groups]), arr(ctypes.c_int64, [g[0].stride(0) for g in groups]),
        arr(ctypes.c_int, [g[1] for g in groups]), arr(ctypes.c_int, [g[2] for g in groups]),
        arr(ctypes.c_void_p, [_ptr(g[3]) for g in groups]), arr(ctypes.c_void_p, [_ptr(g[4]) for g in groups]),
    )  # fmt: skip
    lib.tvq_lut_scan(k, *args, n, _ptr(out))
