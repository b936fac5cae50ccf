"""The reference backends, one problem at a time: ``sklearn`` (``LinearSVC`` with the benchmark's exact
arguments, the anchors' solver) and ``cyanure`` (``cyanure.estimators.LinearSVC``, squared hinge, L2; an
independent check). Cyanure realises class weight 2 by duplicating positives (exact for this loss) and the
bias by the same appended constant column, so it is regularised as liblinear does."""

from __future__ import annotations

import warnings

import numpy as np

from evalsuite.errors import UserError

from .config import SVMConfig
from .newton import solve_torch
from .solution import SVMSolution


def _problem_rows(y: np.ndarray, p: int) -> tuple[np.ndarray, np.ndarray]:
    keep = np.nonzero(y[:, p] != 0)[0]
    return keep, np.where(y[keep, p] > 0, 1, -1).astype(np.int32)


def _solve_per_problem(x, y, costs, config: SVMConfig, name: str, fit_one) -> SVMSolution:
    """Solve each problem on its own with a reference solver ``fit_one(x_rows, y_pm1, cost) -> (w, b, ok, iters)``.

    Problems with a single class (the reference solvers refuse them) are the same objective, solved by ours
    in one batch.
    """
    x64 = np.asarray(x, dtype=np.float64)
    p_total, d = y.shape[1], x.shape[1]
    weight, bias = np.zeros((p_total, d)), np.zeros(p_total)
    converged, iterations = np.ones(p_total, dtype=bool), np.zeros(p_total, dtype=np.int64)
    one_class = []
    for p in range(p_total):
        rows, yp = _problem_rows(y, p)
        if len(np.unique(yp)) < 2:
            one_class.append(p)
            continue
        weight[p], bias[p], converged[p], iterations[p] = fit_one(x64[rows], yp, float(costs[p]))
    if one_class:
        ours = solve_torch(x64, y[:, one_class], costs[one_class], config, "cpu", False).solution
        weight[one_class], bias[one_class] = ours.weight, ours.bias
    return SVMSolution(weight, bias, converged, iterations, name)


def solve_sklearn(x, y, costs, config: SVMConfig) -> SVMSolution:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.svm import LinearSVC

    def fit_one(xp, yp, cost):
        # fair_ssb tools/svm/train_svm_kfold.py's call (verbose=1 there only prints); random_state pinned: the
        # reference leaves it None (numpy's global RNG orders liblinear's coordinate descent), which only
        # matters for a problem stopped at max_iter
        clf = LinearSVC(C=cost, class_weight={1: config.pos_weight, -1: config.neg_weight},
                        intercept_scaling=config.intercept_scaling, verbose=0, penalty="l2", loss=config.loss,
                        tol=config.sklearn_tol, dual=True, max_iter=config.sklearn_max_iter, random_state=0)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            clf.fit(xp, yp)
        ok = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
        return clf.coef_[0], float(clf.intercept_[0]), ok, int(np.max(clf.n_iter_))

    return _solve_per_problem(x, y, costs, config, "sklearn", fit_one)


def solve_cyanure(x, y, costs, config: SVMConfig) -> SVMSolution:
    from cyanure.estimators import LinearSVC as CyLinearSVC

    d = x.shape[1]

    def fit_one(xp, yp, cost):
        xa = np.hstack([xp, np.full((len(yp), 1), config.intercept_scaling)])
        # class weight w (integer) == each row repeated w times, exact for a sum of per-row losses
        reps = np.where(yp > 0, config.pos_weight, config.neg_weight)
        if not np.allclose(reps, np.round(reps)):
            raise UserError("svm.backend=cyanure needs integer class weights (rows are duplicated)")
        reps = np.round(reps).astype(int)
        xr, yr = np.repeat(xa, reps, axis=0), np.repeat(yp, reps).astype(np.float64)
        # cyanure: 1/n sum 1/2 max(0, 1 - y w.x)^2 + lambda/2 ||w||^2  ==  (1/(n lambda)) * ours with C = 1/(2 n lambda)
        lam = 1.0 / (2.0 * len(yr) * cost)
        clf = CyLinearSVC(loss="sqhinge", penalty="l2", fit_intercept=False, lambda_1=lam, tol=config.cyanure_tol,
                          max_iter=config.cyanure_max_iter, verbose=False, n_threads=1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            clf.fit(xr, yr)
        w = np.asarray(clf.coef_, dtype=np.float64).reshape(-1)
        return w[:d], w[d] * config.intercept_scaling, True, 0

    return _solve_per_problem(x, y, costs, config, "cyanure", fit_one)
