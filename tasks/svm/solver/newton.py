"""The ``torch`` backend: every problem of a sweep (classes x costs x CV folds + refit) is one column of a
single batched problem, on CPU or GPU.

A truncated Newton method on the primal (Chapelle 2007 / liblinear's TRON family): generalised-Hessian
conjugate gradient per Newton step, an exact safeguarded line search on the piecewise-quadratic objective,
per-problem convergence ``||grad|| <= tol * ||grad at 0||`` on a float64 iterate and gradient (CG products
in the solver dtype). Each cost path is warm-started cost after cost, and a finished problem's batch slot
takes the next problem at once. Large-C steps with small active sets are exact (Woodbury on the active set).
When the augmented dimension D+1 exceeds the number of samples N, the problem is solved exactly in the
N-dimensional span of the samples (``Xa Xa^T = L L^T``, coordinates ``z = L``; the optimum of an
L2-regularised linear model lies in that span), then mapped back, ``w = Xa^T L^-T v``.

Notation: problem p has coordinates ``v_p`` (r,) with margins ``m_p = z v_p`` (N,), row labels ``y_p`` in
{-1, 0, +1} (0: row left out), row weights ``c_p`` (the class weight of each row in the problem, 0 for rows
left out) and cost ``C_p``. Its active set is the rows with ``y m < 1``; the objective is
``1/2 ||v||^2 + C sum_i c_i max(0, 1 - y_i m_i)^2``, with gradient ``v + 2C z^T (c * active * (m - y))``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from evalsuite.console import progress as progress_bar

from .config import SVMConfig
from .solution import SVMSolution


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

    def factors(self, active_weights: torch.Tensor, cost: torch.Tensor) -> torch.Tensor:
        """(k, P): 1 / (1 + 2C curvature) - 1 along each top direction."""
        return 1.0 / (1.0 + 2.0 * cost * (self.w2.T @ active_weights)) - 1.0

    def apply(self, u: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
        """M^-1 u: ``u`` scaled by ``1 + factors`` along the top directions, unchanged elsewhere."""
        return u + self.q @ (factors * (self.q.T @ u))



def _in_active_set(margins: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """y m < 1 for labels y in {-1, 0, 1} (bool), without a float temporary of the margins' size."""
    return ((labels > 0) & (margins < 1)) | ((labels < 0) & (margins > -1)) | (labels == 0)


def _line_search(v_dot_d, d_dot_d, margins, dir_margins, labels, row_weights, cost, t0=1.0, iters=30,
                 cols: int = 32):
    """Exact minimiser over t >= 0 of phi(t) = f(v + t d) for each problem (safeguarded Newton on phi',
    which is increasing and piecewise linear). v.d (P,), d.d (P,), margins z v (float64), the direction's
    margins z d (N, P); labels, row weights and the direction's margins may be in the solver's dtype
    (promoted to float64 ``cols`` problems at a time, so the search's temporaries stay small whatever the
    batch)."""
    p = margins.shape[1]
    if p > cols:
        t0 = torch.as_tensor(t0, dtype=v_dot_d.dtype, device=v_dot_d.device).expand_as(v_dot_d)
        return torch.cat([_line_search(v_dot_d[a:a + cols], d_dot_d[a:a + cols], margins[:, a:a + cols],
                                       dir_margins[:, a:a + cols], labels[:, a:a + cols],
                                       row_weights[:, a:a + cols], cost[a:a + cols], t0[a:a + cols], iters, cols)
                          for a in range(0, p, cols)])
    dir_margins = dir_margins.double()

    def derivatives(t):
        """phi'(t) and phi''(t) (the latter from the active set at t)."""
        margins_t = margins + t * dir_margins
        active_weights = row_weights * _in_active_set(margins_t, labels)
        slope = v_dot_d + t * d_dot_d + 2 * cost * (active_weights * (margins_t - labels) * dir_margins).sum(0)
        curvature = d_dot_d + 2 * cost * (active_weights * dir_margins * dir_margins).sum(0)
        return slope, curvature

    eps = 1e-12 if v_dot_d.dtype == torch.float64 else 1e-6
    lo = torch.zeros_like(v_dot_d)
    hi = torch.as_tensor(t0, dtype=v_dot_d.dtype, device=v_dot_d.device).expand_as(v_dot_d).clone()
    slope, _ = derivatives(hi)
    for _ in range(60):  # expand until phi'(hi) >= 0
        grow = slope < 0
        if not grow.any():
            break
        lo = torch.where(grow, hi, lo)
        hi = torch.where(grow, hi * 2, hi)
        slope, _ = derivatives(hi)
    t = hi.clone()
    for _ in range(iters):
        slope, curvature = derivatives(t)
        lo = torch.where(slope < 0, t, lo)
        hi = torch.where(slope > 0, t, hi)
        newton = t - slope / curvature.clamp_min(1e-300)
        bracketed = (newton > lo) & (newton < hi)
        t_new = torch.where(bracketed, newton, 0.5 * (lo + hi))
        done = (t_new - t).abs() <= eps * t.abs().clamp_min(1e-12)
        t = t_new
        if done.all():
            break
    return t


def _pcg(z, pre: _Precond | None, active_weights, cost, grad, stop, max_cg, straggle: float = 0.0):
    """Per-problem preconditioned CG on H_p s = -g_p, H_p = I + 2C_p z^T diag(active_weights_p) z, all problems
    in one pair of matmuls per step; a problem leaves the batch when ||residual|| <= stop. Returns s, z s and
    the steps taken.

    ``straggle`` > 0 truncates the tail: once at most that fraction of the batch is left and the survivors
    have run twice as many steps as it took half the batch to finish, they stop with their current iterate
    (a CG iterate from 0 is a descent direction; the outer Newton loop finishes them). Single-column matrix
    products are memory-bound, so a few stragglers would otherwise cost as much as the whole batch."""
    p_all = grad.shape[1]
    step_out = torch.zeros_like(grad)
    step_margins_out = torch.zeros((z.shape[0], p_all), dtype=grad.dtype, device=grad.device)
    n_steps = torch.zeros(p_all, dtype=torch.int64, device=grad.device)
    running = torch.arange(p_all, device=grad.device)  # the problems still in the batch
    factors = pre.factors(active_weights, cost) if pre is not None else None
    residual = -grad
    prec_residual = pre.apply(residual, factors) if pre is not None else residual
    # a copy: the residual is updated in place (and is prec_residual without a preconditioner)
    direction, rho = prec_residual.clone(), (residual * prec_residual).sum(0)
    step, step_margins = torch.zeros_like(grad), torch.zeros_like(step_margins_out)
    half_at = None  # the CG step at which half the batch had finished
    for it in range(1, max_cg + 1):
        n_steps[running] += 1
        z_dir = z @ direction
        h_dir = (z.T @ (active_weights * z_dir)).mul_(2 * cost).add_(direction)  # H d
        alpha = rho / (direction * h_dir).sum(0).clamp_min(1e-300)
        step.addcmul_(direction, alpha)
        step_margins.addcmul_(z_dir, alpha)
        residual.addcmul_(h_dir, alpha, value=-1.0)
        fin = residual.double().norm(dim=0) <= stop
        left = len(running) - int(fin.sum())
        if half_at is None and left <= p_all // 2:
            half_at = it
        if straggle > 0 and half_at is not None and left <= straggle * p_all and it >= 2 * half_at + 5:
            fin = torch.ones_like(fin)
        if fin.any():
            step_out[:, running[fin]], step_margins_out[:, running[fin]] = step[:, fin], step_margins[:, fin]
            keep = ~fin
            if not keep.any():
                return step_out, step_margins_out, n_steps
            running, step, step_margins = running[keep], step[:, keep], step_margins[:, keep]
            residual, direction, rho = residual[:, keep], direction[:, keep], rho[keep]
            active_weights, cost, stop = active_weights[:, keep], cost[keep], stop[keep]
            factors = factors[:, keep] if factors is not None else None
        prec_residual = pre.apply(residual, factors) if pre is not None else residual
        rho_new = (residual * prec_residual).sum(0)
        direction = prec_residual + (rho_new / rho.clamp_min(1e-300)) * direction
        rho = rho_new
    step_out[:, running], step_margins_out[:, running] = step, step_margins
    return step_out, step_margins_out, n_steps


def _direct_steps(basis: _Basis, active_weights, cost, grad):
    """Exact Newton directions s = -H^-1 g for the given problems (Chapelle 2007, squared hinge), through the
    Woodbury identity on the active set A: H = I + z_A^T D z_A, D = diag(2 C c_A), so
    s = -g + z_A^T (D^-1 + K_AA)^-1 z_A g -- one Cholesky of size |A| per problem instead of many CG steps
    when C is large and the active set small. Taken from the (float64) gradient, so a rounded K only slows
    convergence down, never stops it at the float32 precision floor."""
    z = basis.z
    z_grad = z @ grad
    coef = torch.zeros_like(z_grad)  # (D^-1 + K_AA)^-1 z_A g on the active rows, 0 elsewhere
    for j in range(grad.shape[1]):
        rows = (active_weights[:, j] > 0).nonzero().squeeze(1)
        if len(rows) == 0:
            continue
        d_inv = 1.0 / (2.0 * cost[j] * active_weights[rows, j])
        kaa = basis.kernel(rows)
        kaa.diagonal().add_(d_inv)
        chol, info = torch.linalg.cholesky_ex(kaa)  # reads the lower triangle only
        del kaa
        if int(info) != 0:  # not positive definite in the solver's dtype: float64
            kaa = basis.kernel(rows).double()
            kaa.diagonal().add_(d_inv.double())
            chol = torch.linalg.cholesky(kaa).to(z.dtype)
            del kaa
        coef[rows, j] = torch.cholesky_solve(z_grad[rows, j:j + 1], chol).squeeze(1)
    return -grad + z.T @ coef


def _newton_step(basis, pre, labels, row_weights, cost, coords, margins, active_weights, grad, grad_norm,
                 grad0_norm, cg_steps, config: SVMConfig):
    """One truncated Newton step for the live problems: a direction from CG or from the exact kernel
    formula, both in the solver's dtype, then the exact line search in float64 (coords, margins, grad
    float64). Returns the step t * s (float64), the direction's margins z s (solver dtype) with the step
    length t, and whether each problem's iterate froze. ``cg_steps`` (the CG steps of each problem's last
    CG direction, which decides where a direct step is cheaper) is updated in place."""
    z = basis.z
    n, r = z.shape
    # CG's relative tolerance: loose far from the optimum, tighter as the gradient shrinks
    forcing = torch.minimum(torch.full_like(grad_norm, config.cg_forcing),
                            (grad_norm / grad0_norm.clamp_min(1e-300)).sqrt())
    # direct (Cholesky) step where it costs less than the CG steps this problem needed last time
    n_active = (active_weights > 0).sum(0).double()
    if config.direct_steps == "auto":
        direct = 2 * n_active**3 / 3 <= cg_steps * 4.0 * n * r
    else:
        direct = torch.full_like(n_active, config.direct_steps == "always", dtype=torch.bool)
    grad_lo = grad.to(z.dtype)  # the gradient in the solver's dtype, for the direction
    cg_idx, dir_idx = (~direct).nonzero().squeeze(1), direct.nonzero().squeeze(1)
    if not len(dir_idx):  # all by CG (the common case): no scatter into zeroed (N, P) buffers
        direction, dir_margins, cg_its = _pcg(z, pre, active_weights, cost, grad_lo, forcing * grad_norm,
                                              config.max_cg, straggle=config.cg_straggle)
        cg_steps.copy_(cg_its)
    else:
        direction = torch.zeros_like(grad_lo)
        dir_margins = torch.zeros((n, grad_lo.shape[1]), dtype=z.dtype, device=z.device)
        if len(cg_idx):
            s_cg, e_cg, cg_its = _pcg(z, pre, active_weights[:, cg_idx], cost[cg_idx], grad_lo[:, cg_idx],
                                      (forcing * grad_norm)[cg_idx], config.max_cg, straggle=config.cg_straggle)
            direction[:, cg_idx], dir_margins[:, cg_idx] = s_cg, e_cg
            cg_steps[cg_idx] = cg_its.double()
        s_direct = _direct_steps(basis, active_weights[:, dir_idx], cost[dir_idx], grad_lo[:, dir_idx])
        direction[:, dir_idx], dir_margins[:, dir_idx] = s_direct, z @ s_direct
    direction = direction.double()
    step_len = _line_search((coords * direction).sum(0), (direction * direction).sum(0), margins, dir_margins,
                            labels, row_weights, cost.double())
    step = step_len * direction
    # a problem whose iterate no longer moves (the float64 precision floor) stops making progress
    frozen = step.norm(dim=0) <= 10 * torch.finfo(torch.float64).eps * (coords + step).norm(dim=0)
    return step, dir_margins, step_len, frozen


def _cost_paths(y: np.ndarray, costs: np.ndarray, col: np.ndarray) -> list[list[int]]:
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
class TorchRun:
    solution: SVMSolution  # problems `keep` only
    scores: np.ndarray | None  # (N, P) decision values on the training rows, every problem (solver's dtype)
    converged: np.ndarray  # (P,)
    iterations: np.ndarray  # (P,)


def _slot_count(n: int, r: int, d: int, config: SVMConfig) -> int:
    """Problems per batch (slots) so that ~14 float32-equivalent vectors of length max(N, r) per problem stay
    within memory_fraction x the float32 feature matrix (N x D); a rough model, see the benchmark's
    measured memory."""
    per_problem = 14 * max(n, r) * 4
    budget = config.memory_fraction * n * max(d, 1) * 4
    return int(max(1, min(config.max_problems, budget // per_problem)))


class _Slots:
    """The batch: S slots, each running one cost path problem after problem (the state below holds one
    column per slot).

    A slot whose problem converges records it and immediately takes the next cost of its path (warm-started
    from the solution it holds) or, when the path is done, the next path (cold start). So the batch stays
    full while problems finish at different times: no cost-by-cost synchronisation with a tail of one or
    two slow problems running as memory-bound matrix-vector products."""

    def __init__(self, basis: _Basis, y, col, costs, paths, n_slots: int, config: SVMConfig, device):
        self.basis, self.y, self.col, self.costs, self.paths, self.config = basis, y, col, costs, paths, config
        n, r, dt = basis.n, basis.r, basis.z.dtype
        # the iterate and its margins in float64: with float32 storage, rounding v alone moves the gradient of
        # an ill-conditioned (large C) problem by more than the tolerance; directions stay in the solver dtype
        self.coords = torch.zeros((r, n_slots), dtype=torch.float64, device=device)  # v
        self.margins = torch.zeros((n, n_slots), dtype=torch.float64, device=device)  # z v
        self.labels = torch.zeros((n, n_slots), dtype=dt, device=device)  # y in {-1, 0, +1}
        self.row_weights = torch.zeros((n, n_slots), dtype=dt, device=device)  # c: class weight, 0 if left out
        self.cost = torch.zeros(n_slots, dtype=dt, device=device)  # C
        self.grad0_unit = torch.zeros(n_slots, dtype=torch.float64, device=device)  # ||grad at v = 0|| / 2C
        self.cg_steps = torch.zeros(n_slots, dtype=torch.float64, device=device)  # of the last CG Newton step
        self.newton_steps = torch.zeros(n_slots, dtype=torch.int64, device=device)
        self.frozen_steps = torch.zeros(n_slots, dtype=torch.int64, device=device)  # consecutive, iterate unmoved
        self.occupied = torch.zeros(n_slots, dtype=torch.bool, device=device)  # the slot holds a problem
        self.grad = torch.zeros((r, n_slots), dtype=torch.float64, device=device)  # gradient at v (float64)
        self.grad_norm = torch.zeros(n_slots, dtype=torch.float64, device=device)
        self.path_of = [-1] * n_slots  # each slot's cost path
        self.path_pos = [0] * n_slots  # its position on that path (0: the smallest cost, a cold start)
        self.next_path = 0

    def problem(self, s: int) -> int:
        return self.paths[self.path_of[s]][self.path_pos[s]]

    def is_all(self, idx: torch.Tensor) -> bool:
        """Whether the (ascending) slot indices idx are all the slots: then column views replace copies."""
        return len(idx) == self.coords.shape[1]

    def columns(self, t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """t[:, idx]: a view when idx is every slot, else a copy."""
        return t if self.is_all(idx) else t[:, idx]

    def refresh_gradient(self, idx) -> None:
        """g = v + 2C z^T (c * active * (m - y)) in float64 for the slots idx (the convergence test's gradient)."""
        labels, margins = self.columns(self.labels, idx), self.columns(self.margins, idx)
        u = (margins - labels).mul_(self.columns(self.row_weights, idx)).masked_fill_(
            ~_in_active_set(margins, labels), 0.0)
        self.grad[:, idx] = self.columns(self.coords, idx) + 2 * self.cost[idx].double() * self.basis.hi_rmatvec(u)
        del u
        self.grad_norm[idx] = self.columns(self.grad, idx).norm(dim=0)

    def grad0_norm(self, idx):
        """||gradient at v = 0||, the scale of the convergence test."""
        return 2 * self.cost[idx].double() * self.grad0_unit[idx]

    def load(self, slots: list[int]) -> None:
        """Put each slot's current (path, position) problem in place: labels, weights, cost and the start point."""
        if not slots:
            return
        cfg, z = self.config, self.basis.z
        idx = torch.as_tensor(slots, device=self.coords.device)
        probs = [self.problem(s) for s in slots]
        signs = torch.as_tensor(np.sign(self.y[:, self.col[probs]]).astype(np.float32),
                                device=self.coords.device).to(z.dtype)
        self.labels[:, idx] = signs
        self.row_weights[:, idx] = torch.where(signs > 0, cfg.pos_weight,
                                               torch.where(signs < 0, cfg.neg_weight, 0.0)).to(signs.dtype)
        self.cost[idx] = torch.as_tensor(self.costs[probs], device=self.coords.device).to(z.dtype)
        cold = [i for i, s in enumerate(slots) if self.path_pos[s] == 0]
        warm = [i for i, s in enumerate(slots) if self.path_pos[s] > 0]
        if cold:
            c = idx[cold]
            self.coords[:, c], self.margins[:, c], self.cg_steps[c] = 0, 0, 0
            self.grad0_unit[c] = (z.T @ (self.row_weights[:, c] * self.labels[:, c])).double().norm(dim=0)
        if warm:  # the previous cost's solution, rescaled by the exact minimiser along that ray
            w = idx[warm]
            prev = np.array([self.paths[self.path_of[slots[i]]][self.path_pos[slots[i]] - 1] for i in warm])
            ratio = torch.as_tensor(self.costs[[probs[i] for i in warm]] / self.costs[prev],
                                    device=self.coords.device)
            coords, margins = self.coords[:, w], self.margins[:, w]
            scale = _line_search(torch.zeros_like(coords[0]), (coords * coords).sum(0), torch.zeros_like(margins),
                                 margins, self.labels[:, w], self.row_weights[:, w], self.cost[w].double(), t0=ratio)
            self.coords[:, w], self.margins[:, w] = coords * scale, margins * scale
        self.newton_steps[idx], self.frozen_steps[idx] = 0, 0
        self.occupied[idx] = True

    def start(self) -> None:
        slots = []
        for s in range(len(self.path_of)):
            if self.next_path < len(self.paths):
                self.path_of[s], self.path_pos[s] = self.next_path, 0
                self.next_path += 1
                slots.append(s)
        self.load(slots)

    def advance(self, slots: list[int]) -> list[int]:
        """Finished slots take the next cost of their path, else the next path, else go idle; returns the
        slots that took a new problem."""
        reload = []
        for s in slots:
            if self.path_pos[s] + 1 < len(self.paths[self.path_of[s]]):
                self.path_pos[s] += 1
            elif self.next_path < len(self.paths):
                self.path_of[s], self.path_pos[s] = self.next_path, 0
                self.next_path += 1
            else:
                self.occupied[s] = False
                continue
            reload.append(s)
        self.load(reload)
        return reload


def solve_torch(x, y, costs, config: SVMConfig, device: str, progress: bool, keep=None,
                on_scores=None, col=None) -> TorchRun:
    """``on_scores(problems, margins)``, when given, receives each finished problem's (N, len) margins on the
    training rows instead of an (N, P) array being kept (``TorchRun.scores`` is then None); it may return kept
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
    paths = _cost_paths(y, costs, col) if config.warm_start else [[p] for p in range(p_total)]
    scores = None if on_scores else np.zeros((n, p_total), dtype=np.float32 if dtype == torch.float32 else np.float64)
    converged = np.zeros(p_total, dtype=bool)
    iterations = np.zeros(p_total, dtype=np.int64)
    keep_set = {int(p) for p in keep}
    kept: dict[int, torch.Tensor] = {}  # finished problems of `keep`: their coordinates
    dropped: set[int] = set()
    batch = _Slots(basis, y, col, costs, paths, min(_slot_count(n, basis.r, d, config), len(paths)), config, device)
    batch.start()
    bar = progress_bar(desc="svm", total=p_total, enabled=progress and p_total > 1)
    n_steps = 0
    stale = batch.occupied.nonzero().squeeze(1)  # slots whose gradient must be (re)computed
    while bool(batch.occupied.any()):
        if len(stale):
            batch.refresh_gradient(stale)
        live = batch.occupied.nonzero().squeeze(1)
        grad, grad_norm, grad0_norm = batch.grad[:, live], batch.grad_norm[live], batch.grad0_norm(live)
        met_tol = grad_norm <= config.tol * grad0_norm
        finished = met_tol | (batch.newton_steps[live] >= config.max_newton) | (batch.frozen_steps[live] >= 2)
        if bool(finished.any()):
            done_slots = live[finished].tolist()
            done_problems = [batch.problem(s) for s in done_slots]
            if on_scores is None:
                scores[:, done_problems] = batch.margins[:, done_slots].cpu().numpy()
            else:
                gone = on_scores(done_problems, batch.margins[:, done_slots].cpu().numpy()) or ()
                dropped.update(int(p) for p in gone)
                for p in gone:
                    kept.pop(int(p), None)
            converged[done_problems] = met_tol[finished].cpu().numpy()
            iterations[done_problems] = batch.newton_steps[done_slots].cpu().numpy()
            for s, p in zip(done_slots, done_problems):
                if p in keep_set and p not in dropped:
                    kept[p] = batch.coords[:, s].clone()
            bar.update(len(done_slots))
            stale = torch.as_tensor(batch.advance(done_slots), dtype=torch.int64, device=device)
            continue
        labels, row_weights, cost = batch.columns(batch.labels, live), batch.columns(batch.row_weights, live), \
            batch.cost[live]
        coords, margins = batch.columns(batch.coords, live), batch.columns(batch.margins, live)
        active_weights = row_weights * _in_active_set(margins, labels)  # c on the active set, 0 elsewhere
        cg_steps = batch.cg_steps[live]  # a copy (advanced indexing): _newton_step updates it, written back below
        step, dir_margins, step_len, frozen = _newton_step(basis, pre, labels, row_weights, cost, coords, margins,
                                                           active_weights, grad, grad_norm, grad0_norm, cg_steps,
                                                           config)
        del active_weights
        batch.cg_steps[live] = cg_steps
        coords.add_(step)
        margins.addcmul_(dir_margins, step_len)
        del dir_margins
        if not batch.is_all(live):  # coords, margins were copies
            batch.coords[:, live], batch.margins[:, live] = coords, margins
        batch.frozen_steps[live] = torch.where(frozen, batch.frozen_steps[live] + 1, 0)
        batch.newton_steps[live] += 1
        n_steps += 1
        if n_steps % 8 == 0:  # exact margins: no drift from the incremental (solver-dtype) updates
            if batch.is_all(live):
                batch.margins = basis.hi_matvec(batch.coords, out=batch.margins)
            else:
                batch.margins[:, live] = basis.hi_matvec(batch.coords[:, live])
        stale = live
    bar.close()
    w_aug = np.full((d + 1, len(keep)), np.nan)
    have = [i for i, p in enumerate(keep) if int(p) in kept]
    if have:
        w_aug[:, have] = basis.weights(torch.stack([kept[int(keep[i])] for i in have], dim=1))
    sol = SVMSolution(np.ascontiguousarray(w_aug[:d].T), w_aug[d] * config.intercept_scaling, converged[keep],
                      iterations[keep], "torch")
    return TorchRun(sol, scores, converged, iterations)
