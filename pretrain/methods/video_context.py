"""Context prediction (Doersch, Gupta & Efros, ICCV 2015) on video frames: the ``relative_position`` method trained
on frames drawn from videos.

Data (per example, ``ContextPairSampler``): a frame of a video, one random crop (area ``crop_scale_min``..1, aspect
3/4..4/3, mirrored with probability 0.5: the relative_position method's view), and its pretext pair cut exactly as
``relative_position`` cuts it (``pretrain.methods.relative_position.patch_pair``: centre + 1 of 8 neighbours, gap,
per-patch jitter; colour dropping or projection; per-patch normalisation). With ``frame_gap`` > 0 the neighbour
patch comes from a second frame 1..``frame_gap`` frames later (or earlier, at the end of the video) under the same
crop, so the position must be read across the objects' motion; 0 (the default) is Doersch et al.'s single image.

Network and loss: the ``relative_position`` method itself on this trunk (its pair layer, classifier, 8-way
cross-entropy and optimiser); its hyper-parameters are this method's.
"""

from __future__ import annotations

import numpy as np
import torch

from ..base import Batch
from ..pretext import color_drop, color_project, normalize_tiles
from ..video import VideoMethod, VideoSampler, read_frames
from .relative_position import RelativePosition, patch_geometry, patch_pair


def context_pair(frames: torch.Tensor, label: int, gap_frac: float, jitter_frac: float,
                 colour: str) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
    """relative_position's pretext pair from one crop (1, 3, S, S), or with the neighbour from the second of two
    crops (2, 3, S, S) cut at the same place: (normalised pair (2, 3, p, p), centre corner, neighbour corner)."""
    stacked = frames.flatten(0, 1)  # the frames' channels side by side: one cut, the same corners in each
    pair, centre, neighbour = patch_pair(stacked, label, gap_frac, jitter_frac)
    pair = torch.stack([pair[0, :3], pair[1, -3:]])
    if colour == "drop":
        pair = torch.stack([color_drop(q) for q in pair])
    elif colour == "project":
        pair = torch.stack([color_project(q) for q in pair])
    return normalize_tiles(pair), centre, neighbour


class ContextPairSampler(VideoSampler):
    """A relative-position question from a video: ``pair`` (2, 3, p, p) normalised patches [centre, neighbour],
    ``label`` the neighbour's position (0..7), ``corners`` (2, 2) their top-left (y, x) in the crop, ``time`` (2,)
    the frames they were cut from."""

    name = "context_pair"
    frame_keys = ()  # the patches are normalised per patch here, as relative_position's loader does

    def __init__(self, image_size: int, frame_gap: int = 0, gap_frac: float = 0.5, jitter_frac: float = 7 / 96,
                 colour: str = "drop", crop_scale_min: float = 0.3):
        super().__init__(image_size, crop_scale_min, flip=True)
        self.frame_gap, self.gap_frac, self.jitter_frac, self.colour = (int(frame_gap), float(gap_frac),
                                                                        float(jitter_frac), str(colour))

    @property
    def min_frames(self) -> int:
        return self.frame_gap + 1

    def draw(self, dataset, video: int, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        n = dataset.info(video).num_frames
        t0 = t1 = int(rng.integers(0, n))
        if self.frame_gap:
            step = int(rng.integers(1, self.frame_gap + 1))
            t1 = t0 + step if t0 + step < n else t0 - step
        label = int(torch.randint(0, 8, ()))
        frames = self.crop(read_frames(dataset, video, [t0] if t1 == t0 else [t0, t1]), rng)
        pair, centre, neighbour = context_pair(frames, label, self.gap_frac, self.jitter_frac, self.colour)
        return {"pair": pair, "label": torch.tensor(label), "corners": torch.tensor([centre, neighbour]),
                "time": torch.tensor([t0, t1])}

    def settings(self) -> dict:
        p, g, j = patch_geometry(self.crop.size, self.gap_frac, self.jitter_frac)
        return {"frame_gap": self.frame_gap, "patch": p, "gap": g, "jitter": j, "colour": self.colour}


class VideoContext(VideoMethod):
    name = "video_context"
    description = "context prediction (Doersch et al.) on video frames: relative_position's 8-way patch " \
                  "position task, optionally with the neighbour from a nearby frame"
    defaults = {**RelativePosition.defaults, "frame_gap": 0}
    optim = RelativePosition.optim
    short = {"hp": {"hidden": 1024}}

    def __init__(self, arch, hp=None, **kw):
        super().__init__(arch, hp, **kw)
        if self.hp["frame_gap"] < 0:
            from evalsuite.errors import UserError

            raise UserError("video_context: frame_gap must be >= 0")
        task_hp = {k: v for k, v in self.hp.items() if k in RelativePosition.defaults}
        self.task = RelativePosition(arch, task_hp, num_samples=self.num_samples, num_classes=self.num_classes,
                                     seed=self.seed)
        self.task.trunk = self.trunk  # one trunk; the task's own copy is dropped

    def sampler(self, image_size):
        hp = self.hp
        return ContextPairSampler(image_size, hp["frame_gap"], hp["gap_frac"], hp["jitter_frac"], hp["colour"],
                                  hp["crop_scale_min"])

    def preprocess(self, x):
        return x  # no frame keys: the patches arrive normalised

    def training_step(self, batch: Batch):
        return self.task.training_step(Batch([batch.extra["pair"], batch.extra["label"]], batch.index, batch.target))
