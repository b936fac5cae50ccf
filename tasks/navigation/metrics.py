"""Navigation metrics as pure functions: success rate, SPL, mean return and episode length.

SPL (Success weighted by (normalized inverse) Path Length), Anderson et al. 2018,
"On Evaluation of Embodied Navigation Agents", Eq. 1::

    SPL = 1/N * sum_i S_i * l_i / max(p_i, l_i)

with S_i the binary success of episode i, l_i the shortest-path distance from the
agent's start to the goal (from the simulator's geometry) and p_i the length of the
path the agent actually took. An episode that starts inside the goal region
(l_i = p_i = 0) and succeeds counts as 1 (the ratio's limit: the shortest path was taken).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class Episode:
    """What one finished episode contributes to the metrics."""

    success: bool
    shortest_path: float  # l_i, metres (simulator units)
    path_length: float  # p_i, metres actually travelled
    ret: float  # sum of rewards
    length: int  # number of steps

    def to_dict(self) -> dict:
        return asdict(self)


def _check(success: Sequence, shortest: Sequence, path: Sequence) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    s = np.asarray(success, dtype=bool).reshape(-1)
    lengths = np.asarray(shortest, dtype=np.float64).reshape(-1)
    p = np.asarray(path, dtype=np.float64).reshape(-1)
    if not (len(s) == len(lengths) == len(p)):
        raise ValueError(f"success, shortest and path lengths differ: {len(s)}, {len(lengths)}, {len(p)}")
    if not (np.all(np.isfinite(lengths)) and np.all(np.isfinite(p))):
        raise ValueError("path lengths must be finite")
    if np.any(lengths < 0) or np.any(p < 0):
        raise ValueError("path lengths must be non-negative")
    return s, lengths, p


def success_rate(success: Sequence[bool]) -> float:
    s = np.asarray(success, dtype=bool).reshape(-1)
    if len(s) == 0:
        raise ValueError("no episodes")
    return float(s.mean())


def spl_terms(success: Sequence[bool], shortest: Sequence[float], path: Sequence[float]) -> np.ndarray:
    """Each episode's S_i l_i / max(p_i, l_i) (1 for a success that starts inside the goal region)."""
    s, lengths, p = _check(success, shortest, path)
    denom = np.maximum(p, lengths)
    return s * np.where(denom > 0, lengths / np.where(denom > 0, denom, 1.0), 1.0)


def spl(success: Sequence[bool], shortest: Sequence[float], path: Sequence[float]) -> float:
    """Anderson et al. 2018 SPL over N episodes (see the module docstring): the mean of :func:`spl_terms`."""
    terms = spl_terms(success, shortest, path)
    if len(terms) == 0:
        raise ValueError("no episodes")
    return float(np.mean(terms))


def episode_values(episodes: Iterable[Episode]) -> dict[str, np.ndarray]:
    """Per episode, the value each metric of :func:`summarize` is the mean of: success (0/1), the SPL term (NaN
    where the geometry gave no shortest path: left out of SPL), return and length."""
    eps = list(episodes)
    shortest = np.array([e.shortest_path for e in eps], np.float64)
    success = np.array([e.success for e in eps], bool)
    known = np.isfinite(shortest)
    terms = np.full(len(eps), np.nan)
    terms[known] = spl_terms(success[known], shortest[known], np.array([e.path_length for e in eps])[known])
    return {"success_rate": success.astype(np.float64), "spl": terms,
            "mean_return": np.array([e.ret for e in eps], np.float64),
            "mean_length": np.array([e.length for e in eps], np.float64)}


def summarize(episodes: Iterable[Episode]) -> dict[str, float]:
    """success_rate, spl, mean_return, mean_length (and num_episodes) of a set of episodes."""
    eps = list(episodes)
    if not eps:
        raise ValueError("no episodes")
    s = [e.success for e in eps]
    # an episode whose shortest path the geometry could not give (NaN) is left out of SPL only
    known = [e for e in eps if np.isfinite(e.shortest_path)]
    return {
        "success_rate": success_rate(s),
        "spl": spl([e.success for e in known], [e.shortest_path for e in known], [e.path_length for e in known])
        if known else float("nan"),
        "spl_episodes": len(known),
        "mean_return": float(np.mean([e.ret for e in eps])),
        "mean_length": float(np.mean([e.length for e in eps])),
        "num_episodes": len(eps),
    }


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and population std (ddof=0) across seeds, as the anchors' "mean ± std" over 5 seeds."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        raise ValueError("no values")
    return float(v.mean()), float(v.std())
