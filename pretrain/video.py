"""Training on video: how the trainer feeds the methods that learn image trunks from videos.

A method whose ``data_kinds`` names the video readers' kinds (``"video"``, ``"egomotion"``: the ``kind`` of
``evalsuite.data.video.VideoFolder`` / ``EgoMotion``) trains on examples drawn by ``method.sampler(image_size)``:
a picklable :class:`VideoSampler`, called as ``sampler(dataset, video, rng)`` with a numpy Generator, that reads
frames (``dataset.clip``, :func:`read_frames`; sound through ``dataset.audio``, poses through ``dataset.poses``)
and returns a dict of tensors. Keys named in ``frame_keys`` hold RGB frames as float in [0, 1], shaped
(..., 3, image_size, image_size).

The trainer wraps the reader in a :class:`SampleDataset`: ``samples_per_video`` examples per video per epoch,
item ``i`` from video ``i % len(dataset)`` with a generator seeded by (seed, epoch, i), so a run is reproducible
and a resumed run draws exactly the examples it would have drawn. :func:`collate_samples` stacks each key; the
method's :class:`~pretrain.base.Batch` has ``views == []``, ``extra`` holding the stacked keys (frames already in
the method's input space, through ``Trainer.to_input`` as images are), ``index`` the video indices and
``target`` zeros.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from evalsuite.errors import UserError

from .base import Method

#: the dataset kinds a video method may train on (every video reader's ``kind``)
VIDEO_KINDS = ("video", "egomotion")


def data_kind(dataset) -> str:
    """The kind of training data a reader holds: a video reader's ``kind``, else ``"images"``."""
    from evalsuite.data.video import VideoFolder

    return dataset.kind if isinstance(dataset, VideoFolder) else "images"


def read_frames(dataset, video: int, frames: Sequence[int], max_span: int = 64) -> torch.Tensor:
    """Frames ``frames`` (any order, repeats allowed) of ``video`` as uint8 (len(frames), H, W, 3): one decode of
    the span they cover when it is under ``max_span`` frames, else one seek per distinct frame."""
    idx = np.asarray(frames, dtype=np.int64)
    lo, hi = int(idx.min()), int(idx.max())
    if hi - lo < max_span:
        return dataset.clip(video, lo, hi - lo + 1)[torch.as_tensor(idx - lo)]
    distinct = np.unique(idx)
    got = torch.stack([dataset.clip(video, int(f), 1)[0] for f in distinct])
    return got[torch.as_tensor(np.searchsorted(distinct, idx))]


def far_frame(rng: np.random.Generator, num_frames: int, lo: int, hi: int, gap: int) -> int:
    """A frame more than ``gap`` frames from every frame of [lo, hi] (uniform over those that are)."""
    candidates = np.concatenate([np.arange(0, max(0, lo - gap)), np.arange(hi + gap + 1, num_frames)])
    if candidates.size == 0:
        raise ValueError(f"no frame more than {gap} frames from [{lo}, {hi}] in {num_frames} frames")
    return int(rng.choice(candidates))


def sum_of_differences(x: torch.Tensor, dim: int) -> torch.Tensor:
    """The mean over ordered pairs i < j along ``dim`` of ``x_j - x_i`` (Fernando et al. 2017's sum of
    differences, scaled by the number of pairs): ``sum_t (2t - n + 1) x_t / (n (n - 1) / 2)``, an order-sensitive
    summary (reversing the order negates it; a constant sequence gives 0)."""
    n = x.shape[dim]
    if n < 2:
        raise ValueError(f"sum of differences needs at least 2 entries along dim {dim}, got {n}")
    w = (2 * torch.arange(n, device=x.device, dtype=x.dtype) - (n - 1)) / (n * (n - 1) / 2)
    shape = [1] * x.ndim
    shape[dim] = n
    return (x * w.view(shape)).sum(dim)


class FrameCrop:
    """One spatial augmentation for every frame of an example (so motion between them is kept): a crop of a
    random area fraction in ``scale`` and aspect ratio in ``ratio`` (log-uniform), resized to ``size`` px
    (bilinear, antialiased), flipped horizontally with probability 0.5 when ``flip``. ``scale`` (1, 1) is the
    whole frame resized (Misra et al.'s data layer). uint8 (T, H, W, 3) -> float (T, 3, size, size) in [0, 1]."""

    def __init__(self, size: int, scale: tuple[float, float] = (1.0, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3),
                 flip: bool = False):
        if not 0 < scale[0] <= scale[1] <= 1:
            raise UserError(f"frame crop scale must satisfy 0 < min <= max <= 1, got {scale}")
        self.size, self.scale, self.ratio, self.flip = int(size), tuple(scale), tuple(ratio), bool(flip)

    def box(self, rng: np.random.Generator, h: int, w: int) -> tuple[int, int, int, int]:
        """(y0, x0, crop height, crop width)."""
        if self.scale[0] >= 1:
            return 0, 0, h, w
        area = h * w * rng.uniform(*self.scale)
        aspect = math.exp(rng.uniform(math.log(self.ratio[0]), math.log(self.ratio[1])))
        cw = min(w, max(1, round(math.sqrt(area * aspect))))
        ch = min(h, max(1, round(math.sqrt(area / aspect))))
        return int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw

    def __call__(self, frames: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        y0, x0, ch, cw = self.box(rng, frames.shape[1], frames.shape[2])
        x = frames[:, y0:y0 + ch, x0:x0 + cw].permute(0, 3, 1, 2).float().div_(255)
        if (ch, cw) != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False,
                              antialias=True).clamp_(0, 1)
        if self.flip and rng.random() < 0.5:
            x = x.flip(-1)
        return x.contiguous()

    def describe(self) -> dict[str, Any]:
        return {"size": self.size, "scale": list(self.scale), "ratio": [round(r, 4) for r in self.ratio],
                "flip": self.flip}


class VideoSampler:
    """Draws one training example from a video: ``sampler(dataset, video, rng) -> dict[str, Tensor]``.

    Subclasses implement :meth:`draw` and set ``name``; ``frame_keys`` names the keys holding frames (the
    trainer moves them into the method's input space), ``min_frames`` the shortest video the sampling can use
    (the trainer refuses data with a shorter one). ``crop`` is the example's :class:`FrameCrop`."""

    name = "video"
    frame_keys: tuple[str, ...] = ("frames",)

    def __init__(self, image_size: int, crop_scale_min: float = 1.0, flip: bool = False):
        self.crop = FrameCrop(image_size, (crop_scale_min, 1.0), flip=flip)

    @property
    def min_frames(self) -> int:
        return 1

    def draw(self, dataset, video: int, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def __call__(self, dataset, video: int, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        return self.draw(dataset, video, rng)

    def settings(self) -> dict[str, Any]:
        """The sampling settings recorded in the checkpoint (the subclass's own, e.g. frame gaps)."""
        return {}

    def describe(self) -> dict[str, Any]:
        return {"sampler": self.name, "min_frames": self.min_frames, "crop": self.crop.describe(), **self.settings()}


class FramesInMemory:
    """A video reader whose ``clip`` serves frames from memory: each video is decoded whole on its first use and
    kept (the same frames as a seek to the clip gives); everything else is the reader's. For sets whose decoded
    frames fit in memory (:func:`frames_fit`), where decoding each example's frames again is most of a step."""

    def __init__(self, data):
        self.data, self._frames = data, {}

    def __getattr__(self, name: str):
        if name.startswith("__") or name in ("data", "_frames"):  # unpickling: before __init__'s attributes
            raise AttributeError(name)
        return getattr(self.data, name)

    def __len__(self) -> int:
        return len(self.data)

    def clip(self, i: int, start: int, num_frames: int, stride: int = 1) -> torch.Tensor:
        n = self.data.info(i).num_frames
        last = start + (num_frames - 1) * stride
        if num_frames < 1 or stride < 1 or start < 0 or last >= n:
            return self.data.clip(i, start, num_frames, stride)  # the reader's error
        if i not in self._frames:
            self._frames[i] = self.data.clip(i, 0, n)
        return self._frames[i][start:last + 1:stride].clone()


def frames_fit(data, n_videos: int, max_bytes: int) -> bool:
    """Whether the decoded uint8 frames of the first ``n_videos`` videos take at most ``max_bytes``."""
    infos = [data.info(i) for i in range(n_videos)]
    return sum(v.num_frames * v.height * v.width * 3 for v in infos) <= max_bytes


class SampleDataset(Dataset):
    """``samples_per_video`` examples of every video per epoch: item ``i`` is drawn from video ``i % n`` by the
    sampler with a generator seeded by (seed, epoch, i) (torch's RNG is seeded alike for torch-random ops)."""

    def __init__(self, data, sampler: VideoSampler, seed: int, samples_per_video: int, limit: int | None = None):
        if samples_per_video < 1:
            raise UserError(f"samples per video must be at least 1, got {samples_per_video}")
        self.data, self.sampler, self.seed, self.epoch = data, sampler, seed, 0
        self.n_videos = len(data) if limit is None else min(limit, len(data))
        self.samples_per_video = samples_per_video
        short = [i for i in range(self.n_videos) if data.info(i).num_frames < sampler.min_frames]
        if short:
            info = data.info(short[0])
            raise UserError(f"{len(short)} video(s) have fewer than the {sampler.min_frames} frames the "
                            f"{sampler.name} sampling needs (first: {info.path}, {info.num_frames} frames); "
                            "lower the method's frame gaps or use longer videos")

    def __len__(self) -> int:
        return self.n_videos * self.samples_per_video

    def __getitem__(self, i: int):
        video = i % self.n_videos
        rng = np.random.default_rng([self.seed, self.epoch, i])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(rng.integers(2**63 - 1)))
            sample = self.sampler(self.data, video, rng)
        return sample, video, 0


def collate_samples(items):
    """(dict of stacked tensors, video indices, zero targets)."""
    keys = items[0][0].keys()
    stacked = {k: torch.stack([torch.as_tensor(it[0][k]) for it in items]) for k in keys}
    return stacked, torch.tensor([it[1] for it in items]), torch.tensor([it[2] for it in items])


class VideoMethod(Method):
    """Base of the methods that train on videos (``pretrain.methods.{slow_features, slow_steady, shuffle_learn,
    odd_one_out}``): trains on any video reader's data, draws examples with :meth:`sampler` (no image views)."""

    data_kinds = VIDEO_KINDS

    def views(self, image_size: int):
        raise UserError(f"method {self.name!r} trains on video: it draws examples with sampler(), not views()")

    def sampler(self, image_size: int) -> VideoSampler:
        raise NotImplementedError
