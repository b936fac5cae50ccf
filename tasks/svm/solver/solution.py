"""What every backend returns (:class:`SVMSolution`) and the shape contract of a batch of problems."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from evalsuite.errors import UserError


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
        """Problem p's weights on the augmented rows [x, s]: (D + 1,), the bias as the last weight."""
        s = intercept_scaling if intercept_scaling else 1.0
        return np.concatenate([self.weight[p], [self.bias[p] / s]])

    def select(self, problems: np.ndarray) -> SVMSolution:
        """The solution of the given problems only."""
        return SVMSolution(self.weight[problems], self.bias[problems], self.converged[problems],
                           self.iterations[problems], self.backend)


def check_problems(x: np.ndarray, y: np.ndarray, costs: np.ndarray, col: np.ndarray | None = None) -> None:
    """Shapes of one batch: problem p uses label column ``col[p]`` of y (default: column p) and cost p."""
    if col is None:
        cols_ok = y.ndim == 2 and y.shape[1] == costs.shape[0]
    else:
        cols_ok = y.ndim == 2 and col.shape == costs.shape and int(col.max(initial=-1)) < y.shape[1]
    if not cols_ok or y.shape[0] != x.shape[0]:
        raise UserError(f"svm: labels {y.shape} / costs {costs.shape} do not match features {x.shape}")
    if not (costs > 0).all():
        raise UserError("svm costs must be positive")
