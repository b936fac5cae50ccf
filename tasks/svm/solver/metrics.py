"""The benchmark's metrics and folds, and the primal objective every backend minimises (pure functions).

- :func:`voc_ap` -- the benchmark's *test* AP (``svm_helper.get_precision_recall`` + ``calculate_ap``): rank by
  score, precision made monotone from the right, summed over recall steps (all points, not the 11-point
  detection metric); ignore-labelled images are dropped.
- :func:`cv_average_precision` -- the *cross-validation* scorer, scikit-learn's ``average_precision`` (what
  ``cross_val_score(..., scoring="average_precision")`` uses; 0.0 for a fold without positives, as
  scikit-learn returns).
"""

from __future__ import annotations

import warnings

import numpy as np

from .config import SVMConfig


def voc_ap(labels: np.ndarray, scores: np.ndarray) -> float:
    """The benchmark's test AP for one class; ``labels`` in {1, -1, 0}, 0 = ignore (dropped).

    Images are ranked by descending score (ties: the later index first, i.e. the reverse of a stable
    ascending argsort, which is what the benchmark's ``np.argsort(preds)[::-1]`` gives whenever
    numpy's sort is stable on the input); precision is made monotone from the right and summed over
    every recall step (VOC2010+ "all points" AP). NaN when there is no positive.
    """
    labels, scores = np.asarray(labels), np.asarray(scores, dtype=np.float64)
    keep = labels != 0
    y, s = labels[keep] > 0, scores[keep]
    npos = int(y.sum())
    if npos == 0:
        return float("nan")
    order = np.argsort(s, kind="stable")[::-1]
    tp = np.cumsum(y[order])
    prec = tp / np.arange(1, len(tp) + 1)
    rec = tp / npos
    mpre = np.concatenate([[0.0], prec, [0.0]])
    mrec = np.concatenate([[0.0], rec, [1.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    idx = np.nonzero(mrec[1:] != mrec[:-1])[0] + 1
    return float(np.sum((mrec[idx] - mrec[idx - 1]) * mpre[idx]))


def cv_average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    """scikit-learn's ``average_precision`` scorer (the benchmark's CV metric); 0.0 without positives."""
    from sklearn.metrics import average_precision_score

    y = np.asarray(labels) > 0
    if not y.any():
        return 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(average_precision_score(y, scores))


def stratified_folds(y: np.ndarray, n_splits: int) -> np.ndarray:
    """Fold index per row: ``StratifiedKFold(n_splits, shuffle=False)``, what ``cross_val_score(cv=3)``
    uses for a classifier (scikit-learn >= 0.22 assignment). Fewer members of a class than folds is allowed
    (scikit-learn warns; such folds get no positive)."""
    from sklearn.model_selection import StratifiedKFold

    fold = np.full(len(y), -1, dtype=np.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for f, (_, test) in enumerate(StratifiedKFold(n_splits=n_splits).split(np.zeros(len(y)), y)):
            fold[test] = f
    return fold


def svm_objective(x: np.ndarray, y: np.ndarray, w_aug: np.ndarray, cost: float, config: SVMConfig) -> float:
    """The primal objective (package docstring) of one problem, rows with y == 0 excluded, in float64."""
    x = np.asarray(x, dtype=np.float64)
    keep = y != 0
    xa = np.hstack([x[keep], np.full((int(keep.sum()), 1), config.intercept_scaling)])
    yy = np.where(y[keep] > 0, 1.0, -1.0)
    c = np.where(yy > 0, config.pos_weight, config.neg_weight)
    xi = np.maximum(0.0, 1.0 - yy * (xa @ w_aug))
    sq = xi**2 if config.loss == "squared_hinge" else xi
    return float(0.5 * w_aug @ w_aug + cost * np.sum(c * sq))
