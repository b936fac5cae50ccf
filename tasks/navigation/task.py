"""Navigation with a policy trained by RL on frozen features (Goyal et al. 2019 Sec. 6; Sax et al. 2018).

An agent sees first-person RGB frames of a 3D simulator; the frozen trunk turns every
frame into its res3/res4/res5 maps (a ViT: its last block and ``last4``, each patch-token grid as a
map; one batched pass for all parallel environments per step, ``tasks.navigation.features``); only a
small policy is trained, with PPO from stable-baselines3. Its first layers compress the taps of each
frame to 8 x 16 x 16 (the size of the mid-level representations of Sax et al.), the last 4 frames are
stacked. Scores on
held-out episodes: success rate, SPL (Anderson et al. 2018, shortest path from the
simulator's geometry, ``tasks.navigation.metrics``), mean episode return and length, each as
mean +- std over seeds; in the same result set two baselines: ``random`` (uniform actions)
and ``blind`` (the same PPO on a constant observation: no visual input).

Simulator: the anchors used Gibson, which is not available here; this task uses MiniWorld
(first-person, gymnasium) through ``tasks.navigation.env``, where other gymnasium simulators plug in.

Presets:
- ``goyal19``: the anchors' RL settings -- PPO, lr 1e-4, clip 0.1, gamma 0.99, 4 stacked
  frames, res3/res4/res5 compressed by a trainable conv to 8x16x16, 5 seeds mean +- std --
  on MiniWorld OneRoom (10 m room, 180 steps) at 128 px (res3 of a ResNet is then 16x16),
  8 environments, a budget of 1M frames per seed. The remaining PPO fields (n_steps, batch,
  epochs, GAE lambda, entropy/value coefficients) are stable-baselines3 defaults scaled to
  8 environments; they are not given by the anchors.
- ``vissl``: VISSL has no navigation benchmark; identical to ``goyal19`` (recorded in a note).
- ``quick``: CPU/CI sized: OneRoomS6Fast (6 m room, 50 steps, 45 degree turns) at 32 px, 8 environments,
  6144 frames, one seed, lr 3e-4, compression to 8x8x8; about a minute of one CPU core.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from evalsuite.console import progress
from evalsuite.errors import UserError
from evalsuite.io import atomic_write_json
from evalsuite.outputs import MetricOutputs, SampleOutputs
from evalsuite.plan import TaskPlan
from evalsuite.protocols import TaskProtocol, preset_changes
from evalsuite.results import Result
from evalsuite.task import TaskContext
from tasks.navigation.metrics import Episode, episode_values, mean_std, summarize

METRICS = ("success_rate", "spl", "mean_return", "mean_length")
AGENTS = ("ppo", "random", "blind")
SIMULATOR_NOTE = "MiniWorld instead of the anchors' Gibson simulator (not available here)"
VISSL_NOTE = "VISSL has no navigation benchmark: the vissl preset is the goyal19 protocol"


@dataclass(frozen=True)
class PPOConfig(TaskProtocol):
    """stable-baselines3 PPO's arguments, under its own names (passed to ``PPO(...)`` as they are)."""

    learning_rate: float = 1e-4
    n_steps: int = 256  # per environment and rollout
    batch_size: int = 256
    n_epochs: int = 4
    gamma: float = 0.99
    gae_lambda: float = 0.95
    clip_range: float = 0.1
    ent_coef: float = 0.01
    vf_coef: float = 0.5
    max_grad_norm: float = 0.5


@dataclass(frozen=True)
class NavigationProtocol(TaskProtocol):
    """The goyal19 settings (see the module docstring); presets change a few of them."""

    env: str = "miniworld:OneRoom"
    env_kwargs: dict = field(default_factory=dict)  # passed to the simulator's constructor
    image_size: int = 128
    n_envs: int = 8
    layers: tuple[str, ...] = ("res3", "res4", "res5")
    frame_stack: int = 4
    compress_channels: int = 8
    compress_grid: int = 16
    compress_hidden: int = 32
    features_dim: int = 256
    frames: int = 1_000_000
    num_seeds: int = 5
    ppo: PPOConfig = field(default_factory=PPOConfig)
    eval_episodes: int = 100
    eval_deterministic: bool = False
    baselines: tuple[str, ...] = ("random", "blind")
    precision: Literal["auto", "fp32", "bf16"] = "auto"


_PRESET_CHANGES: dict[str, dict[str, Any]] = {
    "goyal19": {},
    "vissl": {},
    "quick": {"env": "miniworld:OneRoomS6Fast", "image_size": 32, "frames": 6144, "num_seeds": 1,
              "ppo": PPOConfig(learning_rate=3e-4, n_steps=64, batch_size=128), "compress_grid": 8,
              "compress_hidden": 16, "eval_episodes": 32},
}


class NavigationTask:
    name = "navigation"
    description = ("PPO policy on frozen res3/res4/res5 features in a first-person 3D simulator (MiniWorld): "
                   "success rate, SPL, return, length; random and blind baselines")
    headline_metrics = ("success_rate", "spl")

    def seeded(self, protocol: NavigationProtocol) -> bool:
        """`--seeds` runs navigation once per seed only with ``num_seeds=1`` (quick): with more it already averages
        the seeds ctx.seed .. ctx.seed + num_seeds - 1 in each record, and a second run from the next seed would
        train the same seeds again. So it runs once, from the first seed of `--seeds`."""
        return protocol.num_seeds == 1

    def default_protocol(self, preset: str) -> NavigationProtocol:
        return NavigationProtocol(**preset_changes(_PRESET_CHANGES, preset, self.name))

    def check_environment(self) -> None:
        """Headless GL must load before the simulator starts (the optional part of the task contract)."""
        from tasks.navigation.env import require_gl

        require_gl()

    def run(self, ctx: TaskContext) -> list[Result]:
        p = ctx.protocol
        from tasks.navigation.env import resolve

        resolve(p.env)  # unknown environment: fail before anything heavy
        unknown = [b for b in p.baselines if b not in ("random", "blind")]
        if unknown:
            raise UserError(f"unknown navigation baseline(s) {', '.join(unknown)}; choose random, blind")
        taps = ctx.taps(p.layers)
        from tasks.navigation.features import check_trunk_taps

        trunk = ctx.trunk
        check_trunk_taps(trunk, taps)
        seeds = [ctx.seed + i for i in range(p.num_seeds)]
        state_dir = ctx.out_dir / "navigation_state" / _fingerprint(ctx, taps)[:16]
        jobs = [(agent, s) for agent in ("ppo", *p.baselines) for s in seeds]
        summaries: dict[str, list[dict]] = {a: [] for a in ("ppo", *p.baselines)}
        for agent, seed in progress(jobs, desc=self.name, enabled=ctx.progress, unit="run"):
            path = state_dir / f"{agent}-seed{seed}.json"
            if path.exists():  # resume: a finished (agent, seed) is never rerun
                summaries[agent].append(json.loads(path.read_text()))
                continue
            summary = run_agent(agent, p, seed, ctx.device, trunk=trunk if agent == "ppo" else None, taps=taps,
                                normalize=_normalize(ctx))
            atomic_write_json(path, summary, default=float)
            summaries[agent].append(summary)

        results = []
        layer_of = {"ppo": "+".join(taps), "random": "random", "blind": "blind"}
        for agent, runs in summaries.items():
            params = {
                "agent": agent, "seeds": seeds, "taps": taps if agent == "ppo" else [],
                "simulator": SIMULATOR_NOTE, "device": ctx.device,
                "per_seed": [{k: r.get(k) for k in (*METRICS, "num_episodes", "spl_episodes", "seed")} for r in runs],
                "timing": [r.get("timing", {}) for r in runs],
            }
            if ctx.preset == "vissl":
                params["vissl_note"] = VISSL_NOTE
            note = {"ppo": "", "random": "baseline: uniformly random actions",
                    "blind": "baseline: PPO on a constant observation (no visual input)"}[agent]
            outputs = episode_outputs(runs)
            for metric in METRICS:
                mean, std = mean_std([r[metric] for r in runs])
                results.append(ctx.result(_dataset(p.env), "eval", layer_of[agent], metric, mean,
                                          params={**params, "std": std}, note=note,
                                          outputs=None if outputs is None else outputs[metric]))
        return results

    def plan(self, ctx: TaskContext) -> TaskPlan:
        """The frames the frozen trunk encodes while PPO trains: stable-baselines3 collects whole rollouts of
        n_steps x n_envs frames until ``frames`` is reached, one batched forward pass of n_envs frames per step."""
        p: NavigationProtocol = ctx.protocol
        rollout = p.ppo.n_steps * p.n_envs
        steps = math.ceil(p.frames / rollout) * p.ppo.n_steps  # per seed
        return TaskPlan(images={"ppo training frames": p.num_seeds * steps * p.n_envs}, image_size=p.image_size,
                        note=f"{p.num_seeds} seed(s) x {steps} forward passes of {p.n_envs} frames; simulation, "
                             f"PPO updates, baselines and {p.eval_episodes} evaluation episodes per seed not timed")


def episode_outputs(runs: list[dict]) -> dict[str, MetricOutputs] | None:
    """Each metric's per-episode values over the evaluation episodes of every seed (``seed`` says whose), weighted
    1 / (that seed's episodes with a value) so that the weighted mean is the record's mean over seeds: the
    per-sample outputs of a bootstrap over episodes (docs/uncertainty.md). None when a run kept no episodes."""
    if not runs or any("episodes" not in r for r in runs):
        return None
    per_seed = [episode_values(Episode(**e) for e in r["episodes"]) for r in runs]
    arrays = {"seed": np.concatenate([np.full(len(v["success_rate"]), r["seed"], np.int64)
                                      for r, v in zip(runs, per_seed)])}
    for m in METRICS:
        arrays[m] = np.concatenate([v[m] for v in per_seed])
        arrays[f"{m}_weight"] = np.concatenate([np.full(len(v[m]), 1.0 / max(1, int(np.isfinite(v[m]).sum())))
                                                for v in per_seed])
    samples = SampleOutputs(arrays)
    return {m: samples.metric("weighted_mean", 1.0, values=m, weights=f"{m}_weight") for m in METRICS}


# ----------------------------------------------------------------------------- one agent, one seed


def run_agent(agent: str, p: NavigationProtocol, seed: int, device: str = "cpu", trunk=None, taps=None,
              normalize: dict | None = None) -> dict:
    """Train (``ppo``/``blind``) and evaluate one agent for one seed; returns the metrics summary."""
    from tasks.navigation.env import make_vec_env

    t0 = time.perf_counter()
    timing: dict[str, float] = {}
    env_kwargs = dict(p.env_kwargs)
    if agent == "random":
        venv = make_vec_env(p.env, p.n_envs, 10_000 + seed, p.image_size, env_kwargs)
        rng = np.random.default_rng(seed)
        n_actions = venv.action_space.n
        episodes = evaluate(venv, lambda obs: rng.integers(0, n_actions, venv.num_envs), p.eval_episodes)
        venv.close()
    else:
        model, train_env = build_ppo(agent, p, seed, device, trunk, taps, normalize)
        t1 = time.perf_counter()
        model.learn(total_timesteps=p.frames)
        timing["train_s"] = time.perf_counter() - t1
        timing["train_frames_per_s"] = p.frames / max(timing["train_s"], 1e-9)
        if hasattr(train_env, "seconds"):
            timing.update({f"train_{k}_s": v for k, v in train_env.seconds.items()})
        train_env.close()
        eval_env = _wrap(agent, make_vec_env(p.env, p.n_envs, 10_000 + seed, p.image_size, env_kwargs),
                         p, device, trunk, taps, normalize)
        det = p.eval_deterministic
        episodes = evaluate(eval_env, lambda obs: model.predict(obs, deterministic=det)[0], p.eval_episodes)
        eval_env.close()
    timing["total_s"] = time.perf_counter() - t0
    return {"agent": agent, "seed": seed, **summarize(episodes), "timing": timing,
            "episodes": [e.to_dict() for e in episodes]}


def _wrap(agent: str, venv, p: NavigationProtocol, device: str, trunk, taps, normalize):
    from tasks.navigation.features import BlindVecEnv, FrozenEncoder, FrozenFeatureVecEnv

    if agent == "blind":
        return BlindVecEnv(venv)
    encoder = FrozenEncoder(trunk, taps, device=device, precision=p.precision, **(normalize or {}))
    return FrozenFeatureVecEnv(venv, encoder, frame_stack=p.frame_stack)


def build_ppo(agent: str, p: NavigationProtocol, seed: int, device: str = "cpu", trunk=None, taps=None, normalize=None):
    """The stable-baselines3 PPO model (and its training VecEnv) of the protocol."""
    from stable_baselines3 import PPO

    from tasks.navigation.env import make_vec_env
    from tasks.navigation.features import CompressedFeatures

    venv = _wrap(agent, make_vec_env(p.env, p.n_envs, seed, p.image_size, dict(p.env_kwargs)),
                 p, device, trunk, taps, normalize)
    common = dict(**dataclasses.asdict(p.ppo), seed=seed, device=device, verbose=0)
    if agent == "blind":
        return _quiet(PPO("MlpPolicy", venv, policy_kwargs={"net_arch": []}, **common)), venv
    kwargs = {"features_extractor_class": CompressedFeatures,
              "features_extractor_kwargs": {"frame_stack": p.frame_stack, "channels": p.compress_channels,
                                            "grid": p.compress_grid, "hidden": p.compress_hidden,
                                            "features_dim": p.features_dim},
              "net_arch": []}
    return _quiet(PPO("MultiInputPolicy", venv, policy_kwargs=kwargs, **common)), venv


def _quiet(model):
    """SB3's default logger (verbose=0) still creates an empty ``$TMPDIR/SB3-<time>`` folder per ``learn``;
    a logger without outputs or folder keeps the run's footprint to the task's own files."""
    from stable_baselines3.common.logger import Logger

    model.set_logger(Logger(folder=None, output_formats=[]))
    return model


def evaluate(venv, act: Callable[[Any], np.ndarray], n_episodes: int, max_steps: int = 1_000_000) -> list[Episode]:
    """Run ``act`` until ``n_episodes`` episodes finished, spread evenly over the environments.

    Each environment contributes a fixed quota (as SB3's ``evaluate_policy``), so short
    episodes are not over-represented.
    """
    n = venv.num_envs
    quota = [(n_episodes + i) // n for i in range(n)]
    done_count = [0] * n
    episodes: list[Episode] = []
    obs = venv.reset()
    for _ in range(max_steps):
        if done_count == quota:
            break
        obs, _rewards, dones, infos = venv.step(act(obs))
        for i in range(n):
            if dones[i] and done_count[i] < quota[i] and "nav_episode" in infos[i]:
                episodes.append(Episode(**infos[i]["nav_episode"]))
                done_count[i] += 1
    return episodes


# ----------------------------------------------------------------------------- helpers


def _dataset(env: str) -> str:
    return env if ":" in env else f"miniworld:{env}"


def _normalize(ctx: TaskContext) -> dict:
    t = ctx.transform()
    return {"mean": t.mean, "std": t.std, "input_space": t.input_space}


def _fingerprint(ctx: TaskContext, taps: list[str]) -> str:
    payload = {"checkpoint": ctx.checkpoint.sha256, "protocol": ctx.protocol.to_dict(), "taps": taps,
               "device": ctx.device}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


task = NavigationTask()
