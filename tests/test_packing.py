import numpy as np
import pytest
import torch

from turbovq import packing

LENGTHS = [1, 3, 5, 7, 8, 9, 13, 64, 127, 383]


def reference_pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """The documented layout, spelled out bit by bit: code j at bits [b*j, b*j+b) of a little-endian stream."""
    n = codes.shape[-1]
    stream = ((codes.long().unsqueeze(-1) >> torch.arange(bits)) & 1).reshape(*codes.shape[:-1], n * bits)
    stream = torch.nn.functional.pad(stream, (0, (-n * bits) % 8)).reshape(*codes.shape[:-1], -1, 8)
    return (stream << torch.arange(8)).sum(-1).to(torch.uint8)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", LENGTHS)
def test_round_trip_and_layout(bits, n):
    codes = torch.randint(0, 2**bits, (4, n), generator=torch.Generator().manual_seed(bits * 1000 + n))
    packed = packing.pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (4, packing.packed_size(n, bits))
    assert torch.equal(packed, reference_pack(codes, bits))
    out = packing.unpack(packed, bits, n)
    assert out.dtype == torch.uint8 and torch.equal(out.long(), codes)


@pytest.mark.parametrize("bits", [1, 3, 4, 8])
def test_numpy_and_batch_dims(bits):
    codes = np.random.default_rng(0).integers(0, 2**bits, size=(2, 3, 11), dtype=np.uint8)
    packed = packing.pack(codes, bits)
    assert isinstance(packed, np.ndarray) and packed.shape == (2, 3, packing.packed_size(11, bits))
    assert np.array_equal(packing.unpack(packed, bits, 11), codes)


def test_extreme_codes_and_empty_rows():
    for bits in range(1, 9):
        codes = torch.full((3, 17), 2**bits - 1)
        assert torch.equal(packing.unpack(packing.pack(codes, bits), bits, 17).long(), codes)
        empty = torch.zeros(0, 17, dtype=torch.uint8)
        assert packing.unpack(packing.pack(empty, bits), bits, 17).shape == (0, 17)


def test_bad_inputs():
    with pytest.raises(ValueError, match="bits"):
        packing.pack(torch.zeros(3, dtype=torch.uint8), 9)
    with pytest.raises(ValueError, match="integer"):
        packing.pack(torch.zeros(3), 2)
    with pytest.raises(ValueError, match="uint8"):
        packing.unpack(torch.zeros(3, dtype=torch.int32), 2, 12)
    with pytest.raises(ValueError, match="take 3 bytes"):
        packing.unpack(torch.zeros(4, dtype=torch.uint8), 2, 12)
    with pytest.raises(TypeError):
        packing.pack([1, 2], 2)


@pytest.mark.gpu
def test_cuda_matches_cpu(cuda):
    for bits in range(1, 9):
        codes = torch.randint(0, 2**bits, (50, 131))
        assert torch.equal(packing.pack(codes.to(cuda), bits).cpu(), packing.pack(codes, bits))


def test_byte_codes_are_what_each_byte_unpacks_to():
    for bits in (1, 2, 4, 8):
        codes = packing.byte_codes(bits)
        assert codes.shape == (256, 8 // bits)
        assert torch.equal(packing.pack(codes, bits)[:, 0], torch.arange(256, dtype=torch.uint8))
    assert packing.byte_codes(4)[0x21].tolist() == [1, 2]  # LSB first
    with pytest.raises(ValueError, match="straddle"):
        packing.byte_codes(3)
