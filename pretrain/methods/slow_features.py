"""Slow features: temporal coherence in video (Mobahi, Collobert & Weston, ICML 2009; the "slow" term of
Jayaraman & Grauman 2016; Goroshin et al. 2015's slowness prior), trained with the contrastive loss of Hadsell,
Chopra & LeCun 2006 (``pretrain.losses.contrastive_loss``).

Data (per example, ``SlowPairSampler``): frames a and b of one video at most ``max_gap`` frames apart (Mobahi's
consecutive frames at the default 1), and a frame r of the same video more than ``max_gap`` frames from both.
Network: the trunk's pooled embedding and a linear layer to ``dim`` (the embedding the loss acts on). Loss: the
pair (a, b) is pulled together (d^2 / 2); (a, r) and (a, b') with b' the b frame of the next example in the batch
(another video, or the same video more than ``max_gap`` frames away; a nearer one is left out) are pushed beyond
``margin`` (max(margin - d, 0)^2 / 2).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from evalsuite.data.video import sample_pair

from ..base import Batch, optim_config
from ..losses import contrastive_loss
from ..video import VideoMethod, VideoSampler, far_frame, read_frames


class SlowPairSampler(VideoSampler):
    """Frames (a, b, r): ``1 <= |b - a| <= max_gap``, r more than ``max_gap`` frames from a and b; key ``frames``
    (3, 3, S, S) and ``time`` (3,) their indices."""

    name = "slow_pair"

    def __init__(self, image_size: int, max_gap: int = 1, crop_scale_min: float = 1.0, flip: bool = False):
        super().__init__(image_size, crop_scale_min, flip)
        self.max_gap = int(max_gap)

    @property
    def min_frames(self) -> int:
        return 3 * self.max_gap + 2  # room for r outside [a - T, b + T]

    def draw(self, dataset, video: int, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        n = dataset.info(video).num_frames
        a, b = sample_pair(rng, n, self.max_gap)
        r = far_frame(rng, n, a, b, self.max_gap)
        t = [a, b, r]
        return {"frames": self.crop(read_frames(dataset, video, t), rng), "time": torch.tensor(t)}

    def settings(self) -> dict:
        return {"max_gap": self.max_gap}


class SlowFeatures(VideoMethod):
    name = "slow_features"
    description = "temporal coherence: frames within T of each other pulled together, other times/videos pushed " \
                  "beyond a margin (contrastive loss)"
    defaults = {"max_gap": 1, "dim": 128, "margin": 1.0, "crop_scale_min": 1.0, "flip": False}
    optim = optim_config("sgd", lr=0.03, weight_decay=1e-4)
    short = {"hp": {"crop_scale_min": 0.5, "flip": True}, "optim": {"lr": 0.05}}

    def __init__(self, arch, hp=None, **kw):
        super().__init__(arch, hp, **kw)
        if self.hp["max_gap"] < 1:
            from evalsuite.errors import UserError

            raise UserError("slow_features: max_gap must be at least 1 frame")
        self.head = nn.Linear(self.feat_dim, self.hp["dim"])

    def sampler(self, image_size):
        hp = self.hp
        return SlowPairSampler(image_size, hp["max_gap"], hp["crop_scale_min"], hp["flip"])

    def training_step(self, batch: Batch):
        frames, t, video = batch.extra["frames"], batch.extra["time"], batch.index
        b = frames.shape[0]
        z = self.head(self.embed(frames.flatten(0, 1))).view(b, 3, -1)
        za, zb, zr = z.unbind(1)
        # in-batch negatives: each a against the next example's b, unless that is the same video within max_gap
        far = (video != video.roll(-1)) | ((t[:, 0] - t[:, 1].roll(-1)).abs() > self.hp["max_gap"])
        ones = torch.ones(b, device=z.device)
        left, right = torch.cat([za, za, za]), torch.cat([zb, zr, zb.roll(-1, 0)])
        similar = torch.cat([ones, 0 * ones, 0 * ones])
        weight = torch.cat([ones, ones, far.float()])
        loss = contrastive_loss(left, right, similar, self.hp["margin"], weight=weight)
        with torch.no_grad():
            logs = {"d_pos": float((za - zb).float().norm(dim=1).mean()),
                    "d_neg": float((za - zr).float().norm(dim=1).mean())}
        return loss, logs
