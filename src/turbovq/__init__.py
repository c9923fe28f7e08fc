"""turbovq: TurboQuant vector quantization (online, data-oblivious, near-optimal distortion) in PyTorch."""

from turbovq.codebook import distortion_bounds, lloyd_max_codebook
from turbovq.codes import QuantizedVectors
from turbovq.quantizer import TurboQuantMSE, TurboQuantProd
from turbovq.search import TurboQuantIndex

__version__ = "0.1.0"

__all__ = [
    "QuantizedVectors",
    "TurboQuantIndex",
    "TurboQuantMSE",
    "TurboQuantProd",
    "distortion_bounds",
    "lloyd_max_codebook",
]
