"""Uncertainty of a metric from its per-test-sample outputs: bootstrap intervals, paired tests, Holm correction.

Small pure functions over numpy arrays (docs/uncertainty.md says what the record fields mean):

- resamples: :func:`bootstrap_indices` draws B resamples of the n test samples with replacement from
  ``numpy.random.default_rng(seed)``; :func:`bootstrap_counts` yields the same draws as per-sample counts, in
  chunks of resamples (a generator's stream does not depend on how the draws are chunked);
- statistics (:data:`STATISTICS`, by the name a record stores): ``mean`` (per-sample values; NaN samples, e.g.
  retrieval queries without a relevant item, left out), ``map_voc`` (class-mean all-points VOC AP, ignore-labelled
  images dropped per class: voc07_svm / lowshot_svm) and ``map_sklearn`` (class-mean non-interpolated AP with tied
  scores grouped, scikit-learn's ``average_precision_score``: knn on multi-label data). Each has a point estimate
  and a version vectorised over resamples that takes the resamples as counts (an image drawn twice weighs 2);
- :func:`bootstrap` / :func:`bootstrap_many`: percentile intervals; :func:`paired_bootstrap`: the difference of
  a metric between two runs on the same test samples (interval and two-sided p-value); :func:`mcnemar`: exact
  binomial or chi-square McNemar test on paired top-1 correctness; :func:`holm`: Holm's step-down adjustment.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

DEFAULT_RESAMPLES = 1000
DEFAULT_LEVEL = 0.95
CI_METHOD = "percentile bootstrap over test samples"
#: resamples x samples per chunk of counts (64 MiB of int64): bounds memory on large test sets
CHUNK_ELEMENTS = 1 << 23

Arrays = Mapping[str, np.ndarray]


# ------------------------------------------------------------------------------------------------ resamples


def _check(resamples: int, level: float) -> None:
    if int(resamples) < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    if not 0.0 < float(level) < 1.0:
        raise ValueError(f"level must lie in (0, 1), got {level}")


def bootstrap_indices(n: int, resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> np.ndarray:
    """(resamples, n) sample indices drawn with replacement: the resamples every function here uses."""
    return np.random.default_rng(seed).integers(0, n, size=(int(resamples), int(n)))


def bootstrap_counts(n: int, resamples: int = DEFAULT_RESAMPLES, seed: int = 0,
                     chunk_elements: int = CHUNK_ELEMENTS) -> Iterator[np.ndarray]:
    """The draws of :func:`bootstrap_indices` as (b, n) counts (how often each sample is drawn in each resample),
    b resamples at a time; the chunks concatenate to the counts of every resample."""
    rng = np.random.default_rng(seed)
    n = int(n)
    step = max(1, int(chunk_elements) // max(n, 1))
    for start in range(0, int(resamples), step):
        b = min(step, int(resamples) - start)
        idx = rng.integers(0, n, size=(b, n))
        idx += (np.arange(b) * n)[:, None]  # each resample counts into its own row
        yield np.bincount(idx.ravel(), minlength=b * n).reshape(b, n)


def percentile_interval(values: np.ndarray, level: float = DEFAULT_LEVEL) -> tuple[float, float]:
    """The (1 - level) / 2 and (1 + level) / 2 quantiles (numpy's linear interpolation) of the finite values;
    NaNs when none is finite."""
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return float("nan"), float("nan")
    lo, hi = np.quantile(v, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    return float(lo), float(hi)


# ------------------------------------------------------------------------------------------------ statistics


@dataclass(frozen=True)
class Statistic:
    """How a metric is computed from per-sample arrays: ``point(arrays)``, ``resampled(arrays, counts)`` -> (b,)
    (counts (b, n): how often each test sample is drawn in each resample), ``samples(arrays)`` = n, and the
    arrays it reads (``roles``, then the ``optional`` ones)."""

    name: str
    roles: tuple[str, ...]
    optional: tuple[str, ...]
    point: Callable[[Arrays], float]
    resampled: Callable[[Arrays, np.ndarray], np.ndarray]
    samples: Callable[[Arrays], int]


def _mean_point(a: Arrays) -> float:
    v = np.asarray(a["values"], np.float64)
    ok = np.isfinite(v)
    return float(v[ok].mean()) if ok.any() else float("nan")


def _mean_resampled(a: Arrays, counts: np.ndarray) -> np.ndarray:
    return _resampled_means(np.asarray(a["values"], np.float64)[:, None], counts)[:, 0]


def _resampled_means(values: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """(b, m) means of the m columns of ``values`` (n, m) under each resample; NaN entries left out."""
    ok = np.isfinite(values)
    w = counts.astype(np.float64)
    if ok.all():
        return (w @ values) / w.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (w @ np.where(ok, values, 0.0)) / (w @ ok.astype(np.float64))


def ranking(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One class: the sample indices of the kept images (label != 0) best first, as ``voc_ap`` ranks them (the
    reverse of a stable ascending argsort: equal scores put the later image first), whether each is positive, and
    the rank of the last image with the same score (the end of its tie group)."""
    keep = np.flatnonzero(labels != 0)
    s = np.asarray(scores, np.float64)[keep]
    order = np.argsort(s, kind="stable")[::-1]
    ranked = s[order]
    ends = np.flatnonzero(np.r_[ranked[1:] != ranked[:-1], True])  # the last rank of each tie group
    group_end = ends[np.searchsorted(ends, np.arange(len(ranked)))]
    return keep[order], labels[keep[order]] > 0, group_end


def weighted_ap(rows: np.ndarray, positive: np.ndarray, group_end: np.ndarray, counts: np.ndarray,
                kind: str = "voc") -> np.ndarray:
    """(b,) AP of one ranked list (``rows``: sample indices best first, from :func:`ranking`) under b resamples,
    ``counts`` (n, b) float32 (exact below 2**24 draws): each image repeated as often as it was drawn, in its
    place, which is how ``voc_ap`` ranks the resampled images taken in index order (``np.sort`` of the indices).

    ``kind="voc"``: all-points VOC AP (precision made monotone from the right, summed over every recall step);
    ``kind="sklearn"``: non-interpolated AP, precision read at the end of each tie group (``group_end``).
    Only positives move recall and an image's copies sit together, so both need the running counts at the
    positives (or at their tie groups' ends) only: one sparse product sums the counts between those ranks.
    NaN where a resample drew no positive.
    """
    from scipy.sparse import csr_matrix

    if kind not in ("voc", "sklearn"):
        raise ValueError(f"unknown AP kind {kind!r}")
    pos = np.flatnonzero(positive)
    if pos.size == 0:
        return np.full(counts.shape[1], np.nan)
    wpos = counts[rows[pos]].astype(np.float64)
    tp = np.cumsum(wpos, axis=0)  # positives drawn up to and including each positive
    ends = pos if kind == "voc" else np.unique(group_end[pos])  # the ranks where precision is read
    segment = np.searchsorted(ends, np.arange(len(rows)))  # the first of those ranks at or after each rank
    inside = segment < len(ends)
    between = csr_matrix((np.ones(int(inside.sum()), np.float32), (segment[inside], rows[inside])),
                         shape=(len(ends), counts.shape[0]))
    seen = np.cumsum(between @ counts, axis=0, dtype=np.float64)
    if kind == "voc":
        n_at, tp_at = seen, tp
    else:
        n_at = seen[np.searchsorted(ends, group_end[pos])]
        tp_at = tp[np.searchsorted(pos, group_end[pos], side="right") - 1]  # through the group's last positive
    prec = np.divide(tp_at, n_at, out=np.zeros_like(tp_at), where=n_at > 0)
    if kind == "voc":  # the best precision at this recall or beyond
        prec = np.maximum.accumulate(prec[::-1], axis=0)[::-1]
    npos = tp[-1]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(npos > 0, (wpos * prec).sum(axis=0) / npos, np.nan)


def _class_aps(a: Arrays, counts: np.ndarray, kind: str) -> np.ndarray:
    """(b, S, C) AP per resample, draw and class; ``scores`` is (N, C) or (S, N, C) (S low-shot draws)."""
    labels = np.asarray(a["labels"])
    scores = np.asarray(a["scores"])
    scores = scores[None] if scores.ndim == 2 else scores
    if scores.shape[1:] != labels.shape:
        raise ValueError(f"scores {scores.shape} do not match labels {labels.shape}")
    # once for every class: samples on the first axis (a ranking gathers rows); float32 counts are exact
    counts = np.ascontiguousarray(counts.T, dtype=np.float32)
    out = np.full((counts.shape[1], scores.shape[0], labels.shape[1]), np.nan)
    for c in range(labels.shape[1]):
        for s in range(scores.shape[0]):
            out[:, s, c] = weighted_ap(*ranking(labels[:, c], scores[s, :, c]), counts, kind)
    return out


def _map_resampled(a: Arrays, counts: np.ndarray, kind: str) -> np.ndarray:
    """Class-mean AP (classes outside ``class_mask`` and classes without a positive left out), averaged over
    the draws of a low-shot run."""
    aps = _class_aps(a, counts, kind)
    if "class_mask" in a:
        aps = aps[:, :, np.asarray(a["class_mask"], bool)]
    ok = np.isfinite(aps)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_draw = np.where(ok, aps, 0.0).sum(axis=2) / ok.sum(axis=2)  # NaN when no class is defined
    return per_draw.mean(axis=1)


def _map_statistic(name: str, kind: str) -> Statistic:
    def samples(a: Arrays) -> int:
        return int(np.asarray(a["labels"]).shape[0])

    def point(a: Arrays) -> float:
        return float(_map_resampled(a, np.ones((1, samples(a)), np.int64), kind)[0])

    return Statistic(name, ("scores", "labels"), ("class_mask",), point,
                     lambda a, counts: _map_resampled(a, counts, kind), samples)


STATISTICS: dict[str, Statistic] = {
    "mean": Statistic("mean", ("values",), (), _mean_point, _mean_resampled,
                      lambda a: int(np.asarray(a["values"]).shape[0])),
    "map_voc": _map_statistic("map_voc", "voc"),
    "map_sklearn": _map_statistic("map_sklearn", "sklearn"),
}


def get_statistic(name: str) -> Statistic:
    if name not in STATISTICS:
        raise ValueError(f"unknown statistic {name!r}; known: {', '.join(STATISTICS)}")
    return STATISTICS[name]


# ------------------------------------------------------------------------------------------------ intervals


@dataclass(frozen=True)
class Interval:
    """A point estimate with its percentile bootstrap interval (in the statistic's units)."""

    estimate: float
    low: float
    high: float
    level: float
    resamples: int
    seed: int
    method: str = CI_METHOD


def resampled_values(items: Sequence[tuple[str, Arrays]], resamples: int = DEFAULT_RESAMPLES,
                     seed: int = 0) -> np.ndarray:
    """(resamples, m) values of m (statistic name, arrays) items over the same n test samples, all under the
    same resamples; ``mean`` items share one matrix product per chunk."""
    used = [get_statistic(name) for name, _ in items]
    sizes = {st.samples(a) for st, (_, a) in zip(used, items)}
    if len(sizes) != 1:
        raise ValueError(f"items have different numbers of samples: {sorted(sizes)}")
    n = sizes.pop()
    means = [i for i, st in enumerate(used) if st.name == "mean"]
    stacked = (np.stack([np.asarray(items[i][1]["values"], np.float64) for i in means], axis=1)
               if means else None)
    out = np.empty((int(resamples), len(items)))
    row = 0
    for counts in bootstrap_counts(n, resamples, seed):
        b = counts.shape[0]
        if stacked is not None:
            out[row:row + b, means] = _resampled_means(stacked, counts)
        for i, st in enumerate(used):
            if st.name != "mean":
                out[row:row + b, i] = st.resampled(items[i][1], counts)
        row += b
    return out


def bootstrap_many(items: Sequence[tuple[str, Arrays]], resamples: int = DEFAULT_RESAMPLES,
                   level: float = DEFAULT_LEVEL, seed: int = 0) -> list[Interval]:
    """One :class:`Interval` per (statistic name, arrays) item over the same test samples (same resamples)."""
    _check(resamples, level)
    values = resampled_values(items, resamples, seed)
    out = []
    for j, (name, arrays) in enumerate(items):
        lo, hi = percentile_interval(values[:, j], level)
        out.append(Interval(get_statistic(name).point(arrays), lo, hi, float(level), int(resamples), int(seed)))
    return out


def bootstrap(statistic: str, arrays: Arrays, resamples: int = DEFAULT_RESAMPLES, level: float = DEFAULT_LEVEL,
              seed: int = 0) -> Interval:
    """The percentile bootstrap interval of one statistic."""
    return bootstrap_many([(statistic, arrays)], resamples, level, seed)[0]


def bootstrap_mean_ci(values: np.ndarray, resamples: int = DEFAULT_RESAMPLES, level: float = DEFAULT_LEVEL,
                      seed: int = 0) -> Interval:
    """Interval of the mean of per-sample values (e.g. 0/1 top-1 correctness)."""
    return bootstrap("mean", {"values": np.asarray(values)}, resamples, level, seed)


def bootstrap_map_ci(scores: np.ndarray, labels: np.ndarray, class_mask: np.ndarray | None = None,
                     kind: str = "voc", resamples: int = DEFAULT_RESAMPLES, level: float = DEFAULT_LEVEL,
                     seed: int = 0) -> Interval:
    """Interval of the class-mean AP, resampling test images and recomputing every class's AP. ``labels`` (N, C)
    in {1, -1, 0} (0: ignored for that class), ``scores`` (N, C) or (S, N, C); ``kind`` ``voc`` or ``sklearn``."""
    arrays = {"scores": np.asarray(scores), "labels": np.asarray(labels)}
    if class_mask is not None:
        arrays["class_mask"] = np.asarray(class_mask, bool)
    return bootstrap(f"map_{kind}", arrays, resamples, level, seed)


# ------------------------------------------------------------------------------------------------ paired tests


@dataclass(frozen=True)
class PairedDifference:
    """metric(a) - metric(b) on the same test samples: the interval and a two-sided p-value for no difference."""

    difference: float
    low: float
    high: float
    p_value: float
    level: float
    resamples: int
    seed: int


def paired_bootstrap(statistic: str, a: Arrays, b: Arrays, resamples: int = DEFAULT_RESAMPLES,
                     level: float = DEFAULT_LEVEL, seed: int = 0) -> PairedDifference:
    """Resample the test samples once per resample for both runs and take the difference of the metric.

    Interval: percentiles of the resampled differences d*. p-value: the bootstrap distribution shifted to the
    null, (1 + #{|d* - d| >= |d|}) / (1 + B) over the B finite resamples (Davison & Hinkley 1997, 4.4), so a run
    against itself gets p = 1 and no p-value is below 1 / (1 + B).
    """
    _check(resamples, level)
    values = resampled_values([(statistic, a), (statistic, b)], resamples, seed)
    diffs = values[:, 0] - values[:, 1]
    diffs = diffs[np.isfinite(diffs)]
    st = get_statistic(statistic)
    d = st.point(a) - st.point(b)
    lo, hi = percentile_interval(diffs, level)
    p = (1.0 + np.count_nonzero(np.abs(diffs - d) >= abs(d))) / (1.0 + diffs.size)
    return PairedDifference(float(d), lo, hi, float(p), float(level), int(resamples), int(seed))


@dataclass(frozen=True)
class McNemar:
    """McNemar's test on paired correctness: ``b`` = only run A right, ``c`` = only run B right."""

    b: int
    c: int
    statistic: float
    p_value: float
    method: str


def mcnemar(correct_a: np.ndarray, correct_b: np.ndarray, method: str = "auto") -> McNemar:
    """Two-sided McNemar test of equal accuracy from per-sample top-1 correctness of two runs.

    ``exact``: binomial test of b against Bin(b + c, 1/2), p = min(1, 2 P(X <= min(b, c))), statistic min(b, c);
    ``chi2``: (|b - c| - 1)^2 / (b + c) with continuity correction (Edwards), p from chi-square with 1 dof;
    ``auto``: exact when b + c < 25. No discordant pair: p = 1.
    """
    from scipy.stats import binom, chi2

    a, bb = np.asarray(correct_a, bool), np.asarray(correct_b, bool)
    if a.shape != bb.shape:
        raise ValueError(f"correctness arrays differ in shape: {a.shape} vs {bb.shape}")
    b, c = int(np.count_nonzero(a & ~bb)), int(np.count_nonzero(~a & bb))
    if method == "auto":
        method = "exact" if b + c < 25 else "chi2"
    if method == "exact":
        p = 1.0 if b + c == 0 else min(1.0, 2.0 * float(binom.cdf(min(b, c), b + c, 0.5)))
        return McNemar(b, c, float(min(b, c)), p, "exact")
    if method == "chi2":
        if b + c == 0:
            return McNemar(b, c, 0.0, 1.0, "chi2")
        stat = (abs(b - c) - 1.0) ** 2 / (b + c)
        return McNemar(b, c, stat, float(chi2.sf(stat, 1)), "chi2")
    raise ValueError(f"unknown McNemar method {method!r}; use auto, exact or chi2")


def holm(p_values: Sequence[float] | np.ndarray) -> np.ndarray:
    """Holm's step-down adjusted p-values, in the input order: the i-th smallest of m is multiplied by
    (m - i + 1) (i from 1), made non-decreasing in that order and capped at 1."""
    p = np.asarray(p_values, np.float64)
    if p.ndim != 1 or (p.size and (np.isnan(p).any() or p.min() < 0 or p.max() > 1)):
        raise ValueError("p-values must be a flat list of numbers in [0, 1]")
    m = p.size
    order = np.argsort(p, kind="stable")
    adjusted = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    out = np.empty(m)
    out[order] = adjusted
    return out

