"""``TurboQuantIVFIndex``: coarse k-means partitions (inverted lists) over TurboQuant codes of residuals.

Build: k-means with ``nlist`` centroids on a sample (a few iterations, seeded), then every vector goes to its
nearest centroid ``c`` and the residual ``r = x - c`` is encoded by one TurboQuant encoder shared by all lists
(trained once on a sample of residuals: centre, principal axes, bit allocation as in ``TurboQuantIndex``).

Search: each query scores the centroids, visits its ``nprobe`` best lists and scores their codes there; the queries
that visit one list are scored together through that list's BLAS tile scan:

    ip / cosine   <q, x>       = <q, c> + est<q, r>
    l2            ||q - x||^2  = ||(q - c) - r||^2     (the flat index's l2 on the residual)

``nprobe`` trades recall for speed (``nprobe = nlist`` scans everything).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from turbovq import io
from turbovq.quantizer import from_config
from turbovq.search.index import METRICS, TurboQuantIndex, _as_float_matrix, _IdsMixin, _unit, check_k

FILE_KIND = "turbovq_ivf_index"
IVF_VERSION = 1


def kmeans(x: torch.Tensor, k: int, iters: int = 10, seed: int = 0) -> torch.Tensor:
    """Lloyd's k-means (squared L2) on the rows of ``x``: (k, dim) centroids. Empty clusters restart at random rows."""
    if len(x) < k:
        raise ValueError(f"k-means with nlist={k} needs at least {k} training vectors, got {len(x)}")
    g = torch.Generator().manual_seed(seed)
    c = x[torch.randperm(len(x), generator=g)[:k]].clone()
    for _ in range(iters):
        assign = assign_l2(x, c)
        sums = torch.zeros_like(c).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).to(x.dtype)
        empty = counts == 0
        c = sums / counts.clamp_min(1)[:, None]
        if bool(empty.any()):
            c[empty] = x[torch.randint(0, len(x), (int(empty.sum()),), generator=g)]
    return c


def assign_l2(x: torch.Tensor, c: torch.Tensor, chunk: int = 16_384) -> torch.Tensor:
    """Index of the nearest centroid (squared L2) of every row of ``x``."""
    cn = (c * c).sum(1)
    return torch.cat([(cn[None] - 2 * x[lo : lo + chunk] @ c.T).argmin(1) for lo in range(0, len(x), chunk)])


class TurboQuantIVFIndex(_IdsMixin):
    """Inverted-file TurboQuant index: ``train`` / ``add`` / ``add_with_ids`` / ``search`` / ``remove_ids``.

    Parameters
    ----------
    dim, bits, metric, seed, mode : as for :class:`TurboQuantIndex` (``bits`` is the code budget a vector; the list
        assignment costs nothing extra beyond the id, as lists are stored contiguously).
    nlist : number of coarse partitions.
    nprobe : partitions visited per query (settable later: ``index.nprobe = 32``).
    """

    def __init__(self, dim: int, bits: float = 4, nlist: int = 256, metric: str = "ip", seed: int = 0,
                 *, mode: str = "pca", nprobe: int = 8, **index_kwargs):
        if index_kwargs.get("rerank"):
            raise ValueError("TurboQuantIVFIndex does not support rerank yet")
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        if isinstance(nlist, bool) or not isinstance(nlist, (int, np.integer)) or nlist < 1:
            raise ValueError(f"nlist must be a positive integer, got {nlist!r}")
        self.dim, self.bits, self.nlist, self.metric = dim, float(bits), int(nlist), metric
        self.seed, self.mode = seed, mode
        self.nprobe = nprobe
        inner_metric = "l2" if metric == "l2" else "ip"
        # the template holds the shared encoder; every list is a flat index that shares its trained state
        self._template = TurboQuantIndex(dim, bits, metric=inner_metric, seed=seed, mode=mode, **index_kwargs)
        self.centroids: torch.Tensor | None = None
        self.lists: list[TurboQuantIndex] = []
        self._next_id = 0

    @property
    def is_trained(self) -> bool:
        return self.centroids is not None

    @property
    def nprobe(self) -> int:
        return self._nprobe

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"nprobe must be a positive integer, got {value!r}")
        self._nprobe = int(value)

    def __len__(self) -> int:
        return sum(len(lst) for lst in self.lists)

    @property
    def ntotal(self) -> int:
        return len(self)

    @property
    def code_size(self) -> int:
        return self._template.code_size

    @property
    def nbytes(self) -> int:
        """Codes + ids of every list, the centroids and the encoder's centre/projection."""
        shared = sum(4 * t.numel() for t in (self._template.mean, self._template.projection) if t is not None)
        return len(self) * (self.code_size + 8) + 4 * self.nlist * self.dim + shared

    def _prepare(self, x, name: str = "x") -> torch.Tensor:
        x = _as_float_matrix(x, self.dim, name)
        return _unit(x) if self.metric == "cosine" else x

    def train(self, x, max_samples: int = 100_000, iters: int = 10) -> TurboQuantIVFIndex:
        """Coarse k-means and the shared residual encoder, from (a sample of) ``x``."""
        if len(self):
            raise ValueError("train before adding vectors")
        x = self._prepare(x)
        if len(x) > max_samples:
            x = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(self.seed))[:max_samples]]
        self.centroids = kmeans(x, self.nlist, iters=iters, seed=self.seed)
        residuals = x - self.centroids[assign_l2(x, self.centroids)]
        if self._template.mode != "oblivious":
            self._template.train(residuals)
        self.lists = [self._new_list() for _ in range(self.nlist)]
        return self

    def _new_list(self) -> TurboQuantIndex:
        t = self._template
        lst = TurboQuantIndex(**t.config)
        lst.mean, lst.projection, lst.parts, lst.is_trained = t.mean, t.projection, t.parts, True
        return lst

    def _all_ids(self) -> torch.Tensor:
        return torch.cat([torch.zeros(0, dtype=torch.int64), *(lst._all_ids() for lst in self.lists)])

    def _add(self, x: torch.Tensor, ids: torch.Tensor) -> None:
        if not self.is_trained:
            self.train(x)
        assign = assign_l2(x, self.centroids)
        for lst_id in torch.unique(assign).tolist():
            rows = (assign == lst_id).nonzero()[:, 0]
            self.lists[lst_id]._add(x[rows] - self.centroids[lst_id], ids[rows])  # ids checked by add_with_ids
        if len(ids):
            self._next_id = max(self._next_id, int(ids.max()) + 1)

    def remove_ids(self, ids) -> int:
        return sum(lst.remove_ids(ids) for lst in self.lists)

    def search(self, queries, k: int = 10, nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(D, I) of shape (m, k) as :meth:`TurboQuantIndex.search`; slots not filled (the probed lists held fewer
        than k vectors) have id -1 and score -inf (ip) or +inf (l2)."""
        q = self._prepare(queries, "queries")
        check_k(k, len(self))
        nprobe = min(self.nlist, self.nprobe if nprobe is None else nprobe)
        coarse = q @ self.centroids.T
        if self.metric == "l2":
            coarse = 2 * coarse - (self.centroids * self.centroids).sum(1)[None]
        probe = torch.topk(coarse, nprobe, dim=1).indices  # (m, nprobe)
        m = len(q)
        sign = -1.0 if self.metric == "l2" else 1.0  # internal: larger is better
        cand_s = torch.full((m, nprobe * k), -float("inf"))
        cand_i = torch.full((m, nprobe * k), -1, dtype=torch.int64)
        t = self._template
        mean = t.mean
        # Rotations are linear and shared by all lists: rotate the queries (and, for l2, the centroids) once.
        base = q - mean if (self.metric == "l2" and mean is not None) else q
        rq, sq = t._rotate_queries(base)
        rc, sc_ = t._rotate_queries(self.centroids) if self.metric == "l2" else (None, None)
        for lst_id in torch.unique(probe).tolist():
            lst = self.lists[lst_id]
            if len(lst) == 0:
                continue
            lst._consolidate()
            rows, slot = (probe == lst_id).nonzero(as_tuple=True)
            kk = min(k, len(lst))
            c = self.centroids[lst_id]
            if self.metric == "l2":
                qc = base[rows] - c
                rot = [r[rows] - r_c[lst_id] for r, r_c in zip(rq, rc)]
                sq_rows = None if sq is None else sq[rows] - sc_[lst_id]
            else:
                qc = base[rows]
                rot = [r[rows] for r in rq]
                sq_rows = None if sq is None else sq[rows]
            s, pos = lst._scan(qc, kk, full=True, rotated=(rot, sq_rows))
            if self.metric == "l2":
                d = (qc * qc).sum(1, keepdim=True) - s
            else:
                d = s + (qc @ c)[:, None] + (0 if mean is None else (qc @ mean)[:, None])
            cols = slot[:, None] * k + torch.arange(kk)[None]
            cand_s[rows[:, None], cols] = sign * d
            cand_i[rows[:, None], cols] = lst._ids[pos]
        best, top = torch.topk(cand_s, k, dim=1)
        return (sign * best).numpy(), torch.gather(cand_i, 1, top).numpy()

    # --- persistence ------------------------------------------------------------------------------------------
    @property
    def config(self) -> dict:
        inner = {k: v for k, v in self._template.config.items() if k not in ("dim", "bits", "metric", "seed", "mode")}
        return {"dim": self.dim, "bits": self.bits, "nlist": self.nlist, "metric": self.metric, "seed": self.seed,
                "mode": self.mode, "nprobe": self.nprobe, **inner}  # fmt: skip

    def save(self, path) -> None:
        """Write the index atomically in the checksummed format of :mod:`turbovq.io`: centroids, the shared
        encoder's centre/projection, and every list's codes and ids stored back to back (list sizes alongside)."""
        if not self.is_trained:
            raise ValueError("the index is not trained: nothing to save")
        for lst in self.lists:
            lst._consolidate()
        t = self._template
        tensors = {"centroids": self.centroids, "list_sizes": torch.tensor([len(x._ids) for x in self.lists])}
        tensors["ids"] = torch.cat([torch.zeros(0, dtype=torch.int64), *(x._ids for x in self.lists)])
        for name in ("mean", "projection"):
            if getattr(t, name) is not None:
                tensors[name] = getattr(t, name).cpu()
        filled = [x for x in self.lists if x._fields]
        for k in filled[0]._fields if filled else ():
            tensors[f"field.{k}"] = torch.cat([x._fields[k].cpu() for x in filled])
        meta = {"ivf_version": IVF_VERSION, "config": self.config, "parts": [[a, b, q.config] for a, b, q in t.parts],
                "next_id": self._next_id}  # fmt: skip
        io.save(path, FILE_KIND, meta, tensors)

    @classmethod
    def load(cls, path, mmap: bool = True, verify: bool = True) -> TurboQuantIVFIndex:
        """Open an index written by :meth:`save` (``mmap``: lists are views into the mapped file)."""
        path = Path(path)
        meta, tensors = io.load(path, FILE_KIND, mmap=mmap, verify=verify)
        if meta.get("ivf_version") != IVF_VERSION:
            raise io.FormatError(
                f"{path}: IVF index version {meta.get('ivf_version')}, but this turbovq reads version {IVF_VERSION}"
            )
        try:
            idx = cls(**meta["config"])
            t = idx._template
            t.parts = [(a, b, from_config(c)) for a, b, c in meta["parts"]]
            t.mean, t.projection, t.is_trained = tensors.pop("mean", None), tensors.pop("projection", None), True
            idx.centroids, idx._next_id = tensors.pop("centroids"), meta["next_id"]
            sizes, ids = tensors.pop("list_sizes").tolist(), tensors.pop("ids")
        except (KeyError, TypeError, ValueError) as e:
            raise io.FormatError(f"{path}: invalid IVF index metadata ({e})") from None
        fields = {k.removeprefix("field."): v for k, v in tensors.items()}
        if len(sizes) != idx.nlist or sum(sizes) != len(ids) or any(len(v) != len(ids) for v in fields.values()):
            raise io.FormatError(f"{path}: inconsistent IVF index (list sizes do not match the stored rows)")
        idx.lists, lo = [], 0
        for size in sizes:
            lst = idx._new_list()
            lst._ids = ids[lo : lo + size]
            if size:
                lst._fields = {k: v[lo : lo + size] for k, v in fields.items()}
            lo += size
            idx.lists.append(lst)
        return idx
