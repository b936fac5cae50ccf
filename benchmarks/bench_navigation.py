"""Navigation speed: environment steps/s with and without the frozen trunk; where PPO training time goes.

Measured side by side in one run, on the same MiniWorld environment and machine:
- raw simulator: N environments (DummyVecEnv), random actions, frames rendered headless (EGL);
- the same with the frozen trunk encoding all N frames once per step (``FrozenFeatureVecEnv``);
- a short PPO run (the navigation task's policy) with its wall time split into rendering/simulation,
  trunk encoding, policy inference during rollouts and PPO updates.

    python -m benchmarks.bench_navigation [--env OneRoomS6Fast] [--size 64] [--n-envs 8] [--steps 100]
                                          [--frames 2048] [--arch resnet18] [--threads 1] [--device cpu]

Prints a table and writes benchmarks/out/bench_navigation.json.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from benchmarks.common import write_json


def steps_per_s(venv, steps: int, seed: int = 0) -> float:
    rng = np.random.default_rng(seed)
    venv.reset()
    n = venv.num_envs
    t0 = time.perf_counter()
    for _ in range(steps):
        venv.step(rng.integers(0, venv.action_space.n, n))
    return steps * n / (time.perf_counter() - t0)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--env", default="OneRoomS6Fast")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--n-envs", type=int, default=8)
    ap.add_argument("--steps", type=int, default=100, help="vector steps for the steps/s measurements")
    ap.add_argument("--frames", type=int, default=2048, help="PPO training frames for the time split")
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    import tasks.navigation.task as navigation
    from evalsuite.trunks import build_trunk
    from tasks.navigation.env import make_vec_env
    from tasks.navigation.features import FrozenEncoder, FrozenFeatureVecEnv

    taps = ["res3", "res4", "res5"]
    raw = make_vec_env(args.env, args.n_envs, 0, args.size)
    raw_sps = steps_per_s(raw, args.steps)
    raw.close()

    enc = FrozenEncoder(build_trunk(args.arch, seed=0), taps, device=args.device)
    wrapped = FrozenFeatureVecEnv(make_vec_env(args.env, args.n_envs, 0, args.size), enc)
    calls0 = enc.calls
    trunk_sps = steps_per_s(wrapped, args.steps)
    trunk_calls = enc.calls - calls0
    enc_share = wrapped.seconds["encode"] / max(wrapped.seconds["encode"] + wrapped.seconds["simulate"], 1e-9)
    wrapped.close()

    p = navigation.task.default_protocol("quick")
    n_steps = max(8, min(64, args.frames // args.n_envs))
    p = p.replace(env=args.env, image_size=args.size, n_envs=args.n_envs, frames=args.frames,
                  ppo=p.ppo.replace(n_steps=n_steps, batch_size=min(p.ppo.batch_size, n_steps * args.n_envs)))
    model, venv = navigation.build_ppo("ppo", p, seed=0, device=args.device,
                                       trunk=build_trunk(args.arch, seed=0), taps=taps)
    update_s = [0.0]
    real_train = model.train

    def timed_train():
        t = time.perf_counter()
        real_train()
        update_s[0] += time.perf_counter() - t

    model.train = timed_train
    t0 = time.perf_counter()
    model.learn(total_timesteps=args.frames)
    total = time.perf_counter() - t0
    sim, encode = venv.seconds["simulate"], venv.seconds["encode"]
    inference = max(0.0, total - sim - encode - update_s[0])
    venv.close()
    split = {"simulate_render": sim, "encode_trunk": encode, "policy_inference": inference,
             "ppo_updates": update_s[0]}

    payload = {
        "config": vars(args),
        "env_steps_per_s": {"raw_simulator": raw_sps, "with_frozen_trunk": trunk_sps,
                            "slowdown_x": raw_sps / max(trunk_sps, 1e-9)},
        "trunk_calls_per_vector_step": (trunk_calls - 1) / args.steps,  # minus the one at reset
        "encode_share_of_env_time": enc_share,
        "ppo": {"frames": args.frames, "seconds": total, "frames_per_s": args.frames / total,
                "seconds_by_part": split, "share_by_part": {k: v / total for k, v in split.items()}},
    }
    print(f"{'env steps/s (raw simulator)':40s} {raw_sps:10.1f}")
    print(f"{'env steps/s (with frozen ' + args.arch + ')':40s} {trunk_sps:10.1f}   "
          f"({payload['env_steps_per_s']['slowdown_x']:.1f}x slower)")
    print(f"{'trunk calls per vector step':40s} {payload['trunk_calls_per_vector_step']:10.2f}")
    print(f"{'PPO frames/s':40s} {args.frames / total:10.1f}")
    for k, v in split.items():
        print(f"  {k:38s} {v:8.2f} s  {100 * v / total:5.1f} %")
    write_json("bench_navigation", payload)
    return payload


if __name__ == "__main__":
    main()
