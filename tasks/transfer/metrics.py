"""The per-dataset metrics of Ericsson et al. 2021 (ssl-transfer ``linear.py``), as small pure functions.

- :func:`top1` -- ``accuracy``: ``100 * clf.score`` (CIFAR, Cars, DTD, Food, SUN397).
- :func:`mean_per_class_accuracy` -- ``mean per-class accuracy`` (Aircraft, Caltech101, Flowers, Pets):
  ``confusion_matrix(y_true, y_pred)``, diagonal over row sums, mean. Its rows are every label seen in
  ``y_true`` *or* ``y_pred``; a predicted label absent from ``y_true`` gives a 0/0 row, so the reference's
  score is NaN there, and so is ours (such a value is never chosen: ``score > best`` is False for NaN).
- :func:`voc07_11point_ap` / :func:`mean_ap` -- ``mAP`` (VOC2007): per class, ``precision_recall_curve`` on
  the decision values, then the VOC2007 11-point interpolation (max precision at recall >= t, t = 0, 0.1 ...
  1). ``precision_recall_curve`` groups tied scores into one threshold and ends in the point (recall 0,
  precision 1), so the t = 0 term is always 1/11. Labels are the reference dataset's ``target == 1``:
  "difficult" (0) and absent (-1) images are both negatives. (``tasks/svm/solver/metrics.voc_ap`` is the
  Goyal et al. all-points AP with difficult images dropped: a different metric, so not reused here.)
- :func:`mean_ci95` -- the few-shot summary: mean and ``1.96 * std / sqrt(n)`` (numpy's population std).
"""

from __future__ import annotations

import numpy as np


def top1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Percentage of exact matches."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    return 100.0 * float(np.mean(y_true == y_pred))


def mean_per_class_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean over the confusion matrix's rows of diagonal / row sum, in percent (NaN if a predicted label never
    occurs in ``y_true``, as the reference's 0/0 gives)."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    labels = np.union1d(y_true, y_pred)
    support = np.array([np.sum(y_true == c) for c in labels], dtype=np.float64)
    correct = np.array([np.sum((y_true == c) & (y_pred == c)) for c in labels], dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return 100.0 * float(np.mean(correct / support))


def precision_recall(y_true: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's ``precision_recall_curve`` points (one per distinct score, descending, plus the final
    (recall 0, precision 1)), as (precision, recall); points after full recall are kept (they cannot raise
    an 11-point AP, whichever scikit-learn version truncates them)."""
    y = np.asarray(y_true).astype(bool).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    order = np.argsort(-s, kind="stable")
    y, s = y[order], s[order]
    last = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]  # the last row of each run of equal scores
    tps = np.cumsum(y)[last].astype(np.float64)
    fps = (last + 1) - tps
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = tps / tps[-1]
    precision = tps / (tps + fps)
    return np.r_[precision[::-1], 1.0], np.r_[recall[::-1], 0.0]


def voc07_11point_ap(y_true: np.ndarray, scores: np.ndarray) -> float:
    """The reference's ``voc_eval_cls``: 11-point AP (a fraction in [0, 1]); NaN without positives."""
    if not np.any(np.asarray(y_true).astype(bool)):
        return float("nan")
    prec, rec = precision_recall(y_true, scores)
    ap = 0.0
    for t in np.linspace(0, 1, 11):
        above = rec >= t
        ap += (np.max(prec[above]) if above.any() else 0.0) / 11.0
    return float(ap)


def mean_ap(y_true: np.ndarray, scores: np.ndarray) -> float:
    """``100 * mean`` of the 11-point AP over the columns (classes) of (n, T) binary labels and scores."""
    y_true, scores = np.asarray(y_true), np.asarray(scores)
    return 100.0 * float(np.mean([voc07_11point_ap(y_true[:, t], scores[:, t]) for t in range(y_true.shape[1])]))


def mean_ci95(values: np.ndarray) -> tuple[float, float]:
    """(mean, 1.96 * std / sqrt(n)) with numpy's default (population) std, as CD-FSL and ssl-transfer print."""
    v = np.asarray(values, dtype=np.float64)
    return float(v.mean()), float(1.96 * v.std() / np.sqrt(len(v)))
