"""Slow and steady feature analysis (Jayaraman & Grauman, CVPR 2016): higher-order temporal coherence.

Data (per example, ``SteadyTripletSampler``): frames a, b = a + s, c = a + 2s of one video (s uniform in
1..``max_gap``; the paper's (t, t+1, t+2) at the default 1) and a frame r of the same video more than ``max_gap``
frames from all three. Network: the trunk's pooled embedding and a linear layer to ``dim``. Loss
(``pretrain.losses.slow_steady_loss``, the contrastive loss of Jayaraman's Caffe fork: d^2 for similar pairs,
max(margin - d^2, 0) for dissimilar ones): ``slow_weight`` x slow (neighbours (a, b), (b, c) close; (a, r),
(c, r) beyond ``margin_slow``) + ``steady_weight`` x steady (the feature change is steady: z_b - z_a close to
z_c - z_b; z_r - z_b beyond ``margin_steady`` from it). The paper adds these terms to a supervised loss on a
labelled set; trained here without labels, as its unsupervised pretraining is.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..base import Batch, optim_config
from ..losses import slow_steady_loss
from ..video import VideoMethod, VideoSampler, far_frame, read_frames


class SteadyTripletSampler(VideoSampler):
    """Frames (a, a + s, a + 2s, r), 1 <= s <= ``max_gap``, r more than ``max_gap`` frames from the three; key
    ``frames`` (4, 3, S, S) and ``time`` (4,)."""

    name = "steady_triplet"

    def __init__(self, image_size: int, max_gap: int = 1, crop_scale_min: float = 1.0, flip: bool = False):
        super().__init__(image_size, crop_scale_min, flip)
        self.max_gap = int(max_gap)

    @property
    def min_frames(self) -> int:
        return 4 * self.max_gap + 2  # the triplet spans up to 2T + 1 frames, r needs T more on one side

    def draw(self, dataset, video: int, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        n = dataset.info(video).num_frames
        step = int(rng.integers(1, min(self.max_gap, (n - 1) // 2) + 1))
        a = int(rng.integers(0, n - 2 * step))
        r = far_frame(rng, n, a, a + 2 * step, self.max_gap)
        t = [a, a + step, a + 2 * step, r]
        return {"frames": self.crop(read_frames(dataset, video, t), rng), "time": torch.tensor(t)}

    def settings(self) -> dict:
        return {"max_gap": self.max_gap}


class SlowSteady(VideoMethod):
    name = "slow_steady"
    description = "slow and steady: neighbouring frames close, feature changes steady over frame triplets " \
                  "(contrastive, with far frames as negatives)"
    defaults = {"max_gap": 1, "dim": 128, "margin_slow": 1.0, "margin_steady": 1.0, "slow_weight": 1.0,
                "steady_weight": 1.0, "crop_scale_min": 1.0, "flip": False}
    optim = optim_config("sgd", lr=0.03, weight_decay=1e-4)
    short = {"hp": {"crop_scale_min": 0.5, "flip": True}, "optim": {"lr": 0.05}}

    def __init__(self, arch, hp=None, **kw):
        super().__init__(arch, hp, **kw)
        if self.hp["max_gap"] < 1:
            from evalsuite.errors import UserError

            raise UserError("slow_steady: max_gap must be at least 1 frame")
        self.head = nn.Linear(self.feat_dim, self.hp["dim"])

    def sampler(self, image_size):
        hp = self.hp
        return SteadyTripletSampler(image_size, hp["max_gap"], hp["crop_scale_min"], hp["flip"])

    def training_step(self, batch: Batch):
        frames = batch.extra["frames"]
        b = frames.shape[0]
        za, zb, zc, zr = self.head(self.embed(frames.flatten(0, 1))).view(b, 4, -1).unbind(1)
        slow, steady = slow_steady_loss(za, zb, zc, zr, self.hp["margin_slow"], self.hp["margin_steady"])
        loss = self.hp["slow_weight"] * slow + self.hp["steady_weight"] * steady
        return loss, {"slow": float(slow.detach()), "steady": float(steady.detach())}
