"""``ShardedIndex``: a :class:`~turbovq.search.index.TurboQuantIndex` split over Ray actors, same results as one.

Why the results are *identical* to a single-machine index with the same seed, not merely close:

* **One fitted state.** Modes ``"pca"`` and ``"center"`` learn a centre (and principal axes, bit allocation) from
  the data. Fitting per shard would give every shard different codes. The driver fits once, exactly as
  ``TurboQuantIndex`` does (on the first batch added, or on ``train(x)``), and every shard starts from a copy of
  that trained, empty index.
* **Encoding is per vector.** A vector's codes depend only on the vector and the fitted state, not on which
  other vectors are encoded with it, so a shard encodes its rows exactly as the single index would.
* **Scores are per (query, vector) pair,** so a shard's top-k holds the exact scores the single index computes,
  and the global top-k is the top-k of the union of the shards' top-k: merging is exact. Ties (exactly equal float
  scores) go to the smaller id here, and to ``torch.topk``'s order in ``TurboQuantIndex``.

Bit-for-bit equality needs two conditions, both about float rounding, not about the codes:

* ``scan_precision="float32"``. With ``"bfloat16"`` (what ``"auto"`` picks on CPUs with bf16 matrix units) an index
  scans in bf16 and re-scores a shortlist in float32 only when the shortlists are smaller than the collection,
  a choice that depends on its size: a shard may score in float32 where the whole index re-scores, and the two
  float32 computations round differently in the last bit. Ids then agree except for scores within ~1e-6.
* The same number of BLAS threads in the shards (``threads_per_shard``, 1 by default) as in the single index:
  MKL may round a few scores differently (1 ulp) at another thread count.

Placement: the vector with id ``i`` lives on shard ``i % num_shards``. Ids are routed, not looked up, so a clash
check or a removal touches only the shard that can hold the id, and consecutive ids spread evenly.

Files: ``save(dirpath)`` writes ``manifest.tvq`` (the ``turbovq.io`` format: versioned, checksummed, atomic), one
``TurboQuantIndex`` file per non-empty shard, written by the shard's own actor in parallel, and the trained state
(``template``, loaded by the driver; empty shards start from it). Every save uses fresh file names (a generation
tag) and commits by replacing the manifest last, then deletes the previous generation: a crash mid-save leaves the
previous index complete. In a multi-node cluster ``dirpath`` must be storage every node sees (NFS, a bucket mount).

Faults: a shard whose actor dies (node lost, process killed) is restarted from its file and the call retried,
when its file holds all its vectors (since the last ``save`` / ``load`` nothing was added or removed). Otherwise
its new vectors exist nowhere else, and the error says so. Missing, truncated or corrupt shard files are refused
by name.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from turbovq import io
from turbovq.search.index import TurboQuantIndex, _as_float_matrix, check_k

MANIFEST = "manifest.tvq"
MANIFEST_KIND = "turbovq_sharded_index"
SHARDED_VERSION = 1
_GENERATED = re.compile(r"^(shard-\d+|template)\.[0-9a-f]+\.tvq$")
log = logging.getLogger(__name__)


def _ray():
    """Import Ray on first use: the rest of turbovq must not need it."""
    try:
        import ray
    except ImportError:
        raise ImportError('ShardedIndex runs on Ray, which is not installed: pip install "turbovq[dist]"') from None
    return ray


_ACTOR_CLASS = None


def _actor_class():
    """``_Shard`` as a Ray actor class, made once per process (each ``ray.remote`` would export it again)."""
    global _ACTOR_CLASS
    if _ACTOR_CLASS is None:
        _ACTOR_CLASS = _ray().remote(_Shard)
    return _ACTOR_CLASS


class _Shard:
    """One shard: a ``TurboQuantIndex`` inside a Ray actor process. Methods return what the driver bookkeeps."""

    def __init__(self, threads: int):
        torch.set_num_threads(threads)  # the driver's bit-exactness claim assumes a known BLAS thread count
        self.index: TurboQuantIndex | None = None

    def create(self, template: TurboQuantIndex) -> int:
        self.index = template
        return len(self.index)

    def open(self, path: str, verify: bool) -> int:
        self.index = TurboQuantIndex.load(path, mmap=True, verify=verify)
        return len(self.index)

    def add_with_ids(self, x: np.ndarray, ids: np.ndarray) -> int:
        self.index.add_with_ids(x, np.array(ids))  # Ray hands arrays over read-only; torch wants them writable
        return len(self.index)

    def remove_ids(self, ids: np.ndarray) -> tuple[int, int]:
        return self.index.remove_ids(ids), len(self.index)

    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self.index.search(q, k)

    def save(self, path: str) -> int:
        self.index.save(path)
        return Path(path).stat().st_size

    def nbytes(self) -> int:
        return self.index.nbytes

    def pid(self) -> int:
        return os.getpid()


@dataclass
class _ShardState:
    actor: object
    ntotal: int = 0
    file: Path | None = None  # the file that holds exactly this shard's vectors, if any
    dirty: bool = False  # vectors added or removed since ``file`` was written (or, without a file, since empty)


class ShardedIndex:
    """A TurboQuant index sharded over Ray actors: ``add`` / ``add_with_ids`` / ``search`` / ``remove_ids`` /
    ``save`` / ``load``, with the results of a ``TurboQuantIndex`` of the same arguments.

    Parameters
    ----------
    dim, bits, metric, seed : as :class:`~turbovq.search.index.TurboQuantIndex`; further keyword arguments
        (``mode``, ``estimator``, ...) go to it too.
    num_shards : number of shard actors. Encoding runs in parallel over them; each search goes to all of them.
    address : Ray cluster to join (``"auto"``, ``"ray://host:10001"``) when Ray is not initialised yet;
        ``None`` starts a local instance (or joins ``RAY_ADDRESS``). An initialised Ray is used as it is.
    threads_per_shard : torch / BLAS threads inside each shard actor.
    num_cpus_per_shard : CPUs each actor reserves from Ray's scheduler; ``None`` keeps Ray's actor default (none
        held while it runs), so more shards than CPUs can live on a small machine.
    max_restarts : how many times one call restarts a dead shard actor from its file before giving up.
    """

    def __init__(
        self,
        dim: int,
        bits: float = 4,
        metric: str = "ip",
        seed: int = 0,
        num_shards: int = 2,
        *,
        address: str | None = None,
        threads_per_shard: int = 1,
        num_cpus_per_shard: float | None = None,
        max_restarts: int = 3,
        **options,
    ):
        for name, v, low in (("num_shards", num_shards, 1), ("threads_per_shard", threads_per_shard, 1),
                             ("max_restarts", max_restarts, 0)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")
        self._template = TurboQuantIndex(dim, bits, metric, seed, **options)
        self.num_shards = int(num_shards)
        self.threads_per_shard = int(threads_per_shard)
        self.num_cpus_per_shard = num_cpus_per_shard
        self.max_restarts = int(max_restarts)
        self.restarts = 0  # shard actors restarted from their files so far
        self._verify = True  # checksum shard files when opening them
        self._shards: list[_ShardState] | None = None  # created with the first vectors (after training)
        self._next_id = 0
        ray = _ray()
        if not ray.is_initialized():
            ray.init(address=address)

    # --- configuration ----------------------------------------------------------------------------------------
    @property
    def config(self) -> dict:
        """The ``TurboQuantIndex`` configuration every shard shares, plus ``num_shards``."""
        return {**self._template.config, "num_shards": self.num_shards}

    @property
    def dim(self) -> int:
        return self._template.dim

    @property
    def metric(self) -> str:
        return self._template.metric

    @property
    def is_trained(self) -> bool:
        return self._template.is_trained

    @property
    def code_size(self) -> int:
        return self._template.code_size

    def __len__(self) -> int:
        return sum(s.ntotal for s in self._shards) if self._shards else 0

    @property
    def ntotal(self) -> int:
        return len(self)

    @property
    def nbytes(self) -> int:
        """Bytes held over all shards (each also holds its copy of the centre and projection)."""
        if not self._shards:
            return 0
        return sum(self._gather({i: ("nbytes",) for i in range(self.num_shards)}).values())

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config.items())
        return f"ShardedIndex({args}, ntotal={len(self)})"

    # --- actors -----------------------------------------------------------------------------------------------
    def _new_actor(self):
        opts = {"max_restarts": 0}  # restarts are ours: from the shard file, with a check of what it holds
        if self.num_cpus_per_shard is not None:
            opts["num_cpus"] = self.num_cpus_per_shard
        return _actor_class().options(**opts).remote(self.threads_per_shard)

    def _spawn(self, states: list[_ShardState] | None = None) -> None:
        """Start the shard actors: from their files, or from the trained, empty template."""
        ray = _ray()
        self._shards = states or [_ShardState(None) for _ in range(self.num_shards)]
        ref = ray.put(self._template)
        refs = []
        for s in self._shards:
            s.actor = self._new_actor()
            refs.append(s.actor.open.remote(str(s.file), self._verify) if s.file else s.actor.create.remote(ref))
        for i, (s, ref) in enumerate(zip(self._shards, refs)):
            try:
                n = ray.get(ref)
            except ray.exceptions.RayTaskError as e:
                self._kill()
                raise self._named(i, e) from None
            if n != s.ntotal:
                self._kill()
                raise io.FormatError(f"shard {i} of {self.num_shards}: {s.file} holds {n} vectors, the manifest "
                                     f"says {s.ntotal}")

    def start(self) -> ShardedIndex:
        """Start the shard actors now rather than with the first vectors added (each is a new process: seconds),
        e.g. to keep that start-up out of a timing. Needs a trained index."""
        if not self.is_trained:
            raise ValueError("train the index (or add a first batch) before starting its shards")
        if self._shards is None:
            self._spawn()
        return self

    def _restart(self, i: int, err: Exception) -> None:
        """Replace the dead actor of shard ``i`` by a new one that loads the shard's file (or, for a shard that
        was empty, starts from the template)."""
        s = self._shards[i]
        if s.dirty:
            raise RuntimeError(
                f"shard {i} of {self.num_shards} lost its actor ({type(err).__name__}) and holds vectors that were "
                "never saved (added or removed since the last save/load): they are lost. Rebuild it, and call "
                "save() after building so that a dead shard can be restored from its file."
            ) from err
        log.warning("shard %d: actor died (%s); restarting it from %s", i, type(err).__name__, s.file or "empty")
        s.actor = self._new_actor()
        if s.file is None:
            n = _ray().get(s.actor.create.remote(self._template))
        else:
            n = self._open(i, s.actor, s.file, verify=True)
        if n != s.ntotal:
            raise io.FormatError(f"{s.file}: shard {i} holds {n} vectors, the index expects {s.ntotal}")
        self.restarts += 1

    def _open(self, i: int, actor, path: Path, verify: bool) -> int:
        ray = _ray()
        try:
            return ray.get(actor.open.remote(str(path), verify))
        except ray.exceptions.RayTaskError as e:
            raise self._named(i, e) from None

    def _named(self, i: int, err: Exception) -> Exception:
        """The error a shard raised, without Ray's wrapper, prefixed with the shard (the message names the file)."""
        cause = getattr(err, "cause", None) or err
        if isinstance(cause, (io.FormatError, OSError)):
            return io.FormatError(f"shard {i} of {self.num_shards}: {cause}")
        if isinstance(cause, ValueError):
            return ValueError(str(cause))
        return err

    def _call_ref(self, i: int, method: str, *args):
        return getattr(self._shards[i].actor, method).remote(*args)

    def _gather(self, calls: dict[int, tuple]) -> dict[int, object]:
        """Run ``{shard: (method, *args)}`` on all the shards at once; a shard whose actor died is restarted
        from its file and its call retried (up to ``max_restarts`` times)."""
        ray = _ray()
        refs = {i: self._call_ref(i, m, *a) for i, (m, *a) in calls.items()}
        out = {}
        for i, ref in refs.items():
            for attempt in range(self.max_restarts + 1):
                try:
                    out[i] = ray.get(ref)
                    break
                except ray.exceptions.RayActorError as e:
                    if attempt == self.max_restarts:
                        raise RuntimeError(f"shard {i}: actor died {attempt + 1} times in one call; giving up") from e
                    self._restart(i, e)
                    ref = self._call_ref(i, calls[i][0], *calls[i][1:])
        return out

    # --- building ---------------------------------------------------------------------------------------------
    def train(self, x, max_samples: int = 20_000) -> ShardedIndex:
        """Fit the centre / principal axes on ``x`` (as ``TurboQuantIndex.train``), once, for every shard."""
        if len(self):
            raise ValueError("train before adding vectors: the codes already stored depend on the old centre")
        self._template.train(x, max_samples)
        if self._shards is not None:  # empty shards of an earlier state: start them again from the new one
            self._kill()
        return self

    def _route(self, ids: np.ndarray) -> dict[int, np.ndarray | slice]:
        """``{shard: positions in ids}`` for the shards that get any: id ``i`` lives on shard ``i % num_shards``.

        Consecutive ids (what ``add`` assigns) route to strided slices: no gather copy of the vectors.
        """
        s = self.num_shards
        if len(ids) and ids[-1] - ids[0] == len(ids) - 1 and (np.diff(ids) == 1).all():
            out = {i: slice((i - int(ids[0])) % s, None, s) for i in range(s)}
            return {i: sl for i, sl in out.items() if sl.start < len(ids)}
        shard = ids % s
        out = {i: np.flatnonzero(shard == i) for i in range(s)}
        return {i: pos for i, pos in out.items() if len(pos)}

    def _add(self, x: torch.Tensor, ids: np.ndarray) -> None:
        if not self.is_trained:  # exactly what TurboQuantIndex.add does with its first batch
            self._template._fit(self._template._prepare(x))
        if self._shards is None:
            self._spawn()
        ray = _ray()
        x = x.numpy()
        routed = self._route(ids)
        calls = {i: ("add_with_ids", ray.put(x[pos]), ids[pos]) for i, pos in routed.items()}
        for i in calls:  # from here the shard's file no longer holds all its vectors
            self._shards[i].dirty = True
        refs = {i: self._call_ref(i, m, *a) for i, (m, *a) in calls.items()}
        done, failed = {}, None
        for i, ref in refs.items():
            try:
                done[i] = ray.get(ref)
            except ray.exceptions.RayTaskError as e:  # e.g. an id already on that shard: undo the others
                failed = failed or self._named(i, e)
            except ray.exceptions.RayActorError as e:  # its unsaved vectors are gone: _restart says so
                self._restart(i, e)
        if failed is not None:
            self._gather({i: ("remove_ids", ids[routed[i]]) for i in done})
            raise failed
        for i, n in done.items():
            self._shards[i].ntotal = n
        if len(ids):
            self._next_id = max(self._next_id, int(ids.max()) + 1)

    def add(self, x) -> np.ndarray:
        """Add vectors (n, dim), encoded in parallel on the shards; returns their ids (consecutive int64)."""
        x = _as_float_matrix(x, self.dim, "x")
        ids = np.arange(self._next_id, self._next_id + len(x), dtype=np.int64)
        self._add(x, ids)
        return ids

    def add_with_ids(self, x, ids) -> np.ndarray:
        """Add vectors with caller-chosen int64 ids (distinct, not already in the index); all or nothing."""
        x = _as_float_matrix(x, self.dim, "x")
        ids = np.asarray(ids).reshape(-1)
        if ids.dtype.kind not in "iu":
            raise ValueError(f"ids must be integers, got {ids.dtype}")
        ids = ids.astype(np.int64)
        if len(ids) != len(x):
            raise ValueError(f"got {len(x)} vectors but {len(ids)} ids")
        if len(np.unique(ids)) != len(ids):
            raise ValueError("ids must be distinct")
        self._add(x, ids)  # each shard refuses ids it already holds; the others are then rolled back
        return ids

    def remove_ids(self, ids) -> int:
        """Remove the vectors with these ids (absent ids are ignored); returns how many were removed."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if not self._shards or not len(ids):
            return 0
        removed = 0
        for i, (r, n) in self._gather({i: ("remove_ids", ids[pos]) for i, pos in self._route(ids).items()}).items():
            if r:
                self._shards[i].dirty = True
            self._shards[i].ntotal = n
            removed += r
        return removed

    # --- searching --------------------------------------------------------------------------------------------
    def search(self, queries, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` best vectors for each query over all shards: ``(D, I)`` of shape (m, k), best first, as
        ``TurboQuantIndex.search`` (every shard returns its own top-k, the driver keeps the best k of those)."""
        q = _as_float_matrix(queries, self.dim, "queries")
        check_k(k, len(self))
        q_ref = _ray().put(q.numpy())
        calls = {i: ("search", q_ref, min(k, s.ntotal)) for i, s in enumerate(self._shards) if s.ntotal}
        parts = self._gather(calls)
        d = np.concatenate([parts[i][0] for i in sorted(parts)], axis=1)
        ids = np.concatenate([parts[i][1] for i in sorted(parts)], axis=1)
        key = d if self.metric == "l2" else -d  # smaller key is better; ties go to the smaller id
        order = np.lexsort((ids, key), axis=-1)[:, :k]
        return np.take_along_axis(d, order, 1), np.take_along_axis(ids, order, 1)

    # --- persistence ------------------------------------------------------------------------------------------
    def save(self, dirpath) -> None:
        """Write the manifest, the shard files (each by its own actor, in parallel) and the trained template into
        ``dirpath``; the manifest is replaced last, so an interrupted save leaves the previous index whole."""
        d = Path(dirpath)
        d.mkdir(parents=True, exist_ok=True)
        gen = secrets.token_hex(6)
        template = f"template.{gen}.tvq" if self.is_trained else None  # untrained: the config says it all
        if template:
            self._template.save(d / template)
        shards = [{"file": None, "ntotal": s.ntotal} for s in self._shards or []]
        for i, s in enumerate(shards):
            if s["ntotal"]:  # an empty shard needs no file: it starts from the template
                s["file"] = f"shard-{i:05d}.{gen}.tvq"
        sizes = self._gather({i: ("save", str(d / s["file"])) for i, s in enumerate(shards) if s["file"]})
        for i, size in sizes.items():
            shards[i]["bytes"] = size
        meta = {
            "sharded_version": SHARDED_VERSION,
            "config": self._template.config,
            "num_shards": self.num_shards,
            "template": template,
            "shards": shards,
            "next_id": self._next_id,
            "ntotal": len(self),
        }
        io.save(d / MANIFEST, MANIFEST_KIND, meta, {})
        keep = {template, *(s["file"] for s in shards)}
        for p in d.iterdir():  # the previous generation, now unreferenced
            if _GENERATED.match(p.name) and p.name not in keep:
                p.unlink(missing_ok=True)
        for state, s in zip(self._shards or [], shards):
            state.file, state.dirty = (d / s["file"] if s["file"] else None), False

    @classmethod
    def load(cls, dirpath, *, address: str | None = None, threads_per_shard: int = 1, verify: bool = True,
             **kwargs) -> ShardedIndex:
        """Open a directory written by :meth:`save`: one actor per shard loads its file (checksums verified in
        parallel unless ``verify=False``). Missing, truncated or corrupt files are refused by name."""
        d = Path(dirpath)
        if not (d / MANIFEST).is_file():
            what = "does not exist" if not d.exists() else f"has no {MANIFEST}"
            raise FileNotFoundError(f"{d} {what}: a sharded index is a directory written by ShardedIndex.save")
        meta, _ = io.load(d / MANIFEST, MANIFEST_KIND)
        version = meta.get("sharded_version")
        if version != SHARDED_VERSION:
            raise io.FormatError(f"{d / MANIFEST}: sharded index version {version}, turbovq reads {SHARDED_VERSION}")
        try:
            config, shards, num_shards = dict(meta["config"]), list(meta["shards"]), int(meta["num_shards"])
            template_file, next_id = meta["template"] and d / meta["template"], int(meta["next_id"])
        except (KeyError, TypeError, ValueError) as e:
            raise io.FormatError(f"{d / MANIFEST}: invalid manifest ({e})") from None
        if shards and len(shards) != num_shards:
            raise io.FormatError(f"{d / MANIFEST}: lists {len(shards)} shard files for {num_shards} shards")
        for i, s in enumerate(shards):
            if not s["file"]:
                continue
            p = d / s["file"]
            if not p.is_file():
                raise FileNotFoundError(f"shard {i} of {num_shards}: {p} is missing")
            if p.stat().st_size != s["bytes"]:
                raise io.FormatError(f"shard {i} of {num_shards}: {p} has {p.stat().st_size} bytes, the manifest "
                                     f"says {s['bytes']} (truncated, or from another save)")
        if template_file and not template_file.is_file():
            raise FileNotFoundError(f"{template_file} (the trained state of {d}) is missing")
        idx = cls(**config, num_shards=num_shards, address=address, threads_per_shard=threads_per_shard, **kwargs)
        if template_file:
            idx._template = TurboQuantIndex.load(template_file, mmap=False, verify=verify)
        idx._next_id = next_id
        idx._verify = verify
        if shards:
            idx._spawn([_ShardState(None, s["ntotal"], d / s["file"] if s["file"] else None) for s in shards])
        return idx

    def _kill(self) -> None:
        """Stop the actors and forget the shards (their state is discarded)."""
        self.close()
        self._shards = None

    def close(self) -> None:
        """Stop the shard actors now, freeing their memory (they also stop when the index is garbage collected).

        A saved index stays usable: the next call restarts its shards from their files. Unsaved vectors are lost.
        """
        ray = _ray()
        for s in self._shards or []:
            if s.actor is not None:
                ray.kill(s.actor)
