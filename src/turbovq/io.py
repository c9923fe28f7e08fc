"""The turbovq file format: versioned, checksummed, written atomically, shared by codes and indexes.

Layout::

    b"TURBOVQ\\0"  | u32 format version | u32 reserved | u64 header length |  header (UTF-8 JSON)
    | zero padding to a 64-byte boundary | tensor data, each tensor 64-byte aligned | SHA-256 of all the above

The header holds ``kind`` (what the file is), ``meta`` (JSON metadata) and, per tensor, its dtype, shape,
offset and length. No pickle: loading a file never runs code. Tensors are read back as numpy views of the
file, memory-mapped when asked, so a large file opens without reading it (``verify=False`` skips the
checksum pass for that case; the size and header are still checked).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

MAGIC = b"TURBOVQ\0"
FORMAT_VERSION = 1
_PREAMBLE = struct.Struct("<8sIIQ")
_ALIGN = 64
_DIGEST = 32

_DTYPES = {
    "uint8": torch.uint8,
    "int8": torch.int8,
    "int16": torch.int16,
    "int32": torch.int32,
    "int64": torch.int64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}
_NAMES = {v: k for k, v in _DTYPES.items()}


class FormatError(ValueError):
    """A file that is not a valid turbovq file of the expected kind and version."""


def _pad(n: int) -> int:
    return (-n) % _ALIGN


def save(path, kind: str, meta: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Write ``tensors`` and ``meta`` to ``path`` atomically: a crash leaves either the old file or the new one."""
    path = Path(path)
    table, blobs, offset = {}, [], 0
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor) or t.dtype not in _NAMES:
            raise TypeError(f"tensor {name!r}: unsupported value {type(t).__name__} / {getattr(t, 'dtype', None)}")
        raw = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        table[name] = {"dtype": _NAMES[t.dtype], "shape": list(t.shape), "offset": offset, "nbytes": len(raw)}
        blobs.append(raw + b"\0" * _pad(len(raw)))
        offset += len(raw) + _pad(len(raw))
    header = json.dumps({"kind": kind, "meta": meta, "tensors": table, "data_bytes": offset}).encode()
    head = _PREAMBLE.pack(MAGIC, FORMAT_VERSION, 0, len(header)) + header
    head += b"\0" * _pad(len(head))
    digest = hashlib.sha256()
    with atomic_file(path) as f:
        for chunk in (head, *blobs):
            digest.update(chunk)
            f.write(chunk)
        f.write(digest.digest())


@contextmanager
def atomic_file(path):
    """A binary file that replaces ``path`` only once the block completes: a crash or an exception leaves either
    the old file or the new one, never a half-written one. The data and the rename are fsynced, and the file gets
    the usual (umask) permissions rather than ``mkstemp``'s private ones."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable
        dfd = os.open(path.parent or ".", os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:  # pragma: no cover - platforms without directory fsync
        pass


def load(path, kind: str, mmap: bool = False, verify: bool = True) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read a file written by :func:`save`; refuse a wrong kind, version, truncation or corruption by name."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        pre = f.read(_PREAMBLE.size)
        if len(pre) < _PREAMBLE.size or pre[:8] != MAGIC:
            raise FormatError(f"{path}: not a turbovq file (bad magic)")
        _, version, _, hlen = _PREAMBLE.unpack(pre)
        if version != FORMAT_VERSION:
            raise FormatError(f"{path}: file format version {version}, but this turbovq reads version {FORMAT_VERSION}")
        if _PREAMBLE.size + hlen > size:
            raise FormatError(f"{path}: truncated (header runs past the end of the file)")
        try:
            header = json.loads(f.read(hlen))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise FormatError(f"{path}: corrupt header ({e})") from None
    start = _PREAMBLE.size + hlen
    start += _pad(start)
    expected = start + header.get("data_bytes", -1) + _DIGEST
    if size != expected:
        raise FormatError(f"{path}: truncated or padded: {size} bytes, the header says {expected}")
    if header.get("kind") != kind:
        raise FormatError(f"{path}: holds a {header.get('kind')!r}, expected a {kind!r}")
    if verify:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            remaining = size - _DIGEST
            while remaining:
                chunk = f.read(min(remaining, 1 << 24))
                digest.update(chunk)
                remaining -= len(chunk)
            if f.read(_DIGEST) != digest.digest():
                raise FormatError(f"{path}: checksum mismatch, the file is corrupt")
    data = np.memmap(path, mode="r", dtype=np.uint8) if mmap else np.fromfile(path, dtype=np.uint8)
    tensors = {}
    for name, spec in header["tensors"].items():
        if spec["nbytes"] == 0:  # (a zero-length buffer cannot be viewed as a wider dtype)
            tensors[name] = torch.empty(spec["shape"], dtype=_DTYPES[spec["dtype"]])
            continue
        lo = start + spec["offset"]
        raw = data[lo : lo + spec["nbytes"]]
        if not mmap:
            raw = raw.copy()
        with warnings.catch_warnings():  # a memory-mapped array is read-only, and that is intended
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            tensors[name] = torch.from_numpy(raw).view(_DTYPES[spec["dtype"]]).reshape(spec["shape"])
    return header["meta"], tensors
