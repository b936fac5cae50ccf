"""Navigation metrics (pure): SPL on hand-made trajectories, success rate, summaries; shortest-path geometry."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tasks.navigation.env import shortest_path_2d
from tasks.navigation.metrics import Episode, mean_std, spl, success_rate, summarize


def reference_spl(episodes):
    """Anderson et al. 2018, Eq. 1, written out term by term."""
    episodes = list(episodes)
    total = 0.0
    for s, short, p in episodes:
        if s:
            total += 1.0 if max(p, short) == 0 else short / max(p, short)
    return total / len(episodes)


def test_spl_on_hand_made_trajectories():
    # start (0,0), goal (3,4): shortest path 5
    straight = [(0, 0), (3, 4)]  # p = 5, success -> 1
    detour = [(0, 0), (0, 4), (3, 4)]  # p = 7, success -> 5/7
    lost = [(0, 0), (-1, 0)]  # failure -> 0 whatever the path
    paths = [straight, detour, lost]
    p = [sum(math.dist(a, b) for a, b in zip(t, t[1:])) for t in paths]
    assert p == [5.0, 7.0, 1.0]
    s, lengths = [True, True, False], [5.0, 5.0, 5.0]
    assert spl(s, lengths, p) == pytest.approx((1 + 5 / 7 + 0) / 3)
    assert spl(s, lengths, p) == pytest.approx(reference_spl(zip(s, lengths, p)))
    assert success_rate(s) == pytest.approx(2 / 3)


def test_spl_edge_cases():
    # reaching the goal region earlier than the shortest path (p < l) counts as 1, not more
    assert spl([True], [5.0], [4.0]) == 1.0
    # starting inside the goal region: l = p = 0 and success -> 1
    assert spl([True, False], [0.0, 0.0], [0.0, 0.0]) == 0.5
    with pytest.raises(ValueError):
        spl([True], [-1.0], [1.0])
    with pytest.raises(ValueError):
        spl([True, False], [1.0], [1.0, 2.0])
    with pytest.raises(ValueError):
        spl([], [], [])


def test_spl_matches_reference_on_random_episodes():
    rng = np.random.default_rng(0)
    s = rng.random(200) < 0.6
    lengths = rng.uniform(0, 10, 200)
    p = lengths * rng.uniform(0.8, 3.0, 200)
    assert spl(s, lengths, p) == pytest.approx(reference_spl(zip(s, lengths, p)))


def test_summarize_and_mean_std():
    eps = [Episode(True, 2.0, 4.0, 0.9, 10), Episode(False, 3.0, 1.0, 0.0, 50), Episode(True, 1.0, 1.0, 0.8, 6)]
    out = summarize(eps)
    assert out["success_rate"] == pytest.approx(2 / 3)
    assert out["spl"] == pytest.approx((0.5 + 0 + 1.0) / 3)
    assert out["mean_return"] == pytest.approx(1.7 / 3)
    assert out["mean_length"] == pytest.approx(22.0)
    assert out["num_episodes"] == 3 == out["spl_episodes"]
    unknown = summarize([*eps, Episode(True, float("nan"), 2.0, 1.0, 3)])  # no shortest path: left out of SPL
    assert unknown["spl"] == pytest.approx(out["spl"]) and unknown["spl_episodes"] == 3
    assert unknown["success_rate"] == pytest.approx(3 / 4)
    assert mean_std([0.5, 0.7]) == pytest.approx((0.6, 0.1))  # population std over seeds


def test_shortest_path_open_room_is_the_straight_line_to_the_goal_region():
    room = np.array([[[-5, -5], [5, -5]], [[5, -5], [5, 5]], [[5, 5], [-5, 5]], [[-5, 5], [-5, -5]]], float)
    d = shortest_path_2d(np.array([0.0, 0.0]), np.array([3.0, 4.0]), 1.0, 0.4, room)
    assert d == pytest.approx(5.0 - 1.0)
    assert shortest_path_2d(np.array([0.0, 0.0]), np.array([0.5, 0.0]), 1.0, 0.4, room) == 0.0


def test_shortest_path_goes_around_a_wall():
    # a wall from (2,-5) to (2,1) between start (0,0) and goal (4,0); the agent (radius r) wraps around its end
    wall = np.array([[[2.0, -5.0], [2.0, 1.0]]])
    r, goal_r = 0.4, 0.05
    c = np.array([2.0, 1.0])
    d = np.linalg.norm(c - [0.0, 0.0])
    tangent = math.sqrt(d * d - r * r)
    # angle at the wall end between the directions to start and goal, on the side facing away from them
    a_start, a_goal = np.array([0.0, 0.0]) - c, np.array([4.0, 0.0]) - c
    between = math.acos(a_start @ a_goal / (np.linalg.norm(a_start) * np.linalg.norm(a_goal)))
    arc = r * ((2 * math.pi - between) - 2 * math.acos(r / d))
    exact = 2 * tangent + arc - goal_r
    got = shortest_path_2d(np.array([0.0, 0.0]), np.array([4.0, 0.0]), goal_r, r, wall, resolution=0.05)
    straight = 4.0 - goal_r
    assert got > straight + 0.5  # not the straight line through the wall
    assert exact - 0.1 <= got <= exact * 1.085 + 0.1  # 8-connected grid: at most ~8% longer
