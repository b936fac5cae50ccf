"""Batched linear SVMs for the Goyal et al. 2019 VOC07 / low-shot benchmarks, plus the benchmark's metrics.

The problem (what ``sklearn.svm.LinearSVC(C, class_weight={1: 2, -1: 1}, intercept_scaling=1,
penalty="l2", loss="squared_hinge", dual=True, tol=1e-4, max_iter=2000)`` solves in
fair_self_supervision_benchmark ``tools/svm/train_svm_kfold.py`` and VISSL ``svm_trainer.py``)::

    min_w  1/2 ||w||^2 + C * sum_i c_i * max(0, 1 - y_i <w, [x_i, s]>)^2

with ``y_i`` in {-1, +1}, ``c_i`` = 2 for positives and 1 for negatives, and ``s`` the
intercept scaling: liblinear appends a constant feature ``s`` and *regularises* the bias
like any other weight (``intercept_ = s * w[-1]``).

Modules: ``config`` (:class:`SVMConfig`), ``solution`` (:class:`SVMSolution`), ``backends``
(:func:`solve`, :func:`solve_with_scores` over ``SVMConfig.backend``: ``newton`` -- ours, batched, torch,
the default -- or ``reference`` -- scikit-learn's LinearSVC, the anchors' solver, and cyanure), ``sweep``
(:func:`cv_sweep`, the cross-validated cost choice) and ``metrics`` (:func:`voc_ap`,
:func:`cv_average_precision`, :func:`stratified_folds`, :func:`svm_objective`).
"""

from .backends import solve, solve_with_scores
from .config import BACKENDS, SVMConfig
from .metrics import cv_average_precision, stratified_folds, svm_objective, voc_ap
from .solution import SVMSolution
from .sweep import SweepResult, cv_sweep, finite_mean

__all__ = [
    "BACKENDS", "SVMConfig", "SVMSolution", "SweepResult", "cv_average_precision", "cv_sweep", "finite_mean",
    "solve", "solve_with_scores", "stratified_folds", "svm_objective", "voc_ap",
]
