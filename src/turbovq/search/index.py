"""``TurboQuantIndex``: a flat (brute-force) vector index that scores queries directly on TurboQuant codes.

Encoding reuses :class:`~turbovq.quantizer.TurboQuantMSE` / :class:`~turbovq.quantizer.TurboQuantProd`. Scoring is
asymmetric: the queries are rotated once into every channel group's space, then the packed codes are scored tile by
tile: a tile of ``T`` codes is decoded to centroid values (a byte table maps one packed byte to its 8/b values for
b in 1, 2, 4, 8; a generic unpack otherwise), scaled by the stored per-vector scales, and multiplied by all the
queries in one BLAS product (bfloat16 where the CPU has bf16 units, with an exact float32 re-score of a shortlist).
Top-k is a partial selection inside each tile merged into a running best. The database is never materialised in
floats beyond one tile.

Scores (``x`` stored, ``q`` a query, ``mu`` the centre, ``est`` the quantized estimate of an inner product)::

    ip      <q, x>           = <q, mu> + est<q, x - mu>                       (larger is better)
    cosine  ip on unit-normalised x and q
    l2      ||q - x||^2      = ||q - mu||^2 + ||x - mu||^2 - 2 est<q - mu, x - mu>   (smaller is better)

``||x - mu||^2`` is exact: from the per-group norms (modes center/oblivious) or stored as a float32 (mode pca, l2).

Memory: ``bits`` is the *total* storage per coordinate, norms included: the codes take at most
``floor(dim * bits / 8)`` bytes a vector, the same as FAISS's ``SQ4`` / ``PQ(dim/2)x8`` at ``bits=4``.

Modes (what is learnt; all of it in one pass over a sample, milliseconds to seconds):

* ``"pca"`` (default): centre on the mean, rotate onto the principal axes, share the bits out over the components
  by reverse water-filling (groups of equal integer bits, each a TurboQuant_mse quantizer with its own random
  rotation, Lloyd-Max codebook and float16 scale; components worth 0 bits are dropped), and store per group the
  least-squares scale of its codes instead of its norm. On MiniLM embeddings at 4 bits this takes Recall@1@1 from
  0.89 (plain TurboQuant_mse) to 0.96, above PQ, fast-scan PQ and RaBitQ at equal or larger size.
* ``"center"``: centre on the mean; a fractional-bit split pays for the norms (e.g. d 384, 4 bits: 352 channels at
  4 bits + 32 at 3 bits + two float16 norms = 192 B) and the extra bit goes to the highest-variance channels.
* ``"oblivious"``: nothing learnt, for streaming use; with ``fit_norms=False`` exactly the paper's TurboQuant_mse
  (float32 norm on top of ``bits`` per coordinate).

Estimators (modes center/oblivious): ``"mse"`` (biased by a near-constant factor that does not change rankings)
or ``"prod"`` (TurboQuant_prod, unbiased: (b-1)-bit mse + a 1-bit QJL sketch of the residual). With ``"prod"`` and
``rerank > 0`` the collection is scanned with the mse part and the best ``rerank * k`` candidates are re-scored
with the full unbiased estimator. (Measured: at equal bytes prod loses to mse for nearest-neighbour search; the
QJL bits are worth more as mse bits.)
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np
import torch

from turbovq import codebook, io, packing
from turbovq.quantizer import TurboQuantMSE, TurboQuantProd, from_config
from turbovq.rotation import derive_seed
from turbovq.search import fastscan

FILE_KIND = "turbovq_index"
INDEX_VERSION = 1
METRICS = ("ip", "l2", "cosine")
ESTIMATORS = ("mse", "prod")
_NORM_BYTES = 2  # float16 norms when fit_norms=True
_TILE_ELEMENTS = 1 << 20  # a decoded tile holds ~1M float32 (4 MB): stays in L2/L3
_TILE_ELEMENTS_GPU = 1 << 25  # on a GPU: tiles of ~32M values (64 MB in bf16), few kernel launches
_QUERY_BLOCK = 1024
_REFINE_EXTRA = 16  # bfloat16 scans keep k + this many candidates for the exact float32 re-score
_LUT_QUERIES = 2  # up to this many queries, the CPU scan looks codes up in tables instead of decoding tiles
SCAN_PRECISIONS = ("auto", "float32", "bfloat16", "int8")


def _fast_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 matrices natively (AVX512-BF16 or AMX): a bf16 scan is ~3x faster."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


# --- memory planning ---------------------------------------------------------------------------------------------
def _mse_bytes(dim: int, lo: int, n_hi: int, norm_bytes: int) -> int:
    """Bytes of TurboQuantMSE codes + norms with ``n_hi`` channels at ``lo + 1`` bits and the rest at ``lo``."""
    if n_hi == 0:
        return packing.packed_size(dim, lo) + norm_bytes
    return packing.packed_size(n_hi, lo + 1) + packing.packed_size(dim - n_hi, lo) + 2 * norm_bytes


def plan_bits(dim: int, bits: float, estimator: str = "mse", norm_bytes: int = _NORM_BYTES) -> float:
    """Quantizer ``bits`` (possibly fractional) whose codes + norms fit ``floor(dim * bits / 8)`` bytes, maximal.

    For ``"prod"`` the QJL sketch (``ceil(dim / 8)`` bytes + a norm) is paid for first and the mse stage gets the
    rest; the returned value is what ``TurboQuantProd(bits=...)`` takes (mse bits + 1).
    """
    budget = int(math.floor(dim * bits / 8 + 1e-9))
    if estimator == "prod":
        budget -= packing.packed_size(dim, 1) + norm_bytes
    best = None  # (total code bits, quantizer bits)
    for lo in range(1, 9):
        for n_hi in range(0, dim - 1) if lo < 8 else (0,):
            if 0 < n_hi < 2:
                continue
            if _mse_bytes(dim, lo, n_hi, norm_bytes) > budget:
                continue
            code_bits = dim * lo + n_hi
            if best is None or code_bits > best[0]:
                best = (code_bits, lo + n_hi / dim)
    if best is None:
        extra = " and a QJL sketch" if estimator == "prod" else ""
        raise ValueError(
            f"bits={bits:g} at dim={dim} leaves no room for >= 1-bit codes plus norms{extra}; raise bits or pass "
            "fit_norms=False (norms then come on top of the codes)"
        )
    q_bits = best[1]
    return q_bits + 1 if estimator == "prod" else q_bits


@functools.cache
def _gaussian_distortions(max_bits: int) -> tuple[float, ...]:
    """D_mse(b) for b = 0..max_bits of Lloyd-Max on the Gaussian limit (the law of one rotated coordinate)."""
    return (1.0, *(codebook.mse_distortion(10**6, b) for b in range(1, max_bits + 1)))


def allocate_bits(variances, budget_bytes: int, norm_bytes: int = _NORM_BYTES, max_bits: int = 8) -> list[tuple]:
    """Reverse water-filling in integer bits over principal components (``variances`` descending).

    Greedy: each step gives one more bit to the component whose expected squared error drops most
    (``var_i * (D(b_i) - D(b_i + 1))``, D the Gaussian-limit Lloyd-Max distortion) until the codes, packed per
    group of equal bits, plus one norm per group fit ``budget_bytes``. Variances are sorted, so equal-bit
    components are contiguous. Returns ``[(start, stop, bits), ...]``; components left at 0 bits are dropped.
    """
    var = np.asarray(variances, dtype=np.float64)
    d = len(var)
    dist = _gaussian_distortions(max_bits)
    gains = np.array([dist[b] - dist[b + 1] for b in range(max_bits)])
    bits = np.zeros(d, dtype=np.int64)

    def groups(bits):
        out, start = [], 0
        for i in range(1, d + 1):
            if i == d or bits[i] != bits[start]:
                if bits[start] > 0:
                    out.append((start, i, int(bits[start])))
                start = i
        return out

    def cost(bits):
        return sum(packing.packed_size(b - a, nb) + norm_bytes for a, b, nb in groups(bits))

    # One bit per step from a heap would be faster; d <= a few thousand and <= 8 bits each keeps this cheap.
    while True:
        benefit = np.where(bits < max_bits, var * gains[np.minimum(bits, max_bits - 1)], -1.0)
        i = int(np.argmax(benefit))
        if benefit[i] <= 0:
            break
        bits[i] += 1
        if cost(bits) > budget_bytes:
            bits[i] -= 1
            break
    # a group of one component cannot be rotated: give its bit back (repeat until none is left)
    while True:
        single = [(a, nb) for a, b, nb in groups(bits) if b - a == 1]
        if not single:
            break
        bits[single[0][0]] -= 1
    out = groups(bits)
    if not out:
        raise ValueError(f"a budget of {budget_bytes} bytes cannot hold any group of codes plus its norm")
    return out


# --- helpers --------------------------------------------------------------------------------------------------------
def _as_float_matrix(x, dim: int, name: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        if x.dtype.kind != "f":
            raise ValueError(f"{name} must be floating point, got numpy dtype {x.dtype}")
        x = np.asarray(x, dtype=np.float32)
        x = torch.from_numpy(x if x.flags.writeable else x.copy())  # e.g. memory-mapped input
    elif isinstance(x, torch.Tensor):
        if not x.dtype.is_floating_point:
            raise ValueError(f"{name} must be floating point, got {x.dtype}")
        x = x.detach().to("cpu", torch.float32)
    else:
        raise ValueError(f"{name} must be a numpy array or torch.Tensor, got {type(x).__name__}")
    if x.ndim == 1:
        x = x[None]
    if x.ndim != 2:
        raise ValueError(f"{name} must have shape (n, {dim}), got {tuple(x.shape)}")
    if x.shape[1] != dim:
        raise ValueError(f"{name} has dimension {x.shape[1]}, but the index has dim={dim}")
    finite = torch.isfinite(x).all(dim=1)
    if not bool(finite.all()):
        raise ValueError(f"{name} contains NaN or Inf (first in row {int((~finite).nonzero()[0, 0])})")
    return x.contiguous()


def check_k(k, n: int) -> None:
    """Refuse a ``k`` that is not a positive integer, an empty index, or ``k`` above its size, by name."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if n == 0:
        raise ValueError("the index is empty: add vectors before searching")
    if k > n:
        raise ValueError(f"k={k} is larger than the number of vectors in the index ({n})")


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min(1e-30)


def _merge_topk(best_s, best_p, s: torch.Tensor, offset: int, keep: int):
    """Merge the scores ``s`` (m, T) of rows ``offset..offset+T`` into the running top-``keep`` (descending).

    Once every query holds ``keep`` results, only entries above its current k-th best can enter; after the first
    tiles these are few, so they are gathered sparsely (one comparison pass over the tile) instead of running a
    full ``topk`` per tile, which costs ~4x more per entry.
    """
    m, width = s.shape
    tile_s = None
    if best_s.shape[1] == keep and not s.is_cuda:  # (on a GPU one topk per large tile is cheaper than syncing)
        rows, cols = (s > best_s[:, -1:]).nonzero(as_tuple=True)
        if len(rows) == 0:
            return best_s, best_p
        counts = torch.bincount(rows, minlength=m)
        most = int(counts.max())
        if most <= keep:  # else too many entries for a query: the dense path below is cheaper
            slot = torch.arange(len(rows), device=s.device) - (torch.cumsum(counts, 0) - counts)[rows]
            tile_s = torch.full((m, most), -math.inf, device=s.device)
            tile_p = torch.zeros((m, most), dtype=torch.int64, device=s.device)
            tile_s[rows, slot] = s[rows, cols].float()
            tile_p[rows, slot] = cols + offset
    if tile_s is None:
        tile_s, tile_p = torch.topk(s, min(keep, width), dim=1)
        tile_p = tile_p + offset
    cat_s = torch.cat([best_s, tile_s.float()], dim=1)
    cat_p = torch.cat([best_p, tile_p], dim=1)
    best_s, top = torch.topk(cat_s, min(keep, cat_s.shape[1]), dim=1)
    return best_s, torch.gather(cat_p, 1, top)


class _GroupScorer:
    """Decodes tiles of one channel group's packed codes to centroid values (rotated space, unit norm)."""

    def __init__(self, group, device):
        a, cents, _, ch = group.tensors(device)
        self.rotation, self.channels, self.bits, self.dim = a, ch, group.bits, group.dim
        self.centroids = cents
        if 8 % self.bits == 0:  # byte table: one packed byte -> its 8/b centroid values (LSB first)
            self.table = cents[packing.byte_codes(self.bits).to(device)]  # (256, per)
        else:
            self.table = None
        self._tables = {torch.float32: (self.centroids, self.table)}

    def rotate(self, q: torch.Tensor) -> torch.Tensor:
        return q[:, self.channels] @ self.rotation  # (m, d_g)

    def decode(self, packed: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(T, bytes) uint8 -> (T, d_g) centroid values in ``dtype`` (bfloat16 for the bf16 scan: half the bytes)."""
        if dtype not in self._tables:
            self._tables[dtype] = tuple(None if t is None else t.to(dtype) for t in self._tables[torch.float32])
        centroids, table = self._tables[dtype]
        if table is not None:
            vals = torch.nn.functional.embedding(packed.long(), table)  # (T, bytes, per)
            return vals.reshape(len(packed), -1)[:, : self.dim]
        return centroids[packing.unpack(packed, self.bits, self.dim).long()]


class _IdsMixin:
    """``add`` / ``add_with_ids`` for indexes that define ``_prepare``, ``_add``, ``_all_ids`` and ``_next_id``."""

    def add(self, x) -> np.ndarray:
        """Add vectors (n, dim); returns their ids (consecutive int64, continuing from the last id given)."""
        x = self._prepare(x)
        ids = torch.arange(self._next_id, self._next_id + len(x), dtype=torch.int64)
        self._add(x, ids)
        return ids.numpy()

    def add_with_ids(self, x, ids) -> np.ndarray:
        """Add vectors with caller-chosen int64 ids (distinct, not already in the index)."""
        x = self._prepare(x)
        ids_t = torch.as_tensor(np.asarray(ids).reshape(-1))
        if ids_t.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
            raise ValueError(f"ids must be integers, got {ids_t.dtype}")
        ids_t = ids_t.to(torch.int64)
        if len(ids_t) != len(x):
            raise ValueError(f"got {len(x)} vectors but {len(ids_t)} ids")
        if torch.unique(ids_t).numel() != len(ids_t):
            raise ValueError("ids must be distinct")
        clash = torch.isin(ids_t, self._all_ids())
        if bool(clash.any()):
            raise ValueError(f"id {int(ids_t[clash][0])} is already in the index")
        self._add(x, ids_t)
        return ids_t.numpy()


class TurboQuantIndex(_IdsMixin):
    """Flat TurboQuant index: ``add`` / ``add_with_ids`` / ``search`` / ``remove_ids`` / ``save`` / ``load``.

    Parameters
    ----------
    dim : vector dimension (>= 4).
    bits : storage per coordinate, norms included: the codes of a vector take ``floor(dim * bits / 8)`` bytes
        (with ``mode="pca"``, or ``fit_norms=True``). With ``fit_norms=False`` (modes ``"center"`` and
        ``"oblivious"``) ``bits`` goes to the quantizer as is and float32 norms come on top (plain TurboQuant).
    metric : ``"ip"`` (inner product, larger is better), ``"l2"`` (squared distance, smaller is better) or
        ``"cosine"`` (vectors and queries are L2-normalised, then inner product).
    seed : rotations and sketches derive from it; the same seed gives the same codes everywhere.
    mode : ``"pca"`` (default): centre on the mean of the first batch added (or ``train(x)``), rotate onto its
        principal axes and share the bits out by reverse water-filling (integer bits per group of components, one
        random rotation + Lloyd-Max codebook + float16 norm per group). ``"center"``: centre, and give the
        fractional split's extra bit to the highest-variance channels. ``"oblivious"``: nothing learnt
        (streaming use; TurboQuant as in the paper).
    estimator : ``"mse"`` (default) or ``"prod"`` (unbiased; modes ``"center"``/``"oblivious"`` only).
    rerank : with ``estimator="prod"``, scan with the mse part and re-score the best ``rerank * k`` with the full
        unbiased estimator; 0 scores everything with the full estimator.
    fit_norms : see ``bits``.
    rotation : ``"hadamard"`` or ``"haar"`` (the random rotation inside each group).
    scan_precision : ``"float32"``, ``"bfloat16"`` (scan tiles in bf16, re-score a shortlist exactly in float32),
        ``"int8"`` (CPU: tiles decoded to int8 on a per-group grid, int8 x int8 -> int32 products, ~1.8x faster
        than bf16; re-score as for bf16; needs the compiled helpers of ``turbovq.search.fastscan``) or ``"auto"``
        (int8 on the CPU where the helpers compile, else bfloat16 where the CPU or GPU has bf16 matrix units, else
        float32). Search-time only.
    """

    MODES = ("pca", "center", "oblivious")

    def __init__(
        self,
        dim: int,
        bits: float = 4,
        metric: str = "ip",
        seed: int = 0,
        *,
        mode: str = "pca",
        estimator: str = "mse",
        rerank: int = 0,
        fit_norms: bool = True,
        rotation: str = "haar",
        scan_precision: str = "auto",
    ):
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 4:
            raise ValueError(f"dim must be an integer >= 4, got {dim!r}")
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {self.MODES}, got {mode!r}")
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
        if estimator == "prod" and mode == "pca":
            raise ValueError("estimator='prod' needs mode='center' or 'oblivious' (mode='pca' scores with mse codes)")
        if isinstance(rerank, bool) or not isinstance(rerank, (int, np.integer)) or rerank < 0:
            raise ValueError(f"rerank must be an integer >= 0, got {rerank!r}")
        if rerank and estimator != "prod":
            raise ValueError("rerank re-scores with the unbiased estimator: it needs estimator='prod'")
        if isinstance(bits, bool) or not isinstance(bits, (int, float, np.integer, np.floating)) or not 1 <= bits <= 8:
            raise ValueError(f"bits must be a number in [1, 8], got {bits!r}")
        self.dim = int(dim)
        self.bits = float(bits)
        self.metric = metric
        self.seed = int(seed)
        self.mode = mode
        self.estimator = estimator
        self.rerank = int(rerank)
        self.fit_norms = bool(fit_norms)
        self.rotation = rotation
        if scan_precision not in SCAN_PRECISIONS:
            raise ValueError(f"scan_precision must be one of {SCAN_PRECISIONS}, got {scan_precision!r}")
        self.scan_precision = scan_precision
        self.mean: torch.Tensor | None = None
        self.projection: torch.Tensor | None = None  # (dim, dim) orthogonal, x' = (x - mu) @ P
        self.parts: list[tuple[int, int, TurboQuantMSE]] = []  # (start, stop, quantizer) over the x' channels
        if mode != "pca":
            q_bits = plan_bits(self.dim, self.bits, estimator) if self.fit_norms else self.bits
            cls = TurboQuantProd if estimator == "prod" else TurboQuantMSE
            norm_dtype = "float16" if self.fit_norms else "float32"
            quantizer = cls(self.dim, q_bits, seed=self.seed, rotation=rotation, norm_dtype=norm_dtype)
            self.parts = [(0, self.dim, quantizer)]
        self.is_trained = mode == "oblivious"
        self._fields: dict[str, torch.Tensor] = {}
        self._pending: list[dict[str, torch.Tensor]] = []
        self._ids = torch.empty(0, dtype=torch.int64)  # always in host memory
        self.device = torch.device("cpu")  # where codes live and search runs (see ``to``)
        self._pending_ids: list[torch.Tensor] = []
        self._next_id = 0
        self._scorers = None

    # --- configuration ----------------------------------------------------------------------------------------
    @property
    def config(self) -> dict:
        return {
            "dim": self.dim,
            "bits": self.bits,
            "metric": self.metric,
            "seed": self.seed,
            "mode": self.mode,
            "estimator": self.estimator,
            "rerank": self.rerank,
            "fit_norms": self.fit_norms,
            "rotation": self.rotation,
            "scan_precision": self.scan_precision,
        }

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config.items())
        return f"TurboQuantIndex({args}, ntotal={len(self)}, code_size={self.code_size})"

    @property
    def quantizer(self):
        """The single quantizer of modes ``"center"``/``"oblivious"`` (``None`` in mode ``"pca"``)."""
        return self.parts[0][2] if self.mode != "pca" else None

    @property
    def groups(self) -> list[tuple[int, int, int]]:
        """``(start, stop, bits)`` of every group of integer bits over the (projected) channels."""
        out = []
        for start, _, q in self.parts:
            mse = q._mse if isinstance(q, TurboQuantProd) else q
            if mse is not None:
                out += [(start + int(g.channels.min()), start + int(g.channels.max()) + 1, g.bits) for g in mse._groups]
        return out

    @property
    def code_size(self) -> int:
        """Bytes per vector of codes + norms (what equal-memory comparisons use; ids not included).

        Before a ``"pca"`` index is trained this is the budget ``floor(dim * bits / 8)``.
        """
        if not self.parts:
            return int(math.floor(self.dim * self.bits / 8 + 1e-9))
        size = 4 if self._has_tail else 0
        for _, _, q in self.parts:
            nb = 2 if q.norm_dtype == "float16" else 4
            mse = q._mse if isinstance(q, TurboQuantProd) else q
            if mse is not None:
                size += sum(packing.packed_size(g.dim, g.bits) + nb for g in mse._groups)
            if isinstance(q, TurboQuantProd):
                size += packing.packed_size(q.qjl.rows, 1) + nb
        return size

    @property
    def _has_tail(self) -> bool:
        return self.mode == "pca" and self.metric == "l2"

    @property
    def ntotal(self) -> int:
        return len(self)

    def __len__(self) -> int:
        return len(self._ids) + sum(len(i) for i in self._pending_ids)

    @property
    def nbytes(self) -> int:
        """All bytes held: codes + norms (``code_size`` a vector), the int64 ids, the centre and projection."""
        extra = sum(4 * t.numel() for t in (self.mean, self.projection) if t is not None)
        return len(self) * (self.code_size + 8) + extra

    # --- building ---------------------------------------------------------------------------------------------
    def _prepare(self, x, name: str = "x") -> torch.Tensor:
        x = _as_float_matrix(x, self.dim, name).to(self.device)
        return _unit(x) if self.metric == "cosine" else x

    def to(self, device) -> TurboQuantIndex:
        """Move the codes (and centre, projection) to ``device``, e.g. ``"cuda"``; returns ``self``.

        Search then runs there: tiles of codes are decoded and scored with bf16 matrix products on the device,
        and (D, I) still come back as numpy. Ids stay in host memory. ``add`` also works on the device.
        """
        device = torch.device(device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("CUDA is not available on this machine")
        self._consolidate()
        self.device = device
        self._fields = {k: v.to(device) for k, v in self._fields.items()}
        for name in ("mean", "projection"):
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name).to(device))
        self._scorers = None
        return self

    def train(self, x, max_samples: int = 20_000) -> TurboQuantIndex:
        """Learn the centre (and, in mode ``"pca"``, the principal axes and bit allocation) from ``x``.

        One pass over at most ``max_samples`` rows (an evenly spaced subset), no iterations: it takes
        milliseconds to seconds. Called automatically on the first batch added.
        """
        if self.mode == "oblivious":
            raise ValueError("this index is data-oblivious (mode='oblivious'): it has nothing to train")
        if len(self):
            raise ValueError("train before adding vectors: the codes already stored depend on the old centre")
        return self._fit(self._prepare(x), max_samples)

    def _fit(self, x: torch.Tensor, max_samples: int = 20_000) -> TurboQuantIndex:
        """``train`` on rows already checked and prepared by ``_prepare`` (e.g. the first batch ``add`` holds)."""
        if len(x) > max_samples:
            x = x[torch.linspace(0, len(x) - 1, max_samples, device=x.device).long()]
        self.mean = x.mean(dim=0)
        xc = x - self.mean
        if self.mode == "pca":
            cov = (xc.T.double() @ xc.double()) / max(1, len(xc) - 1)
            evals, evecs = torch.linalg.eigh(cov)
            order = torch.argsort(evals, descending=True)
            self.projection = evecs[:, order].to(torch.float32).contiguous()
            budget = self.code_size - (4 if self._has_tail else 0)
            groups = allocate_bits(evals[order].clamp_min(0).cpu().numpy(), budget)
            self.parts = [
                (a, b, TurboQuantMSE(b - a, nb, seed=derive_seed(self.seed, f"part{j}") % (1 << 62),
                                     rotation=self.rotation, norm_dtype="float16"))
                for j, (a, b, nb) in enumerate(groups)
            ]
        else:
            q = self.parts[0][2]
            mse = q._mse if isinstance(q, TurboQuantProd) else q
            if mse is not None and mse.num_outliers:
                mse.calibrate(xc)
        self._scorers = None
        self.is_trained = True
        return self

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.projection is None else x @ self.projection

    def _add(self, x: torch.Tensor, ids: torch.Tensor) -> None:
        if not self.is_trained:
            self._fit(x)
        parts = []
        step = max(1, (1 << 22) // self.dim)
        for lo in range(0, len(x), step):
            xc = x[lo : lo + step]
            xc = self._project(xc if self.mean is None else xc - self.mean)
            fields = {}
            for j, (a, b, q) in enumerate(self.parts):
                fields.update({f"p{j}.{k}": v for k, v in q._encode_chunk(xc[:, a:b]).items()})
            if self.mode == "pca":
                self._rescale(xc, fields)
            if self._has_tail:
                fields["sqnorm"] = xc.pow(2).sum(dim=1)
            parts.append(fields)
        self._pending.append({k: torch.cat([p[k] for p in parts]) for k in parts[0]})
        self._pending_ids.append(ids)
        if len(ids):
            self._next_id = max(self._next_id, int(ids.max()) + 1)

    def _rescale(self, xp: torch.Tensor, fields: dict[str, torch.Tensor]) -> None:
        """Mode pca: replace each group's norm by the least-squares scale of its codes, ``<x_g A, c> / ||c||^2``.

        TurboQuant reconstructs a group as ``||x_g|| c`` (c: the centroid values of the codes, a near-unit vector
        in the rotated space). The scale minimising ``||x_g A - s c||`` is the projection above; it costs nothing
        to store (it replaces the norm) and removes the per-vector error along c, which is what ranking by inner
        product is most sensitive to (measured: R@1@1 0.927 -> 0.964 on MiniLM at 4 bits). ``||x - mu||^2``,
        which l2 needs, is then stored exactly on its own (``sqnorm``).
        """
        for prefix, off, i, sc in self._get_scorers():
            c = sc.decode(fields[f"{prefix}codes{i}"])
            xg = sc.rotate(xp[:, off:])
            scale = (xg * c).sum(1) / (c * c).sum(1).clamp_min(1e-30)
            fields[f"{prefix}norms{i}"] = self.parts[0][2]._norms_out(scale)

    def _consolidate(self) -> None:
        if self._pending:
            chunks = ([self._fields] if self._fields else []) + self._pending
            self._fields = {k: torch.cat([c[k] for c in chunks]) for k in chunks[0]}
            self._ids = torch.cat([self._ids, *self._pending_ids])
            self._pending, self._pending_ids = [], []

    def _all_ids(self) -> torch.Tensor:
        self._consolidate()
        return self._ids

    def remove_ids(self, ids) -> int:
        """Remove the vectors with these ids (absent ids are ignored); returns how many were removed."""
        ids_t = torch.as_tensor(np.asarray(ids, dtype=np.int64).reshape(-1))
        self._consolidate()
        keep = ~torch.isin(self._ids, ids_t)
        removed = int((~keep).sum())
        if removed:
            self._fields = {k: v[keep.to(v.device)] for k, v in self._fields.items()}
            self._ids = self._ids[keep]
        return removed

    def reset(self) -> None:
        """Remove every vector (the centre, projection and bit allocation are kept)."""
        self._consolidate()
        self._fields = {k: v[:0] for k, v in self._fields.items()}
        self._ids = self._ids[:0]

    # --- searching --------------------------------------------------------------------------------------------
    def _get_scorers(self) -> list[tuple[str, int, _GroupScorer]]:
        """(field prefix, channel offset of the part, scorer) for every mse group."""
        if self._scorers is None:
            self._scorers = []
            for j, (a, _, q) in enumerate(self.parts):
                mse = q._mse if isinstance(q, TurboQuantProd) else q
                if mse is not None:
                    scorers = [_GroupScorer(g, self.device) for g in mse._groups]
                    self._scorers += [(f"p{j}.", a, i, sc) for i, sc in enumerate(scorers)]
        return self._scorers

    def _norm_sq(self, fields: dict[str, torch.Tensor]) -> torch.Tensor:
        """||x - mu||^2 of each stored vector: stored exactly in mode pca, else from the stored per-group norms."""
        if self._has_tail:
            return fields["sqnorm"].float()
        total = 0
        for j, (_, _, q) in enumerate(self.parts):
            if isinstance(q, TurboQuantProd) and q._mse is None:
                total = total + fields[f"p{j}.rnorms"].float() ** 2
            else:
                mse = q._mse if isinstance(q, TurboQuantProd) else q
                total = total + sum(fields[f"p{j}.norms{i}"].float() ** 2 for i in range(len(mse._groups)))
        return total

    def _rotate_queries(self, qc: torch.Tensor, full: bool = True) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """Queries in every group's rotated space (and the QJL projection ``S q``): linear in ``qc``."""
        qp = self._project(qc)
        scorers = self._get_scorers()
        rot = [sc.rotate(qp[:, off:]) for _, off, _, sc in scorers]
        q0 = self.parts[0][2]
        qjl = q0.qjl if isinstance(q0, TurboQuantProd) else None
        sq = qp @ qjl.matrix(qp.device).T if (qjl is not None and (full or not scorers)) else None
        return rot, sq

    def _scan(self, qc: torch.Tensor, k: int, full: bool, rotated=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k of ``est<qc, x - mu>`` (``2 est - ||x - mu||^2`` for l2): (m, k) scores and row positions.

        ``full``: include the QJL term of TurboQuant_prod; otherwise only the mse part. A low-precision scan
        (bfloat16, or int8 with int32 accumulation: see ``scan_precision``) keeps a shortlist of
        ``k + _REFINE_EXTRA`` (at least ``2k``) and re-scores it exactly in float32, so the scores returned are
        float32 estimates whatever the scan precision. On the CPU the tiles are decoded and the top-k merged by the
        compiled helpers of :mod:`turbovq.search.fastscan` when they are available.
        """
        fields = self._fields
        n, m, dev = len(self._ids), len(qc), self.device
        scorers = self._get_scorers()
        q0 = self.parts[0][2]
        qjl = q0.qjl if isinstance(q0, TurboQuantProd) else None
        if rotated is None:
            rotated = self._rotate_queries(qc, full)
        rot, sq = rotated
        # one GEMM a tile: the decoded groups (and the QJL signs) side by side against the concatenated queries
        cols = [r for r in rot] + ([sq] if sq is not None else [])
        widths = [c.shape[1] for c in cols]
        lib = fastscan.library() if dev.type == "cpu" and max(widths) <= fastscan.MAX_DIM else None
        if lib is not None and sq is None and m <= _LUT_QUERIES:
            return self._lut_scan(lib, rot, k)
        keep = min(n, max(2 * k, k + _REFINE_EXTRA))
        # low precision pays only while re-scoring the shortlists (m * keep rows) costs less than scanning n rows
        dt = self._scan_dtype(int8_ok=lib is not None and sq is None)
        low = dt != torch.float32 and m * keep < n
        keep, dt = (keep, dt) if low else (k, torch.float32)
        q_cat = torch.cat(cols, dim=1)  # (m, K) float32
        scales = norms = self._group_scales()
        row_scale = None
        if dt == torch.int8:
            # int8 grid per group: the largest |centroid * scale| of the collection maps to 127; the per-group steps
            # move onto the query columns, and each query gets its own step (the int32 dot times it is the score)
            steps = [float(sc.centroids.abs().max() * s.abs().max().clamp_min(1e-30)) / 127 for (*_, sc), s in
                     zip(scorers, scales)]
            scales = [s / st for s, st in zip(scales, steps)]
            q_cat = q_cat * torch.cat([torch.full((w,), st) for w, st in zip(widths, steps)])
            row_scale = q_cat.abs().amax(dim=1).clamp_min(1e-30) / 127
            q_cat = torch.round(q_cat / row_scale[:, None]).to(torch.int8)
        else:
            q_cat = q_cat.to(dt).contiguous()
        neg_sq = None
        if self.metric == "l2":  # 2 est - ||x - mu||^2
            row_scale = 2 * (row_scale if row_scale is not None else torch.ones(m, device=dev))
            neg_sq = -self._norm_sq(fields)
        tile = max(256, (_TILE_ELEMENTS_GPU if dev.type == "cuda" else _TILE_ELEMENTS) // self.dim)
        width0 = keep if lib is not None else 0  # the compiled merge fills a preallocated best list in place
        best_s = torch.full((m, width0), -math.inf, device=dev)
        best_p = torch.full((m, width0), -1, dtype=torch.int64, device=dev)
        for lo in range(0, n, tile):
            hi = min(n, lo + tile)
            buf = torch.empty(hi - lo, sum(widths), dtype=dt, device=dev)
            jobs, at = [], 0
            for (prefix, _, i, sc), w, scale in zip(scorers, widths, scales):
                codes, out = fields[f"{prefix}codes{i}"][lo:hi], buf[:, at : at + w]
                if lib is not None:
                    jobs.append((codes, sc.bits, w, sc.centroids, scale[lo:hi], out))
                else:
                    torch.mul(sc.decode(codes, dt), scale[lo:hi, None].to(dt), out=out)
                at += w
            if jobs:
                fastscan.decode(lib, jobs)
            if sq is not None:
                signs = qjl.signs(fields["p0.qjl"][lo:hi]) * qjl.scale(fields["p0.rnorms"][lo:hi])[:, None]
                buf[:, at:] = signs
            s = torch._int_mm(q_cat, buf.T) if dt == torch.int8 else q_cat @ buf.T  # (m, T)
            bias = None if neg_sq is None else neg_sq[lo:hi]
            if lib is not None:
                fastscan.topk_merge(lib, s, lo, best_s, best_p, row_scale, bias)
            else:
                if self.metric == "l2":
                    s = s.float().mul_(row_scale[:, None]).add_(bias[None, :])
                best_s, best_p = _merge_topk(best_s, best_p, s, lo, keep)
        if low:
            exact = self._exact(rot, sq, best_p, norms)
            best_s, top = torch.topk(exact, k, dim=1)
            best_p = torch.gather(best_p, 1, top)
        return best_s, best_p

    def _lut_scan(self, lib, rot: list[torch.Tensor], k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``_scan`` for a query or two: table lookups on the codes (one per code byte or code), no decoded tiles.

        Decoding costs the same whatever the number of queries, so below ``_LUT_QUERIES`` queries a lookup scan
        (float32 sums, no shortlist needed) is faster."""
        n, m = len(self._ids), len(rot[0])
        scorers = self._get_scorers()
        norm_sq = self._norm_sq(self._fields) if self.metric == "l2" else None
        codes = [self._fields[f"{prefix}codes{g}"] for prefix, _, g, _ in scorers]
        scales = self._group_scales()
        best_s, best_p = [], []
        out = torch.empty(n)
        for i in range(m):
            groups = [(c, sc.bits, sc.dim, scale, fastscan.lut_tables(sc.centroids, sc.bits, r[i]))
                      for c, scale, (*_, sc), r in zip(codes, scales, scorers, rot)]  # fmt: skip
            fastscan.lut_scan(lib, groups, n, out)
            s = out if norm_sq is None else 2 * out - norm_sq
            top = torch.topk(s, k)
            best_s.append(top.values)
            best_p.append(top.indices)
        return torch.stack(best_s), torch.stack(best_p)

    def _group_scales(self) -> list[torch.Tensor]:
        """Each mse group's stored per-vector scales (norms) as float32, in ``_get_scorers`` order."""
        return [self._fields[f"{prefix}norms{i}"].float() for prefix, _, i, _ in self._get_scorers()]

    def _exact(self, rot: list[torch.Tensor], sq: torch.Tensor | None, pos: torch.Tensor,
               scales: list[torch.Tensor]) -> torch.Tensor:
        """Float32 scores, as the scan defines them, of the rows ``pos`` (m, L) for each query: (m, L).

        ``scales``: ``_group_scales()``, already computed by the scan."""
        m, length = pos.shape
        out = torch.empty(m, length, device=self.device)
        scorers = self._get_scorers()
        qjl = self.parts[0][2].qjl if sq is not None else None
        step = max(1, (1 << 21) // max(1, length * self.dim))
        lib = fastscan.library() if self.device.type == "cpu" and qjl is None else None
        if lib is not None:  # decode the rows straight from the fields (no gathered copies), one batched product
            q_cat = torch.cat(rot, dim=1)
            norm_sq = self._norm_sq(self._fields) if self.metric == "l2" else None
            edges = np.cumsum([0] + [r.shape[1] for r in rot])
        for lo in range(0, m, step):
            hi = min(m, lo + step)
            flat = pos[lo:hi].reshape(-1)
            if lib is not None:
                buf = torch.empty(len(flat), q_cat.shape[1])
                jobs = [(self._fields[f"{prefix}codes{i}"], sc.bits, sc.dim, sc.centroids, scale, buf[:, a:b])
                        for (prefix, _, i, sc), scale, a, b in zip(scorers, scales, edges[:-1], edges[1:])]  # fmt: skip
                fastscan.decode(lib, jobs, rows=flat)
                s = torch.bmm(buf.view(hi - lo, length, -1), q_cat[lo:hi, :, None])[..., 0]
                out[lo:hi] = s if norm_sq is None else 2 * s - norm_sq[flat].view(hi - lo, length)
                continue
            rows = {k: v[flat] for k, v in self._fields.items()}
            s = torch.zeros(hi - lo, length, device=self.device)
            for (prefix, _, i, sc), r in zip(scorers, rot):
                vals = sc.decode(rows[f"{prefix}codes{i}"]) * rows[f"{prefix}norms{i}"].float()[:, None]
                s += torch.einsum("mld,md->ml", vals.reshape(hi - lo, length, -1), r[lo:hi])
            if qjl is not None:
                signs = qjl.signs(rows["p0.qjl"]) * qjl.scale(rows["p0.rnorms"])[:, None]
                s += torch.einsum("mld,md->ml", signs.reshape(hi - lo, length, -1), sq[lo:hi])
            if self.metric == "l2":
                s = 2 * s - self._norm_sq(rows).reshape(hi - lo, length)
            out[lo:hi] = s
        return out

    def _scan_dtype(self, int8_ok: bool) -> torch.dtype:
        """The scan's product precision; int8 needs the compiled CPU decoder (else the next best is used)."""
        want = self.scan_precision
        if want in ("auto", "int8") and int8_ok:
            return torch.int8
        if want == "float32" or (want != "bfloat16" and self.device.type == "cpu" and not _fast_bf16()):
            return torch.float32
        return torch.bfloat16

    def _rescore(self, qc: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Full (unbiased) TurboQuant_prod estimate for the candidates ``pos`` (m, L) of each query: (m, L)."""
        m, length = pos.shape
        flat = pos.reshape(-1)
        rows = {k: v[flat] for k, v in self._fields.items()}
        q = self.parts[0][2]
        xhat = q._decode_chunk({k.removeprefix("p0."): v for k, v in rows.items()}).reshape(m, length, self.dim)
        s = torch.einsum("mld,md->ml", xhat, qc)
        if self.metric == "l2":
            s = 2 * s - self._norm_sq(rows).reshape(m, length)
        return s

    def search(self, queries, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` best vectors for each query: ``(D, I)`` numpy arrays of shape (m, k), best first.

        ``D`` holds inner products (``ip``, ``cosine``; descending) or squared L2 distances (``l2``; ascending),
        as estimated from the codes; ``I`` the int64 ids.
        """
        q = self._prepare(queries, "queries")
        check_k(k, len(self))
        d, ids = self._search_prepared(q, k)
        return d.cpu().numpy(), ids.numpy()

    def _search_prepared(self, q: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``search`` on already validated (and, for cosine, normalised) float32 queries; torch out."""
        self._consolidate()
        out_d, out_i = [], []
        n = len(self._ids)
        for lo in range(0, len(q), _QUERY_BLOCK):
            qb = q[lo : lo + _QUERY_BLOCK]
            # <q, x> = <q, mu> + <q, x - mu>: centre the query only for l2, where ||q - x|| = ||(q - mu) - (x - mu)||
            qc = qb - self.mean if (self.mean is not None and self.metric == "l2") else qb
            if self.rerank:
                _, cand = self._scan(qc, min(n, self.rerank * k), full=False)
                s, top = torch.topk(self._rescore(qc, cand), k, dim=1)
                pos = torch.gather(cand, 1, top)
            else:
                s, pos = self._scan(qc, k, full=True)
            # back from the internal "larger is better" score to the metric's value
            if self.metric == "l2":
                d = torch.linalg.vector_norm(qc, dim=1, keepdim=True) ** 2 - s
            else:
                d = s + (0 if self.mean is None else (qb @ self.mean)[:, None])
            out_d.append(d)
            out_i.append(self._ids[pos.cpu()])
        return torch.cat(out_d), torch.cat(out_i)

    # --- persistence ------------------------------------------------------------------------------------------
    def save(self, path) -> None:
        """Write the index atomically (versioned, checksummed; an interrupted save leaves the old file intact)."""
        self._consolidate()
        tensors = {"ids": self._ids}
        for name in ("mean", "projection"):
            if getattr(self, name) is not None:
                tensors[name] = getattr(self, name).cpu()
        tensors.update({f"field.{k}": v.cpu() for k, v in self._fields.items()})
        meta = {
            "index_version": INDEX_VERSION,
            "config": self.config,
            "parts": [[a, b, q.config] for a, b, q in self.parts],
            "is_trained": self.is_trained,
            "next_id": self._next_id,
            "ntotal": len(self._ids),
        }
        io.save(path, FILE_KIND, meta, tensors)

    @classmethod
    def load(cls, path, mmap: bool = True, verify: bool = True) -> TurboQuantIndex:
        """Open an index written by :meth:`save`. ``mmap=True`` maps the codes instead of reading them, so a large
        index opens at once (``verify=False`` also skips the checksum pass, which reads the whole file)."""
        path = Path(path)
        meta, tensors = io.load(path, FILE_KIND, mmap=mmap, verify=verify)
        version = meta.get("index_version")
        if version != INDEX_VERSION:
            raise io.FormatError(
                f"{path}: index version {version}, but this turbovq reads index version {INDEX_VERSION}"
            )
        try:
            idx = cls(**meta["config"])
            idx.parts = [(a, b, from_config(c)) for a, b, c in meta["parts"]]
            idx.is_trained = meta["is_trained"]
            idx._next_id = meta["next_id"]
            idx.mean = tensors.pop("mean", None)
            idx.projection = tensors.pop("projection", None)
            idx._ids = tensors.pop("ids")
            ntotal = meta["ntotal"]
        except (KeyError, TypeError, ValueError) as e:
            raise io.FormatError(f"{path}: invalid index metadata ({e})") from None
        idx._fields = {k.removeprefix("field."): v for k, v in tensors.items()}
        if len(idx._ids) != ntotal or any(len(v) != ntotal for v in idx._fields.values()):
            raise io.FormatError(f"{path}: inconsistent index (field lengths do not match ntotal)")
        return idx
