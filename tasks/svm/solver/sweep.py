"""The cross-validated cost sweep (one-vs-rest, cost chosen per class by k-fold CV mean AP) and the mean of
per-class APs under the undefined-AP policy."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .backends import solve_with_scores
from .config import SVMConfig
from .metrics import cv_average_precision, stratified_folds
from .newton import solve_torch
from .solution import SVMSolution, check_problems


@dataclass
class SweepResult:
    """One-vs-rest SVMs for K classes over a cost grid, cost chosen per class by k-fold CV mean AP."""

    costs: list[float]
    cv_ap: np.ndarray  # (K, n_costs, folds)  fold APs (scikit-learn average_precision)
    chosen: np.ndarray  # (K,) index into costs
    final: SVMSolution  # K refits (one per class) on all training rows at the chosen cost
    folds: int
    not_converged: int  # problems (of the whole sweep) that hit the iteration cap

    @property
    def mean_cv_ap(self) -> np.ndarray:
        return self.cv_ap.mean(axis=2)

    @property
    def chosen_costs(self) -> list[float]:
        return [self.costs[i] for i in self.chosen]


def cv_sweep(x: np.ndarray, labels: np.ndarray, costs: Sequence[float], folds: int, config: SVMConfig,
             device: str = "cpu", progress: bool = False) -> SweepResult:
    """``labels`` (N, K) with +1 / -1 for training rows and 0 for rows left out of that class.

    Per class: StratifiedKFold(folds) on its rows; for each cost, train on folds-1 folds, score the
    held-out fold with scikit-learn's AP; choose the cost with the highest mean (first on ties, as
    ``np.argmax``); the model at that cost refit on all the class's rows is the final one. All
    classes x costs x (folds + 1) problems go to :func:`solve` together.
    """
    labels = np.asarray(labels)
    n, k = labels.shape
    nc = len(costs)
    fold_of = np.full((n, k), -1, dtype=np.int64)
    for j in range(k):
        rows = np.nonzero(labels[:, j] != 0)[0]
        if len(rows):
            fold_of[rows, j] = stratified_folds(labels[rows, j] > 0, folds)
    # problem p = ((j * nc) + c) * (folds + 1) + f ; f == folds -> refit on all rows. Its labels are column
    # j * (folds + 1) + f of y (one column per class and fold, shared by the costs)
    n_prob = k * nc * (folds + 1)
    y = np.zeros((n, k * (folds + 1)), dtype=np.int8)
    col = np.zeros(n_prob, dtype=np.int64)
    cvec = np.zeros(n_prob)
    for j in range(k):
        for f in range(folds + 1):
            u = j * (folds + 1) + f
            y[:, u] = labels[:, j]
            if f < folds:
                y[fold_of[:, j] == f, u] = 0
            for c in range(nc):
                p = (j * nc + c) * (folds + 1) + f
                col[p], cvec[p] = u, costs[c]
    refits = np.array([(j * nc + c) * (folds + 1) + folds for j in range(k) for c in range(nc)])
    cv_ap = np.zeros((k, nc, folds))
    folds_done = np.zeros((k, nc), dtype=np.int64)

    def score_folds(probs, margins):
        """Each fold problem's held-out AP, as soon as it is solved. Returns the refits that can no longer be
        chosen: a cost whose CV is complete loses to the first best of the other complete costs (so it is not
        ``np.argmax`` of the final means either), and its refit need not be kept."""
        touched = set()
        for p, scores_p in zip(probs, margins.T):
            j, c, f = p // (nc * (folds + 1)), (p // (folds + 1)) % nc, p % (folds + 1)
            if f < folds:
                held = fold_of[:, j] == f
                cv_ap[j, c, f] = cv_average_precision(labels[held, j], scores_p[held])
                folds_done[j, c] += 1
                touched.add(j)
        gone = []
        for j in touched:
            complete = np.flatnonzero(folds_done[j] == folds)
            best = complete[np.argmax(cv_ap[j, complete].mean(axis=1))] if len(complete) else -1
            gone += [(j * nc + c) * (folds + 1) + folds for c in complete if c != best]
        return gone

    if config.backend == "torch":  # no (N, problems) score matrix: APs are taken as problems finish
        check_problems(x, y, cvec, col)
        run = solve_torch(x, y, cvec, config, device, progress, refits, on_scores=score_folds, col=col)
        sol, converged = run.solution, run.converged
    else:
        sol, scores, converged = solve_with_scores(x, y[:, col], cvec, config, device=device, progress=progress,
                                                   keep=refits)
        score_folds(range(n_prob), scores)
    chosen = np.argmax(cv_ap.mean(axis=2), axis=1)
    pick = np.array([j * nc + chosen[j] for j in range(k)])  # positions in `refits`
    return SweepResult(list(costs), cv_ap, chosen, sol.select(pick), folds, int((~converged).sum()))


def finite_mean(values, nan_policy: str) -> tuple[float | None, list[int]]:
    """Mean of per-class APs: ``nan`` -> None if any is NaN; ``exclude`` -> mean of the defined ones."""
    arr = np.asarray(values, dtype=np.float64)
    undefined = [int(i) for i in np.nonzero(~np.isfinite(arr))[0]]
    if not undefined:
        return float(arr.mean()), []
    if nan_policy == "exclude" and len(undefined) < len(arr):
        return float(arr[np.isfinite(arr)].mean()), undefined
    return None, undefined

