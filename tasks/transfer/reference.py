"""Reference backends for :func:`tasks.transfer.logreg.fit_path`, one problem at a time, returning the same
:class:`~tasks.transfer.logreg.LogRegPath`; each is a drop-in ``fit=`` for ``select_and_refit``.

- :class:`SklearnPath` -- what ssl-transfer ``linear.py`` runs: one ``LogisticRegression(solver="lbfgs",
  warm_start=True)`` object (default ``max_iter=100``, ``tol=1e-4``: the reference leaves both at
  scikit-learn's defaults and silences the ConvergenceWarning), fitted for each C in the order given, every fit
  starting from the previous one, including the final train+val refit (the reference warm-starts it from the
  last fit of the C loop, the smallest C; ``init`` is ignored). For label columns (VOC) the loop is C outer,
  column inner, as the reference's. Two-class columns: scikit-learn >= 1.5 fits a binomial model, the
  reference's 0.22 a two-class softmax with ``multi_class="multinomial"``; the binomial model at ``2 C`` is
  that softmax (``w = (w1 - w0)``, ``w0 = -w1`` at the optimum), so we fit it and report the symmetric pair.
- :func:`cyanure_path` -- ``cyanure.estimators.LogisticRegression`` (multinomial, ``lambda_1 = 1 / (n C)``,
  intercept unpenalised: the same minimiser), an independent solver; only when ``cyanure`` is importable
  (:func:`cyanure_available`).
"""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Sequence

import numpy as np

from .logreg import LogRegPath


def _columns(y: np.ndarray, classes: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y)
    y2 = y[:, None] if y.ndim == 1 else y
    return y2, (np.unique(y2) if classes is None else np.asarray(classes))


def _symmetric_pair(coef: np.ndarray, intercept: float) -> tuple[np.ndarray, np.ndarray]:
    """Binomial (w, c) at 2C -> the two-class softmax at C: columns (-w/2, w/2), intercepts (-c/2, c/2)."""
    return np.stack([-coef / 2, coef / 2], axis=1), np.array([-intercept / 2, intercept / 2])


class SklearnPath:
    """scikit-learn's L-BFGS as the reference calls it; the object keeps the last fit for the next warm start."""

    name = "sklearn"

    def __init__(self, max_iter: int = 100, tol: float = 1e-4, warm_start: bool = True):
        from sklearn.linear_model import LogisticRegression

        self.clf = LogisticRegression(solver="lbfgs", warm_start=warm_start, max_iter=max_iter, tol=tol)

    def __call__(self, x: np.ndarray, y: np.ndarray, Cs: Sequence[float], *, classes: np.ndarray | None = None,
                 **ignored) -> LogRegPath:
        from sklearn.exceptions import ConvergenceWarning

        x = np.asarray(x)
        y2, classes = _columns(y, classes)
        t_fam, k, d = y2.shape[1], len(classes), x.shape[1]
        coef, icpt = np.zeros((t_fam, len(Cs), d, k)), np.zeros((t_fam, len(Cs), k))
        n_iter = np.zeros((t_fam, len(Cs)), dtype=np.int64)
        conv = np.ones((t_fam, len(Cs)), dtype=bool)
        for j, c in enumerate(Cs):
            for t in range(t_fam):
                present = np.unique(y2[:, t])
                if k == 2 and len(present) == 2:  # the reference's two-class softmax == binomial at 2C
                    self.clf.set_params(C=2.0 * float(c))
                else:
                    self.clf.set_params(C=float(c))
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always", ConvergenceWarning)
                    self.clf.fit(x, y2[:, t])
                conv[t, j] = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
                n_iter[t, j] = int(np.max(self.clf.n_iter_))
                if k == 2:
                    coef[t, j], icpt[t, j] = _symmetric_pair(self.clf.coef_[0], float(self.clf.intercept_[0]))
                else:
                    cols = np.searchsorted(classes, self.clf.classes_)
                    coef[t, j][:, cols] = self.clf.coef_.T
                    icpt[t, j][cols] = self.clf.intercept_ - self.clf.intercept_.mean()
        return LogRegPath(Cs=np.asarray(Cs, dtype=np.float64), classes=classes, coef=coef, intercept=icpt,
                          n_iter=n_iter, converged=conv, float64_polish=np.zeros_like(conv))


def cyanure_available() -> bool:
    return importlib.util.find_spec("cyanure") is not None


def cyanure_path(x: np.ndarray, y: np.ndarray, Cs: Sequence[float], *, classes: np.ndarray | None = None,
                 tol: float = 1e-6, max_iter: int = 2000, **ignored) -> LogRegPath:
    """Each (column, C) solved by cyanure from zero (its objective is ours divided by n)."""
    if not cyanure_available():
        raise ImportError("cyanure is not installed (pip install cyanure)")
    from cyanure.estimators import LogisticRegression as CyLogReg

    x = np.asarray(x, dtype=np.float64)
    y2, classes = _columns(y, classes)
    n, d = x.shape
    t_fam, k = y2.shape[1], len(classes)
    coef, icpt = np.zeros((t_fam, len(Cs), d, k)), np.zeros((t_fam, len(Cs), k))
    for j, c in enumerate(Cs):
        for t in range(t_fam):
            codes = np.searchsorted(classes, y2[:, t])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if k == 2:  # binomial at 2C, labels +-1
                    clf = CyLogReg(loss="logistic", penalty="l2", lambda_1=1.0 / (n * 2.0 * c), fit_intercept=True,
                                   tol=tol, max_iter=max_iter, verbose=False, n_threads=1)
                    clf.fit(x, np.where(codes == 1, 1.0, -1.0))
                    coef[t, j], icpt[t, j] = _symmetric_pair(np.asarray(clf.coef_).reshape(d),
                                                             float(np.asarray(clf.intercept_).reshape(-1)[0]))
                    continue
                clf = CyLogReg(loss="multiclass-logistic", penalty="l2", lambda_1=1.0 / (n * c), fit_intercept=True,
                               multi_class="multinomial", tol=tol, max_iter=max_iter, verbose=False, n_threads=1)
                clf.fit(x, codes)
            cols = np.searchsorted(np.arange(k), np.unique(codes))
            coef[t, j][:, cols] = np.asarray(clf.coef_).reshape(d, -1)
            b = np.asarray(clf.intercept_).reshape(-1)
            icpt[t, j][cols] = b - b.mean()
    conv = np.ones((t_fam, len(Cs)), dtype=bool)  # cyanure reports no per-fit convergence flag
    return LogRegPath(Cs=np.asarray(Cs, dtype=np.float64), classes=classes, coef=coef, intercept=icpt,
                      n_iter=np.zeros((t_fam, len(Cs)), dtype=np.int64), converged=conv,
                      float64_polish=np.zeros_like(conv))
