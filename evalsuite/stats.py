"""Uncertainty of a metric from its per-test-sample outputs: bootstrap intervals, paired tests, Holm correction.

Small pure functions over numpy arrays (docs/uncertainty.md says what the record fields mean):

- resamples: :func:`bootstrap_indices` draws B resamples of the n test samples with replacement from
  ``numpy.random.default_rng(seed)``; :func:`bootstrap_counts` yields the same draws as per-sample counts, in
  chunks of resamples (a generator's stream does not depend on how the draws are chunked);
- statistics (:data:`STATISTICS`, by the name a record stores): ``mean`` (per-sample values; NaN samples, e.g.
  retrieval queries without a relevant item, left out), ``map_voc`` (class-mean all-points VOC AP, ignore-labelled
  images dropped per class: voc07_svm / lowshot_svm) and ``map_sklearn`` (class-mean non-interpolated AP with tied
  scores grouped, scikit-learn's ``average_precision_score``: knn on multi-label data), ``weighted_mean`` /
  ``root_weighted_mean`` (surface normals' pooled pixel metrics, navigation's mean over seeds), ``median_hist``
  (the median of pooled values from per-sample histograms: surface normals) and ``map_det_voc07`` /
  ``map_det_area`` (detection mAP over resampled test images from each detection's TP / FP outcome),
  ``mean_per_class`` (mean per-class accuracy) and ``map_voc11`` (class-mean 11-point VOC AP of scikit-learn's
  precision-recall curve: linear_transfer), ``episode_mean`` (few-shot: the mean over episodes, whose interval is
  the references' normal one). Each has a point estimate and a version vectorised over resamples that takes the
  resamples as counts (an image drawn twice weighs 2);
- :func:`bootstrap` / :func:`bootstrap_many`: percentile intervals; :func:`paired_bootstrap`: the difference of
  a metric between two runs on the same test samples (interval and two-sided p-value); :func:`mcnemar`: exact
  binomial or chi-square McNemar test on paired top-1 correctness; :func:`holm`: Holm's step-down adjustment.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from statistics import NormalDist

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
    arrays it reads (``roles``, then the ``optional`` ones). ``interval(arrays, level)`` -> (low, high), with its
    ``interval_method``: a statistic whose published protocol states its own interval (few-shot episodes); the
    others get the percentile bootstrap (paired comparisons resample every statistic)."""

    name: str
    roles: tuple[str, ...]
    optional: tuple[str, ...]
    point: Callable[[Arrays], float]
    resampled: Callable[[Arrays, np.ndarray], np.ndarray]
    samples: Callable[[Arrays], int]
    interval: Callable[[Arrays, float], tuple[float, float]] | None = None
    interval_method: str = ""


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


def _rows(role: str) -> Callable[[Arrays], int]:
    return lambda a: int(np.asarray(a[role]).shape[0])


def _point(resampled: Callable[[Arrays, np.ndarray], np.ndarray], role: str) -> Callable[[Arrays], float]:
    """The point estimate of a statistic: its resampled form with every sample drawn once."""
    return lambda a: float(resampled(a, np.ones((1, _rows(role)(a)), np.int64))[0])


# ---------------------------------------------------------------- weighted means (pooled pixels, seed-balanced)


def _weighted_mean_resampled(a: Arrays, counts: np.ndarray, root: bool = False) -> np.ndarray:
    """sum(w v) / sum(w) over the drawn samples (NaN values left out); ``root``: its square root (an RMS from
    per-sample mean squares)."""
    v = np.asarray(a["values"], np.float64)
    w = np.asarray(a["weights"], np.float64)
    ok = np.isfinite(v)
    c = counts.astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = (c @ np.where(ok, w * v, 0.0)) / (c @ np.where(ok, w, 0.0))
    return np.sqrt(out) if root else out


def _weighted_mean_statistic(name: str, root: bool) -> Statistic:
    def resampled(a: Arrays, counts: np.ndarray) -> np.ndarray:
        return _weighted_mean_resampled(a, counts, root)

    return Statistic(name, ("values", "weights"), (), _point(resampled, "values"), resampled, _rows("values"))


# ---------------------------------------------------------------- median of pooled values from per-sample histograms

#: fine bins per block: a resample's median is found in its block first, then in that block's fine bins only
HIST_BLOCK = 100


def histogram_median(hist: np.ndarray, bin_width: float, counts: np.ndarray) -> np.ndarray:
    """(b,) median of the values pooled over the drawn samples, from per-sample histograms ``hist`` (n, B) of
    ``bin_width`` bins starting at 0, ``counts`` (b, n). numpy's median (the mean of the two middle values for an
    even count), each middle value read linearly inside its bin (the k-th value of m in a bin at (k + 0.5) / m of
    it), so it lies within one bin of the exact median. NaN for an empty resample."""
    h = np.asarray(hist)
    c = np.asarray(counts, np.float64)
    starts = np.arange(0, h.shape[1], HIST_BLOCK)
    coarse = np.cumsum(c @ np.add.reduceat(h, starts, axis=1).astype(np.float64), axis=1)  # (b, blocks)
    n = coarse[:, -1]
    rows = np.arange(len(c))

    def value_at(rank: np.ndarray) -> np.ndarray:  # the rank-th smallest pooled value (0-based)
        block = np.minimum((coarse < rank[:, None] + 1).sum(axis=1), len(starts) - 1)
        below = np.where(block > 0, coarse[rows, np.maximum(block - 1, 0)], 0.0)
        out = np.full(len(c), np.nan)
        for k in np.unique(block):
            sel = np.flatnonzero(block == k)
            fine = c[sel] @ h[:, starts[k]:starts[k] + HIST_BLOCK].astype(np.float64)
            cum = np.cumsum(fine, axis=1) + below[sel, None]
            r = rank[sel]
            j = np.minimum((cum < r[:, None] + 1).sum(axis=1), fine.shape[1] - 1)
            before = np.where(j > 0, cum[np.arange(len(sel)), np.maximum(j - 1, 0)], below[sel])
            with np.errstate(invalid="ignore", divide="ignore"):
                out[sel] = (starts[k] + j + (r - before + 0.5) / fine[np.arange(len(sel)), j]) * bin_width
        return out

    with np.errstate(invalid="ignore"):
        median = 0.5 * (value_at(np.floor((n - 1) / 2)) + value_at(np.floor(n / 2)))
    return np.where(n > 0, median, np.nan)


def _median_hist_resampled(a: Arrays, counts: np.ndarray) -> np.ndarray:
    return histogram_median(a["hist"], np.asarray(a["bin_width"]).item(), counts)  # 0-d (1-d once written)


# ---------------------------------------------------------------- detection mAP over resampled images


def detection_ap(image: np.ndarray, positive: np.ndarray, npos: np.ndarray, counts: np.ndarray,
                 method: str = "voc07") -> np.ndarray:
    """(b,) VOC AP of one class's detections under b resamples of the test images.

    ``image``/``positive``: the class's detections best first (TP or FP; those matched to a difficult box
    dropped), ``npos`` (b,) the drawn images' non-difficult boxes, ``counts`` (n, b) float32 (how often each image
    is drawn). An image drawn twice contributes its detections twice (its matching is per image, so unchanged),
    each detection's copies side by side in the ranking. ``method``: ``voc07`` (11-point) or ``area`` (area under
    the monotone precision envelope), ``tasks.detection.voc_eval.voc_ap``. Only the last copy of each TP matters:
    precision rises along a run of TP copies and an FP never raises the envelope, so precision is read there
    only, the FPs between two TPs summed by one sparse product. NaN where a resample has no positive box.
    """
    from scipy.sparse import csr_matrix

    if method not in ("voc07", "area"):
        raise ValueError(f"unknown AP method {method!r}")
    pos = np.flatnonzero(positive)
    b = counts.shape[1]
    if pos.size == 0:
        return np.where(npos > 0, 0.0, np.nan)
    wpos = counts[image[pos]].astype(np.float64)  # (T, b) copies of each TP
    ctp = np.cumsum(wpos, axis=0)
    segment = np.searchsorted(pos, np.arange(len(image)))  # the first TP at or after each rank
    fp = np.flatnonzero(~np.asarray(positive, bool) & (segment < pos.size))
    between = csr_matrix((np.ones(fp.size, np.float32), (segment[fp], image[fp])), shape=(pos.size, counts.shape[0]))
    cfp = np.cumsum(between @ counts, axis=0, dtype=np.float64)
    seen = ctp + cfp
    prec = np.divide(ctp, seen, out=np.zeros_like(ctp), where=seen > 0)
    env = np.maximum.accumulate(prec[::-1], axis=0)[::-1]  # best precision at this recall or beyond
    with np.errstate(invalid="ignore", divide="ignore"):
        if method == "area":
            ap = (wpos * env).sum(axis=0) / npos
        else:
            rec = ctp / npos
            env = np.vstack([env, np.zeros((1, b))])
            ap = np.zeros(b)
            for t in np.arange(0.0, 1.1, 0.1):  # voc_ap's thresholds, in its order
                ap += env[(rec < t).sum(axis=0), np.arange(b)] / 11.0
    return np.where(npos > 0, ap, np.nan)


def _det_map_resampled(a: Arrays, counts: np.ndarray, method: str) -> np.ndarray:
    """Class-mean detection AP (classes outside ``class_mask``, and without a box in the resample, left out)."""
    image, label = np.asarray(a["image"], np.int64), np.asarray(a["label"], np.int64)
    score, outcome = np.asarray(a["score"], np.float64), np.asarray(a["outcome"])
    npos = counts.astype(np.float64) @ np.asarray(a["npos"], np.float64)  # (b, C)
    classes = np.flatnonzero(np.asarray(a.get("class_mask", np.ones(npos.shape[1], bool)), bool))
    counts_t = np.ascontiguousarray(counts.T, dtype=np.float32)  # exact below 2**24 draws
    aps = np.full((counts.shape[0], len(classes)), np.nan)
    for j, c in enumerate(classes):
        kept = np.flatnonzero((label == c) & (outcome >= 0))
        ranked = kept[np.argsort(-score[kept], kind="stable")]  # voc_eval's order (ties: input order)
        aps[:, j] = detection_ap(image[ranked], outcome[ranked] == 1, npos[:, c], counts_t, method)
    ok = np.isfinite(aps)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(ok, aps, 0.0).sum(axis=1) / ok.sum(axis=1)


def _det_map_statistic(name: str, method: str) -> Statistic:
    def resampled(a: Arrays, counts: np.ndarray) -> np.ndarray:
        return _det_map_resampled(a, counts, method)

    return Statistic(name, ("image", "label", "score", "outcome", "npos"), ("class_mask",),
                     _point(resampled, "npos"), resampled, _rows("npos"))


# ---------------------------------------------------------------- transfer: mean per-class accuracy, 11-point VOC AP


def _class_counts(codes: np.ndarray, weights: np.ndarray, k: int, counts: np.ndarray) -> np.ndarray:
    """(b, k) sum of ``weights`` over the drawn samples of each class (``codes`` (n,) in [0, k))."""
    from scipy.sparse import csr_matrix

    n = len(codes)
    onehot = csr_matrix((np.asarray(weights, np.float64), (codes, np.arange(n))), shape=(k, n))
    return np.asarray(onehot @ counts.T.astype(np.float64)).T


def _mean_per_class_resampled(a: Arrays, counts: np.ndarray) -> np.ndarray:
    """(b,) mean over the classes among the drawn targets of correct / drawn (a fraction): ssl-transfer's confusion-
    matrix score (diagonal over row sums, mean) wherever that is defined, i.e. when every predicted label is among
    the targets; a class none of whose images was drawn is left out of that resample."""
    t, p = np.asarray(a["targets"]).ravel(), np.asarray(a["pred"]).ravel()
    classes, codes = np.unique(t, return_inverse=True)
    support = _class_counts(codes, np.ones(len(t)), len(classes), counts)
    correct = _class_counts(codes, (t == p).astype(np.float64), len(classes), counts)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = correct / support  # NaN: class not drawn
    drawn = np.isfinite(recall)
    return np.where(drawn, recall, 0.0).sum(axis=1) / drawn.sum(axis=1)


def _mean_per_class_point(a: Arrays) -> float:
    """The reference's score: NaN when a predicted label never occurs among the targets (its 0/0 row)."""
    t, p = np.asarray(a["targets"]).ravel(), np.asarray(a["pred"]).ravel()
    if not np.isin(p, t).all():
        return float("nan")
    return float(_mean_per_class_resampled(a, np.ones((1, len(t)), np.int64))[0])


def voc11_ap(scores: np.ndarray, positive: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """(b,) 11-point VOC AP of one class under b resamples, ``counts`` (n, b) float32 (exact below 2**24 draws): the
    reference's ``voc_eval_cls`` (scikit-learn's ``precision_recall_curve``, tied scores one threshold, then the max
    precision at recall >= t for t = 0, 0.1 ... 1; the curve's closing point (recall 0, precision 1) makes the t = 0
    term 1/11) on the drawn images, each drawn copy of an image sitting in its tie group. A group with no drawn
    image repeats the previous point, which moves no maximum. NaN where a resample drew no positive."""
    order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
    s = np.asarray(scores, np.float64)[order]
    ends = np.r_[np.flatnonzero(s[1:] != s[:-1]), len(s) - 1]  # the last rank of each tie group
    c = counts[order]
    seen = np.cumsum(c, axis=0)[ends].astype(np.float64)  # (G, b) images at or above each threshold
    tp = np.cumsum(c * np.asarray(positive, bool)[order, None], axis=0)[ends].astype(np.float64)
    npos = tp[-1]
    with np.errstate(invalid="ignore", divide="ignore"):
        prec = np.where(seen > 0, tp / np.where(seen > 0, seen, 1.0), 0.0)
        rec = tp / npos
    env = np.maximum.accumulate(prec[::-1], axis=0)[::-1]  # the best precision at this recall or beyond
    cols = np.arange(c.shape[1])
    ap = np.full(c.shape[1], 1.0 / 11.0)
    for t in np.linspace(0, 1, 11)[1:]:  # the reference's thresholds, as floats
        first = (rec < t).sum(axis=0)  # recall rises along the ranking: the points from `first` on have rec >= t
        ap += np.where(first < len(ends), env[np.minimum(first, len(ends) - 1), cols], 0.0) / 11.0
    return np.where(npos > 0, ap, np.nan)


def _map_voc11_resampled(a: Arrays, counts: np.ndarray) -> np.ndarray:
    """Class-mean 11-point AP; positives are ``labels == 1`` (the reference's ``target == 1``: difficult and absent
    images are negatives); a class without a drawn positive is left out of that resample's mean."""
    labels, scores = np.asarray(a["labels"]), np.asarray(a["scores"])
    if scores.shape != labels.shape:
        raise ValueError(f"scores {scores.shape} do not match labels {labels.shape}")
    c = np.ascontiguousarray(counts.T, dtype=np.float32)
    aps = np.stack([voc11_ap(scores[:, j], labels[:, j] == 1, c) for j in range(labels.shape[1])], axis=1)
    ok = np.isfinite(aps)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(ok, aps, 0.0).sum(axis=1) / ok.sum(axis=1)


# ---------------------------------------------------------------- few-shot episodes: the normal interval


def normal_interval(a: Arrays, level: float) -> tuple[float, float]:
    """mean -/+ z std / sqrt(n) of the per-episode ``values`` (numpy's population std), as CD-FSL and ssl-transfer
    print it: z = 1.96 at the 95 % level (their rounded value), the normal quantile at any other level."""
    v = np.asarray(a["values"], np.float64)
    z = 1.96 if float(level) == 0.95 else NormalDist().inv_cdf((1.0 + float(level)) / 2.0)
    half = z * float(v.std()) / np.sqrt(len(v))
    return float(v.mean()) - half, float(v.mean()) + half


NORMAL_METHOD = "normal over episodes: mean -/+ z std / sqrt(episodes)"

STATISTICS: dict[str, Statistic] = {
    "mean": Statistic("mean", ("values",), (), _mean_point, _mean_resampled, _rows("values")),
    "map_voc": _map_statistic("map_voc", "voc"),
    "map_sklearn": _map_statistic("map_sklearn", "sklearn"),
    "weighted_mean": _weighted_mean_statistic("weighted_mean", root=False),
    "root_weighted_mean": _weighted_mean_statistic("root_weighted_mean", root=True),
    "median_hist": Statistic("median_hist", ("hist", "bin_width"), (), _point(_median_hist_resampled, "hist"),
                             _median_hist_resampled, _rows("hist")),
    "map_det_voc07": _det_map_statistic("map_det_voc07", "voc07"),
    "map_det_area": _det_map_statistic("map_det_area", "area"),
    "mean_per_class": Statistic("mean_per_class", ("targets", "pred"), (), _mean_per_class_point,
                                _mean_per_class_resampled, _rows("targets")),
    "map_voc11": Statistic("map_voc11", ("scores", "labels"), (), _point(_map_voc11_resampled, "labels"),
                           _map_voc11_resampled, _rows("labels")),
    "episode_mean": Statistic("episode_mean", ("values",), (), _mean_point, _mean_resampled, _rows("values"),
                              normal_interval, NORMAL_METHOD),
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
    """One :class:`Interval` per (statistic name, arrays) item over the same test samples (same resamples); a
    statistic with an interval of its own (``episode_mean``) gets that one (``resamples`` 0, its method)."""
    _check(resamples, level)
    used = [get_statistic(name) for name, _ in items]
    boot = [j for j, st in enumerate(used) if st.interval is None]
    values = resampled_values([items[j] for j in boot], resamples, seed) if boot else np.empty((0, 0))
    out = []
    for j, ((_, arrays), st) in enumerate(zip(items, used)):
        if st.interval is not None:
            lo, hi = st.interval(arrays, level)
            out.append(Interval(st.point(arrays), lo, hi, float(level), 0, int(seed), st.interval_method))
            continue
        lo, hi = percentile_interval(values[:, boot.index(j)], level)
        out.append(Interval(st.point(arrays), lo, hi, float(level), int(resamples), int(seed)))
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

