import pytest
import torch

import turbovq as tq
from turbovq import io


@pytest.fixture(params=["mse", "prod", "fractional"])
def quantizer(request):
    return {
        "mse": tq.TurboQuantMSE(100, 3, seed=2),
        "prod": tq.TurboQuantProd(100, 4, seed=2, rotation="haar"),
        "fractional": tq.TurboQuantMSE(100, 2.5, seed=2, outliers=list(range(50, 100))),
    }[request.param]


def test_nbytes_is_exact(quantizer):
    c = quantizer.quantize(torch.randn(37, 100))
    assert c.nbytes == sum(t.numel() * t.element_size() for t in c.fields.values())
    assert c.nbytes == 37 * c.bytes_per_vector
    assert c.bits_per_coordinate == pytest.approx(8 * c.nbytes / (37 * 100))


def test_slicing_and_concat(quantizer):
    x = torch.randn(37, 100)
    c = quantizer.quantize(x)
    full = quantizer.dequantize(c)
    assert len(c[5:9]) == 4 and len(c[3]) == 1 and len(c[-1]) == 1
    assert torch.allclose(quantizer.dequantize(c[5:9]), full[5:9], atol=1e-6)
    joined = tq.QuantizedVectors.concat([c[:10], c[10:]])
    assert torch.allclose(quantizer.dequantize(joined), full, atol=1e-6)
    with pytest.raises(ValueError, match="different quantizers"):
        tq.QuantizedVectors.concat([c, tq.TurboQuantMSE(100, 3, seed=99).quantize(x)])
    with pytest.raises(ValueError):
        tq.QuantizedVectors.concat([])


@pytest.mark.parametrize("mmap", [False, True])
def test_save_load_round_trip(quantizer, tmp_path, mmap):
    x = torch.randn(37, 100)
    c = quantizer.quantize(x)
    c.save(tmp_path / "c.tvq")
    back = tq.QuantizedVectors.load(tmp_path / "c.tvq", mmap=mmap)
    assert back.config == c.config and back.nbytes == c.nbytes
    rebuilt = back.quantizer()  # from the seed in the file: no matrices stored
    assert torch.equal(rebuilt.dequantize(back), quantizer.dequantize(c))
    assert (tmp_path / "c.tvq").stat().st_size < c.nbytes + 4096


def test_load_refuses_other_files(tmp_path):
    io.save(tmp_path / "other.tvq", "index", {}, {"a": torch.zeros(1)})
    with pytest.raises(io.FormatError, match="expected a 'quantized_vectors'"):
        tq.QuantizedVectors.load(tmp_path / "other.tvq")


def test_repr_and_mismatched_rows():
    c = tq.TurboQuantMSE(64, 4).quantize(torch.randn(3, 64))
    assert "n=3" in repr(c) and "bits_per_coordinate=4.500" in repr(c)
    with pytest.raises(ValueError, match="same number of rows"):
        tq.QuantizedVectors(c.meta, {"a": torch.zeros(2), "b": torch.zeros(3)})
