import json
import os

import pytest
import torch

from turbovq import io

TENSORS = {
    "codes": torch.randint(0, 255, (7, 13), dtype=torch.uint8),
    "norms": torch.randn(7),
    "half": torch.randn(7).to(torch.bfloat16),
    "ids": torch.arange(7, dtype=torch.int64),
    "empty_ids": torch.zeros(0, dtype=torch.int64),  # an emptied index still saves and loads
    "empty_rows": torch.zeros(0, 16, dtype=torch.float32),
}


def write(path):
    io.save(path, "thing", {"a": 1, "b": [1, 2]}, TENSORS)


@pytest.mark.parametrize("mmap", [False, True])
def test_round_trip(tmp_path, mmap):
    path = tmp_path / "x.tvq"
    write(path)
    meta, out = io.load(path, "thing", mmap=mmap)
    assert meta == {"a": 1, "b": [1, 2]}
    for k, t in TENSORS.items():
        assert out[k].dtype == t.dtype and torch.equal(out[k], t)
    assert not list(tmp_path.glob(".*tmp"))


def test_file_gets_the_usual_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        write(tmp_path / "x.tvq")
    finally:
        os.umask(old)
    assert (tmp_path / "x.tvq").stat().st_mode & 0o777 == 0o644


def test_corrupt_file_is_refused(tmp_path):
    path = tmp_path / "x.tvq"
    write(path)
    data = bytearray(path.read_bytes())
    data[-40] ^= 0x01  # a bit in the tensor data
    path.write_bytes(bytes(data))
    with pytest.raises(io.FormatError, match="checksum"):
        io.load(path, "thing")


@pytest.mark.parametrize("keep", [0, 5, 30, -1])
def test_truncated_file_is_refused(tmp_path, keep):
    path = tmp_path / "x.tvq"
    write(path)
    data = path.read_bytes()
    path.write_bytes(data[:keep] if keep >= 0 else data[:-1])
    with pytest.raises(io.FormatError, match="truncated|not a turbovq"):
        io.load(path, "thing")


def test_wrong_version_kind_and_magic(tmp_path):
    path = tmp_path / "x.tvq"
    write(path)
    with pytest.raises(io.FormatError, match="holds a 'thing'"):
        io.load(path, "index")
    data = bytearray(path.read_bytes())
    data[8] = 99
    path.write_bytes(bytes(data))
    with pytest.raises(io.FormatError, match="version 99"):
        io.load(path, "thing")
    path.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(io.FormatError, match="not a turbovq"):
        io.load(path, "thing")


def test_interrupted_save_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "x.tvq"
    write(path)
    before = path.read_bytes()

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        io.save(path, "thing", {}, {"codes": torch.zeros(3, dtype=torch.uint8)})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["x.tvq"]


def test_header_is_plain_json_no_pickle(tmp_path):
    path = tmp_path / "x.tvq"
    write(path)
    raw = path.read_bytes()
    hlen = int.from_bytes(raw[16:24], "little")
    header = json.loads(raw[24 : 24 + hlen])
    assert header["kind"] == "thing" and set(header["tensors"]) == set(TENSORS)


def test_unsupported_tensor(tmp_path):
    with pytest.raises(TypeError, match="unsupported"):
        io.save(tmp_path / "x.tvq", "thing", {}, {"c": torch.zeros(2, dtype=torch.complex64)})
