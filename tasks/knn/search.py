"""Nearest-neighbour search on frozen features with FAISS: exact and approximate, chunked, deterministic.

``search(queries, bank, k, config)`` returns the ``k`` best bank entries of every query:

- ``index="flat"`` (default): exact search with ``faiss.knn`` (inner product on L2-normalised
  features = cosine similarity, as in DINO's / NPID's kNN evaluation; or squared L2). The bank
  is never copied into an index and queries go in chunks of ``chunk_size``, so memory stays
  at the bank plus one chunk's results (FAISS blocks its own BLAS calls; no N x M similarity
  matrix is ever formed).
- ``index="ivf"`` (IVF-Flat, ``nlist`` cells, ``nprobe`` probed) and ``index="hnsw"``
  (HNSW-Flat, ``hnsw_m`` links, ``ef_search``): approximate options for large banks. Their
  recall@k against the exact search is measured on a seeded sample of queries and returned
  with the neighbours, so every approximate number carries its own accuracy.
- faiss-gpu is used automatically when it is installed and a GPU is visible (``use_gpu="auto"``).

Ties are broken deterministically: neighbours are ordered by score, then by bank index (the
lower index first), including at the k-th position -- FAISS's own choice among tied entries
at the cut-off is not specified, so a row whose k-th and (k+1)-th scores are equal is
recomputed exactly (brute force on that row only).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import faiss
import numpy as np

from evalsuite import console
from evalsuite.errors import BadFeatures, UserError

METRICS = {"ip": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}
INDEXES = ("flat", "ivf", "hnsw")


@dataclass(frozen=True)
class SearchConfig:
    """How to search; every field lands in the result's params."""

    index: str = "flat"          # flat (exact) | ivf | hnsw
    metric: str = "ip"           # ip (cosine on normalised features) | l2 (squared Euclidean)
    chunk_size: int = 1024       # queries per FAISS call
    nlist: int | None = None     # IVF cells; None = 4 * sqrt(N), at most N // 39 (FAISS's training minimum)
    nprobe: int = 16             # IVF cells visited per query
    hnsw_m: int = 32             # HNSW links per node
    ef_construction: int = 200   # HNSW build beam
    ef_search: int = 128         # HNSW search beam
    use_gpu: str | bool = "auto"  # auto: faiss-gpu when installed and a GPU is visible
    recall_queries: int = 1000   # queries sampled to measure an approximate index's recall vs exact
    seed: int = 0

    def __post_init__(self):
        if self.index not in INDEXES:
            raise UserError(f"unknown kNN index {self.index!r}; choose one of {', '.join(INDEXES)}")
        if self.metric not in METRICS:
            raise UserError(f"unknown kNN metric {self.metric!r}; choose ip or l2")
        if int(self.chunk_size) < 1:
            raise UserError(f"kNN chunk_size must be >= 1, got {self.chunk_size}")

    @classmethod
    def from_protocol(cls, p: Any, seed: int = 0) -> SearchConfig:
        """The search fields of a kNN protocol (same names), with the run's seed."""
        names = [f for f in cls.__dataclass_fields__ if f != "seed" and hasattr(p, f)]
        return cls(**{f: getattr(p, f) for f in names}, seed=seed)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Neighbours:
    """``ids`` (Q, k) int64 bank indices and their ``scores`` (Q, k) float32, best first."""

    scores: np.ndarray
    ids: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)

    def head(self, k: int) -> Neighbours:
        return Neighbours(self.scores[:, :k], self.ids[:, :k], self.info)


# ---------------------------------------------------------------------------- input checks


def check_search(queries: np.ndarray, bank: np.ndarray, k: int, exclude_self: bool = False) -> None:
    if queries.shape[1] != bank.shape[1]:
        raise BadFeatures(f"query/bank dimension mismatch: queries have {queries.shape[1]} dims, "
                          f"the bank has {bank.shape[1]}")
    if len(bank) == 0:
        raise BadFeatures("the kNN bank is empty")
    avail = len(bank) - (1 if exclude_self else 0)
    if not 1 <= int(k) <= avail:
        extra = " (leave-one-out: the query itself is excluded)" if exclude_self else ""
        raise UserError(f"k={k} is larger than the bank ({avail} candidates{extra}); lower k")
    if exclude_self and len(queries) != len(bank):
        raise UserError("exclude_self needs the queries to be the bank itself")


# ---------------------------------------------------------------------------- ordering


def _order_key(scores: np.ndarray, metric: str) -> np.ndarray:
    return -scores if metric == "ip" else scores


def sort_rows(scores: np.ndarray, ids: np.ndarray, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Order each row best first, equal scores by ascending bank index."""
    order = np.lexsort((ids, _order_key(scores, metric)), axis=-1)
    return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)


def _exact_rows(q: np.ndarray, bank: np.ndarray, k: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force top-k of a few rows with full tie-breaking (used where FAISS's cut-off is a tie)."""
    if metric == "ip":
        s = q @ bank.T
    else:
        s = (q * q).sum(1, keepdims=True) - 2.0 * (q @ bank.T) + (bank * bank).sum(1)[None, :]
    idx = np.broadcast_to(np.arange(len(bank), dtype=np.int64), s.shape)
    order = np.lexsort((idx, _order_key(s, metric)), axis=-1)[:, :k]
    return np.take_along_axis(s, order, 1).astype(np.float32), order.astype(np.int64)


# ---------------------------------------------------------------------------- backends


def gpu_available(use_gpu: str | bool = "auto") -> bool:
    if use_gpu is False or use_gpu == "false":
        return False
    ok = hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    if use_gpu is True and not ok:
        raise UserError("kNN use_gpu=true but faiss-gpu or a GPU is not available")
    return ok


_GPU_RES = None


def _gpu_resources():
    global _GPU_RES
    if _GPU_RES is None:
        _GPU_RES = faiss.StandardGpuResources()
    return _GPU_RES


def _flat_searcher(bank: np.ndarray, config: SearchConfig) -> Callable[[np.ndarray, int], tuple]:
    metric = METRICS[config.metric]
    if gpu_available(config.use_gpu):
        res = _gpu_resources()
        return lambda q, k: faiss.knn_gpu(res, q, bank, k, metric=metric)
    return lambda q, k: faiss.knn(q, bank, k, metric=metric)


def build_index(bank: np.ndarray, config: SearchConfig):
    """An approximate FAISS index over ``bank`` (IVF-Flat or HNSW-Flat), trained with ``config.seed``."""
    n, d = bank.shape
    metric = METRICS[config.metric]
    if config.index == "ivf":
        nlist = config.nlist or int(round(4 * np.sqrt(n)))
        nlist = max(1, min(nlist, n // 39 if n >= 39 else 1))
        quantizer = faiss.IndexFlat(d, metric)
        index = faiss.IndexIVFFlat(quantizer, d, nlist, metric)
        index.cp.seed = int(config.seed)
        index.train(bank)
        index.add(bank)
        index.nprobe = min(int(config.nprobe), nlist)
    elif config.index == "hnsw":
        index = faiss.IndexHNSWFlat(d, int(config.hnsw_m), metric)
        index.hnsw.efConstruction = int(config.ef_construction)
        index.add(bank)
        index.hnsw.efSearch = int(config.ef_search)
    else:
        raise UserError(f"build_index is for approximate indexes, not {config.index!r}")
    if gpu_available(config.use_gpu) and config.index == "ivf":
        index = faiss.index_cpu_to_gpu(_gpu_resources(), 0, index)
    return index


def _index_params(index, config: SearchConfig) -> dict[str, Any]:
    if config.index == "ivf":
        ivf = faiss.extract_index_ivf(index)
        return {"nlist": int(ivf.nlist), "nprobe": int(ivf.nprobe)}
    if config.index == "hnsw":
        return {"hnsw_m": int(config.hnsw_m), "ef_construction": int(config.ef_construction),
                "ef_search": int(config.ef_search)}
    return {}


# ---------------------------------------------------------------------------- search


def _search_chunked(searcher, queries, bank, k, metric, chunk, own_ids, exact, progress, desc) -> tuple:
    """Chunked search; ``own_ids`` (Q,) = each query's own bank index to leave out, or None."""
    n_q = len(queries)
    exclude_self = own_ids is not None
    want = k + (1 if exclude_self else 0)
    fetch = min(len(bank), want + 1)  # one more than needed: detects a tie at the cut-off
    scores = np.empty((n_q, k), np.float32)
    ids = np.empty((n_q, k), np.int64)
    recomputed = 0
    bar = console.progress(total=n_q, desc=desc, unit="query", enabled=progress)
    for start in range(0, n_q, chunk):
        q = queries[start:start + chunk]
        s, i = searcher(q, fetch)
        s, i = np.asarray(s, np.float32), np.asarray(i, np.int64)
        s, i = sort_rows(s, i, metric)
        if exact and fetch > want:
            tied = s[:, want - 1] == s[:, want]
            if tied.any():
                rows = np.flatnonzero(tied)
                s_fix, i_fix = _exact_rows(q[rows], bank, fetch, metric)
                s[rows], i[rows] = s_fix, i_fix
                recomputed += len(rows)
        if exclude_self:
            s, i = _drop_self(s, i, own_ids[start:start + len(q)], k)
        scores[start:start + len(q)], ids[start:start + len(q)] = s[:, :k], i[:, :k]
        bar.update(len(q))
    bar.close()
    return scores, ids, recomputed


def _drop_self(s: np.ndarray, i: np.ndarray, own: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Remove each query's own bank index (leave-one-out) by id, never by score: duplicates stay."""
    drop = i == np.asarray(own, np.int64)[:, None]
    none = ~drop.any(axis=1)
    drop[none, -1] = True  # self not among the candidates: drop the last one instead
    keep = ~drop
    width = i.shape[1] - 1
    return s[keep].reshape(-1, width)[:, :k], i[keep].reshape(-1, width)[:, :k]


def search(queries: np.ndarray, bank: np.ndarray, k: int, config: SearchConfig | None = None,
           exclude_self: bool = False, progress: bool = False, desc: str = "knn search") -> Neighbours:
    """The ``k`` nearest bank entries of every query (see the module docstring).

    ``queries``/``bank`` must already be checked C-contiguous float32 (``evalsuite.features.check_features``)
    and, for cosine similarity, L2-normalised. ``exclude_self=True`` is leave-one-out retrieval: ``queries`` is the
    bank itself and each query's own entry is removed (by index, so exact duplicates remain).
    """
    config = config or SearchConfig()
    check_search(queries, bank, k, exclude_self)
    k = int(k)
    own = np.arange(len(queries), dtype=np.int64) if exclude_self else None
    gpu = gpu_available(config.use_gpu)
    info: dict[str, Any] = {"index": config.index, "metric": config.metric, "k": k, "exclude_self": exclude_self,
                            "backend": "faiss-gpu" if gpu else "faiss-cpu", "faiss_version": faiss.__version__,
                            "num_bank": int(len(bank)), "num_queries": int(len(queries)),
                            "chunk_size": int(config.chunk_size)}
    if config.index == "flat":
        searcher = _flat_searcher(bank, config)
        s, i, recomputed = _search_chunked(searcher, queries, bank, k, config.metric, int(config.chunk_size),
                                           own, True, progress, desc)
        info["tie_rows_recomputed"] = recomputed
        return Neighbours(s, i, info)
    index = build_index(bank, config)
    info.update(_index_params(index, config))
    s, i, _ = _search_chunked(index.search, queries, bank, k, config.metric, int(config.chunk_size),
                              own, False, progress, desc)
    valid = i >= 0  # an approximate index may return fewer than k hits (-1 ids)
    info["missing_neighbours"] = int((~valid).sum())
    info.update(measure_recall(queries, bank, i, k, config, exclude_self))
    return Neighbours(s, i, info)


def exact_search(queries: np.ndarray, bank: np.ndarray, k: int, config: SearchConfig | None = None,
                 own_ids: np.ndarray | None = None) -> Neighbours:
    """Exact top-k (flat) for ``queries``; ``own_ids`` leaves each query's own bank entry out."""
    config = config or SearchConfig()
    searcher = _flat_searcher(bank, config)
    s, i, _ = _search_chunked(searcher, queries, bank, int(k), config.metric, int(config.chunk_size), own_ids,
                              True, False, "")
    return Neighbours(s, i)


def measure_recall(queries: np.ndarray, bank: np.ndarray, approx_ids: np.ndarray, k: int, config: SearchConfig,
                   exclude_self: bool = False) -> dict[str, Any]:
    """recall@k of approximate neighbours against the exact search, on a seeded sample of queries."""
    n = len(queries)
    m = min(n, int(config.recall_queries))
    rows = np.sort(np.random.default_rng(config.seed).choice(n, size=m, replace=False)).astype(np.int64)
    exact = exact_search(queries[rows], bank, k, config, own_ids=rows if exclude_self else None)
    return {"recall_vs_exact": float(recall_at_k_ids(approx_ids[rows], exact.ids)), "recall_queries": int(m)}


def recall_at_k_ids(approx_ids: np.ndarray, exact_ids: np.ndarray) -> float:
    """Mean over queries of |approx top-k  exact top-k| / k (order ignored)."""
    if approx_ids.shape != exact_ids.shape:
        raise ValueError(f"shape mismatch {approx_ids.shape} vs {exact_ids.shape}")
    if approx_ids.size == 0:
        return float("nan")
    k = exact_ids.shape[1]
    hits = [len(np.intersect1d(a[a >= 0], e)) for a, e in zip(approx_ids, exact_ids, strict=True)]
    return float(np.mean(hits) / k)
