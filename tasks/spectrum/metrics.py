"""Label-free representation-quality metrics of a feature matrix (N samples x D dims), as small pure functions.

- :func:`rankme`: Garrido et al. 2023 (RankMe, ICML), Eq. 1-2: exp of the entropy of the singular values of the
  (uncentred) feature matrix normalised by their L1 norm, each plus eps (1e-7, the paper's value for float32).
- :func:`alpha_req`: Agrawal et al. 2022 (alpha-ReQ, NeurIPS): the decay exponent alpha of the eigenspectrum of the
  feature covariance, lambda_i ~ i^-alpha, fitted as the authors' code does (arnab39/reptrix ``alpha.py``
  ``get_powerlaw``, after Stringer & Pachitariu 2018): weighted least squares of log lambda_i on -log i (ranks
  counted from 1) over the 0-based eigenvalue indices [start, stop) = [10, 100), weights 1 / rank.
- :func:`uniformity` and :func:`alignment`: Wang & Isola 2020 (SsnL/align_uniform ``uniform_loss`` /
  ``align_loss``): log mean exp(-t ||x - y||^2) over all pairs i < j, and mean ||f(x) - f(x')||^alpha over
  positive pairs, both on L2-normalised features (t = 2, alpha = 2).

Everything is computed in float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

RANKME_EPS = 1e-7


def singular_values(x: np.ndarray) -> np.ndarray:
    """The min(N, D) singular values of ``x``, descending, through the eigenvalues of the smaller Gram matrix
    (float64: for N = 25,600 images this is a D x D product instead of an N x D SVD, several times faster).
    Eigenvalues below the Gram's rounding level (numpy's ``matrix_rank`` tolerance: largest x max(N, D) x float64
    eps) are zero singular values."""
    x = np.asarray(x, dtype=np.float64)
    gram = x.T @ x if x.shape[0] >= x.shape[1] else x @ x.T
    eig = np.linalg.eigvalsh(gram)[::-1]
    eig[eig <= eig[0] * max(x.shape) * np.finfo(np.float64).eps] = 0.0
    return np.sqrt(eig)


def rankme(x: np.ndarray, eps: float = RANKME_EPS) -> float:
    """RankMe(Z) = exp(-sum_k p_k log p_k), p_k = sigma_k(Z) / ||sigma(Z)||_1 + eps (Garrido et al. 2023)."""
    s = singular_values(x)
    total = s.sum()
    if total <= 0:
        return float("nan")
    p = s / total + eps
    p = p[p > 0]  # eps = 0 and a zero singular value: 0 log 0 = 0
    return float(np.exp(-(p * np.log(p)).sum()))


def covariance_eigenvalues(x: np.ndarray) -> np.ndarray:
    """Eigenvalues of the feature covariance (centred features, divided by N - 1), descending: reptrix's
    ``get_eigenspectrum`` (PCA's explained variance; its ratio form has the same decay exponent)."""
    x = np.asarray(x, dtype=np.float64)
    return singular_values(x - x.mean(axis=0)) ** 2 / max(1, x.shape[0] - 1)


@dataclass(frozen=True)
class PowerLawFit:
    alpha: float  # the decay exponent: lambda_i ~ i^-alpha
    intercept: float  # log of the fitted lambda_1
    r2: float  # coefficient of determination of the fit in log space, over the fitted eigenvalues
    start: int  # the 0-based eigenvalue indices fitted: [start, stop)
    stop: int


def powerlaw_fit(eigenvalues: np.ndarray, start: int = 10, stop: int = 100) -> PowerLawFit:
    """Fit log lambda_i = -alpha log i + c over the 0-based indices [start, stop) (ranks i = index + 1), weighted by
    1 / i: reptrix's ``get_powerlaw`` (``np.linalg.solve(x.T @ (x * w), (w * x).T @ y)``). Needs stop - start >= 2."""
    lam = np.asarray(eigenvalues, dtype=np.float64)
    if stop - start < 2 or stop > len(lam):
        raise ValueError(f"the fit needs eigenvalues [{start}, {stop}) of {len(lam)}")
    rank = np.arange(start, stop, dtype=np.float64) + 1
    y = np.log(np.abs(lam[start:stop]))
    x = np.stack([-np.log(rank), np.ones_like(rank)], axis=1)
    w = (1.0 / rank)[:, None]
    alpha, intercept = np.linalg.solve(x.T @ (x * w), (w * x).T @ y)
    pred = x @ np.array([alpha, intercept])
    ss_res, ss_tot = ((y - pred) ** 2).sum(), ((y - y.mean()) ** 2).sum()
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan")
    return PowerLawFit(float(alpha), float(intercept), float(r2), start, stop)


def alpha_fit_range(eigenvalues: np.ndarray, start: int, stop: int) -> tuple[int, int]:
    """The fitted indices [start, stop) clipped to the non-zero eigenvalues (the reference assumes at least ``stop``
    of them; N centred samples have at most N - 1, and dead units or a collapsed representation fewer)."""
    return start, min(stop, int(np.count_nonzero(np.asarray(eigenvalues) > 0)))


def alpha_req(x: np.ndarray, start: int = 10, stop: int = 100) -> PowerLawFit:
    """alpha-ReQ of features ``x`` (N x D): the power-law fit of their covariance eigenspectrum over [start, stop),
    clipped by :func:`alpha_fit_range` (ValueError when fewer than two eigenvalues remain)."""
    eig = covariance_eigenvalues(x)
    return powerlaw_fit(eig, *alpha_fit_range(eig, start, stop))


def _normalized(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)  # F.normalize, as align_uniform uses


def uniformity(x: np.ndarray, t: float = 2.0, block: int = 1024) -> float:
    """log mean_{i<j} exp(-t ||x_i - x_j||^2) of the L2-normalised rows (Wang & Isola 2020, ``uniform_loss``: torch's
    ``pdist`` pairs), as a log-sum-exp over row blocks so N = 25,600 needs no N x N matrix."""
    z = _normalized(x)
    n = len(z)
    if n < 2:
        return float("nan")
    sq = (z * z).sum(axis=1)
    logs = []
    for lo in range(0, n - 1, block):
        hi = min(n, lo + block)
        d2 = np.maximum(sq[lo:hi, None] + sq[None, :] - 2.0 * z[lo:hi] @ z.T, 0.0)
        upper = np.arange(n)[None, :] > np.arange(lo, hi)[:, None]  # pairs i < j only
        v = -t * d2[upper]
        if v.size:
            m = v.max()
            logs.append(m + math.log(np.exp(v - m).sum()))
    logs = np.array(logs)
    m = logs.max()
    return float(m + math.log(np.exp(logs - m).sum()) - math.log(n * (n - 1) / 2))


def alignment(x: np.ndarray, y: np.ndarray, alpha: float = 2.0) -> float:
    """mean_i ||x_i - y_i||^alpha of the L2-normalised rows of two views of the same samples (Wang & Isola 2020,
    ``align_loss``)."""
    if np.shape(x) != np.shape(y):
        raise ValueError(f"the two views have different shapes: {np.shape(x)} and {np.shape(y)}")
    return float((np.linalg.norm(_normalized(x) - _normalized(y), axis=1) ** alpha).mean())
