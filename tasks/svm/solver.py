"""Batched linear SVMs for the Goyal et al. 2019 VOC07 / low-shot benchmarks, plus the benchmark's metrics.

The problem (what ``sklearn.svm.LinearSVC(C, class_weight={1: 2, -1: 1}, intercept_scaling=1,
penalty="l2", loss="squared_hinge", dual=True, tol=1e-4, max_iter=2000)`` solves in
fair_self_supervision_benchmark ``tools/svm/train_svm_kfold.py`` and VISSL ``svm_trainer.py``)::

    min_w  1/2 ||w||^2 + C * sum_i c_i * max(0, 1 - y_i <w, [x_i, s]>)^2

with ``y_i`` in {-1, +1}, ``c_i`` = 2 for positives and 1 for negatives, and ``s`` the
intercept scaling: liblinear appends a constant feature ``s`` and *regularises* the bias
like any other weight (``intercept_ = s * w[-1]``).

Backends (``SVMConfig.backend``):

- ``torch`` (ours, the default): every problem of a sweep (classes x costs x CV folds + refit)
  is one column of a single batched problem. A truncated Newton method on the primal
  (Chapelle 2007 / liblinear's TRON family): generalised-Hessian conjugate gradient per
  Newton step, an exact safeguarded line search on the piecewise-quadratic objective, per-problem
  convergence ``||grad|| <= tol * ||grad at 0||`` on a float64 iterate and gradient (CG products in the
  solver dtype). Each cost path is warm-started cost after cost, and a finished problem's batch slot
  takes the next problem at once. Large-C steps with small active sets are exact (Woodbury on the
  active set). When the augmented dimension D+1 exceeds the number of samples N, the problem is solved
  exactly in the N-dimensional span of the samples (``Xa Xa^T = L L^T``, coordinates ``z = L``; the
  optimum of an L2-regularised linear model lies in that span), then mapped back, ``w = Xa^T L^-T v``.
  Runs on CPU or GPU.
- ``sklearn``: one ``LinearSVC`` per problem with the benchmark's exact arguments (the anchors' solver).
- ``cyanure``: ``cyanure.estimators.LinearSVC`` (squared hinge, L2), an independent reference;
  class weight 2 is realised by duplicating positives (exact for this loss), the bias by the
  same appended constant column (so it is regularised as liblinear does).

Metrics, both pure functions:

- :func:`voc_ap` -- the benchmark's *test* AP (``svm_helper.get_precision_recall`` +
  ``calculate_ap``): rank by score, precision made monotone from the right, summed over recall
  steps (all points, not the 11-point detection metric); ignore-labelled images are dropped.
- :func:`cv_average_precision` -- the *cross-validation* scorer, scikit-learn's
  ``average_precision`` (what ``cross_val_score(..., scoring="average_precision")`` uses; 0.0 for
  a fold without positives, as scikit-learn returns).
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from evalsuite.errors import BadFeatures, UserError

BACKENDS = ("torch", "sklearn", "cyanure")

# fair_self_supervision_benchmark README / scripts: --costs_list "1e-7,...,100" and svm_helper.parse_cost_list
# appends 0.5**4 .. 0.5**19: 26 costs, in this order (np.argmax ties go to the earliest).
GOYAL19_COSTS: list[float] = ([1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0, 100.0]
                              + [0.5**n for n in range(4, 20)])
# VISSL configs/config/benchmark/{linear_image_classification,low_shot_transfer}/voc07/*svm*.yaml
VISSL_COSTS: list[float] = [0.01, 0.1, 1.0, 2.0, 5.0, 10.0, 15.0, 20.0, 50.0, 100.0, 1000.0]


@dataclass(frozen=True)
class SVMConfig:
    """Every solver setting (all recorded with the result)."""

    backend: str = "torch"
    loss: str = "squared_hinge"
    pos_weight: float = 2.0
    neg_weight: float = 1.0
    intercept_scaling: float = 1.0
    # torch backend
    tol: float = 1e-6  # ||grad|| <= tol * ||grad at w = 0||, per problem (1e-5 is loose at C >= 1000)
    max_newton: int = 60
    max_cg: int = 500
    cg_forcing: float = 0.1  # CG stops at ||residual|| <= min(cg_forcing, sqrt(||g|| / ||g0||)) ||g||
    dtype: str = "float32"  # matmul precision; norms for the stopping test are float64
    precond_rank: int = 64  # top eigen-directions of Z^T Z in the CG preconditioner (0: none)
    warm_start: bool = True  # solve each cost path in increasing order from the previous solution
    max_problems: int = 4096  # problems solved together, at most
    memory_fraction: float = 1.0  # per-problem solver state <= this x the float32 feature matrix
    direct_steps: str = "auto"  # exact kernel Newton steps: auto (cheaper than the CG they replace), always, never
    cg_straggle: float = 0.125  # CG stops its last <= this fraction of problems once they lag (0: never)
    # sklearn backend (the benchmark's LinearSVC arguments)
    sklearn_tol: float = 1e-4
    sklearn_max_iter: int = 2000
    # cyanure backend
    cyanure_tol: float = 1e-6
    cyanure_max_iter: int = 2000

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise UserError(f"unknown svm backend {self.backend!r}; choose one of {', '.join(BACKENDS)}")
        if self.loss != "squared_hinge" and self.backend != "sklearn":
            raise UserError(f"svm loss {self.loss!r} is only available with svm.backend=sklearn "
                            "(the benchmark uses squared_hinge)")
        if self.loss not in ("squared_hinge", "hinge"):
            raise UserError(f"unknown svm loss {self.loss!r}; use squared_hinge or hinge")
        if self.direct_steps not in ("auto", "always", "never"):
            raise UserError(f"svm direct_steps must be auto, always or never, got {self.direct_steps!r}")
        if self.dtype not in ("float32", "float64"):
            raise UserError(f"svm dtype must be float32 or float64, got {self.dtype!r}")
        if not (self.pos_weight > 0 and self.neg_weight > 0 and self.intercept_scaling >= 0):
            raise UserError("svm class weights must be positive and intercept_scaling >= 0")

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> SVMConfig:
        d = dict(d or {})
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise UserError(f"unknown svm setting(s): {', '.join(sorted(unknown))}; "
                            f"known: {', '.join(cls.__dataclass_fields__)}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["class_weight"] = {"1": self.pos_weight, "-1": self.neg_weight}
        d["penalty"] = "l2 (bias regularised, liblinear convention)"
        return d


# ---------------------------------------------------------------------------- features and metrics


def check_features(x: np.ndarray, what: str = "features") -> None:
    """NaN/Inf or a feature matrix constant over all images (nothing to rank by) is a clear error."""
    if x.ndim != 2 or x.shape[0] == 0:
        raise BadFeatures(f"{what}: expected a non-empty (N, D) matrix, got shape {tuple(x.shape)}")
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        raise BadFeatures(f"{what}: {int(bad.sum())} of {len(x)} rows contain NaN/Inf "
                          f"(first row {int(np.argmax(bad))})")
    if x.shape[0] > 1 and not (x != x[:1]).any():
        raise BadFeatures(f"{what}: every image has the same feature vector (all zero?); an SVM cannot rank them")


def l2_normalize(x: np.ndarray, eps: float = 1e-5, dtype=np.float64) -> np.ndarray:
    """The benchmark's ``svm_helper.normalize_features``: x / (||x||_2 + 1e-5), row-wise, in float64."""
    out = np.asarray(x, dtype=dtype).copy()
    out /= (np.linalg.norm(out, axis=1) + eps)[:, None]
    return out


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
    """The primal objective above for one problem (rows with y == 0 are excluded), in float64."""
    x = np.asarray(x, dtype=np.float64)
    keep = y != 0
    xa = np.hstack([x[keep], np.full((int(keep.sum()), 1), config.intercept_scaling)])
    yy = np.where(y[keep] > 0, 1.0, -1.0)
    c = np.where(yy > 0, config.pos_weight, config.neg_weight)
    xi = np.maximum(0.0, 1.0 - yy * (xa @ w_aug))
    sq = xi**2 if config.loss == "squared_hinge" else xi
    return float(0.5 * w_aug @ w_aug + cost * np.sum(c * sq))


# ---------------------------------------------------------------------------- the solution object


@dataclass
class SVMSolution:
    """Weights of P problems in the original feature space: decision = x @ weight.T + bias."""

    weight: np.ndarray  # (P, D)
    bias: np.ndarray  # (P,)
    converged: np.ndarray  # (P,) bool
    iterations: np.ndarray  # (P,) Newton steps (torch) / solver iterations
    backend: str

    def decision(self, x: np.ndarray) -> np.ndarray:
        """(M, P) decision values, float64."""
        return np.asarray(x, dtype=np.float64) @ self.weight.T.astype(np.float64) + self.bias[None, :]

    def w_aug(self, p: int, intercept_scaling: float) -> np.ndarray:
        s = intercept_scaling if intercept_scaling else 1.0
        return np.concatenate([self.weight[p], [self.bias[p] / s]])


def _check_problems(x: np.ndarray, y: np.ndarray, costs: np.ndarray, col: np.ndarray | None = None) -> None:
    """Shapes of one batch: problem p uses label column ``col[p]`` of y (default: column p) and cost p."""
    if col is None:
        cols_ok = y.ndim == 2 and y.shape[1] == costs.shape[0]
    else:
        cols_ok = y.ndim == 2 and col.shape == costs.shape and int(col.max(initial=-1)) < y.shape[1]
    if not cols_ok or y.shape[0] != x.shape[0]:
        raise UserError(f"svm: labels {y.shape} / costs {costs.shape} do not match features {x.shape}")
    if not (costs > 0).all():
        raise UserError("svm costs must be positive")


def solve(x: np.ndarray, y: np.ndarray, costs: np.ndarray, config: SVMConfig, device: str = "cpu",
          progress: bool = False) -> SVMSolution:
    """Solve P binary problems on shared rows ``x`` (N, D): column p of ``y`` (N, P) holds +1/-1 for the
    rows in problem p and 0 for rows left out of it; ``costs`` (P,) the C of each problem."""
    y = np.asarray(y)
    costs = np.asarray(costs, dtype=np.float64).reshape(-1)
    _check_problems(x, y, costs)
    return solve_with_scores(x, y, costs, config, device, progress)[0]


def solve_with_scores(x: np.ndarray, y: np.ndarray, costs: np.ndarray, config: SVMConfig, device: str = "cpu",
                      progress: bool = False, keep: np.ndarray | None = None
                      ) -> tuple[SVMSolution, np.ndarray, np.ndarray]:
    """:func:`solve`, plus the (N, P) decision values of every problem on the rows of ``x`` and the (P,)
    convergence flags; the returned solution holds only the problems ``keep`` (default: all). The torch
    backend gets the scores from its margins for free and maps only the kept problems back to weights."""
    y = np.asarray(y)
    costs = np.asarray(costs, dtype=np.float64).reshape(-1)
    _check_problems(x, y, costs)
    keep = np.arange(y.shape[1]) if keep is None else np.asarray(keep, dtype=np.int64)
    if config.backend == "torch":
        run = _solve_torch(x, y, costs, config, device, progress, keep)
        return run.solution, run.scores, run.converged
    sol = _solve_sklearn(x, y, costs, config) if config.backend == "sklearn" else _solve_cyanure(x, y, costs, config)
    scores = sol.decision(x)
    part = SVMSolution(sol.weight[keep], sol.bias[keep], sol.converged[keep], sol.iterations[keep], sol.backend)
    return part, scores, sol.converged


# ---------------------------------------------------------------------------- torch backend


class _Rows:
    """An (N, r) matrix held as row blocks, each with only the columns that can be non-zero (``z @ d`` and
    ``z.T @ u`` as for a tensor). A lower-triangular factor cut into k trapezoids keeps and multiplies
    (k + 1) / 2k of the dense matrix: ~56 % at k = 8, in memory and in every CG matrix product."""

    def __init__(self, blocks: list[tuple[int, torch.Tensor]], n: int, r: int):
        self.blocks, self.shape = blocks, (n, r)
        self.dtype, self.device = blocks[0][1].dtype, blocks[0][1].device

    @classmethod
    def dense(cls, m: torch.Tensor) -> _Rows:
        return cls([(0, m)], m.shape[0], m.shape[1])

    @classmethod
    def lower(cls, low: torch.Tensor, dtype, parts: int = 8) -> _Rows:
        n = low.shape[0]
        cuts = sorted({n * i // parts for i in range(parts + 1)})
        return cls([(a, low[a:b, :b].to(dtype, copy=True)) for a, b in zip(cuts[:-1], cuts[1:])], n, n)

    def __matmul__(self, d: torch.Tensor) -> torch.Tensor:
        if len(self.blocks) == 1:
            return self.blocks[0][1] @ d
        out = torch.empty((self.shape[0], d.shape[1]), dtype=d.dtype, device=d.device)
        for a, blk in self.blocks:
            out[a:a + blk.shape[0]] = blk @ d[:blk.shape[1]]
        return out

    def rmatmul(self, u: torch.Tensor) -> torch.Tensor:
        if len(self.blocks) == 1:
            return self.blocks[0][1].T @ u
        out = torch.zeros((self.shape[1], u.shape[1]), dtype=u.dtype, device=u.device)
        for a, blk in self.blocks:
            out[:blk.shape[1]] += blk.T @ u[a:a + blk.shape[0]]
        return out

    @property
    def T(self) -> _RowsT:  # noqa: N802 (tensor-like)
        return _RowsT(self)

    def sym_gather(self, rows: torch.Tensor, mirror: bool = True) -> torch.Tensor:
        """K[rows][:, rows] (rows ascending) of a symmetric matrix held by :meth:`lower` (each row block keeps
        the columns up to its end, so its lower triangle is complete): gather the lower part block by block
        (the rows of block [a, b) are a contiguous run of ``rows``, their columns the run before it), then
        mirror it (``mirror=False``: only the lower triangle is meaningful, as a Cholesky factorisation
        reads it)."""
        out = torch.zeros((len(rows), len(rows)), dtype=self.dtype, device=self.device)
        ends = torch.searchsorted(rows, torch.tensor([a + blk.shape[0] for a, blk in self.blocks], device=rows.device))
        s0 = 0
        for (a, blk), s1 in zip(self.blocks, ends.tolist()):
            if s1 > s0:
                out[s0:s1, :s1] = blk.index_select(1, rows[:s1]).index_select(0, rows[s0:s1] - a)
            s0 = s1
        if not mirror:
            return out
        out.tril_()
        return out.add_(out.T.triu(1))

    @classmethod
    def gram_lower(cls, z: torch.Tensor, parts: int = 32) -> _Rows:
        """The Gram matrix z z^T as lower trapezoid row blocks, without forming the full N x N matrix."""
        n = z.shape[0]
        cuts = sorted({n * i // parts for i in range(parts + 1)})
        return cls([(a, z[a:b] @ z[:b].T) for a, b in zip(cuts[:-1], cuts[1:])], n, n)

    def solve_upper_t(self, v: torch.Tensor) -> torch.Tensor:
        """L^-T v for a lower-triangular matrix held by :meth:`lower` (block back-substitution)."""
        alpha = torch.empty_like(v)
        acc = torch.zeros_like(v)  # sum over later blocks of B_k[:, :a_k]^T alpha_k
        for a, blk in reversed(self.blocks):
            b = a + blk.shape[0]
            alpha[a:b] = torch.linalg.solve_triangular(blk[:, a:b].T, v[a:b] - acc[a:b], upper=True)
            if a:
                acc[:a] += blk[:, :a].T @ alpha[a:b]
        return alpha


class _RowsT:
    def __init__(self, rows: _Rows):
        self.rows = rows

    def __matmul__(self, u: torch.Tensor) -> torch.Tensor:
        return self.rows.rmatmul(u)


def _cholesky_in_place(k: torch.Tensor) -> torch.Tensor | None:
    """Lower Cholesky factor of the symmetric float64 CPU matrix k, overwriting k (LAPACK potrf in place: the
    Gram matrix and its factor never coexist); None when k is not numerically positive definite."""
    if k.device.type != "cpu":
        chol, info = torch.linalg.cholesky_ex(k)
        return chol if int(info) == 0 else None
    import scipy.linalg

    a = k.numpy().T  # Fortran-ordered view of the same (symmetric) matrix: potrf works on it in place
    try:
        c = scipy.linalg.cholesky(a, lower=True, overwrite_a=True, check_finite=False)
    except np.linalg.LinAlgError:
        return None
    return torch.from_numpy(c)


class _Basis:
    """Coordinates ``z`` (N, r) of the augmented rows ``Xa = [X, s]`` with ``z z^T = Xa Xa^T``, and the map back.

    - primal (D + 1 <= N, or the Gram route below fails): ``z = Xa``, ``w = v``.
    - span (D + 1 > N): the optimum of an L2-regularised linear model lies in the row span, so with the
      Cholesky factor ``Xa Xa^T = L L^T`` (float64) the coordinates ``z = L`` and ``w = Xa^T L^-T v`` are
      an isometry (``||w|| = ||v||``, ``Xa w = z v``): the same objective in N instead of D + 1 unknowns.
      L is lower-triangular, so it is held as trapezoid row blocks (:class:`_Rows`): in the solver's dtype
      for the CG products and in float64 for the exact gradients, margins and the map back.

    Only the caller's ``x`` is read; Xa is never materialised in the span route (column chunks).
    """

    def __init__(self, x: np.ndarray, scaling: float, dtype, device, col_chunk: int = 1024):
        self.x, self.n, self.d = x, x.shape[0], x.shape[1]
        self.scaling, self.dtype, self.device, self.col_chunk = float(scaling), dtype, device, col_chunk
        self.chol, self._gram = None, None
        if self.d + 1 > self.n:
            k = torch.full((self.n, self.n), self.scaling**2, dtype=torch.float64, device=device)
            for c in range(0, self.d, col_chunk):
                xc = torch.as_tensor(x[:, c:c + col_chunk], device=device).to(dtype)
                k += (xc @ xc.T).double()
                del xc
            # for the direct steps' K_AA (k itself becomes the factor); only gathered from, so in thin
            # trapezoids (~52 % of N x N at 32 parts)
            self._gram = _Rows.lower(k, dtype, parts=32)
            chol = _cholesky_in_place(k)
            del k
            if chol is not None:
                self.chol = _Rows.lower(chol, torch.float64)
                self.z = _Rows.lower(chol, dtype)
            else:  # a (numerically) rank-deficient Gram matrix -> primal coordinates
                self._gram = None
            del chol
        if self.chol is None:
            z = torch.empty((self.n, self.d + 1), dtype=dtype, device=device)
            for c in range(0, self.d, col_chunk):
                e = min(self.d, c + col_chunk)
                z[:, c:e].copy_(torch.as_tensor(x[:, c:e], device=device))  # converted in the copy
            z[:, self.d] = self.scaling
            self.z = _Rows.dense(z)
        self.r = self.z.shape[1]

    def hi_matvec(self, v: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """z v in float64 (N, P) for float64 v (r, P): the exact margins behind the convergence test (written
        into ``out`` when given and z is the caller's float64 rows)."""
        if self.chol is not None:
            return self.chol @ v
        if self.z.dtype == torch.float64:
            return self.z @ v
        if out is None:
            out = torch.empty((self.n, v.shape[1]), dtype=torch.float64, device=v.device)
        for a, xc in self._x_rows():
            torch.addmm(self.scaling * v[self.d], xc, v[:self.d], out=out[a:a + xc.shape[0]])
        return out

    def hi_rmatvec(self, u: torch.Tensor) -> torch.Tensor:
        """z^T u in float64 (r, P) for float64 u (N, P): the exact gradient."""
        if self.chol is not None:
            return self.chol.T @ u
        if self.z.dtype == torch.float64:
            return self.z.T @ u
        out = torch.zeros((self.d + 1, u.shape[1]), dtype=torch.float64, device=u.device)
        for a, xc in self._x_rows():
            out[:self.d] += xc.T @ u[a:a + xc.shape[0]]
        out[self.d] = self.scaling * u.sum(0)
        return out

    def _x_rows(self, rows: int = 1024):
        """Row blocks of the caller's features as float64 tensors: all rows at once, without a copy, when x is
        float64 and C-ordered on the CPU; else blocks converted one at a time."""
        if self.x.dtype == np.float64 and self.x.flags.c_contiguous and torch.device(self.device).type == "cpu":
            yield 0, torch.from_numpy(self.x)
            return
        for a in range(0, self.n, rows):
            yield a, torch.as_tensor(self.x[a:a + rows], device=self.device).double()

    def kernel(self, rows: torch.Tensor) -> torch.Tensor:
        """The lower triangle of K_AA = z_A z_A^T for the rows A (a new tensor; the strict upper part is not
        filled in), from the Gram matrix kept as lower trapezoid blocks (~52 % of N x N, formed on first use in
        primal coordinates)."""
        if self._gram is None:
            self._gram = _Rows.gram_lower(self.z.blocks[0][1])  # primal coordinates: one dense block
        return self._gram.sym_gather(rows, mirror=False)

    def weights(self, v: torch.Tensor) -> np.ndarray:
        """(D + 1, P) float64 augmented weights of coordinates v (r, P)."""
        if self.chol is None:
            return v.double().cpu().numpy()
        alpha = self.chol.solve_upper_t(v.double())  # L^-T v  (N, P)
        out = np.empty((self.d + 1, v.shape[1]))
        for c in range(0, self.d, self.col_chunk):
            xc = torch.as_tensor(self.x[:, c:c + self.col_chunk], device=self.device).double()
            out[c:c + xc.shape[1]] = (xc.T @ alpha).cpu().numpy()
        out[self.d] = self.scaling * alpha.sum(0).cpu().numpy()
        return out


@dataclass
class _Precond:
    """Top-k eigenpairs of z^T z (randomised subspace iteration): q (r, k) orthonormal, w2 = (z q)^2 (N, k).

    For problem p with active row weights a_p, the curvature of H_p = I + 2C z^T diag(a_p) z along q_j is
    1 + 2C (w2^T a_p)_j; the preconditioner inverts H_p on span(q) by that diagonal and is the identity
    elsewhere (Nystrom-style PCG, Frangella et al. 2021, with the active set taken into account)."""

    q: torch.Tensor
    w2: torch.Tensor

    @classmethod
    def build(cls, z: torch.Tensor, rank: int, iters: int = 3, seed: int = 0) -> _Precond | None:
        n, r = z.shape
        k = min(int(rank), r, n)
        if k <= 0:
            return None
        gen = torch.Generator(device=z.device).manual_seed(seed)
        q = torch.randn((r, k), generator=gen, device=z.device, dtype=torch.float64)
        for _ in range(iters):
            q = torch.linalg.qr(q).Q.to(z.dtype)
            q = (z.T @ (z @ q)).double()
        q = torch.linalg.qr(q).Q.to(z.dtype)
        w = z @ q
        _, u = torch.linalg.eigh((w.T @ w).double())
        u = u.to(z.dtype)
        return cls(q @ u, (w @ u) ** 2)

    def factors(self, act: torch.Tensor, cost: torch.Tensor) -> torch.Tensor:
        """(k, P): 1 / (1 + 2C curvature) - 1 along each top direction."""
        return 1.0 / (1.0 + 2.0 * cost * (self.w2.T @ act)) - 1.0

    def apply(self, u: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        return u + self.q @ (f * (self.q.T @ u))


def _inside(m: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """y m < 1 for labels y in {-1, 0, 1} (bool), without a float temporary of m's size."""
    return ((y > 0) & (m < 1)) | ((y < 0) & (m > -1)) | (y == 0)


def _line_search(vd, dd, m, e, y, a_w, cost, t0=1.0, iters=30, cols: int = 32):
    """Exact minimiser over t >= 0 of phi(t) = f(v + t d) for each problem (safeguarded Newton on phi',
    which is increasing and piecewise linear). v.d (P,), d.d (P,), margins m (float64), directions e = z d
    (N, P); y, a_w and e may be in the solver's dtype (promoted to float64 ``cols`` problems at a time, so
    the search's temporaries stay small whatever the batch)."""
    p = m.shape[1]
    if p > cols:
        t0 = torch.as_tensor(t0, dtype=vd.dtype, device=vd.device).expand_as(vd)
        return torch.cat([_line_search(vd[a:a + cols], dd[a:a + cols], m[:, a:a + cols], e[:, a:a + cols],
                                       y[:, a:a + cols], a_w[:, a:a + cols], cost[a:a + cols], t0[a:a + cols],
                                       iters, cols) for a in range(0, p, cols)])
    e = e.double()

    def deriv(t):
        mt = m + t * e
        act = a_w * _inside(mt, y)
        d1 = vd + t * dd + 2 * cost * (act * (mt - y) * e).sum(0)
        d2 = dd + 2 * cost * (act * e * e).sum(0)
        return d1, d2

    eps = 1e-12 if vd.dtype == torch.float64 else 1e-6
    lo = torch.zeros_like(vd)
    hi = torch.as_tensor(t0, dtype=vd.dtype, device=vd.device).expand_as(vd).clone()
    d1, _ = deriv(hi)
    for _ in range(60):  # expand until phi'(hi) >= 0
        grow = d1 < 0
        if not grow.any():
            break
        lo = torch.where(grow, hi, lo)
        hi = torch.where(grow, hi * 2, hi)
        d1, _ = deriv(hi)
    t = hi.clone()
    for _ in range(iters):
        d1, d2 = deriv(t)
        lo = torch.where(d1 < 0, t, lo)
        hi = torch.where(d1 > 0, t, hi)
        newton = t - d1 / d2.clamp_min(1e-300)
        inside = (newton > lo) & (newton < hi)
        t_new = torch.where(inside, newton, 0.5 * (lo + hi))
        done = (t_new - t).abs() <= eps * t.abs().clamp_min(1e-12)
        t = t_new
        if done.all():
            break
    return t


def _pcg(z, pre: _Precond | None, act, cost, g, stop, max_cg, straggle: float = 0.0):
    """Per-problem preconditioned CG on H_p s = -g_p, H_p = I + 2C_p z^T diag(act_p) z, all problems in one
    pair of matmuls per step; a problem leaves the batch when ||residual|| <= stop. Returns s, e = z s and
    the steps taken.

    ``straggle`` > 0 truncates the tail: once at most that fraction of the batch is left and the survivors
    have run twice as many steps as it took half the batch to finish, they stop with their current iterate
    (a CG iterate from 0 is a descent direction; the outer Newton loop finishes them). Single-column matrix
    products are memory-bound, so a few stragglers would otherwise cost as much as the whole batch."""
    p_all = g.shape[1]
    s_out, e_out = torch.zeros_like(g), torch.zeros((z.shape[0], p_all), dtype=g.dtype, device=g.device)
    n_it = torch.zeros(p_all, dtype=torch.int64, device=g.device)
    idx = torch.arange(p_all, device=g.device)
    f = pre.factors(act, cost) if pre is not None else None
    res = -g
    zr = pre.apply(res, f) if pre is not None else res
    d, rz = zr.clone(), (res * zr).sum(0)  # a copy: res is updated in place (and is zr without a preconditioner)
    s, e = torch.zeros_like(g), torch.zeros_like(e_out)
    half_at = None
    for it in range(1, max_cg + 1):
        n_it[idx] += 1
        zd = z @ d
        hd = (z.T @ (act * zd)).mul_(2 * cost).add_(d)  # H d
        alpha = rz / (d * hd).sum(0).clamp_min(1e-300)
        s.addcmul_(d, alpha)
        e.addcmul_(zd, alpha)
        res.addcmul_(hd, alpha, value=-1.0)
        fin = res.double().norm(dim=0) <= stop
        left = len(idx) - int(fin.sum())
        if half_at is None and left <= p_all // 2:
            half_at = it
        if straggle > 0 and half_at is not None and left <= straggle * p_all and it >= 2 * half_at + 5:
            fin = torch.ones_like(fin)
        if fin.any():
            s_out[:, idx[fin]], e_out[:, idx[fin]] = s[:, fin], e[:, fin]
            keep = ~fin
            if not keep.any():
                return s_out, e_out, n_it
            idx, s, e, res, d, rz = idx[keep], s[:, keep], e[:, keep], res[:, keep], d[:, keep], rz[keep]
            act, cost, stop = act[:, keep], cost[keep], stop[keep]
            f = f[:, keep] if f is not None else None
        zr = pre.apply(res, f) if pre is not None else res
        rz_new = (res * zr).sum(0)
        d = zr + (rz_new / rz.clamp_min(1e-300)) * d
        rz = rz_new
    s_out[:, idx], e_out[:, idx] = s, e
    return s_out, e_out, n_it


def _direct_steps(basis: _Basis, act, cost, g):
    """Exact Newton directions s = -H^-1 g for the given problems (Chapelle 2007, squared hinge), through the
    Woodbury identity on the active set A: H = I + z_A^T D z_A, D = diag(2 C c_A), so
    s = -g + z_A^T (D^-1 + K_AA)^-1 z_A g -- one Cholesky of size |A| per problem instead of many CG steps
    when C is large and the active set small. Taken from the (float64) gradient, so a rounded K only slows
    convergence down, never stops it at the float32 precision floor."""
    z = basis.z
    zg = z @ g
    beta = torch.zeros_like(zg)
    for j in range(g.shape[1]):
        rows = (act[:, j] > 0).nonzero().squeeze(1)
        if len(rows) == 0:
            continue
        dinv = 1.0 / (2.0 * cost[j] * act[rows, j])
        kaa = basis.kernel(rows)
        kaa.diagonal().add_(dinv)
        chol, info = torch.linalg.cholesky_ex(kaa)  # reads the lower triangle only
        del kaa
        if int(info) != 0:  # not positive definite in the solver's dtype: float64
            kaa = basis.kernel(rows).double()
            kaa.diagonal().add_(dinv.double())
            chol = torch.linalg.cholesky(kaa).to(z.dtype)
            del kaa
        beta[rows, j] = torch.cholesky_solve(zg[rows, j:j + 1], chol).squeeze(1)
    return -g + z.T @ beta


def _newton_step(basis, pre, yl, al, cl, vl, ml, act, g, gn, g0l, hist, config: SVMConfig):
    """One truncated Newton step for the live problems: a direction from CG or from the exact kernel
    formula, both in the solver's dtype, then the exact line search in float64 (vl, ml, g float64).
    Returns the step t * s (float64), the direction's margins z s (solver dtype) with the step length t,
    and whether each problem's iterate froze."""
    z = basis.z
    n, r = z.shape
    eta = torch.minimum(torch.full_like(gn, config.cg_forcing), (gn / g0l.clamp_min(1e-300)).sqrt())
    # direct (Cholesky) step where it costs less than the CG steps this problem needed last time
    n_act = (act > 0).sum(0).double()
    if config.direct_steps == "auto":
        direct = 2 * n_act**3 / 3 <= hist * 4.0 * n * r
    else:
        direct = torch.full_like(n_act, config.direct_steps == "always", dtype=torch.bool)
    gl = g.to(z.dtype)
    cg_idx, dir_idx = (~direct).nonzero().squeeze(1), direct.nonzero().squeeze(1)
    if not len(dir_idx):  # all by CG (the common case): no scatter into zeroed (N, P) buffers
        s, e, n_it = _pcg(z, pre, act, cl, gl, eta * gn, config.max_cg, straggle=config.cg_straggle)
        hist.copy_(n_it)
    else:
        s = torch.zeros_like(gl)
        e = torch.zeros((n, gl.shape[1]), dtype=z.dtype, device=z.device)
        if len(cg_idx):
            s_c, e_c, n_it = _pcg(z, pre, act[:, cg_idx], cl[cg_idx], gl[:, cg_idx], (eta * gn)[cg_idx],
                                  config.max_cg, straggle=config.cg_straggle)
            s[:, cg_idx], e[:, cg_idx] = s_c, e_c
            hist[cg_idx] = n_it.double()
        s_d = _direct_steps(basis, act[:, dir_idx], cl[dir_idx], gl[:, dir_idx])
        s[:, dir_idx], e[:, dir_idx] = s_d, z @ s_d
    s = s.double()
    t = _line_search((vl * s).sum(0), (s * s).sum(0), ml, e, yl, al, cl.double())
    step = t * s
    # a problem whose iterate no longer moves (the float64 precision floor) stops making progress
    frozen = step.norm(dim=0) <= 10 * torch.finfo(torch.float64).eps * (vl + step).norm(dim=0)
    return step, e, t, frozen


def _chains(y: np.ndarray, costs: np.ndarray, col: np.ndarray) -> list[list[int]]:
    """Problems with identical label columns (same rows, same signs; problem p's column is ``y[:, col[p]]``),
    each list sorted by increasing cost: a cost path solved in order, each problem warm-started from the
    previous cost's solution."""
    digest = {}  # of each column's signs (not a copy of N bytes per problem)
    groups: dict[bytes, list[int]] = {}
    for p in range(len(costs)):
        u = int(col[p])
        if u not in digest:
            digest[u] = hashlib.blake2b(np.sign(y[:, u]).astype(np.int8).tobytes(), digest_size=32).digest()
        groups.setdefault(digest[u], []).append(p)
    return [sorted(g, key=lambda p: (costs[p], p)) for g in groups.values()]


@dataclass
class _Run:
    solution: SVMSolution  # problems `keep` only
    scores: np.ndarray | None  # (N, P) decision values on the training rows, every problem (solver's dtype)
    converged: np.ndarray  # (P,)
    iterations: np.ndarray  # (P,)


def _chunk_size(n: int, r: int, d: int, config: SVMConfig) -> int:
    """Problems per batch (slots) so that ~14 float32-equivalent vectors of length max(N, r) per problem stay
    within memory_fraction x the float32 feature matrix (N x D); a rough model, see the benchmark's
    measured memory."""
    per_problem = 14 * max(n, r) * 4
    budget = config.memory_fraction * n * max(d, 1) * 4
    return int(max(1, min(config.max_problems, budget // per_problem)))


class _Slots:
    """The batch: S slots, each running one cost path (chain) problem after problem.

    A slot whose problem converges records it and immediately takes the next cost of its chain (warm-started
    from the solution it holds) or, when the chain is done, the next chain (cold start). So the batch stays
    full while problems finish at different times: no cost-by-cost synchronisation with a tail of one or
    two slow problems running as memory-bound matrix-vector products."""

    def __init__(self, basis: _Basis, y, col, costs, chains, n_slots: int, config: SVMConfig, device):
        self.basis, self.y, self.col, self.costs, self.chains, self.config = basis, y, col, costs, chains, config
        n, r, dt = basis.n, basis.r, basis.z.dtype
        # the iterate and its margins in float64: with float32 storage, rounding v alone moves the gradient of
        # an ill-conditioned (large C) problem by more than the tolerance; directions stay in the solver dtype
        self.v = torch.zeros((r, n_slots), dtype=torch.float64, device=device)
        self.m = torch.zeros((n, n_slots), dtype=torch.float64, device=device)
        self.ys = torch.zeros((n, n_slots), dtype=dt, device=device)
        self.aw = torch.zeros((n, n_slots), dtype=dt, device=device)
        self.cost = torch.zeros(n_slots, dtype=dt, device=device)
        self.g0_unit = torch.zeros(n_slots, dtype=torch.float64, device=device)
        self.hist = torch.zeros(n_slots, dtype=torch.float64, device=device)  # CG steps of the last CG Newton step
        self.its = torch.zeros(n_slots, dtype=torch.int64, device=device)
        self.stall = torch.zeros(n_slots, dtype=torch.int64, device=device)
        self.active = torch.zeros(n_slots, dtype=torch.bool, device=device)
        self.g = torch.zeros((r, n_slots), dtype=torch.float64, device=device)  # gradient at v (float64)
        self.gn = torch.zeros(n_slots, dtype=torch.float64, device=device)
        self.chain = [-1] * n_slots
        self.level = [0] * n_slots
        self.next_chain = 0

    def problem(self, s: int) -> int:
        return self.chains[self.chain[s]][self.level[s]]

    def every(self, idx: torch.Tensor) -> bool:
        """Whether the (ascending) slot indices idx are all the slots: then column views replace copies."""
        return len(idx) == self.v.shape[1]

    def cols(self, t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """t[:, idx]: a view when idx is every slot, else a copy."""
        return t if self.every(idx) else t[:, idx]

    def gradient(self, idx) -> None:
        """g = v + 2C z^T (c * active * (m - y)) in float64 for the slots idx (the convergence test's gradient)."""
        y, m = self.cols(self.ys, idx), self.cols(self.m, idx)
        u = (m - y).mul_(self.cols(self.aw, idx)).masked_fill_(~_inside(m, y), 0.0)
        self.g[:, idx] = self.cols(self.v, idx) + 2 * self.cost[idx].double() * self.basis.hi_rmatvec(u)
        del u
        self.gn[idx] = self.cols(self.g, idx).norm(dim=0)

    def g0(self, idx):
        return 2 * self.cost[idx].double() * self.g0_unit[idx]

    def load(self, slots: list[int]) -> None:
        """Put each slot's current (chain, level) problem in place: labels, weights, cost and the start point."""
        if not slots:
            return
        cfg, z = self.config, self.basis.z
        idx = torch.as_tensor(slots, device=self.v.device)
        probs = [self.problem(s) for s in slots]
        yt = torch.as_tensor(np.sign(self.y[:, self.col[probs]]).astype(np.float32), device=self.v.device).to(z.dtype)
        self.ys[:, idx] = yt
        self.aw[:, idx] = torch.where(yt > 0, cfg.pos_weight, torch.where(yt < 0, cfg.neg_weight, 0.0)).to(yt.dtype)
        self.cost[idx] = torch.as_tensor(self.costs[probs], device=self.v.device).to(z.dtype)
        cold = [i for i, s in enumerate(slots) if self.level[s] == 0]
        warm = [i for i, s in enumerate(slots) if self.level[s] > 0]
        if cold:
            c = idx[cold]
            self.v[:, c], self.m[:, c], self.hist[c] = 0, 0, 0
            self.g0_unit[c] = (z.T @ (self.aw[:, c] * self.ys[:, c])).double().norm(dim=0)
        if warm:  # the previous cost's solution, rescaled by the exact minimiser along that ray
            w = idx[warm]
            prev = np.array([self.chains[self.chain[slots[i]]][self.level[slots[i]] - 1] for i in warm])
            ratio = torch.as_tensor(self.costs[[probs[i] for i in warm]] / self.costs[prev], device=self.v.device)
            vw, mw = self.v[:, w], self.m[:, w]
            t = _line_search(torch.zeros_like(vw[0]), (vw * vw).sum(0), torch.zeros_like(mw), mw,
                             self.ys[:, w], self.aw[:, w], self.cost[w].double(), t0=ratio)
            self.v[:, w], self.m[:, w] = vw * t, mw * t
        self.its[idx], self.stall[idx] = 0, 0
        self.active[idx] = True

    def start(self) -> None:
        slots = []
        for s in range(len(self.chain)):
            if self.next_chain < len(self.chains):
                self.chain[s], self.level[s] = self.next_chain, 0
                self.next_chain += 1
                slots.append(s)
        self.load(slots)

    def advance(self, slots: list[int]) -> list[int]:
        """Finished slots take the next cost of their chain, else the next chain, else go idle; returns the
        slots that took a new problem."""
        reload = []
        for s in slots:
            if self.level[s] + 1 < len(self.chains[self.chain[s]]):
                self.level[s] += 1
            elif self.next_chain < len(self.chains):
                self.chain[s], self.level[s] = self.next_chain, 0
                self.next_chain += 1
            else:
                self.active[s] = False
                continue
            reload.append(s)
        self.load(reload)
        return reload


def _solve_torch(x, y, costs, config: SVMConfig, device: str, progress: bool, keep=None,
                 on_scores=None, col=None) -> _Run:
    """``on_scores(problems, margins)``, when given, receives each finished problem's (N, len) margins on the
    training rows instead of an (N, P) array being kept (``_Run.scores`` is then None); it may return kept
    problems whose solutions are no longer wanted (their rows in the solution are then NaN). ``col`` (P,), when
    given, says which column of ``y`` each problem uses (problems that differ only in cost share one)."""
    dtype = torch.float64 if config.dtype == "float64" else torch.float32
    n, d = x.shape
    p_total = len(costs)
    col = np.arange(p_total) if col is None else np.asarray(col)
    keep = np.arange(p_total) if keep is None else np.asarray(keep)
    basis = _Basis(x, config.intercept_scaling, dtype, device)
    z = basis.z
    pre = _Precond.build(z, config.precond_rank) if config.precond_rank > 0 else None
    chains = _chains(y, costs, col) if config.warm_start else [[p] for p in range(p_total)]
    scores = None if on_scores else np.zeros((n, p_total), dtype=np.float32 if dtype == torch.float32 else np.float64)
    converged = np.zeros(p_total, dtype=bool)
    iterations = np.zeros(p_total, dtype=np.int64)
    keep_set = {int(p) for p in keep}
    kept: dict[int, torch.Tensor] = {}  # finished problems of `keep`: their coordinates
    dropped: set[int] = set()
    sl = _Slots(basis, y, col, costs, chains, min(_chunk_size(n, basis.r, d, config), len(chains)), config, device)
    sl.start()
    from tqdm import tqdm

    bar = tqdm(total=p_total, desc="svm", disable=not progress or p_total <= 1)
    steps = 0
    stale = sl.active.nonzero().squeeze(1)  # slots whose gradient must be (re)computed
    while bool(sl.active.any()):
        if len(stale):
            sl.gradient(stale)
        live = sl.active.nonzero().squeeze(1)
        g, gn, g0l = sl.g[:, live], sl.gn[live], sl.g0(live)
        ok = gn <= config.tol * g0l
        done = ok | (sl.its[live] >= config.max_newton) | (sl.stall[live] >= 2)
        if bool(done.any()):
            fin = live[done].tolist()
            probs = [sl.problem(s) for s in fin]
            if on_scores is None:
                scores[:, probs] = sl.m[:, fin].cpu().numpy()
            else:
                gone = on_scores(probs, sl.m[:, fin].cpu().numpy()) or ()
                dropped.update(int(p) for p in gone)
                for p in gone:
                    kept.pop(int(p), None)
            converged[probs] = ok[done].cpu().numpy()
            iterations[probs] = sl.its[fin].cpu().numpy()
            for s, p in zip(fin, probs):
                if p in keep_set and p not in dropped:
                    kept[p] = sl.v[:, s].clone()
            bar.update(len(fin))
            stale = torch.as_tensor(sl.advance(fin), dtype=torch.int64, device=device)
            continue
        yl, al, cl, vl, ml = sl.cols(sl.ys, live), sl.cols(sl.aw, live), sl.cost[live], sl.cols(sl.v, live), \
            sl.cols(sl.m, live)
        act = al * _inside(ml, yl)
        hist = sl.hist[live]  # a copy (advanced indexing): _newton_step updates it, written back below
        step, e, t, frozen = _newton_step(basis, pre, yl, al, cl, vl, ml, act, g, gn, g0l, hist, config)
        del act
        sl.hist[live] = hist
        vl.add_(step)
        ml.addcmul_(e, t)
        del e
        if not sl.every(live):  # vl, ml were copies
            sl.v[:, live], sl.m[:, live] = vl, ml
        sl.stall[live] = torch.where(frozen, sl.stall[live] + 1, 0)
        sl.its[live] += 1
        steps += 1
        if steps % 8 == 0:  # exact margins: no drift from the incremental (solver-dtype) updates
            if sl.every(live):
                sl.m = basis.hi_matvec(sl.v, out=sl.m)
            else:
                sl.m[:, live] = basis.hi_matvec(sl.v[:, live])
        stale = live
    bar.close()
    w_aug = np.full((d + 1, len(keep)), np.nan)
    have = [i for i, p in enumerate(keep) if int(p) in kept]
    if have:
        w_aug[:, have] = basis.weights(torch.stack([kept[int(keep[i])] for i in have], dim=1))
    sol = SVMSolution(np.ascontiguousarray(w_aug[:d].T), w_aug[d] * config.intercept_scaling, converged[keep],
                      iterations[keep], "torch")
    return _Run(sol, scores, converged, iterations)


# ---------------------------------------------------------------------------- reference backends


def _problem_rows(y: np.ndarray, p: int) -> tuple[np.ndarray, np.ndarray]:
    keep = np.nonzero(y[:, p] != 0)[0]
    return keep, np.where(y[keep, p] > 0, 1, -1).astype(np.int32)


def _solve_per_problem(x, y, costs, config: SVMConfig, name: str, fit_one) -> SVMSolution:
    """Solve each problem on its own with a reference solver ``fit_one(x_rows, y_pm1, cost) -> (w, b, ok, iters)``.

    A problem with a single class (the reference solvers refuse it) is the same objective, solved by ours.
    """
    x64 = np.asarray(x, dtype=np.float64)
    p_total, d = y.shape[1], x.shape[1]
    weight, bias = np.zeros((p_total, d)), np.zeros(p_total)
    converged, iterations = np.ones(p_total, dtype=bool), np.zeros(p_total, dtype=np.int64)
    for p in range(p_total):
        rows, yp = _problem_rows(y, p)
        if len(np.unique(yp)) < 2:
            one = _solve_torch(x64, y[:, p:p + 1], costs[p:p + 1], config, "cpu", False).solution
            weight[p], bias[p] = one.weight[0], one.bias[0]
            continue
        weight[p], bias[p], converged[p], iterations[p] = fit_one(x64[rows], yp, float(costs[p]))
    return SVMSolution(weight, bias, converged, iterations, name)


def _solve_sklearn(x, y, costs, config: SVMConfig) -> SVMSolution:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.svm import LinearSVC

    def fit_one(xp, yp, cost):
        clf = LinearSVC(C=cost, class_weight={1: config.pos_weight, -1: config.neg_weight},
                        intercept_scaling=config.intercept_scaling, penalty="l2", loss=config.loss,
                        tol=config.sklearn_tol, dual=True, max_iter=config.sklearn_max_iter, random_state=0)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            clf.fit(xp, yp)
        ok = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
        return clf.coef_[0], float(clf.intercept_[0]), ok, int(np.max(clf.n_iter_))

    return _solve_per_problem(x, y, costs, config, "sklearn", fit_one)


def _solve_cyanure(x, y, costs, config: SVMConfig) -> SVMSolution:
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


# ---------------------------------------------------------------------------- the cross-validated sweep


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


def cv_sweep(x: np.ndarray, labels: np.ndarray, costs: list[float], folds: int, config: SVMConfig,
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
        _check_problems(x, y, cvec, col)
        run = _solve_torch(x, y, cvec, config, device, progress, refits, on_scores=score_folds, col=col)
        sol, converged = run.solution, run.converged
    else:
        sol, scores, converged = solve_with_scores(x, y[:, col], cvec, config, device=device, progress=progress,
                                                   keep=refits)
        score_folds(range(n_prob), scores)
    chosen = np.argmax(cv_ap.mean(axis=2), axis=1)
    pick = np.array([j * nc + chosen[j] for j in range(k)])  # positions in `refits`
    final = SVMSolution(sol.weight[pick], sol.bias[pick], sol.converged[pick], sol.iterations[pick], sol.backend)
    return SweepResult(list(costs), cv_ap, chosen, final, folds, int((~converged).sum()))


def finite_mean(values, nan_policy: str) -> tuple[float | None, list[int]]:
    """Mean of per-class APs: ``nan`` -> None if any is NaN; ``exclude`` -> mean of the defined ones."""
    arr = np.asarray(values, dtype=np.float64)
    undefined = [int(i) for i in np.nonzero(~np.isfinite(arr))[0]]
    if not undefined:
        return float(arr.mean()), []
    if nan_policy == "exclude" and len(undefined) < len(arr):
        return float(arr[np.isfinite(arr)].mean()), undefined
    return None, undefined

