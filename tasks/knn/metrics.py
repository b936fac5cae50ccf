"""Pure functions for kNN classification and retrieval metrics on precomputed neighbours.

Inputs are the output of a neighbour search: ``sims`` (Q, k) best first and the neighbours'
labels (Q, k) (or, multi-label, their (Q, k, C) positive-label indicators).

Classification
- :func:`weighted_vote`: the weighted kNN of Wu et al. 2018 (NPID, "Unsupervised feature
  learning via non-parametric instance discrimination", k=200, T=0.07) as used by DINO
  (Caron et al. 2021, ``eval_knn.py``: k=20, T=0.07): each of the k neighbours votes for its
  class with weight exp(sim / T), sim the cosine similarity. Class scores are the sums.
- :func:`majority_vote`: every neighbour votes 1.
- :func:`topk_accuracy` (per query: :func:`topk_hits`): a query is top-n correct when its label is
  among the n classes with the highest score; equal scores rank the lower class index first
  (deterministic; for a plain majority vote this is scikit-learn's ``KNeighborsClassifier`` rule,
  the smallest label wins).

Retrieval (a neighbour is relevant when it shares the query's label; multi-label: shares at
least one positive label)
- :func:`precision_at_k`, :func:`recall_at_k` (per query: :func:`precision_per_query`, :func:`recall_per_query`)
- :func:`average_precision`: AP@K = (1 / min(R, K)) * sum_{i <= K, rel_i} precision@i, R the
  number of relevant bank entries. With K = the whole bank this is the usual non-interpolated
  AP (scikit-learn's ``average_precision_score`` on the ranking when scores have no ties).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


def vote_weights(sims: np.ndarray, temperature: float) -> np.ndarray:
    """exp(sim / T) in float64 (sims are cosine similarities in [-1, 1]: no overflow for T >= 0.01)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return np.exp(np.asarray(sims, np.float64) / float(temperature))


def _scatter(neighbour_labels: np.ndarray, weights: np.ndarray, num_classes: int) -> np.ndarray:
    labels = np.asarray(neighbour_labels, np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"neighbour labels must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}]")
    q = labels.shape[0]
    scores = np.zeros((q, num_classes), np.float64)
    rows = np.arange(q)
    for j in range(labels.shape[1]):  # one column at a time: no duplicate (row, class) pairs per update
        scores[rows, labels[:, j]] += weights[:, j]
    return scores


def weighted_vote(sims: np.ndarray, neighbour_labels: np.ndarray, num_classes: int,
                  temperature: float) -> np.ndarray:
    """(Q, C) class scores: sum over the k neighbours of exp(sim / T) for the neighbour's class."""
    return _scatter(neighbour_labels, vote_weights(sims, temperature), num_classes)


def majority_vote(neighbour_labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(Q, C) vote counts (every neighbour weighs 1)."""
    labels = np.asarray(neighbour_labels)
    return _scatter(labels, np.ones(labels.shape, np.float64), num_classes)


def multilabel_vote(sims: np.ndarray, neighbour_positives: np.ndarray, temperature: float | None) -> np.ndarray:
    """(Q, C) multi-label scores: sum of weights of neighbours positive for each class (None: weight 1)."""
    w = np.ones(np.shape(sims)) if temperature is None else vote_weights(sims, temperature)
    return np.einsum("qk,qkc->qc", w, np.asarray(neighbour_positives, np.float64))


def rank_classes(scores: np.ndarray) -> np.ndarray:
    """Class indices best first per row; equal scores rank the lower class index first."""
    return np.argsort(-np.asarray(scores), axis=1, kind="stable")


def topk_hits(scores: np.ndarray, labels: np.ndarray, ks: Iterable[int] = (1, 5)) -> dict[int, np.ndarray]:
    """(Q,) bool per n in ``ks``: the query's label is among its top-n classes (the per-sample outputs)."""
    labels = np.asarray(labels, np.int64)
    ranked = rank_classes(scores)
    return {int(n): (ranked[:, : int(n)] == labels[:, None]).any(axis=1) for n in ks}


def topk_accuracy(scores: np.ndarray, labels: np.ndarray, ks: Iterable[int] = (1, 5)) -> dict[int, float]:
    """Fraction of queries whose label is among the top-n classes, for each n in ``ks``."""
    return {n: float(hit.mean()) for n, hit in topk_hits(scores, labels, ks).items()}


# ---------------------------------------------------------------------------- retrieval


def relevance_single(query_labels: np.ndarray, neighbour_labels: np.ndarray) -> np.ndarray:
    """(Q, K) bool: the neighbour has the query's label."""
    return np.asarray(neighbour_labels) == np.asarray(query_labels)[:, None]


def relevance_multi(query_pos: np.ndarray, bank_pos: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """(Q, K) bool: the neighbour shares at least one positive label with the query."""
    q = np.asarray(query_pos, bool)
    b = np.asarray(bank_pos, bool)
    return (b[ids] & q[:, None, :]).any(axis=2)


def num_relevant_single(query_labels: np.ndarray, bank_labels: np.ndarray, exclude_self: bool = False) -> np.ndarray:
    """R per query: bank entries with the query's label (minus the query itself when leave-one-out)."""
    counts = np.bincount(np.asarray(bank_labels, np.int64),
                         minlength=int(max(np.max(bank_labels), np.max(query_labels))) + 1)
    r = counts[np.asarray(query_labels, np.int64)]
    return r - 1 if exclude_self else r


def num_relevant_multi(query_pos: np.ndarray, bank_pos: np.ndarray, exclude_self: bool = False,
                       chunk: int = 4096) -> np.ndarray:
    """R per query for multi-label data (bank entries sharing >= 1 positive label)."""
    q = np.asarray(query_pos, np.float32)
    b = np.asarray(bank_pos, np.float32)
    out = np.empty(len(q), np.int64)
    for s in range(0, len(q), chunk):
        out[s:s + chunk] = ((q[s:s + chunk] @ b.T) > 0).sum(axis=1)
    if exclude_self:
        out -= (q.sum(axis=1) > 0).astype(np.int64)
    return out


def precision_per_query(relevance: np.ndarray, ks: Iterable[int]) -> dict[int, np.ndarray]:
    """(Q,) per k: (relevant among the first k) / k."""
    rel = np.asarray(relevance, bool)
    return {int(k): rel[:, : int(k)].sum(axis=1) / int(k) for k in ks}


def precision_at_k(relevance: np.ndarray, ks: Iterable[int]) -> dict[int, float]:
    """Mean over queries of (relevant among the first k) / k."""
    return {k: float(v.mean()) for k, v in precision_per_query(relevance, ks).items()}


def recall_per_query(relevance: np.ndarray, num_relevant: np.ndarray, ks: Iterable[int]) -> dict[int, np.ndarray]:
    """(Q,) per k: (relevant among the first k) / R; NaN for a query without a relevant entry (R = 0)."""
    rel = np.asarray(relevance, bool)
    r = np.asarray(num_relevant, np.float64)
    ok = r > 0
    out = {}
    for k in ks:
        v = np.full(len(r), np.nan)
        v[ok] = rel[ok, : int(k)].sum(axis=1) / r[ok]
        out[int(k)] = v
    return out


def recall_at_k(relevance: np.ndarray, num_relevant: np.ndarray, ks: Iterable[int]) -> dict[int, float]:
    """Mean over queries with R > 0 of (relevant among the first k) / R."""
    return {k: float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")
            for k, v in recall_per_query(relevance, num_relevant, ks).items()}


def average_precision(relevance: np.ndarray, num_relevant: np.ndarray) -> np.ndarray:
    """(Q,) AP@K of each ranked list (K = its length); NaN for queries with no relevant entry."""
    rel = np.asarray(relevance, bool)
    r = np.asarray(num_relevant, np.float64)
    k = rel.shape[1]
    hits = np.cumsum(rel, axis=1)
    prec = hits / np.arange(1, k + 1)
    denom = np.minimum(r, k)
    with np.errstate(invalid="ignore", divide="ignore"):
        ap = (prec * rel).sum(axis=1) / denom
    ap[r <= 0] = np.nan
    return ap


def mean_average_precision(relevance: np.ndarray, num_relevant: np.ndarray) -> float:
    """Mean AP over queries that have at least one relevant bank entry."""
    ap = average_precision(relevance, num_relevant)
    return float(np.nanmean(ap)) if np.isfinite(ap).any() else float("nan")


def class_mean_ap(scores: np.ndarray, label_matrix: np.ndarray) -> tuple[float, list[float]]:
    """Multi-label classification: mean over classes of non-interpolated AP (scikit-learn).

    ``label_matrix`` is VOC-style: 1 positive, -1 negative, 0 ignored (difficult-only). Classes
    without a positive are skipped (NaN in the per-class list).
    """
    from sklearn.metrics import average_precision_score

    lm = np.asarray(label_matrix)
    per = []
    for c in range(lm.shape[1]):
        keep = lm[:, c] != 0
        y = lm[keep, c] > 0
        per.append(float(average_precision_score(y, scores[keep, c])) if y.any() else float("nan"))
    arr = np.asarray(per)
    return (float(np.nanmean(arr)) if np.isfinite(arr).any() else float("nan")), per
