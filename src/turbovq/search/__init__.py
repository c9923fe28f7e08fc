"""Vector search on TurboQuant codes: a flat index (``TurboQuantIndex``), FAISS-like, numpy in and out."""

from turbovq.search.index import TurboQuantIndex, plan_bits

__all__ = ["TurboQuantIndex", "plan_bits"]
