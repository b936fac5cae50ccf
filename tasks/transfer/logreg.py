"""Batched L2-regularised multinomial logistic regression over a regularisation path, in torch (CPU or CUDA),
and the Ericsson et al. 2021 model-selection protocol around it.

The problem, for one value of ``C`` (what ``sklearn.linear_model.LogisticRegression(C=C, solver="lbfgs")``
minimises for K >= 3 classes: the intercept is not penalised)::

    min_{W, b}  sum_i [ logsumexp(x_i W + b) - (x_i W + b)_{y_i} ]  +  1 / (2 C) ||W||^2

with W (d, K) and b (K,). The reference (ssl-transfer ``linear.py``) calls ``LogisticRegression(solver="lbfgs",
multi_class="multinomial", warm_start=True)`` from scikit-learn 0.22, which for two classes (its per-class VOC
fits) still fits this two-class softmax (and reports ``coef_`` of class 1); today's scikit-learn fits a
binomial model there, which is the same model at ``2 C``. We fit the two-class softmax, as the reference did.

How it is solved (:func:`fit_path`):

- Every value of ``C`` (and, for multi-label targets, every label column) is one problem of a single batched
  problem: coefficients ``[d + 1, problems, K]``, one matrix product ``X @ W`` per function evaluation for all.
- Exact reparameterisation: X is centred (the unpenalised intercept absorbs the mean) and rotated onto the
  eigenvectors of its covariance (``V``, orthonormal, so ``||W||`` and the minimiser are unchanged; when
  n < d only the n-dimensional span of the rows is kept, where the minimiser lies). In those coordinates the
  feature second moments are ``diag(lambda)``, and L-BFGS starts every update from the Kronecker model of the
  Hessian at the current point, ``diag(mean_i p_ik (1 - p_ik) * lambda_j + 1/C)`` (exact at ``W = 0`` up to
  the class-sum direction), instead of a multiple of the identity, scaled up by the curvature the last step
  met where it exceeds the model's (``s'y / s' diag s``), so that the unit step is accepted more often.
- L-BFGS (not Newton: the Hessian has ``(d + 1) K`` rows, 200k for 2048 x 100), batched two-loop recursion,
  per-problem backtracking line search (Armijo, or the approximate Wolfe conditions of Hager & Zhang that
  stay decidable in float32); converged problems leave the batch.
- Warm starts along the path: the values are solved from the smallest ``C`` up, ``block`` of them at a time
  (default 3), each problem of a block started from the solution at the largest ``C`` solved so far or from the
  path extrapolated in ``log C`` (the quadratic through three solved values): one that already passes the
  gradient test, else the one with the lower objective (``block=None``: all values in one batch, from zero).
- Stopping: scikit-learn's L-BFGS-B tests, ``max |gradient| <= tol`` of the objective divided by n (its
  ``gtol``), measured in the original coordinates, or (float64) a relative decrease of f below 64 eps (its
  ``ftol``). Matrix products run in ``dtype`` (float32: the rotated features rounded to float32, a
  perturbation of the order of float32 features' own rounding); losses are summed and every test is made in
  float64. A float32 problem that stops decreasing before ``tol`` is finished with float64 products.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

Metric = str  # "top1" | "mean_per_class" | "map11"


# --- the objective, as pure functions (float64 numpy; tests and gradient checks) -------------------------------


def objective(x: np.ndarray, y: np.ndarray, coef: np.ndarray, intercept: np.ndarray, C: float) -> float:
    """``sum_i logloss_i + ||coef||^2 / (2 C)``; x (n, d), y (n,) class indices, coef (d, K), intercept (K,)."""
    z = np.asarray(x, np.float64) @ coef + intercept
    zmax = z.max(axis=1, keepdims=True)
    lse = zmax[:, 0] + np.log(np.exp(z - zmax).sum(axis=1))
    return float(np.sum(lse - z[np.arange(len(y)), y]) + 0.5 / C * np.sum(coef * coef))


def gradient(x: np.ndarray, y: np.ndarray, coef: np.ndarray, intercept: np.ndarray,
             C: float) -> tuple[np.ndarray, np.ndarray]:
    """Gradient of :func:`objective` with respect to (coef, intercept)."""
    x = np.asarray(x, np.float64)
    z = x @ coef + intercept
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    p[np.arange(len(y)), y] -= 1.0
    return x.T @ p + coef / C, p.sum(axis=0)


# --- the protocol's grid and split ------------------------------------------------------------------------------


def reference_costs(n_values: int = 45) -> np.ndarray:
    """The reference's C values, in its order: ``C = 1 / wd.item()`` for ``wd`` in ``torch.logspace(-6, 5, 45)``
    (float32, so e.g. 1e-4 gives C = 10000.000252621256), i.e. from C = 1e6 down to 1e-5."""
    return np.array([1.0 / w.item() for w in torch.logspace(-6, 5, n_values)])


def reference_val_split(n: int, valid_size: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, val rows) for a dataset without a validation split: the reference shuffles
    ``list(range(n))`` after ``np.random.seed(0)`` and holds out the first ``floor(0.2 n)``."""
    indices = list(range(n))
    np.random.RandomState(seed).shuffle(indices)  # the same stream as np.random.seed(seed); np.random.shuffle
    split = int(np.floor(valid_size * n))
    return np.array(indices[split:], dtype=np.int64), np.array(indices[:split], dtype=np.int64)


def select_index(scores: Sequence[float], costs: Sequence[float]) -> int:
    """The reference's choice: walk C from largest to smallest, keep the first score strictly above the best so
    far (starting at 0), so ties go to the larger C and NaN is never chosen. If nothing beats 0 the reference
    raises (KeyError); we take the largest C."""
    order = sorted(range(len(costs)), key=lambda i: -costs[i])
    best, chosen = 0.0, order[0]
    for i in order:
        if scores[i] > best:
            best, chosen = scores[i], i
    return chosen


# --- the solver ------------------------------------------------------------------------------------------------


@dataclass
class LogRegPath:
    """Solutions for T label columns x len(Cs) values of C (T = 1 for one label vector)."""

    Cs: np.ndarray  # (n_reg,) in the order given
    classes: np.ndarray  # (K,) the label values, column k of coef is classes[k]
    coef: np.ndarray  # (T, n_reg, d, K)
    intercept: np.ndarray  # (T, n_reg, K), centred over classes (the loss does not see a common shift)
    n_iter: np.ndarray  # (T, n_reg)
    converged: np.ndarray  # (T, n_reg) bool: max |grad| / n <= tol
    float64_polish: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))  # (T, n_reg) finished in float64

    def decision(self, x: np.ndarray, device: str = "cpu") -> np.ndarray:
        """Logits (n, T, n_reg, K) in float32 (float64 products)."""
        x = torch.as_tensor(np.asarray(x), device=device, dtype=torch.float64)
        t, r, d, k = self.coef.shape
        w = torch.as_tensor(self.coef, device=device).permute(2, 0, 1, 3).reshape(d, t * r * k)
        out = x @ w + torch.as_tensor(self.intercept, device=device).reshape(1, -1)
        return out.reshape(len(x), t, r, k).float().cpu().numpy()

    def predict(self, x: np.ndarray, device: str = "cpu") -> np.ndarray:
        """Predicted labels (n, T, n_reg); ties go to the first class, as ``np.argmax`` in scikit-learn."""
        return self.classes[self.decision(x, device).argmax(axis=-1)]

    def positive_score(self, x: np.ndarray, device: str = "cpu") -> np.ndarray:
        """Two-class problems: logit of class 1 minus class 0 (n, T, n_reg), twice the reference's
        ``decision_function`` (class 1's row of a symmetric two-class softmax), so every ranking is the same."""
        z = self.decision(x, device)
        return z[..., 1] - z[..., 0]


@dataclass
class _Basis:
    """Centred, rotated coordinates: ``z = [(x - mean) @ v, 1]`` (n, r + 1); ``lam`` = column sums of z^2."""

    mean: torch.Tensor  # (d,) float64
    v: torch.Tensor  # (d, r) float64, orthonormal columns
    z: torch.Tensor  # (n, r + 1) solver dtype
    lam: torch.Tensor  # (r + 1,) float64


def _basis(x: np.ndarray, dtype: torch.dtype, device: str, rtol: float = 1e-10, chunk: int = 8192) -> _Basis:
    n, d = x.shape
    dev = torch.device(device)
    mean = torch.zeros(d, dtype=torch.float64, device=dev)
    for a in range(0, n, chunk):
        mean += torch.as_tensor(x[a:a + chunk], device=dev).double().sum(0)
    mean /= n

    def rows(a):  # a centred float64 row block
        return torch.as_tensor(x[a:a + chunk], device=dev).double() - mean

    if n >= d:  # covariance route: d x d eigenvectors, every direction kept (V square, exact for any data)
        cov = torch.zeros(d, d, dtype=torch.float64, device=dev)
        for a in range(0, n, chunk):
            xc = rows(a)
            cov += xc.T @ xc
        _, v = torch.linalg.eigh(cov)
    else:  # Gram route: the span of the centred rows (rank < n), where the minimiser lies
        xc = rows(0) if n <= chunk else torch.as_tensor(x, device=dev).double() - mean
        lam_g, u = torch.linalg.eigh(xc @ xc.T)
        keep = lam_g > rtol * lam_g.max().clamp_min(1e-300)
        v, _ = torch.linalg.qr(xc.T @ u[:, keep])
    z = torch.empty(n, v.shape[1] + 1, dtype=dtype, device=dev)
    lam = torch.zeros(v.shape[1] + 1, dtype=torch.float64, device=dev)
    for a in range(0, n, chunk):
        zb = rows(a) @ v
        z[a:a + len(zb), :-1] = zb.to(dtype)
        lam[:-1] += (zb * zb).sum(0)
    z[:, -1] = 1.0
    lam[-1] = n
    return _Basis(mean, v, z, lam)


class _Problems:
    """The batched objective over a subset of problems: labels (n, T) int64, family of each problem, 1/C."""

    def __init__(self, basis: _Basis, labels: torch.Tensor, k: int, chunk: int = 8192):
        self.z, self.labels, self.k, self.chunk = basis.z, labels, k, chunk
        self.pen = torch.ones(basis.z.shape[1], dtype=torch.float64, device=basis.z.device)
        self.pen[-1] = 0.0  # the intercept row is not penalised

    def _zmm(self, m: torch.Tensor) -> torch.Tensor:
        """z @ m in m's dtype (float64 products of a float32 z row block by row block, for the float64 finish)."""
        if m.dtype == self.z.dtype:
            return self.z @ m
        return torch.cat([zb.to(m.dtype) @ m for zb in self.z.split(self.chunk)])

    def _ztmm(self, m: torch.Tensor) -> torch.Tensor:
        """z^T @ m in m's dtype."""
        if m.dtype == self.z.dtype:
            return self.z.T @ m
        return sum(zb.to(m.dtype).T @ mb for zb, mb in zip(self.z.split(self.chunk), m.split(self.chunk)))

    def value_grad(self, w: torch.Tensor, fam: torch.Tensor,
                   inv_c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """f (P,) float64, gradient (r1, P, K) for coefficients w (r1, P, K) in the solver dtype, and the mean
        of p (1 - p) per problem and class (P, K), the diagonal of the softmax's Hessian."""
        n, r1 = self.z.shape
        p = w.shape[1]
        logits = self._zmm(w.reshape(r1, p * self.k)).view(n, p, self.k)
        idx = (self.labels[:, :1].expand(n, p) if self.labels.shape[1] == 1 else self.labels[:, fam]).unsqueeze(2)
        # softmax and log-loss in place, one pass each: shift by the row max, exp, normalise
        logits -= logits.amax(2, keepdim=True)
        picked = logits.gather(2, idx)
        # exp(-50) ~ 2e-22 is invisible next to the row's largest term, 1 (below float64's eps); the floor keeps
        # subnormal numbers, which make CPU matrix products several times slower, out of p and z^T p
        prob = logits.clamp_min_(-50.0).exp_()
        tot = prob.sum(2, keepdim=True)
        loss = (tot.log() - picked).sum(0, dtype=torch.float64).view(p)
        prob /= tot
        curv = (prob.sum(0) - (prob * prob).sum(0)).double() / n  # mean p (1 - p), for the preconditioner only
        prob.scatter_add_(2, idx, torch.full_like(picked, -1.0))  # p - onehot(y)
        grad = self._ztmm(prob.view(n, p * self.k)).view(r1, p, self.k)
        reg = (inv_c[None, :] * self.pen[:, None]).unsqueeze(2)  # (r1, P, 1) float64
        grad += reg.to(w.dtype) * w
        w64 = w.double()
        f = loss + 0.5 * (reg * w64 * w64).sum((0, 2))
        return f, grad, curv


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-problem inner products of (r1, P, K) tensors, as float64 (P,) (accumulated in the tensors' dtype:
    the strided float64 reduction costs 2-4x more; rows first, a reduction along the contiguous P K, is up to
    8x faster than classes first for small K)."""
    return (a * b).sum(0).sum(1).double()


def _max_grad_original(g: torch.Tensor, basis: _Basis, bound: float) -> torch.Tensor:
    """Per problem: is max |gradient| <= bound in the original (uncentred, unrotated) coordinates? There the W
    part is ``V g_W + mean (x) g_b`` and the b part ``g_b``. The exact test (a d x r product) is made only
    where a cheap lower bound, ``(||g_W[:, k]|| - ||mean|| |g_b[k]|) / sqrt(d)``, does not already fail it."""
    r1, p, k = g.shape
    g64 = g.double()
    d = basis.v.shape[0]
    low = (g64[:-1].norm(dim=0) - basis.mean.norm() * g64[-1].abs()) / d ** 0.5  # (P, K)
    ok = (low.amax(1) <= bound) & (g64[-1].abs().amax(1) <= bound)
    cand = torch.nonzero(ok).flatten()
    if len(cand):
        gc = g64[:, cand]
        gw = (basis.v @ gc[:-1].reshape(r1 - 1, -1)).view(d, len(cand), k) + basis.mean[:, None, None] * gc[-1:]
        ok[cand] = gw.abs().amax((0, 2)) <= bound
    return ok


def _lbfgs(prob: _Problems, basis: _Basis, w: torch.Tensor, fam: torch.Tensor, inv_c: torch.Tensor,
           tol: float, max_iter: int, memory: int, c1: float = 1e-4, max_ls: int = 30,
           first: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None):
    """Minimise every problem of the batch from w (r1, P, K) (overwritten with the solutions); ``first``: the
    (f, gradient, curvature) of ``value_grad`` at w when already computed. Returns (n_iter, status), each (P,);
    status 0: converged, 1: iteration cap, 2: line search stalled."""
    dt, dev, bound = w.dtype, w.device, tol * basis.z.shape[0]
    n_iter = torch.zeros(w.shape[1], dtype=torch.long, device=dev)
    status = torch.ones_like(n_iter)
    eps_f = 1e-6 if dt == torch.float32 else 1e-10  # approximate-Wolfe slack on f, relative
    ftol = 64 * torch.finfo(torch.float64).eps  # scipy L-BFGS-B's factr * eps, as scikit-learn sets it
    lam, pen = basis.lam, prob.pen
    act = torch.arange(w.shape[1], device=dev)  # the problems still running
    wa = w.clone()
    f, g, cv = prob.value_grad(wa, fam, inv_c) if first is None else first
    tau = torch.ones_like(f)  # the scale of the Kronecker model fitted to the last step's curvature (below)
    hist: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (s, y, rho) of the running problems
    conv = _max_grad_original(g, basis, bound)
    stalled = torch.zeros_like(conv)
    n_flat = torch.zeros_like(n_iter)
    for it in range(max_iter + 1):
        leave = conv | stalled | (it == max_iter)
        if leave.any():  # retire finished problems: write them back, shrink every per-problem tensor
            out = act[leave]
            w[:, out] = wa[:, leave]
            status[out] = torch.where(conv[leave], 0, torch.where(stalled[leave], 2, 1))
            n_iter[out] = it
            keep = ~leave
            act, wa, g, f, fam, inv_c, n_flat, cv, tau = (act[keep], wa[:, keep], g[:, keep], f[keep], fam[keep],
                                                          inv_c[keep], n_flat[keep], cv[keep], tau[keep])
            hist = [(s[:, keep], y[:, keep], rho[keep]) for s, y, rho in hist]
            if not len(act):
                break
        # direction: two-loop recursion from H0^-1 = diag(tau (mean p (1 - p) * lam + pen / C))^-1 (Kronecker model
        # of the Hessian at the current point: each class's softmax curvature times the feature second moments)
        kron = (cv.clamp_min(1e-8)[None] * lam[:, None, None] + (pen[:, None] * inv_c[None, :]).unsqueeze(2)).to(dt)
        h0 = kron * tau.to(dt)[None, :, None]
        q = g.clone()
        alphas = []
        for s, y, rho in reversed(hist):
            a = rho * _dot(s, q)
            alphas.append(a)
            q -= a.to(dt)[None, :, None] * y
        q /= h0
        for (s, y, rho), a in zip(hist, reversed(alphas)):
            q += (a - rho * _dot(y, q)).to(dt)[None, :, None] * s
        d = q.neg_()
        d -= d.mean(2, keepdim=True)  # stay where the classes sum to zero (below)
        dphi = _dot(g, d)
        bad = ~(dphi < 0)  # not a descent direction (rounding): the preconditioned gradient instead
        if bad.any():
            d[:, bad] = -g[:, bad] / h0[:, bad]
            dphi = _dot(g, d)
        # per-problem backtracking line search from the unit step
        alpha = torch.ones_like(f)
        f_new, g_new, cv_new = f.clone(), g.clone(), cv.clone()
        by_armijo = torch.zeros(len(act), dtype=torch.bool, device=dev)
        todo = torch.arange(len(act), device=dev)
        for trial in range(max_ls):
            al = alpha[todo]
            if trial == 0:  # every problem, at the unit step: no gathers
                ft, gt, ct = prob.value_grad(wa + d, fam, inv_c)
                dpt = _dot(gt, d)
            else:
                dt_ = d[:, todo]
                ft, gt, ct = prob.value_grad(wa[:, todo] + al.to(dt)[None, :, None] * dt_, fam[todo], inv_c[todo])
                dpt = _dot(gt, dt_)
            f0, dp0 = f[todo], dphi[todo]
            armijo = ft <= f0 + c1 * al * dp0
            ok = armijo | ((ft <= f0 + eps_f * f0.abs()) & (dpt <= 0.8 * dp0.abs()) & (dpt >= 0.9 * dp0))
            f_new[todo[ok]], g_new[:, todo[ok]], cv_new[todo[ok]] = ft[ok], gt[:, ok], ct[ok]
            by_armijo[todo[ok]] = armijo[ok]
            # minimiser of the quadratic through f0, dphi0 and f(alpha), kept within [0.1, 0.5] alpha
            quad = torch.nan_to_num(-dp0 * al * al / (2 * (ft - f0 - dp0 * al)).clamp_min(1e-300), nan=0.0)
            alpha[todo] = torch.where(ok, al, torch.minimum(torch.maximum(quad, 0.1 * al), 0.5 * al))
            todo = todo[~ok]
            if not len(todo):
                break
        stalled = torch.zeros(len(act), dtype=torch.bool, device=dev)
        stalled[todo] = True
        alpha[stalled] = 0.0
        s = alpha.to(dt)[None, :, None] * d
        y = g_new - g
        wa += s
        # float64: a relative decrease below 64 eps ends the problem as converged (scipy's ftol test; the 1 in
        # its max(|f|, 1) is n here, f being n times scikit-learn's). float32: 3 steps in a row accepted only
        # by the approximate Wolfe test (f no longer resolves the decrease) end it as stalled, to be finished
        # with float64 products
        flat = (f - f_new) <= ftol * torch.maximum(f.abs(), f_new.abs()).clamp_min(basis.z.shape[0])
        n_flat = torch.where(by_armijo | stalled, 0, n_flat + 1)
        g, f = g_new, f_new
        # the curvature pair (kept only where s'y > 0 clearly: convex, penalised)
        sy = _dot(s, y)
        s_pen_s = (_dot(s, s) - (s[-1].double() ** 2).sum(1)) * inv_c  # the intercept row is not penalised
        curv = ~stalled & (sy > 1e-10 * s_pen_s) & (sy > 0)
        hist.append((s, y, torch.where(curv, 1.0 / torch.where(curv, sy, 1.0), 0.0)))
        # tau: the curvature along the step relative to the Kronecker model's, s'y / s' kron s, where it is larger
        # (never below 1: the model is exact at W = 0); it scales the next H0, so that the unit step is accepted
        # more often (fewer line-search evaluations)
        tau = torch.where(curv, (sy / _dot(s, kron * s).clamp_min(1e-300)).clamp_min(1.0), tau)
        cv = cv_new
        if len(hist) > memory:
            hist.pop(0)
        conv = _max_grad_original(g, basis, bound)
        if dt == torch.float64:
            conv |= flat & ~stalled
        else:
            stalled |= n_flat >= 3
        n_iter[act] = it + 1
    return n_iter, status


def _lagrange(t_nodes: np.ndarray, t_new: np.ndarray) -> np.ndarray:
    """Weights (len(t_nodes), len(t_new)) of the polynomial through the nodes evaluated at t_new:
    ``p(t_new[j]) = sum_i weights[i, j] * value_i``."""
    wts = np.ones((len(t_nodes), len(t_new)))
    for i, ti in enumerate(t_nodes):
        for j, tj in enumerate(t_nodes):
            if i != j:
                wts[i] *= (t_new - tj) / (ti - tj)
    return wts


def _to_rotated(coef: torch.Tensor, intercept: torch.Tensor, basis: _Basis) -> torch.Tensor:
    """(P, d, K), (P, K) in original coordinates -> (r1, P, K) in the basis (float64)."""
    wr = torch.einsum("dr,pdk->rpk", basis.v, coef)
    b = intercept + torch.einsum("d,pdk->pk", basis.mean, coef)
    return torch.cat([wr, b[None]], 0)


def _to_original(w: torch.Tensor, basis: _Basis) -> tuple[torch.Tensor, torch.Tensor]:
    """(r1, P, K) in the basis -> coef (P, d, K), intercept (P, K) centred over classes."""
    w64 = w.double()
    coef = torch.einsum("dr,rpk->pdk", basis.v, w64[:-1])
    intercept = w64[-1] - torch.einsum("d,pdk->pk", basis.mean, coef)
    return coef, intercept - intercept.mean(1, keepdim=True)


def fit_path(x: np.ndarray, y: np.ndarray, Cs: Sequence[float], *, classes: np.ndarray | None = None,
             device: str = "cpu", dtype: str = "float32", tol: float = 1e-4, max_iter: int = 1000,
             memory: int = 10, block: int | None = 3,
             init: tuple[np.ndarray, np.ndarray] | None = None) -> LogRegPath:
    """Solve the problem of the module docstring for every C in ``Cs`` (and every label column), batched.

    ``x`` (n, d); ``y`` (n,) labels or (n, T) label columns, each its own problem family (two-class columns for
    the reference's per-class VOC fits); ``classes`` the label values (default: those in ``y``). ``block``:
    values of C solved together, each block warm-started from the values solved before (None: all at once;
    3, the default, did the least work in the measurements of docs/transfer.md).
    ``init``: (coef (T, d, K), intercept (T, K)) to start every problem from, in original coordinates.
    """
    x = np.asarray(x)
    if x.dtype not in (np.float32, np.float64):
        x = x.astype(np.float32)
    y = np.asarray(y)
    y2 = y[:, None] if y.ndim == 1 else y
    classes = np.unique(y2) if classes is None else np.asarray(classes)
    k = len(classes)
    if k < 2:
        raise ValueError(f"need at least two classes, got {classes.tolist()}")
    codes = np.searchsorted(classes, y2)
    if np.any(codes >= k) or np.any(classes[np.minimum(codes, k - 1)] != y2):
        raise ValueError("y has labels outside classes")
    cs = np.asarray(Cs, dtype=np.float64)
    t_fam, n_c = y2.shape[1], len(cs)
    tdt = {"float32": torch.float32, "float64": torch.float64}[dtype]
    dev = torch.device(device)
    basis = _basis(x, tdt, device)
    labels = torch.as_tensor(codes, dtype=torch.long, device=dev)
    prob = _Problems(basis, labels, k)
    r1 = basis.z.shape[1]
    order = np.argsort(cs, kind="stable")  # smallest C (strongest penalty) first
    block = n_c if block is None else max(1, int(block))
    w_all = torch.zeros(r1, t_fam, n_c, k, dtype=torch.float64, device=dev)
    n_iter = torch.zeros(t_fam, n_c, dtype=torch.long, device=dev)
    status = torch.zeros(t_fam, n_c, dtype=torch.long, device=dev)
    polished = torch.zeros(t_fam, n_c, dtype=torch.bool, device=dev)
    if init is not None:
        start = _to_rotated(torch.as_tensor(init[0], dtype=torch.float64, device=dev),
                            torch.as_tensor(init[1], dtype=torch.float64, device=dev), basis)  # (r1, T, K)
    else:
        start = torch.zeros(r1, t_fam, k, dtype=torch.float64, device=dev)
    log_c = np.log(cs[order])
    step = max(1, (block - 1) // 2)  # spacing of the extrapolation's nodes along the solved values
    for a in range(0, n_c, block):
        idx = torch.as_tensor(order[a:a + block], device=dev)
        nb = len(idx)
        # problem j of the block = family * nb + position
        fam = torch.arange(t_fam, device=dev).repeat_interleave(nb)
        inv_c = torch.as_tensor(1.0 / cs[order[a:a + block]], device=dev).repeat(t_fam)
        w = start[:, :, None, :].expand(r1, t_fam, nb, k).reshape(r1, t_fam * nb, k).to(tdt, copy=True)
        # the minimiser's coefficients sum to zero over the classes (the penalty; the loss ignores a common
        # shift, which also leaves the intercept free there), and so does every gradient at such a point: the
        # solve is kept in that subspace, where the redundant direction (curvature 1/C only) is gone
        w -= w.mean(2, keepdim=True)
        first = None
        nodes = [a - 1 - i * step for i in range(3) if a - 1 - i * step >= 0]
        if len(nodes) >= 2 and len(set(log_c[nodes])) == len(nodes):
            # a second candidate start: the path extrapolated in log C, the polynomial through (up to) three
            # solved values (the largest C solved and two before it). Each problem starts from a candidate that
            # already passes the gradient test (the plain one first), else from the one with the lower objective;
            # one evaluation of both, which is also the solver's first
            wts = torch.as_tensor(_lagrange(log_c[nodes], log_c[a:a + nb]), device=dev)  # (nodes, nb)
            solved = w_all[:, :, torch.as_tensor(order[nodes], device=dev)]  # (r1, T, nodes, K)
            ext = torch.einsum("mn,rtmk->rtnk", wts, solved).reshape(r1, t_fam * nb, k).to(tdt)
            ext -= ext.mean(2, keepdim=True)
            fb, gb, cb = prob.value_grad(torch.cat([w, ext], 1), fam.repeat(2), inv_c.repeat(2))
            m = t_fam * nb
            done_plain, done_ext = (_max_grad_original(gc, basis, tol * len(basis.z)) for gc in gb.split(m, 1))
            pick = ~done_plain & (done_ext | (fb[m:] < fb[:m]))  # NaN (an overflowing extrapolation) never wins
            w = torch.where(pick[None, :, None], ext, w)
            first = (torch.where(pick, fb[m:], fb[:m]), torch.where(pick[None, :, None], gb[:, m:], gb[:, :m]),
                     torch.where(pick[:, None], cb[m:], cb[:m]))
        it, st = _lbfgs(prob, basis, w, fam, inv_c, tol, max_iter, memory, first=first)
        w64 = w.double()
        sel = torch.nonzero(st == 2).flatten()
        if tdt == torch.float32 and len(sel):  # stalled in float32: finish in float64 on the same z
            w_sel = w64[:, sel]
            it2, st2 = _lbfgs(prob, basis, w_sel, fam[sel], inv_c[sel], tol, max(1, max_iter - int(it[sel].max())),
                              memory)
            w64[:, sel] = w_sel
            it[sel] += it2
            st[sel] = st2
            polished[fam[sel], idx[sel % nb]] = True
        w_all[:, :, idx] = w64.view(r1, t_fam, nb, k)
        n_iter[:, idx] = it.view(t_fam, nb)
        status[:, idx] = st.view(t_fam, nb)
        start = w64.view(r1, t_fam, nb, k)[:, :, -1]  # the largest C of this block starts the next
    coef, icpt = _to_original(w_all.reshape(r1, t_fam * n_c, k), basis)
    return LogRegPath(Cs=cs, classes=classes, coef=coef.view(t_fam, n_c, -1, k).cpu().numpy(),
                      intercept=icpt.view(t_fam, n_c, k).cpu().numpy(), n_iter=n_iter.cpu().numpy(),
                      converged=(status == 0).cpu().numpy(), float64_polish=polished.cpu().numpy())


# --- model selection: the reference protocol ------------------------------------------------------------------


@dataclass
class TransferFit:
    """The outcome of :func:`select_and_refit`."""

    metric: Metric
    Cs: np.ndarray
    val_scores: np.ndarray  # (n_reg,) the metric on val for each C (train fit)
    chosen: int  # index into Cs
    C: float
    test_score: float  # the metric on test of the train+val refit at C
    path: LogRegPath  # the train fits
    refit: LogRegPath  # the train+val fit at C

    @property
    def not_converged(self) -> int:
        return int((~self.path.converged).sum() + (~self.refit.converged).sum())


def _scores(path: LogRegPath, x: np.ndarray, y: np.ndarray, metric: Metric, device: str) -> np.ndarray:
    from . import metrics as m

    if metric == "map11":
        s = path.positive_score(x, device)  # (n, T, n_reg)
        return np.array([m.mean_ap(y, s[:, :, j]) for j in range(s.shape[2])])
    pred = path.predict(x, device)[:, 0]  # (n, n_reg)
    fn: Callable = {"top1": m.top1, "mean_per_class": m.mean_per_class_accuracy}[metric]
    return np.array([fn(y, pred[:, j]) for j in range(pred.shape[1])])


def _labels(metric: Metric, ys: Sequence[np.ndarray], fit_kw: dict) -> list[np.ndarray]:
    """Labels as the metric takes them (map11: (n, T) 0/1 columns, two-class problems); checks the metric."""
    if metric == "map11":
        fit_kw.setdefault("classes", np.array([0, 1]))
        return [np.asarray(v).astype(np.int64) for v in ys]
    if metric not in ("top1", "mean_per_class"):
        raise ValueError(f"unknown metric {metric!r} (top1, mean_per_class, map11)")
    return list(ys)


def refit_at(train: tuple[np.ndarray, np.ndarray], val: tuple[np.ndarray, np.ndarray],
             test: tuple[np.ndarray, np.ndarray], path: LogRegPath, i: int, metric: Metric = "top1", *,
             fit: Callable[..., LogRegPath] | None = None, **fit_kw) -> tuple[LogRegPath, float]:
    """The last step of :func:`select_and_refit`: refit on train + val at ``path.Cs[i]`` (ours: warm-started from
    the train solution ``i`` of ``path``), score test with ``metric``; (the refit, the test score)."""
    fit = fit_path if fit is None else fit
    fit_kw = dict(fit_kw)
    (xtr, ytr), (xva, yva), (xte, yte) = train, val, test
    ytr, yva, yte = _labels(metric, (ytr, yva, yte), fit_kw)
    fit_kw.setdefault("classes", np.union1d(path.classes, np.unique(yva)))
    if np.array_equal(np.asarray(fit_kw["classes"]), path.classes):
        fit_kw["init"] = (path.coef[:, i], path.intercept[:, i])
    refit = fit(np.concatenate([xtr, xva]), np.concatenate([ytr, yva]), [path.Cs[i]], **fit_kw)
    return refit, float(_scores(refit, xte, yte, metric, fit_kw.get("device", "cpu"))[0])


def select_and_refit(train: tuple[np.ndarray, np.ndarray], val: tuple[np.ndarray, np.ndarray],
                     test: tuple[np.ndarray, np.ndarray], Cs: Sequence[float] | None = None,
                     metric: Metric = "top1", *, fit: Callable[..., LogRegPath] | None = None,
                     **fit_kw) -> TransferFit:
    """ssl-transfer ``LinearTester.validate`` + ``evaluate``: fit every C on train, score val with ``metric``
    (``top1``, ``mean_per_class`` or ``map11``; ``map11`` takes (n, T) binary labels, ``target == 1``, and fits
    a two-class problem per column, all columns sharing one C), choose C by :func:`select_index`, refit on
    train + val at that C (:func:`refit_at`), score test. ``Cs`` defaults to :func:`reference_costs`; ``fit``
    to :func:`fit_path` (a backend of ``reference`` is a drop-in), which gets ``fit_kw``. Features are used as
    given: the reference neither normalises nor standardises them."""
    fit = fit_path if fit is None else fit
    cs = reference_costs() if Cs is None else np.asarray(Cs, dtype=np.float64)
    fit_kw = dict(fit_kw)
    (xtr, ytr), (xva, yva) = train, val
    ytr, yva = _labels(metric, (ytr, yva), fit_kw)
    path = fit(xtr, ytr, cs, **fit_kw)
    val_scores = _scores(path, xva, yva, metric, fit_kw.get("device", "cpu"))
    i = select_index(list(val_scores), list(cs))
    refit, test_score = refit_at(train, val, test, path, i, metric, fit=fit, **fit_kw)
    return TransferFit(metric, cs, val_scores, i, float(cs[i]), test_score, path, refit)
