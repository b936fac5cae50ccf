"""Odd-one-out networks (Fernando, Bilen, Gavves & Gould, CVPR 2017): find the clip whose frames are out of order.

Data (per example, ``OddOneOutSampler``): ``n_elements`` clips (the question's elements; 6 in the paper) of one
video, each ``clip_len`` distinct frames drawn within ``clip_span`` frames (0: anywhere in the video), in temporal
order, but one, at a uniformly drawn position, whose frames are permuted into an order neither increasing nor
decreasing (``evalsuite.data.video.sample_tuple``). One crop for every frame of the example.

Network: a multi-branch network with shared weights. ``encoding`` "sod" (the paper's frame-difference
encoding, fit to an image trunk): each clip enters the trunk as one image, the sum of differences of its frames
(``pretrain.video.sum_of_differences``: the mean over frame pairs i < j of x_j - x_i, an approximate dynamic
image); "frames": every frame enters the trunk and the clip's feature is the sum of differences of its frames'
embeddings. Each clip's feature goes through a per-branch layer (Linear + ReLU to ``dim``); the branches are fused
by ``fusion`` "sdf" (the paper's sum of difference fusion: the same sum of differences over the clips) or
"concat" (concatenation); a linear layer gives one logit per clip, softmax cross-entropy against the odd clip's
position. No code was released: settings the paper leaves open are ours (docs/pretraining.md).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from evalsuite.data.video import sample_tuple

from ..base import Batch, optim_config
from ..losses import classification_step
from ..video import VideoMethod, VideoSampler, read_frames, sum_of_differences


class OddOneOutSampler(VideoSampler):
    """An odd-one-out question: key ``frames`` (n_elements, clip_len, 3, S, S), ``label`` the odd clip's position,
    ``time`` (n_elements, clip_len) the frame indices in clip order."""

    name = "odd_one_out"

    def __init__(self, image_size: int, n_elements: int = 6, clip_len: int = 6, clip_span: int = 0,
                 crop_scale_min: float = 1.0, flip: bool = False):
        super().__init__(image_size, crop_scale_min, flip)
        self.n_elements, self.clip_len, self.clip_span = int(n_elements), int(clip_len), int(clip_span)

    @property
    def min_frames(self) -> int:
        return self.clip_len

    def draw(self, dataset, video: int, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        n = dataset.info(video).num_frames
        span = self.clip_span or None
        odd = int(rng.integers(self.n_elements))
        t = np.stack([sample_tuple(rng, n, self.clip_len, span, shuffled=k == odd) for k in range(self.n_elements)])
        frames = self.crop(read_frames(dataset, video, t.ravel()), rng)
        return {"frames": frames.view(self.n_elements, self.clip_len, *frames.shape[1:]), "label": torch.tensor(odd),
                "time": torch.from_numpy(t)}

    def settings(self) -> dict:
        return {"n_elements": self.n_elements, "clip_len": self.clip_len, "clip_span": self.clip_span}


class OddOneOut(VideoMethod):
    name = "odd_one_out"
    description = "odd-one-out: which of N clips of a video has its frames out of order? (shared trunk per clip, " \
                  "sum-of-differences encoding and fusion)"
    defaults = {"n_elements": 6, "clip_len": 6, "clip_span": 0, "encoding": "sod", "fusion": "sdf", "dim": 512,
                "crop_scale_min": 1.0, "flip": False}
    optim = optim_config("sgd", lr=0.01, weight_decay=5e-4, base_batch_size=128)
    short = {"hp": {"clip_len": 4, "dim": 256}, "optim": {"lr": 0.05}}

    def __init__(self, arch, hp=None, **kw):
        super().__init__(arch, hp, **kw)
        hp = self.hp
        from evalsuite.errors import UserError

        if hp["encoding"] not in ("sod", "frames") or hp["fusion"] not in ("sdf", "concat"):
            raise UserError("odd_one_out: encoding must be sod or frames, fusion sdf or concat")
        if hp["n_elements"] < 2 or hp["clip_len"] < 3 or hp["clip_span"] < 0:
            raise UserError("odd_one_out: needs n_elements >= 2, clip_len >= 3 (a shuffled clip is neither "
                            "increasing nor decreasing), clip_span >= 0")
        if 0 < hp["clip_span"] < hp["clip_len"] - 1:
            raise UserError("odd_one_out: clip_span must leave room for clip_len frames (>= clip_len - 1)")
        self.branch = nn.Sequential(nn.Linear(self.feat_dim, hp["dim"]), nn.ReLU(inplace=True))
        fused = hp["dim"] * (hp["n_elements"] if hp["fusion"] == "concat" else 1)
        self.classifier = nn.Linear(fused, hp["n_elements"])

    def sampler(self, image_size):
        hp = self.hp
        return OddOneOutSampler(image_size, hp["n_elements"], hp["clip_len"], hp["clip_span"], hp["crop_scale_min"],
                                hp["flip"])

    def clip_features(self, frames: torch.Tensor) -> torch.Tensor:
        """(B, N, L, C, H, W) frames in the input space -> (B, N, dim) per-clip codes."""
        b, n, length = frames.shape[:3]
        if self.hp["encoding"] == "sod":
            feats = self.embed(sum_of_differences(frames, dim=2).flatten(0, 1))
        else:
            feats = sum_of_differences(self.embed(frames.flatten(0, 2)).view(b * n, length, -1), dim=1)
        return self.branch(feats).view(b, n, -1)

    def training_step(self, batch: Batch):
        frames, labels = batch.extra["frames"], batch.extra["label"]
        codes = self.clip_features(frames)
        fused = sum_of_differences(codes, dim=1) if self.hp["fusion"] == "sdf" else codes.flatten(1)
        return classification_step(self.classifier(fused), labels)
