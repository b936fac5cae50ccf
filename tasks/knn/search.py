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
  with the neighbours, so every approximate number carries its own accuracy. IVF's coarse
  quantiser is trained on a seeded sample of ``ivf_train_size`` rows (:func:`ivf_train_rows`,
  FAISS's guideline of 30-256 training points per cell) and both indexes are filled block by
  block, so a bank streamed from its store is never held besides the index's own copy.
- faiss-gpu is used automatically when it is installed and a GPU is visible (``use_gpu="auto"``).

Ties are broken deterministically: neighbours are ordered by score, then by bank index (the
lower index first), including at the k-th position -- FAISS's own choice among tied entries
at the cut-off is not specified, so a row whose k-th and (k+1)-th scores are equal is
recomputed exactly (that row only: FAISS asked for more neighbours until every entry tied at the
cut-off is in, then ordered by score and index).

Banks larger than the memory budget (:class:`StoredBank`, :func:`open_bank`): the bank is read from its
feature store in blocks of consecutive rows, every query chunk is searched against each block and the
per-block top lists are merged by (score, bank index), keeping the k + 1 best: exactly the single-array
result, ties included. The top k of the union of each block's top k + 1 is the global top k whenever the
global k-th and (k+1)-th scores differ, and a tie there is resolved as above, block by block. Every score is
the one the single-array search computes because each block starts at a multiple of FAISS's BLAS database
block (``faiss.cvar.distance_compute_blas_database_bs``, 1024 rows): FAISS multiplies the same rows in the
same BLAS calls, while a block starting elsewhere would put rows through other BLAS kernels (a last-bit
difference, enough to reorder near-ties). The bank is read once (twice with cut-off ties); memory holds the
queries, one block and the running top lists. :func:`search_memory` estimates it; :func:`open_bank`
prints the estimate, keeps the bank in memory when the whole search fits the budget, streams it otherwise
and refuses (UserError, one line) when even one block does not fit. Exactness across blocks holds for
faiss-cpu; faiss-gpu's kernels are not checked for it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import faiss
import numpy as np

from evalsuite import console
from evalsuite.cache import FeatureStore, format_size
from evalsuite.errors import BadFeatures, UserError
from evalsuite.features import check_features, l2_normalize

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
    ivf_train_size: int | None = None  # rows k-means trains the IVF cells on; None: see ivf_train_rows
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
        if self.nlist is not None and int(self.nlist) < 1:
            raise UserError(f"kNN nlist must be >= 1 or none, got {self.nlist}")
        if self.ivf_train_size is not None and int(self.ivf_train_size) < 1:
            raise UserError(f"kNN ivf_train_size must be >= 1 or none, got {self.ivf_train_size}")

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


# ---------------------------------------------------------------------------- banks larger than memory


PIECE_BYTES = 8 << 20  # a bank is checked and normalised in pieces of this size (the temporaries are that big)
TIE_GROUP = 64  # rows whose cut-off ties are resolved together (each FAISS call holds their neighbours)


def block_unit() -> int:
    """Rows of FAISS's BLAS database block: a streamed bank's blocks start at multiples of it (module docstring)."""
    return int(faiss.cvar.distance_compute_blas_database_bs)


@dataclass
class StoredBank:
    """A bank read from its feature store in blocks of ``block_rows`` rows (a multiple of :func:`block_unit`), each
    converted to float32, checked and (``normalize``) L2-normalised as the in-memory bank is (F.normalize)."""

    store: FeatureStore
    block_rows: int
    normalize: bool = True
    what: str = "bank features"
    source: Any = None

    def __post_init__(self):
        if self.block_rows < 1 or self.block_rows % block_unit():
            raise ValueError(f"block_rows must be a positive multiple of {block_unit()}, got {self.block_rows}")

    @property
    def shape(self) -> tuple[int, int]:
        return self.store.shape

    def __len__(self) -> int:
        return len(self.store)

    def bounds(self) -> list[tuple[int, int]]:
        """Each block's rows; a last block of one row joins the one before (FAISS searches k=1 another way)."""
        n = len(self)
        starts = list(range(0, n, self.block_rows))
        if len(starts) > 1 and n - starts[-1] == 1:
            starts.pop()
        return list(zip(starts, [*starts[1:], n], strict=True))

    def blocks(self) -> Iterator[tuple[int, np.ndarray]]:
        for lo, hi in self.bounds():
            x = self.store.read(lo, hi, dtype=np.float32)
            check_features(x, f"{self.what} (rows {lo}..{hi - 1})", self.source, chunk_bytes=PIECE_BYTES)
            if self.normalize:
                normalize_rows(x)
            yield lo, x
            del x  # before the next block is read: one block in memory at a time


def normalize_rows(x: np.ndarray) -> np.ndarray:
    """The kNN task's F.normalize (``l2_normalize(eps=1e-12, clamp=True)``) in place, in pieces of
    :data:`PIECE_BYTES`: the same values (rows are normalised one by one) without a temporary of the whole bank."""
    chunk = max(1, PIECE_BYTES // max(1, x.shape[1] * x.itemsize))
    for lo in range(0, len(x), chunk):
        l2_normalize(x[lo:lo + chunk], 1e-12, clamp=True, inplace=True)
    return x


def bank_blocks(bank: np.ndarray | StoredBank) -> Iterator[tuple[int, np.ndarray]]:
    """``(first row, float32 rows)`` of each block of the bank: an in-memory bank is one block."""
    return bank.blocks() if isinstance(bank, StoredBank) else iter([(0, bank)])


def num_blocks(bank: np.ndarray | StoredBank) -> int:
    return len(bank.bounds()) if isinstance(bank, StoredBank) else 1


def search_memory(n_bank: int, n_queries: int, dim: int, k: int, config: SearchConfig, block_rows: int | None = None,
                  exclude_self: bool = False, shard_bytes: int = 0) -> dict[str, int]:
    """Bytes a search holds at its peak, by part, and ``total``: the float32 queries, the float32 bank (all of it,
    or one block of ``block_rows`` plus one mapped cache shard of ``shard_bytes``), the running and final
    neighbour lists, one chunk's merge, FAISS's score tile, the temporaries of checking and normalising one piece
    of the bank (twice: freed temporaries the allocator keeps); an approximate index adds its own copy of the bank."""
    fetch = min(n_bank, k + (1 if exclude_self else 0) + 1)
    block = n_bank if block_rows is None else min(n_bank, block_rows)
    chunk = min(int(config.chunk_size), n_queries)
    parts = {
        "queries": n_queries * dim * 4,
        "bank": block * dim * 4 + (shard_bytes if block < n_bank else 0),
        "neighbour_lists": n_queries * (fetch + k) * 12,  # scores float32 + ids int64, running and final
        "merge": chunk * 2 * fetch * 28,  # two lists side by side, sorted: scores, ids and the sort order
        "faiss": chunk * (min(block, block_unit()) * 4 + fetch * 12),
        # normalising / checking one piece, and as much again that the C allocator may keep after freeing one
        "temporaries": min(block * dim * 4, PIECE_BYTES) * 5 // 2,
    }
    if config.index != "flat":
        parts["index"] = index_bytes(n_bank, dim, config)
    if config.index == "ivf":  # k-means' sampled rows, its centroids and the quantiser's copy of them
        nlist = ivf_nlist(n_bank, config)
        parts["ivf_training"] = (ivf_train_rows(n_bank, nlist, config) + 2 * nlist) * dim * 4
    return {**parts, "total": sum(parts.values())}


def index_bytes(n_bank: int, dim: int, config: SearchConfig) -> int:
    """What an approximate index holds: every bank vector in float32 (IVF-Flat, HNSW-Flat) and its id (IVF) or its
    links (HNSW: 2 x hnsw_m int32 per vector at level 0, FAISS's guideline (d * 4 + M * 2 * 4) bytes per vector)."""
    per_row = dim * 4 + (int(config.hnsw_m) * 8 if config.index == "hnsw" else 8)
    return n_bank * per_row


def _describe(parts: dict[str, int]) -> str:
    return ", ".join(f"{name.replace('_', ' ')} {format_size(v)}" for name, v in parts.items() if name != "total")


def open_bank(store: FeatureStore, n_queries: int, k: int, config: SearchConfig, normalize: bool = True,
              what: str = "bank features", source: Any = None, desc: str = "knn",
              exclude_self: bool = False) -> np.ndarray | StoredBank:
    """The bank of a search of ``n_queries`` queries, within ``store.memory_budget``: in memory (float32, checked,
    normalised) when the whole search fits, else a :class:`StoredBank` in the largest blocks that fit (an approximate
    index is then built from the streamed blocks and holds the bank's vectors itself). Prints the estimate; UserError
    in one line when not even one block (with the approximate index) fits."""
    n, dim = store.shape
    budget = store.memory_budget
    whole = search_memory(n, n_queries, dim, k, config, None, exclude_self)
    if whole["total"] <= budget:
        console.note(f"{desc}: memory estimate {format_size(whole['total'])} within the budget {format_size(budget)} "
                     f"(bank in memory; {_describe(whole)})")
        bank = store.load(np.float32)
        check_features(bank, what, source, chunk_bytes=PIECE_BYTES)
        return normalize_rows(bank) if normalize else bank
    advice = "raise --memory-budget / EVALSUITE_MEMORY_BUDGET"
    kind = "an exact search" if config.index == "flat" else f"the {config.index} index built from the bank"
    unit, shard = block_unit(), store.shard_rows * store.row_bytes
    smallest = search_memory(n, n_queries, dim, k, config, unit, exclude_self, shard)
    if smallest["total"] > budget:
        if config.index != "flat":
            advice = (f"an approximate index holds every bank vector in memory ({format_size(smallest['index'])}): "
                      f"use index=flat (exact, streamed from the cache) or {advice}")
        raise UserError(f"{desc}: {kind} streamed in {unit}-row blocks needs about {format_size(smallest['total'])} "
                        f"({_describe(smallest)}), beyond the memory budget {format_size(budget)}; {advice}")
    block_rows = unit * (1 + (budget - smallest["total"]) // (unit * dim * 4))  # the bank's share, then the rest
    while block_rows > unit and search_memory(n, n_queries, dim, k, config, block_rows, exclude_self,
                                              shard)["total"] > budget:
        block_rows -= unit
    est = search_memory(n, n_queries, dim, k, config, block_rows, exclude_self, shard)
    built = "" if config.index == "flat" else f", {config.index} index built block by block"
    console.note(f"{desc}: memory estimate {format_size(est['total'])} within the budget {format_size(budget)} "
                 f"(bank of {format_size(n * dim * 4)} streamed in {-(-n // block_rows)} blocks of {block_rows} "
                 f"rows{built}; {_describe(est)})")
    return StoredBank(store, block_rows, normalize, what, source)


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


def _merge(s: np.ndarray | None, i: np.ndarray | None, s_new: np.ndarray, i_new: np.ndarray, width: int,
           metric: str) -> tuple[np.ndarray, np.ndarray]:
    """The ``width`` best of two top lists over disjoint bank rows, ordered by score then bank index."""
    if s is not None:
        s_new, i_new = np.concatenate([s, s_new], 1), np.concatenate([i, i_new], 1)
    s_new, i_new = sort_rows(s_new, i_new, metric)
    return s_new[:, :width], i_new[:, :width]


def _exact_top(q: np.ndarray, block: np.ndarray, k: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best of ``block`` for a few rows, every tie at the k-th position resolved by bank index: FAISS
    is asked for more neighbours (doubling) until the last one it returns scores strictly below the k-th."""
    n = len(block)
    k = min(k, n)
    want = min(n, k + 1)
    while True:
        s, i = faiss.knn(q, block, want, metric=METRICS[metric])
        s, i = sort_rows(np.asarray(s, np.float32), np.asarray(i, np.int64), metric)
        if want == n or (s[:, want - 1] != s[:, k - 1]).all():
            return s[:, :k], i[:, :k]
        want = min(n, 2 * want)


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


def ivf_nlist(n: int, config: SearchConfig) -> int:
    """IVF cells: ``config.nlist``, else 4 sqrt(N) (the low end of FAISS's 4-16 sqrt(N) guideline for banks below 1M
    vectors); at most N // 39, FAISS's minimum of 39 training points per centroid."""
    nlist = config.nlist or int(round(4 * np.sqrt(n)))
    return max(1, min(int(nlist), n // 39 if n >= 39 else 1))


IVF_TRAIN_FLOOR = 50_000  # rows k-means trains on at least (when 256 x nlist allows it)


def ivf_train_rows(n: int, nlist: int, config: SearchConfig) -> int:
    """Rows the coarse quantiser's k-means trains on: ``config.ivf_train_size``, else max(39 x nlist, 50,000) capped at
    256 x nlist, and at N. FAISS's guideline trains on 30 x to 256 x nlist vectors; 39 x nlist is its k-means'
    minimum (it warns below) and 256 x nlist what its k-means would subsample to anyway
    (``ClusteringParameters.max_points_per_centroid``). The cost of k-means is linear in it, so a 1M bank is not
    clustered whole."""
    if config.ivf_train_size is not None:
        return int(min(n, config.ivf_train_size))
    return int(min(n, 256 * nlist, max(39 * nlist, IVF_TRAIN_FLOOR)))


def ivf_build_flops(n: int, dim: int, nlist: int, train_rows: int, niter: int) -> dict[str, float]:
    """Floating-point operations of an IVF-Flat build (2 per multiply-add of the distance computations): k-means'
    ``niter`` assignments of the training rows to ``nlist`` centroids, then the assignment of every bank row."""
    train = 2.0 * niter * train_rows * nlist * dim
    add = 2.0 * n * nlist * dim
    return {"train": train, "add": add, "total": train + add}


def ivf_train_sample(bank: np.ndarray | StoredBank, rows: int, seed: int) -> np.ndarray:
    """The float32 rows k-means trains on: ``rows`` bank rows drawn without replacement by ``default_rng([seed, 1])``
    (all rows when ``rows`` is the bank), read from the store and checked / normalised as the blocks are."""
    n = len(bank)
    idx = (np.arange(n, dtype=np.int64) if rows >= n else
           np.sort(np.random.default_rng([int(seed), 1]).choice(n, size=rows, replace=False)).astype(np.int64))
    if not isinstance(bank, StoredBank):
        return np.ascontiguousarray(bank[idx])
    x = np.empty((len(idx), bank.shape[1]), np.float32)
    piece = max(1, PIECE_BYTES // bank.store.row_bytes)
    for lo in range(0, len(idx), piece):  # gathered in pieces: no stored-dtype copy of the whole sample
        x[lo:lo + piece] = bank.store.take(idx[lo:lo + piece])
    check_features(x, f"{bank.what} (k-means sample)", bank.source, chunk_bytes=PIECE_BYTES)
    return normalize_rows(x) if bank.normalize else x


def build_index(bank: np.ndarray | StoredBank, config: SearchConfig, info: dict[str, Any] | None = None,
                desc: str = "knn"):
    """An approximate FAISS index over ``bank`` (IVF-Flat or HNSW-Flat), filled block by block: a
    :class:`StoredBank` is read from its store one block at a time, never whole (the index holds its own float32
    copy of every vector). IVF: the coarse quantiser's k-means (seeded by ``config.seed``) trains on
    :func:`ivf_train_rows` sampled rows (:func:`ivf_train_sample`), its cost printed beforehand. ``info`` receives
    the index's settings and the seconds of each phase."""
    n, d = bank.shape
    metric = METRICS[config.metric]
    info = {} if info is None else info
    t0 = time.perf_counter()
    if config.index == "ivf":
        nlist = ivf_nlist(n, config)
        rows = ivf_train_rows(n, nlist, config)
        if rows < nlist:
            raise UserError(f"{desc}: ivf_train_size {rows} is below nlist {nlist}: k-means needs a row per cell")
        quantizer = faiss.IndexFlat(d, metric)
        index = faiss.IndexIVFFlat(quantizer, d, nlist, metric)
        index.cp.seed = int(config.seed)
        flops = ivf_build_flops(n, d, nlist, rows, int(index.cp.niter))
        console.note(f"{desc}: IVF-Flat build: nlist {nlist}, k-means on {rows} sampled rows x {index.cp.niter} "
                     f"iterations ({flops['train'] / 1e9:,.0f} GFLOP), then {n} rows assigned block by block "
                     f"({flops['add'] / 1e9:,.0f} GFLOP)")
        index.train(ivf_train_sample(bank, rows, config.seed))
        info.update({"ivf_train_size": rows, "kmeans_niter": int(index.cp.niter),
                     "ivf_train_sample": "default_rng([seed, 1]).choice(N, ivf_train_size, replace=False)",
                     "build_gflop": round(flops["total"] / 1e9, 1)})
        index.nprobe = min(int(config.nprobe), nlist)
    elif config.index == "hnsw":
        index = faiss.IndexHNSWFlat(d, int(config.hnsw_m), metric)
        index.hnsw.efConstruction = int(config.ef_construction)
        index.hnsw.efSearch = int(config.ef_search)
    else:
        raise UserError(f"build_index is for approximate indexes, not {config.index!r}")
    t1 = time.perf_counter()
    for _, block in bank_blocks(bank):  # one block of the bank in memory at a time, besides the index
        index.add(block)
        del block
    info.update({"train_seconds": round(t1 - t0, 3), "add_seconds": round(time.perf_counter() - t1, 3)})
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


def _search_chunked(searcher, queries, bank, k, metric, chunk, own_ids, progress, desc) -> tuple:
    """Chunked search of an approximate index; ``own_ids`` (Q,) = each query's own bank index to leave out."""
    n_q = len(queries)
    exclude_self = own_ids is not None
    want = k + (1 if exclude_self else 0)
    fetch = min(len(bank), want + 1)
    scores = np.empty((n_q, k), np.float32)
    ids = np.empty((n_q, k), np.int64)
    bar = console.progress(total=n_q, desc=desc, unit="query", enabled=progress)
    for start in range(0, n_q, chunk):
        q = queries[start:start + chunk]
        s, i = searcher(q, fetch)
        s, i = sort_rows(np.asarray(s, np.float32), np.asarray(i, np.int64), metric)
        if exclude_self:
            s, i = _drop_self(s, i, own_ids[start:start + len(q)], k)
        scores[start:start + len(q)], ids[start:start + len(q)] = s[:, :k], i[:, :k]
        bar.update(len(q))
    bar.close()
    return scores, ids


def _search_exact(queries: np.ndarray, bank: np.ndarray | StoredBank, k: int, config: SearchConfig,
                  own_ids: np.ndarray | None, progress: bool, desc: str) -> tuple[np.ndarray, np.ndarray, int]:
    """Exact top-k of every query over the bank's blocks (one block: an in-memory bank), merged block by block;
    returns (scores, ids, rows whose cut-off tie was resolved). ``own_ids``: see :func:`_search_chunked`."""
    metric, chunk, n_q = config.metric, int(config.chunk_size), len(queries)
    want = k + (1 if own_ids is not None else 0)
    fetch = min(len(bank), want + 1)  # one more than needed: detects a tie at the cut-off
    starts = list(range(0, n_q, chunk))
    run_s: list[np.ndarray | None] = [None] * len(starts)
    run_i: list[np.ndarray | None] = [None] * len(starts)
    bar = console.progress(total=n_q * num_blocks(bank), desc=desc, unit="query", enabled=progress)
    for off, block in bank_blocks(bank):
        searcher = _flat_searcher(block, config)
        f = min(len(block), fetch)
        for c, start in enumerate(starts):
            q = queries[start:start + chunk]
            s, i = searcher(q, f)
            run_s[c], run_i[c] = _merge(run_s[c], run_i[c], np.asarray(s, np.float32),
                                        np.asarray(i, np.int64) + off, fetch, metric)
            bar.update(len(q))
        del searcher, block  # released before the next block is read
    bar.close()
    # rows whose want-th and (want+1)-th scores tie: FAISS's pick among the tied entries is unspecified. They are
    # resolved in groups of at most TIE_GROUP rows of one chunk, so every FAISS call is the same for any blocking.
    tied: dict[tuple[int, int], np.ndarray] = {}
    for c in range(len(starts) if fetch > want else 0):
        rows = np.flatnonzero(run_s[c][:, want - 1] == run_s[c][:, want])
        tied.update({(c, g): rows[g:g + TIE_GROUP] for g in range(0, len(rows), TIE_GROUP)})
    if tied:
        fixed: dict[tuple[int, int], tuple] = {key: (None, None) for key in tied}
        for off, block in bank_blocks(bank):
            for (c, g), rows in tied.items():
                s, i = _exact_top(queries[starts[c] + rows], block, fetch, metric)
                fixed[c, g] = _merge(*fixed[c, g], s, i + off, fetch, metric)
            del block
        for (c, g), rows in tied.items():
            run_s[c][rows], run_i[c][rows] = fixed[c, g]
    scores, ids = np.empty((n_q, k), np.float32), np.empty((n_q, k), np.int64)
    for c, start in enumerate(starts):
        s, i = run_s[c], run_i[c]
        if own_ids is not None:
            s, i = _drop_self(s, i, own_ids[start:start + len(s)], k)
        scores[start:start + len(s)], ids[start:start + len(s)] = s[:, :k], i[:, :k]
    return scores, ids, sum(len(rows) for rows in tied.values())


def _drop_self(s: np.ndarray, i: np.ndarray, own: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Remove each query's own bank index (leave-one-out) by id, never by score: duplicates stay."""
    drop = i == np.asarray(own, np.int64)[:, None]
    none = ~drop.any(axis=1)
    drop[none, -1] = True  # self not among the candidates: drop the last one instead
    keep = ~drop
    width = i.shape[1] - 1
    return s[keep].reshape(-1, width)[:, :k], i[keep].reshape(-1, width)[:, :k]


def search(queries: np.ndarray, bank: np.ndarray | StoredBank, k: int, config: SearchConfig | None = None,
           exclude_self: bool = False, progress: bool = False, desc: str = "knn search") -> Neighbours:
    """The ``k`` nearest bank entries of every query (see the module docstring).

    ``queries``/``bank`` must already be checked C-contiguous float32 (``evalsuite.features.check_features``)
    and, for cosine similarity, L2-normalised; a :class:`StoredBank` (from :func:`open_bank`) is read block by
    block, checked and normalised as it is read, with exactly the same result. ``exclude_self=True`` is
    leave-one-out retrieval: ``queries`` is the bank itself and each query's own entry is removed (by index, so
    exact duplicates remain).
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
    if isinstance(bank, StoredBank):
        info.update({"bank_blocks": num_blocks(bank), "bank_block_rows": int(bank.block_rows),
                     "memory_budget": int(bank.store.memory_budget)})
    if config.index == "flat":
        s, i, recomputed = _search_exact(queries, bank, k, config, own, progress, desc)
        info["tie_rows_recomputed"] = recomputed
        return Neighbours(s, i, info)
    index = build_index(bank, config, info, desc)  # a streamed bank is added block by block
    info.update(_index_params(index, config))
    s, i = _search_chunked(index.search, queries, bank, k, config.metric, int(config.chunk_size),
                           own, progress, desc)
    valid = i >= 0  # an approximate index may return fewer than k hits (-1 ids)
    info["missing_neighbours"] = int((~valid).sum())
    info.update(measure_recall(queries, bank, i, k, config, exclude_self))
    return Neighbours(s, i, info)


def exact_search(queries: np.ndarray, bank: np.ndarray | StoredBank, k: int, config: SearchConfig | None = None,
                 own_ids: np.ndarray | None = None) -> Neighbours:
    """Exact top-k (flat) for ``queries``; ``own_ids`` leaves each query's own bank entry out."""
    config = config or SearchConfig()
    s, i, _ = _search_exact(queries, bank, int(k), config, own_ids, False, "")
    return Neighbours(s, i)


def measure_recall(queries: np.ndarray, bank: np.ndarray | StoredBank, approx_ids: np.ndarray, k: int,
                   config: SearchConfig, exclude_self: bool = False) -> dict[str, Any]:
    """recall@k of approximate neighbours against the exact search (a streamed bank: block by block), on a seeded
    sample of queries."""
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
