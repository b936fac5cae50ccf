"""Navigation: environment interface and errors, frozen-feature wrapper, SPL geometry in MiniWorld, the task.

MiniWorld renders headless through EGL (Debian: libegl1 libegl-mesa0 libgl1-mesa-dri libglu1-mesa libgl1).
In CI (CI=true) these tests always run (.ci/run installs the packages); elsewhere they skip only without EGL.
"""

from __future__ import annotations

import math
import os
import tempfile

import numpy as np
import pytest
import torch

import tasks.navigation.env as nav_env
import tasks.navigation.task as navigation
from evalsuite.checkpoints import load_checkpoint
from evalsuite.errors import UserError
from evalsuite.trunks import build_trunk, tap_shapes
from tasks.navigation.features import FrozenEncoder, FrozenFeatureVecEnv
from tests.helpers import make_context

TAPS = ["res3", "res4", "res5"]
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
needs_gl = pytest.mark.skipif(not IN_CI and not nav_env.gl_available(),
                              reason="EGL/GL libraries missing (apt-get install " + nav_env.GL_PACKAGES + ")")


# ----------------------------------------------------------------------------- bad input (no simulator needed)


def test_unknown_environment_is_one_clear_line():
    with pytest.raises(UserError) as e:
        nav_env.resolve("miniworld:Nowhere")
    msg = str(e.value)
    assert "Nowhere" in msg and "Hallway" in msg and "\n" not in msg
    with pytest.raises(UserError, match="unknown simulator 'gibson'"):
        nav_env.make_vec_env("gibson:Space", 2, 0, 32)
    # all spellings of a MiniWorld name resolve to the same environment
    assert [nav_env.resolve(n)[1] for n in ("Hallway", "miniworld:Hallway", "MiniWorld-Hallway-v0")] == ["Hallway"] * 3


def test_missing_egl_is_one_line_naming_the_debian_packages(monkeypatch):
    def no_egl(name):
        if "EGL" in name:
            raise OSError(f"{name}: cannot open shared object file: No such file or directory")
        return object()

    monkeypatch.setattr(nav_env, "_load_library", no_egl)
    assert not nav_env.gl_available()
    with pytest.raises(nav_env.SimulatorUnavailable) as e:
        nav_env.make_env("Hallway", 32)  # checked before pyglet/MiniWorld are touched: no segfault
    msg = str(e.value)
    assert "\n" not in msg and "libEGL.so.1" in msg and "libGL.so.1" not in msg
    for pkg in ("libegl1", "libegl-mesa0", "libgl1-mesa-dri", "libglu1-mesa"):
        assert pkg in msg
    assert e.value.exit_code == 2


def test_trunk_without_the_requested_taps_is_a_clear_error():
    with pytest.raises(UserError, match=r"alexnet has no tap\(s\) res3, res4, res5.*conv1, conv2"):
        FrozenEncoder(build_trunk("alexnet", seed=0), TAPS)


def test_vit_taps_become_patch_grids_for_the_compression(tmp_path):
    """A ViT's taps reach the policy as (C, h, w) patch-token maps: CLS left out, the grid of a 40 px frame padded
    to 3 x 3 patches of 16, last4 with 4 x D channels; equal to timm's own blocks reshaped here."""
    import timm
    from gymnasium import spaces

    from tasks.navigation.features import CompressedFeatures

    trunk = build_trunk("vit_tiny_patch16", seed=0)
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, dynamic_img_size=True,
                            dynamic_img_pad=True).eval()
    ref.load_state_dict(trunk.state_dict())
    frames = np.random.default_rng(0).integers(0, 256, (3, 40, 40, 3), dtype=np.uint8)
    enc = FrozenEncoder(trunk, ["block11", "last4"], precision="fp32")
    out = enc(frames)
    assert {t: v.shape for t, v in out.items()} == {"block11": (3, 192, 3, 3), "last4": (3, 768, 3, 3)}
    assert enc.shapes(40) == {"block11": (192, 3, 3), "last4": (768, 3, 3)}

    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    x = (torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255 - mean) / std
    with torch.no_grad():
        t = ref.norm_pre(ref._pos_embed(ref.patch_embed(x)))
        blocks = []
        for blk in ref.blocks:
            t = blk(t)
            blocks.append(ref.norm(t))

    def grid(tokens):  # token 1 + 3 * row + col is patch (row, col)
        return np.stack([[[tokens[n, 1 + 3 * r + c].numpy() for c in range(3)] for r in range(3)]
                         for n in range(len(tokens))]).transpose(0, 3, 1, 2)

    np.testing.assert_allclose(out["block11"], grid(blocks[11]), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out["last4"], np.concatenate([grid(b) for b in blocks[8:]], axis=1),
                               rtol=1e-4, atol=1e-4)

    space = spaces.Dict({k: spaces.Box(-np.inf, np.inf, (2 * c, h, w), np.float32)
                         for k, (c, h, w) in enc.shapes(40).items()})
    head = CompressedFeatures(space, frame_stack=2, channels=8, grid=8, hidden=16)
    obs = {k: torch.from_numpy(np.concatenate([v[:2], v[:2]], axis=1)) for k, v in out.items()}
    assert head.compress(obs).shape == (2, 2, 8, 8, 8)

    ctx = make_context("navigation", tmp_path, tmp_path / "out", checkpoint="random:vit_tiny_patch16")
    assert ctx.taps(ctx.protocol.layers) == ["block11", "last4"]  # a ViT's default taps
    assert navigation.task.plan(ctx).images  # planned, not refused


def test_presets():
    g, v, q = (navigation.task.default_protocol(p) for p in ("goyal19", "vissl", "quick"))
    assert g == v  # VISSL has no navigation benchmark
    assert (g.ppo.learning_rate, g.ppo.clip_range, g.ppo.gamma, g.frame_stack) == (1e-4, 0.1, 0.99, 4)
    assert list(g.layers) == TAPS and (g.compress_channels, g.compress_grid) == (8, 16)
    assert g.num_seeds == 5 and g.frames >= 1_000_000
    assert q.frames < g.frames and q.image_size < g.image_size and q.num_seeds == 1
    assert (q.env, q.ppo.learning_rate, q.n_envs, q.ppo.n_epochs) == ("miniworld:OneRoomS6Fast", 3e-4, 8, 4)
    assert g.to_dict()["env_kwargs"] == {} and g.to_dict()["baselines"] == ["random", "blind"]


# ----------------------------------------------------------------------------- the wrapper


def raw_env(seed, n=2, size=32):
    return nav_env.make_vec_env("OneRoomS6Fast", n, seed, size)


def reference_features(trunk, frames):
    """The trunk's taps computed independently of the wrapper (ImageNet normalisation, eval mode)."""
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    x = (torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float() / 255 - mean) / std
    trunk.eval()
    with torch.no_grad():
        out = trunk(x, TAPS)
    return {t: v.numpy() for t, v in out.items()}


@needs_gl
def test_wrapper_shapes_stacking_and_one_trunk_pass_per_step():
    trunk = build_trunk("resnet18", seed=0)
    ref_trunk = build_trunk("resnet18", seed=0)
    enc = FrozenEncoder(trunk, TAPS)
    env = FrozenFeatureVecEnv(raw_env(3), enc, frame_stack=4)
    raw = raw_env(3)  # the same seeds, driven with the same actions, to compute the expected stacks
    shapes = tap_shapes("resnet18", 32, TAPS)
    for t, (c, h, w) in shapes.items():
        assert env.observation_space[t].shape == (4 * c, h, w)
    assert not trunk.training and not any(p.requires_grad for p in trunk.parameters())

    obs, frames = env.reset(), raw.reset()
    history = [[frames[i]] * 4 for i in range(2)]
    actions = [np.array([2, 0]), np.array([2, 2]), np.array([1, 2])]
    calls0 = enc.calls
    for a in [None, *actions]:
        if a is not None:
            obs, _, dones, infos = env.step(a)
            frames, _, rdones, rinfos = raw.step(a)
            assert not dones.any() and not rdones.any()
            for i in range(2):
                history[i] = history[i][1:] + [frames[i]]
        for i in range(2):
            ref = reference_features(ref_trunk, history[i])
            for t in TAPS:
                c = shapes[t][0]
                assert obs[t].shape == (2, 4 * c, *shapes[t][1:])
                want = np.concatenate(list(ref[t]), axis=0)
                np.testing.assert_allclose(obs[t][i], want, rtol=1e-4, atol=1e-4)
    assert enc.calls - calls0 == len(actions)  # one batched pass per step for both environments
    env.close()
    raw.close()


@needs_gl
def test_wrapper_is_deterministic_under_a_seed_and_handles_episode_ends():
    def run(seed):
        trunk = build_trunk("resnet18", seed=0)
        env = FrozenFeatureVecEnv(raw_env(seed), FrozenEncoder(trunk, TAPS), frame_stack=2)
        out = [env.reset()]
        rng = np.random.default_rng(0)
        terminal = None
        for _ in range(60):  # OneRoomS6Fast: at most 50 steps per episode
            obs, _, dones, infos = env.step(rng.integers(0, 3, 2))
            out.append(obs)
            if dones.any() and terminal is None:
                i = int(np.flatnonzero(dones)[0])
                terminal = (i, infos[i]["terminal_observation"], obs, infos[i]["nav_episode"])
        env.close()
        return out, terminal

    a, term_a = run(5)
    b, _ = run(5)
    c, _ = run(6)
    for x, y in zip(a, b):
        for t in TAPS:
            np.testing.assert_array_equal(x[t], y[t])
    assert any(not np.array_equal(x["res5"], y["res5"]) for x, y in zip(a, c))
    assert term_a is not None
    i, terminal, obs_after, episode = term_a
    for t in TAPS:
        assert terminal[t].shape == obs_after[t].shape[1:]
        half = terminal[t].shape[0] // 2
        # a new episode starts with its first frame repeated; the terminal stack ends with the last frame
        np.testing.assert_array_equal(obs_after[t][i, :half], obs_after[t][i, half:])
        assert not np.array_equal(terminal[t][half:], obs_after[t][i, half:])
    assert set(episode) == {"success", "shortest_path", "path_length", "ret", "length"}


@needs_gl
def test_batchnorm_in_eval_mode_features_do_not_depend_on_the_batch():
    enc = FrozenEncoder(build_trunk("resnet18", seed=0), TAPS)
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    alone = enc(frames[:1])
    together = enc(frames)
    for t in TAPS:
        np.testing.assert_allclose(alone[t][0], together[t][0], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- SPL in the simulator


def oracle_episode(env):
    """Turn towards the red box, walk straight: an (almost) shortest path."""
    u = env.unwrapped
    for _ in range(400):
        to_goal = u.box.pos - u.agent.pos
        want = math.atan2(-to_goal[2], to_goal[0])  # MiniWorld: dir_vec = (cos d, 0, -sin d)
        err = (want - u.agent.dir + math.pi) % (2 * math.pi) - math.pi
        half_turn = math.radians(u.params.get_max("turn_step")) / 2
        action = 2 if abs(err) <= half_turn else (0 if err > 0 else 1)
        _, _, terminated, truncated, info = env.step(action)
        if terminated or truncated:
            return info["nav_episode"]
    raise AssertionError("the oracle did not finish")


@needs_gl
def test_shortest_path_and_oracle_spl_in_miniworld():
    env = nav_env.make_env("OneRoom", 32)
    episodes = []
    for seed in range(4):
        env.reset(seed=seed)
        u = env.unwrapped
        goal_r = u.box.radius + u.agent.radius + 1.1 * u.max_forward_step
        straight = np.hypot(*(u.box.pos - u.agent.pos)[[0, 2]])
        assert env._shortest == pytest.approx(max(0.0, straight - goal_r), abs=1e-9)  # open room: straight line
        episodes.append(oracle_episode(env))
    assert all(e["success"] for e in episodes)
    from tasks.navigation.metrics import spl

    score = spl([e["success"] for e in episodes], [e["shortest_path"] for e in episodes],
                [e["path_length"] for e in episodes])
    assert score > 0.85  # the oracle walks (nearly) the shortest path
    env.close()

    rooms = nav_env.make_env("FourRooms", 32)
    for seed in range(3):
        rooms.reset(seed=seed)
        u = rooms.unwrapped
        goal_r = u.box.radius + u.agent.radius + 1.1 * u.max_forward_step
        straight = max(0.0, np.hypot(*(u.box.pos - u.agent.pos)[[0, 2]]) - goal_r)
        assert np.isfinite(rooms._shortest) and rooms._shortest >= straight - 0.05
    rooms.close()


# ----------------------------------------------------------------------------- PPO and the task


@needs_gl
@pytest.mark.slow
def test_short_ppo_run_beats_the_random_policy():
    p = navigation.task.default_protocol("quick")
    trunk = build_trunk("resnet18", seed=0)
    rand = navigation.run_agent("random", p, seed=0)
    ppo = navigation.run_agent("ppo", p, seed=0, trunk=trunk, taps=TAPS)
    assert rand["num_episodes"] == ppo["num_episodes"] == p.eval_episodes
    # measured: ~0.94 vs ~0.66 success, ~17 vs ~30 steps
    assert ppo["success_rate"] >= rand["success_rate"] + 0.15
    assert ppo["mean_length"] < rand["mean_length"]
    assert ppo["timing"]["train_encode_s"] > 0


@pytest.mark.slow
@needs_gl
def test_task_end_to_end_records_policy_and_baselines_and_resumes(tmp_path, monkeypatch):
    ckpt = load_checkpoint("random:resnet18", seed=0)
    small = ["frames=256", "ppo.n_steps=16", "ppo.batch_size=32", "eval_episodes=4", "n_envs=2"]

    def ctx(out, *overrides):
        return make_context("navigation", tmp_path, out, overrides=[*small, *overrides], checkpoint=ckpt,
                            extractor_factory=lambda: None)

    scratch = tmp_path / "tmpdir"  # the system temp dir during the run: PPO must leave nothing there
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    results = navigation.task.run(ctx(tmp_path / "out"))
    assert list(scratch.iterdir()) == []
    keys = [(r.layer, r.metric) for r in results]
    assert keys == [(layer, m) for layer in ("res3+res4+res5", "random", "blind") for m in navigation.METRICS]
    for r in results:
        assert r.dataset == "miniworld:OneRoomS6Fast" and r.split == "eval"
        assert r.params["std"] == 0.0 and len(r.params["per_seed"]) == 1 and r.params["seeds"] == [0]
        assert r.params["ppo"]["learning_rate"] == 3e-4 and r.params["frames"] == 256
        assert r.params["agent"] in ("ppo", "random", "blind")
    by = {(r.layer, r.metric): r.value for r in results}
    for layer in ("res3+res4+res5", "random", "blind"):
        assert 0.0 <= by[(layer, "spl")] <= by[(layer, "success_rate")] <= 1.0
        assert 1 <= by[(layer, "mean_length")] <= 50

    # one JSON result per (agent, seed), nothing else (no temporary files left behind)
    saved = sorted(f.name for f in (tmp_path / "out" / "navigation_state").rglob("*") if f.is_file())
    assert saved == ["blind-seed0.json", "ppo-seed0.json", "random-seed0.json"]

    # a rerun into the same output directory finishes from the saved per-seed results, training nothing
    def boom(*a, **k):
        raise AssertionError("retrained")

    monkeypatch.setattr(navigation, "run_agent", boom)
    again = navigation.task.run(ctx(tmp_path / "out"))
    assert [r.value for r in again] == [r.value for r in results]

    with pytest.raises(UserError, match="Atlantis"):
        navigation.task.run(ctx(tmp_path / "bad", "env=miniworld:Atlantis"))
