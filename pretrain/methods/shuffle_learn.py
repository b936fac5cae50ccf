"""Shuffle and Learn (Misra, Zitnick & Hebert, ECCV 2016): temporal order verification of 3-frame tuples.

Data (per example, ``OrderTupleSampler``, the paper's Sec. 3.2): five frames a < b < c < d < e of one video with
``d - b <= tau_max`` and a gap of at least ``tau_min`` between a and b or d and e. With probability
``pos_fraction`` (the paper's 25 %) the tuple is positive: (b, c, d) or (d, c, b) (either order is "in order");
otherwise negative: (b, a, d) or (b, e, d) (the middle frame outside the window). ``motion_candidates`` > 1
draws that many windows and keeps the one whose end frames differ most (the mean absolute difference of frames b
and d, a cheap stand-in for the paper's optical-flow magnitude). Frames are resized whole, without crops or
flips, as imisra/shuffle-tuple's data layer (python_layers/multiple_image_multiple_label_data_layer.py with
crop_ms_aug and lr_flip_aug unset).

Network (imisra/shuffle-tuple networks/tuple_train.prototxt): the SAME trunk on each frame, a per-frame layer
(the prototxt's fc7: Linear + BN + ReLU + dropout 0.5) on the pooled embedding, the three codes concatenated in
tuple order, a linear 2-way classifier, softmax cross-entropy (label 1: in order). Solver
(networks/tuple_solver.prototxt): SGD lr 0.001, momentum 0.9, weight decay 5e-4, batch 128.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..base import Batch, optim_config
from ..losses import classification_step
from ..video import VideoMethod, VideoSampler, read_frames


class OrderTupleSampler(VideoSampler):
    """A 3-frame tuple and its label: key ``frames`` (3, 3, S, S) in tuple order, ``label`` (1 in order, 0
    shuffled) and ``time`` (3,) the frame indices in tuple order."""

    name = "order_tuple"

    def __init__(self, image_size: int, tau_max: int = 60, tau_min: int = 15, pos_fraction: float = 0.25,
                 motion_candidates: int = 1, crop_scale_min: float = 1.0, flip: bool = False):
        super().__init__(image_size, crop_scale_min, flip)
        self.tau_max, self.tau_min = int(tau_max), int(tau_min)
        self.pos_fraction, self.motion_candidates = float(pos_fraction), int(motion_candidates)

    @property
    def min_frames(self) -> int:
        return self.tau_min + 3  # a window b < c < d and one negative frame tau_min beyond it

    def window(self, rng: np.random.Generator, n: int) -> tuple[int, int]:
        """(b, d): ``2 <= d - b <= tau_max`` with room for a negative frame on at least one side."""
        w = int(rng.integers(2, min(self.tau_max, n - 1 - self.tau_min) + 1))
        starts = np.arange(0, n - w)
        starts = starts[(starts >= self.tau_min) | (starts + w <= n - 1 - self.tau_min)]
        b = int(rng.choice(starts))
        return b, b + w

    def draw(self, dataset, video: int, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        n = dataset.info(video).num_frames
        windows = [self.window(rng, n) for _ in range(self.motion_candidates)]
        if len(windows) > 1:  # the window whose end frames differ most
            ends = read_frames(dataset, video, [f for bd in windows for f in bd]).float().view(len(windows), 2, -1)
            windows = [windows[int((ends[:, 1] - ends[:, 0]).abs().mean(1).argmax())]]
        b, d = windows[0]
        if rng.random() < self.pos_fraction:
            c = int(rng.integers(b + 1, d))
            t, label = ([b, c, d] if rng.random() < 0.5 else [d, c, b]), 1
        else:
            sides = [s for s, ok in (("before", b >= self.tau_min), ("after", d <= n - 1 - self.tau_min)) if ok]
            if sides[int(rng.integers(len(sides)))] == "before":
                odd = int(rng.integers(max(0, b - self.tau_max), b - self.tau_min + 1))
            else:
                odd = int(rng.integers(d + self.tau_min, min(n - 1, d + self.tau_max) + 1))
            t, label = [b, odd, d], 0
        return {"frames": self.crop(read_frames(dataset, video, t), rng), "label": torch.tensor(label),
                "time": torch.tensor(t)}

    def settings(self) -> dict:
        return {"tau_max": self.tau_max, "tau_min": self.tau_min, "pos_fraction": self.pos_fraction,
                "motion_candidates": self.motion_candidates}


class ShuffleLearn(VideoMethod):
    name = "shuffle_learn"
    description = "Shuffle and Learn: is a 3-frame tuple in temporal order? Siamese trunk, concatenated codes, " \
                  "2-way classifier"
    defaults = {"tau_max": 60, "tau_min": 15, "pos_fraction": 0.25, "motion_candidates": 1, "frame_dim": 4096,
                "dropout": 0.5, "crop_scale_min": 1.0, "flip": False}
    optim = optim_config("sgd", lr=0.001, weight_decay=5e-4, base_batch_size=128)
    #: windows sized to the synthetic 3 s / 10 fps videos (the paper's 60 / 15 frames are 2 s / 0.5 s at 30 fps)
    short = {"hp": {"tau_max": 12, "tau_min": 3, "frame_dim": 512}, "optim": {"lr": 0.01}}

    def __init__(self, arch, hp=None, **kw):
        super().__init__(arch, hp, **kw)
        hp = self.hp
        if not (2 <= hp["tau_max"] and 1 <= hp["tau_min"] <= hp["tau_max"] and 0.0 <= hp["pos_fraction"] <= 1.0
                and hp["motion_candidates"] >= 1):
            from evalsuite.errors import UserError

            raise UserError("shuffle_learn: needs tau_max >= 2, 1 <= tau_min <= tau_max, 0 <= pos_fraction <= 1, "
                            "motion_candidates >= 1")
        self.frame_fc = nn.Sequential(nn.Linear(self.feat_dim, hp["frame_dim"]), nn.BatchNorm1d(hp["frame_dim"]),
                                      nn.ReLU(inplace=True), nn.Dropout(hp["dropout"]))
        self.classifier = nn.Linear(3 * hp["frame_dim"], 2)

    def sampler(self, image_size):
        hp = self.hp
        return OrderTupleSampler(image_size, hp["tau_max"], hp["tau_min"], hp["pos_fraction"],
                                 hp["motion_candidates"], hp["crop_scale_min"], hp["flip"])

    def training_step(self, batch: Batch):
        frames, labels = batch.extra["frames"], batch.extra["label"]
        b = frames.shape[0]
        codes = self.frame_fc(self.embed(frames.flatten(0, 1))).view(b, -1)
        return classification_step(self.classifier(codes), labels)
