"""One entry point over the three backends: :func:`solve` and :func:`solve_with_scores`."""

from __future__ import annotations

import numpy as np

from .config import SVMConfig
from .newton import solve_torch
from .reference import solve_cyanure, solve_sklearn
from .solution import SVMSolution, check_problems


def solve(x: np.ndarray, y: np.ndarray, costs: np.ndarray, config: SVMConfig, device: str = "cpu",
          progress: bool = False) -> SVMSolution:
    """Solve P binary problems on shared rows ``x`` (N, D): column p of ``y`` (N, P) holds +1/-1 for the
    rows in problem p and 0 for rows left out of it; ``costs`` (P,) the C of each problem."""
    return solve_with_scores(x, y, costs, config, device, progress)[0]


def solve_with_scores(x: np.ndarray, y: np.ndarray, costs: np.ndarray, config: SVMConfig, device: str = "cpu",
                      progress: bool = False, keep: np.ndarray | None = None
                      ) -> tuple[SVMSolution, np.ndarray, np.ndarray]:
    """:func:`solve`, plus the (N, P) decision values of every problem on the rows of ``x`` and the (P,)
    convergence flags; the returned solution holds only the problems ``keep`` (default: all). The torch
    backend gets the scores from its margins for free and maps only the kept problems back to weights."""
    y = np.asarray(y)
    costs = np.asarray(costs, dtype=np.float64).reshape(-1)
    check_problems(x, y, costs)
    keep = np.arange(y.shape[1]) if keep is None else np.asarray(keep, dtype=np.int64)
    if config.backend == "torch":
        run = solve_torch(x, y, costs, config, device, progress, keep)
        return run.solution, run.scores, run.converged
    sol = solve_sklearn(x, y, costs, config) if config.backend == "sklearn" else solve_cyanure(x, y, costs, config)
    return sol.select(keep), sol.decision(x), sol.converged
