"""Navigation environments: a small simulator interface, MiniWorld behind it, episode bookkeeping for SPL.

Any gymnasium simulator plugs in as a :class:`Simulator`: how to build an environment that
returns ``(H, W, 3)`` uint8 first-person frames, where the agent is, and the shortest-path
distance from the agent's start to the goal (for SPL, Anderson et al. 2018). MiniWorld
(Chevalier-Boisvert et al., PyPI ``miniworld``) is registered as ``miniworld``; environment
names are ``miniworld:Hallway`` or just ``Hallway``.

Headless rendering (measured on CPU-only Linux): EGL on Mesa's software renderer, with
``PYOPENGL_PLATFORM=egl`` and ``pyglet.options["headless"] = True`` set before MiniWorld is
imported, and torch imported before the first environment is created (the other order
segfaulted). :func:`require_gl` loads the EGL/GL/GLU libraries with ctypes *before* pyglet is
imported, so a machine without them gets one line naming the Debian packages, not a crash.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import gymnasium as gym
import numpy as np

from evalsuite.errors import UserError
from tasks.navigation.metrics import Episode

GL_PACKAGES = "libegl1 libegl-mesa0 libgl1-mesa-dri libglu1-mesa libgl1"
GL_LIBRARIES = ("libEGL.so.1", "libGL.so.1", "libGLU.so.1")

# MiniWorld environments whose task is "reach the red box" (termination = near(box)): SPL is defined.
MINIWORLD_POINT_GOAL = (
    "Hallway", "OneRoom", "OneRoomS6", "OneRoomS6Fast", "FourRooms", "Maze", "MazeS2", "MazeS3",
    "MazeS3Fast", "TMaze", "TMazeLeft", "TMazeRight", "YMaze", "YMazeLeft", "YMazeRight", "WallGap", "Sidewalk",
)


class SimulatorUnavailable(UserError):
    """The simulator (or the system libraries it renders with) is not installed."""


# ----------------------------------------------------------------------------- headless GL

_load_library: Callable[[str], object] = ctypes.CDLL  # monkeypatched by tests to simulate a bare machine


def require_gl() -> None:
    """Load EGL, GL and GLU with ctypes; raise one clear line naming the Debian packages if any is missing."""
    missing = []
    for lib in GL_LIBRARIES:
        try:
            _load_library(lib)
        except OSError:
            missing.append(lib)
    if missing:
        raise SimulatorUnavailable(
            f"headless rendering needs {', '.join(missing)} (EGL/OpenGL); install the Debian packages: "
            f"apt-get install {GL_PACKAGES}"
        )


def gl_available() -> bool:
    try:
        require_gl()
    except SimulatorUnavailable:
        return False
    return True


def import_miniworld():
    """Import MiniWorld for headless EGL rendering (see the module docstring for the order that works)."""
    require_gl()
    if "miniworld" in sys.modules:
        return sys.modules["miniworld"]
    os.environ.setdefault("PYOPENGL_PLATFORM", "egl")
    import torch  # noqa: F401  (must be imported before the first GL context is created)

    try:
        import pyglet
    except ImportError as e:  # pragma: no cover - depends on the installation
        raise SimulatorUnavailable("pyglet is not installed; install the [nav] extra "
                                   "(pip install 'evalsuite[nav]')") from e
    pyglet.options["headless"] = True
    try:
        import miniworld
    except ImportError as e:
        raise SimulatorUnavailable(f"miniworld cannot be imported ({_first_line(e)}); install the [nav] extra "
                                   f"and the Debian packages {GL_PACKAGES}") from e
    return miniworld


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


# ----------------------------------------------------------------------------- simulator interface


@dataclass(frozen=True)
class Simulator:
    """How one gymnasium simulator is driven by the navigation task.

    ``make(env, image_size, kwargs)`` returns a gymnasium env with ``(H, W, 3)`` uint8 observations and a
    Discrete action space; ``position(env)`` the agent's ground-plane position (metres);
    ``shortest_path(env)`` the shortest-path distance from the current position to the goal region,
    called right after ``reset``; ``success(env, terminated, info)`` whether the episode reached the goal;
    ``pose(env)`` the camera's ground-truth (x, y, heading) for ego-motion data (None: not offered).
    """

    name: str
    environments: tuple[str, ...]
    make: Callable[[str, int, dict], gym.Env]
    position: Callable[[gym.Env], np.ndarray]
    shortest_path: Callable[[gym.Env], float]
    success: Callable[[gym.Env, bool, dict], bool] = field(default=lambda env, terminated, info: bool(terminated))
    pose: Callable[[gym.Env], np.ndarray] | None = None


SIMULATORS: dict[str, Simulator] = {}


def register_simulator(sim: Simulator) -> None:
    SIMULATORS[sim.name] = sim


def resolve(name: str) -> tuple[Simulator, str]:
    """``"miniworld:Hallway"``, ``"Hallway"`` or ``"MiniWorld-Hallway-v0"`` -> (simulator, environment)."""
    sim_name, _, env = name.rpartition(":")
    sim_name = sim_name or "miniworld"
    if sim_name not in SIMULATORS:
        raise UserError(f"unknown simulator {sim_name!r} in environment {name!r}; known: {', '.join(SIMULATORS)}")
    sim = SIMULATORS[sim_name]
    if sim_name == "miniworld" and env.startswith("MiniWorld-") and env.endswith("-v0"):
        env = env[len("MiniWorld-"):-len("-v0")]
    if env not in sim.environments:
        raise UserError(f"unknown navigation environment {name!r}; {sim_name} provides: "
                        f"{', '.join(sim.environments)}")
    return sim, env


# ----------------------------------------------------------------------------- MiniWorld


def _miniworld_make(env: str, image_size: int, kwargs: dict) -> gym.Env:
    import_miniworld()
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # MiniWorld prints "Falling back to num_samples=4"
            return gym.make(f"MiniWorld-{env}-v0", obs_width=image_size, obs_height=image_size, **kwargs)
    except UserError:
        raise
    except Exception as e:  # an EGL display/driver that loads but cannot create a context
        raise SimulatorUnavailable(f"MiniWorld could not create an OpenGL context ({_first_line(e)}); install "
                                   f"the Debian packages {GL_PACKAGES} and set PYOPENGL_PLATFORM=egl") from e


def _xz(p) -> np.ndarray:
    return np.array([float(p[0]), float(p[2])])


def _miniworld_position(env: gym.Env) -> np.ndarray:
    return _xz(env.unwrapped.agent.pos)


def miniworld_goal_radius(u) -> float:
    """MiniWorld's ``near(box)``: the episode succeeds when the agent's centre is within this distance."""
    return float(u.box.radius + u.agent.radius + 1.1 * u.max_forward_step)


def _miniworld_shortest_path(env: gym.Env, resolution: float = 0.1) -> float:
    u = env.unwrapped
    segs = np.asarray(u.wall_segs, dtype=np.float64)[:, :, [0, 2]]  # (S, 2, 2) wall segments on the floor
    obstacles = [(_xz(e.pos), float(e.radius)) for e in u.entities if e is not u.agent and e is not u.box]
    return shortest_path_2d(_xz(u.agent.pos), _xz(u.box.pos), miniworld_goal_radius(u), float(u.agent.radius),
                            segs, obstacles, resolution)


def _miniworld_pose(env: gym.Env) -> np.ndarray:
    """The camera's (x, y, heading) with y = -z: MiniWorld is y-up with forward (cos dir, 0, -sin dir), so on the
    (x, -z) plane the heading ``dir`` turns counter-clockwise (a left turn adds to it)."""
    a = env.unwrapped.agent
    cam = a.cam_pos
    return np.array([float(cam[0]), -float(cam[2]), (float(a.dir) + np.pi) % (2 * np.pi) - np.pi])


register_simulator(Simulator("miniworld", MINIWORLD_POINT_GOAL, _miniworld_make, _miniworld_position,
                             _miniworld_shortest_path, pose=_miniworld_pose))


# ----------------------------------------------------------------------------- geometry


def _segment_distance(points: np.ndarray, segs: np.ndarray) -> np.ndarray:
    """Distance from each point (P, 2) to the nearest segment (S, 2, 2): (P,)."""
    if len(segs) == 0:
        return np.full(len(points), np.inf)
    a, b = segs[:, 0], segs[:, 1]
    ab = b - a
    ab2 = np.maximum((ab * ab).sum(-1), 1e-12)[None]
    out = np.empty(len(points))
    for lo in range(0, len(points), 2048):  # blocks: a big maze has thousands of cells x hundreds of walls
        p = points[lo:lo + 2048, None, :]
        t = np.clip(((p - a[None]) * ab[None]).sum(-1) / ab2, 0.0, 1.0)
        out[lo:lo + 2048] = np.linalg.norm(p - (a[None] + t[..., None] * ab[None]), axis=-1).min(axis=1)
    return out


def _free(points: np.ndarray, segs: np.ndarray, obstacles, radius: float) -> np.ndarray:
    ok = _segment_distance(points, segs) >= radius
    for centre, r in obstacles:
        ok &= np.linalg.norm(points - centre, axis=1) >= radius + r
    return ok


def shortest_path_2d(start: np.ndarray, goal: np.ndarray, goal_radius: float, agent_radius: float,
                     segs: np.ndarray, obstacles=(), resolution: float = 0.1) -> float:
    """Shortest distance for a disc of ``agent_radius`` from ``start`` to within ``goal_radius`` of ``goal``.

    Exact (straight line minus the goal radius) when that line keeps clear of every wall and
    obstacle; otherwise the geodesic on an 8-connected grid of ``resolution`` metres over the
    free space (Dijkstra), which overestimates a free-space straight line by at most ~8%.
    """
    start, goal = np.asarray(start, float), np.asarray(goal, float)
    direct = float(np.linalg.norm(goal - start))
    if direct <= goal_radius:
        return 0.0
    end = start + (goal - start) * (direct - goal_radius) / direct
    n = max(2, int(np.ceil((direct - goal_radius) / (resolution / 4))) + 1)
    line = start[None] + np.linspace(0.0, 1.0, n)[:, None] * (end - start)[None]
    if _free(line, segs, obstacles, agent_radius).all():
        return direct - goal_radius
    return _grid_geodesic(start, goal, goal_radius, agent_radius, segs, obstacles, resolution)


def _grid_geodesic(start, goal, goal_radius, agent_radius, segs, obstacles, resolution) -> float:
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import dijkstra

    pts = np.concatenate([segs.reshape(-1, 2), start[None], goal[None]]) if len(segs) else np.stack([start, goal])
    pad = 2 * agent_radius + 2 * resolution  # room to walk around a free-standing wall's end
    lo, hi = pts.min(0) - pad, pts.max(0) + pad
    nx, nz = (np.ceil((hi - lo) / resolution).astype(int) + 1)
    gx, gz = np.meshgrid(np.arange(nx), np.arange(nz), indexing="ij")
    centres = lo[None] + np.stack([gx.ravel(), gz.ravel()], 1) * resolution
    free = _free(centres, segs, obstacles, agent_radius)
    idx = np.arange(nx * nz).reshape(nx, nz)
    rows, cols, w = [], [], []
    for dx, dz in ((1, 0), (0, 1), (1, 1), (1, -1)):
        a = idx[max(0, -dx):nx - max(0, dx), max(0, -dz):nz - max(0, dz)].ravel()
        b = idx[max(0, dx):nx + min(0, dx) or None, max(0, dz):nz + min(0, dz) or None].ravel()
        both = free[a] & free[b]
        rows.append(a[both])
        cols.append(b[both])
        w.append(np.full(both.sum(), resolution * np.hypot(dx, dz)))
    rows_a, cols_a, w_a = np.concatenate(rows), np.concatenate(cols), np.concatenate(w)
    graph = coo_matrix((w_a, (rows_a, cols_a)), shape=(nx * nz, nx * nz)).tocsr()
    # connect the exact start to the free cells around it
    near_start = np.flatnonzero(free & (np.linalg.norm(centres - start, axis=1) <= 1.5 * resolution))
    if len(near_start) == 0:
        return float("nan")
    offsets = np.linalg.norm(centres[near_start] - start, axis=1)
    total = (dijkstra(graph, directed=False, indices=near_start) + offsets[:, None]).min(axis=0)
    in_goal = free & (np.linalg.norm(centres - goal, axis=1) <= goal_radius)
    if not in_goal.any() or not np.isfinite(total[in_goal]).any():
        return float("nan")
    # the nearest free cell inside the goal region: the boundary is where the path enters it
    return float(total[in_goal].min())


# ----------------------------------------------------------------------------- episode bookkeeping


class NavEpisodeTracker(gym.Wrapper):
    """Records shortest path (at reset), travelled path, return and length; at the end of an episode
    ``info["nav_episode"]`` holds a :class:`~tasks.navigation.metrics.Episode` as a dict."""

    def __init__(self, env: gym.Env, sim: Simulator):
        super().__init__(env)
        self.sim = sim
        self._reset_stats()

    def _reset_stats(self):
        self._shortest = float("nan")
        self._pos = None
        self._path = 0.0
        self._ret = 0.0
        self._len = 0

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        self._reset_stats()
        self._pos = self.sim.position(self.env)
        self._shortest = float(self.sim.shortest_path(self.env))
        return obs, info

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        pos = self.sim.position(self.env)
        self._path += float(np.linalg.norm(pos - self._pos))
        self._pos = pos
        self._ret += float(reward)
        self._len += 1
        if terminated or truncated:
            info = dict(info)
            info["nav_episode"] = Episode(
                success=bool(self.sim.success(self.env, terminated, info)), shortest_path=self._shortest,
                path_length=self._path, ret=self._ret, length=self._len,
            ).to_dict()
        return obs, reward, terminated, truncated, info


def record_egomotion(name: str, seeds: Sequence[int], length: int, image_size: int, env_kwargs: dict | None = None,
                     turn_prob: float = 0.4, tries: int = 10) -> Iterator[tuple[np.ndarray, np.ndarray, list[int]]]:
    """Ego-motion data: per seed, ``length`` frames of a random walk in one episode, with the camera's pose.

    Each step turns left / right with probability ``turn_prob`` / 2 each, else moves forward (MiniWorld's actions
    0, 1, 2); a blocked forward step starts a turn of 3-8 steps in one direction, so the walk leaves walls.
    An episode that ends sooner (the goal reached) is recorded again from the next reset, up to ``tries`` times.
    Yields the frames uint8 (T, H, W, 3), the poses float64 (T, 3) from the simulator's ``pose`` and the T - 1
    actions (``evalsuite.data.synth_video.write_egomotion`` writes them to disk)."""
    sim, env_name = resolve(name)
    if sim.pose is None:
        raise UserError(f"simulator {sim.name!r} does not report camera poses")
    env = sim.make(env_name, image_size, dict(env_kwargs or {}))
    try:
        for seed in seeds:
            rng = np.random.default_rng(seed)
            best = None
            for attempt in range(tries):
                obs, _ = env.reset(seed=int(seed) + 7919 * attempt)
                frames, poses, actions, escape = [obs], [sim.pose(env)], [], []
                while len(frames) < length:
                    if actions and actions[-1] == 2 and np.allclose(poses[-1], poses[-2]):  # walked into a wall
                        escape = [int(rng.integers(2))] * int(rng.integers(3, 9))
                    action = escape.pop() if escape else int(rng.choice(3, p=[turn_prob / 2, turn_prob / 2,
                                                                                1 - turn_prob]))
                    obs, _, terminated, truncated, _ = env.step(action)
                    frames.append(obs)
                    poses.append(sim.pose(env))
                    actions.append(action)
                    if terminated or truncated:
                        break
                if best is None or len(frames) > len(best[0]):
                    best = (np.stack(frames).astype(np.uint8), np.stack(poses), actions)
                if len(frames) == length:
                    break
            yield best
    finally:
        env.close()


def make_env(name: str, image_size: int, env_kwargs: dict | None = None) -> gym.Env:
    sim, env = resolve(name)
    return NavEpisodeTracker(sim.make(env, image_size, dict(env_kwargs or {})), sim)


def make_vec_env(name: str, n_envs: int, seed: int, image_size: int, env_kwargs: dict | None = None):
    """``n_envs`` tracked environments in one process (SB3 DummyVecEnv), seeded ``seed + i`` at the first reset."""
    from stable_baselines3.common.vec_env import DummyVecEnv

    resolve(name)  # unknown names fail before any simulator is started
    venv = DummyVecEnv([lambda: make_env(name, image_size, env_kwargs) for _ in range(n_envs)])
    venv.seed(seed)
    return venv
