"""Frozen-trunk observations for navigation: encode every parallel environment's frame once per step.

:class:`FrozenFeatureVecEnv` wraps an SB3 ``VecEnv`` of first-person RGB frames. On each
step it sends all N frames (plus the terminal frames of environments that just finished,
which PPO needs to bootstrap truncated episodes) through the frozen trunk in ONE batched
forward pass -- BatchNorm in eval mode, no autograd, channels_last, bfloat16 autocast on
GPUs -- and returns, per tap, the last ``frame_stack`` feature maps stacked along channels (a ViT tap's
map is its patch-token grid).

:class:`CompressedFeatures` is the trainable part that sees those maps (Sax et al. 2018,
"Mid-level visual representations improve generalization and sample efficiency for
learning visuomotor policies"; Goyal et al. 2019 Sec. 6): per frame, each tap is projected
by a 1x1 conv, resized to a ``grid`` x ``grid`` map, and the taps are fused by a 3x3 conv into
``channels`` (8) x 16 x 16 -- the size of the mid-level representations; the stacked frames'
compressed maps then go through a small conv + linear policy trunk.

:class:`BlindVecEnv` replaces the frames by a constant: the "blind" baseline of Sax et al.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from gymnasium import spaces
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from stable_baselines3.common.vec_env import VecEnv, VecEnvWrapper
from torch import nn

from evalsuite.colorspace import IMAGENET_MEAN, IMAGENET_STD, to_input_space
from evalsuite.errors import UserError
from evalsuite.vit import ViTTaps, patch_grid


def check_trunk_taps(trunk: nn.Module, taps: Sequence[str]) -> None:
    have = list(getattr(trunk, "tap_names", ()))
    missing = [t for t in taps if t not in have]
    if missing:
        arch = getattr(trunk, "arch", type(trunk).__name__)
        raise UserError(f"trunk {arch} has no tap(s) {', '.join(missing)} for navigation; it provides "
                        f"{', '.join(have) or 'none'} (set navigation.layers=[...])")


def resolve_nav_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """``auto``: bfloat16 autocast on CUDA (where it is ~2x faster), plain fp32 on CPU; ``fp32``; ``bf16``."""
    if precision not in ("auto", "fp32", "bf16"):
        raise UserError(f"unknown precision {precision!r}; choose auto, fp32 or bf16")
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    if precision == "bf16" and device.type == "cpu":
        return torch.bfloat16
    if precision == "bf16":
        raise UserError(f"bfloat16 is not supported on this {device.type} device; use navigation.precision=fp32")
    return None


class FrozenEncoder:
    """uint8 (N, H, W, 3) frames -> {tap: float32 (N, C, h, w)} with a frozen trunk.

    A ViT's taps are tokens: their patch tokens become the (C, h, w) map of the patch grid (CLS and register
    tokens left out, :func:`evalsuite.vit.patch_grid`), so the compression treats them like a ResNet's maps.
    """

    def __init__(self, trunk: nn.Module, taps: Sequence[str], device: str = "cpu", precision: str = "auto",
                 mean=IMAGENET_MEAN, std=IMAGENET_STD, input_space: str = "rgb"):
        check_trunk_taps(trunk, taps)
        self.taps = list(taps)
        self.device = torch.device(device)
        self.dtype = resolve_nav_precision(precision, self.device)
        self.trunk = trunk.to(self.device).eval()  # BatchNorm uses its running statistics
        for p in self.trunk.parameters():
            p.requires_grad_(False)
        self.vit = isinstance(trunk, ViTTaps)
        self.channels_last = self.device.type == "cuda" and getattr(trunk, "supports_channels_last", True)
        if self.channels_last:
            self.trunk = self.trunk.to(memory_format=torch.channels_last)
        self.mean, self.std, self.input_space = tuple(mean), tuple(std), input_space
        self.calls = 0  # forward passes (one per environment step)
        self.frames = 0  # frames encoded

    @torch.inference_mode()
    def __call__(self, frames: np.ndarray) -> dict[str, np.ndarray]:
        x = torch.from_numpy(np.ascontiguousarray(frames)).to(self.device).permute(0, 3, 1, 2).float() / 255.0
        x = to_input_space(x, self.input_space, self.mean, self.std)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        self.trunk.eval()
        with torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
            out = self.trunk(x, self.taps)
        if self.vit:
            p = self.trunk.patch_embed.patch_size
            size = (-(-x.shape[2] // p[0]), -(-x.shape[3] // p[1]))  # a partial patch is padded (dynamic_img_pad)
            out = {t: patch_grid(out[t], self.trunk.num_prefix_tokens, size) for t in self.taps}
        self.calls += 1
        self.frames += len(frames)
        return {t: out[t].float().contiguous().cpu().numpy() for t in self.taps}

    def shapes(self, image_size: int) -> dict[str, tuple[int, int, int]]:
        probe = self(np.zeros((1, image_size, image_size, 3), np.uint8))
        self.calls -= 1
        self.frames -= 1
        return {t: tuple(v.shape[1:]) for t, v in probe.items()}


class FrozenFeatureVecEnv(VecEnvWrapper):
    """Observations: ``{tap: float32 (frame_stack * C, h, w)}``, oldest frame first; one trunk pass per step."""

    def __init__(self, venv: VecEnv, encoder: FrozenEncoder, frame_stack: int = 4):
        h, w, _ = venv.observation_space.shape
        if h != w:
            raise UserError(f"navigation frames must be square, got {h}x{w}")
        self.encoder, self.k = encoder, int(frame_stack)
        self.tap_shapes = encoder.shapes(h)
        space = spaces.Dict({t: spaces.Box(-np.inf, np.inf, (self.k * c, hh, ww), np.float32)
                             for t, (c, hh, ww) in self.tap_shapes.items()})
        super().__init__(venv, observation_space=space)
        self.stacks = {t: np.zeros((venv.num_envs, self.k * c, hh, ww), np.float32)
                       for t, (c, hh, ww) in self.tap_shapes.items()}
        self.seconds = {"simulate": 0.0, "encode": 0.0}

    def _encode(self, frames: np.ndarray) -> dict[str, np.ndarray]:
        t0 = time.perf_counter()
        out = self.encoder(frames)
        self.seconds["encode"] += time.perf_counter() - t0
        return out

    def _fill(self, feats: dict[str, np.ndarray], rows) -> None:
        for t, f in feats.items():
            self.stacks[t][rows] = np.concatenate([f] * self.k, axis=1)

    def _obs(self) -> dict[str, np.ndarray]:
        return {t: s.copy() for t, s in self.stacks.items()}

    def reset(self):
        t0 = time.perf_counter()
        frames = self.venv.reset()
        self.seconds["simulate"] += time.perf_counter() - t0
        self._fill(self._encode(frames), slice(None))
        return self._obs()

    def step_wait(self):
        t0 = time.perf_counter()
        frames, rewards, dones, infos = self.venv.step_wait()
        self.seconds["simulate"] += time.perf_counter() - t0
        n = len(frames)
        term = [i for i, info in enumerate(infos) if dones[i] and info.get("terminal_observation") is not None]
        batch = np.concatenate([frames, np.stack([infos[i]["terminal_observation"] for i in term])]) if term \
            else frames
        feats = self._encode(batch)  # ONE forward pass for all environments (and finished episodes' last frames)
        for j, i in enumerate(term):
            terminal = {}
            for t, f in feats.items():
                c = self.tap_shapes[t][0]
                terminal[t] = np.concatenate([self.stacks[t][i, c:], f[n + j]], axis=0)
            infos[i]["terminal_observation"] = terminal
        for t, f in feats.items():
            c = self.tap_shapes[t][0]
            s = self.stacks[t]
            s[:, :-c] = s[:, c:].copy()  # shift the window by one frame
            s[:, -c:] = f[:n]
        done_rows = np.flatnonzero(dones)
        if len(done_rows):  # a new episode starts with its first frame repeated
            self._fill({t: f[:n][done_rows] for t, f in feats.items()}, done_rows)
        return self._obs(), rewards, dones, infos


class BlindVecEnv(VecEnvWrapper):
    """The blind baseline: a constant observation (no visual input), so the policy can only learn action priors."""

    def __init__(self, venv: VecEnv):
        super().__init__(venv, observation_space=spaces.Box(-1.0, 1.0, (1,), np.float32))

    def reset(self):
        self.venv.reset()
        return np.zeros((self.num_envs, 1), np.float32)

    def step_wait(self):
        _, rewards, dones, infos = self.venv.step_wait()
        for info in infos:
            if "terminal_observation" in info:
                info["terminal_observation"] = np.zeros(1, np.float32)
        return np.zeros((self.num_envs, 1), np.float32), rewards, dones, infos


class CompressedFeatures(BaseFeaturesExtractor):
    """Trainable compression of each frame's taps to ``channels`` x ``grid`` x ``grid``, then the policy trunk."""

    def __init__(self, observation_space: spaces.Dict, frame_stack: int = 4, channels: int = 8, grid: int = 16,
                 hidden: int = 32, features_dim: int = 256):
        super().__init__(observation_space, features_dim)
        self.k, self.grid, self.channels = frame_stack, grid, channels
        self.taps = list(observation_space.spaces)
        self.proj = nn.ModuleDict({t: nn.Conv2d(observation_space[t].shape[0] // frame_stack, hidden, 1)
                                   for t in self.taps})
        self.fuse = nn.Sequential(nn.ReLU(), nn.Conv2d(hidden * len(self.taps), channels, 3, padding=1), nn.ReLU())
        self.policy_trunk = nn.Sequential(
            nn.Conv2d(frame_stack * channels, 32, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(32, 32, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
        )
        with torch.no_grad():
            n = self.policy_trunk(torch.zeros(1, frame_stack * channels, grid, grid)).shape[1]
        self.head = nn.Sequential(nn.Linear(n, features_dim), nn.ReLU())

    def compress(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, k*C_t, h_t, w_t) per tap -> (B, k, channels, grid, grid)."""
        maps = []
        for t in self.taps:
            x = obs[t]
            b, kc, h, w = x.shape
            x = self.proj[t](x.reshape(b * self.k, kc // self.k, h, w))
            if (h, w) != (self.grid, self.grid):
                x = F.interpolate(x, size=(self.grid, self.grid), mode="bilinear", align_corners=False) \
                    if h < self.grid else F.adaptive_avg_pool2d(x, self.grid)
            maps.append(x)
        z = self.fuse(torch.cat(maps, dim=1))
        return z.reshape(-1, self.k, self.channels, self.grid, self.grid)

    def forward(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        z = self.compress(obs)
        return self.head(self.policy_trunk(z.flatten(1, 2)))
