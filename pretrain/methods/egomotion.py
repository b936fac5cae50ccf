"""Learning to see by moving (Agrawal, Carreira & Malik, ICCV 2015): classify the camera's motion between two
frames from their images.

Follows pulkitag/learning-to-see-by-moving (``kitti_new.py`` ``get_camera_imnames_and_pose``,
``get_pose_label_normalized``; ``kitti_utils.py`` ``get_prms``, ``get_pose_stats``, ``get_pose_label``) with its
KITTI setting ``poseType='sigMotion'`` (the two ground-plane translations and the yaw), ``maxFrameDiff=7``,
``lossType='classify'``, ``nrmlzType='zScoreScaleSeperate'``:

- pairs (``MotionPairSampler``): frame a uniform; gap ``round(u * max_gap)`` (u uniform in [0, 1)), negated with
  probability 1/2; frame b = a + gap clamped to the video (b = a happens: zero motion);
- motion: (forward, left, turn) of b in a's camera frame (``evalsuite.data.video.relative_pose``);
- normalisation (``on_train_start``, from every consecutive-frame motion of the training sequences, where the
  reference samples 100 per sequence): the reference z-scores each dimension and rescales translations by
  sd / max(translation sds) and rotations by sd / max(rotation sds), i.e. divides (m - mean) by the largest sd of
  its group: forward and left by max(sd_forward, sd_left), turn by sd_turn;
- bins (:func:`motion_bins`): edges ``linspace(-n_bins s, n_bins s, 2 n_bins)`` with s = ``bin_size`` (0: the
  reference's max_gap / 7); a dimension's class is the number of edges at or below its value, 2 n_bins + 1 classes
  (the reference's ``1 + find_bin`` into a 2 n_bins + 2-way output).

Network (pulkitag/egomotion ``base_files/kitti_siamese_window_fc6_cls-trn2-rot1.prototxt``): the SAME trunk on
both frames, a shared fc6 (Linear ``fc6_dim`` + ReLU, the prototxt's 2048) on each pooled embedding, the two
concatenated, common_fc7 (Linear ``fc7_dim`` + ReLU + dropout 0.5), one linear classifier per dimension, their
softmax cross-entropies summed (``pretrain.losses.binned_motion_loss``). Solver (``kitti_new.get_solver``): SGD lr
0.001, weight decay 5e-4, batch 128.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from evalsuite.data.video import relative_pose
from evalsuite.errors import UserError

from ..base import Batch, optim_config
from ..losses import binned_motion_loss
from ..video import VideoMethod, VideoSampler, read_frames

MOTION_DIMS = ("forward", "left", "turn")


def motion_bins(motion: torch.Tensor, mean: torch.Tensor, div: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """Each dimension of (..., 3) ``motion`` normalised, ``(m - mean) / div``, and binned: the number of the
    ascending ``edges`` at or below it (0 .. len(edges)). Long (..., 3)."""
    z = ((motion.float() - mean) / div).contiguous()
    return torch.searchsorted(edges.contiguous(), z, right=True)


class MotionPairSampler(VideoSampler):
    """Frames (a, b) of one sequence and b's motion in a's frame: keys ``frames`` (2, 3, S, S), ``motion`` (3,)
    (forward, left, turn) and ``time`` (2,)."""

    name = "motion_pair"

    def __init__(self, image_size: int, max_gap: int = 7, crop_scale_min: float = 1.0):
        super().__init__(image_size, crop_scale_min, flip=False)  # a flip would mirror the motion
        self.max_gap = int(max_gap)

    @property
    def min_frames(self) -> int:
        return 2

    def draw(self, dataset, video: int, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        n = dataset.info(video).num_frames
        a = int(rng.integers(n))
        gap = int(round(rng.random() * self.max_gap))
        if rng.random() > 0.5:
            gap = -gap
        b = min(max(a + gap, 0), n - 1)
        poses = dataset.poses(video)
        return {"frames": self.crop(read_frames(dataset, video, [a, b]), rng),
                "motion": torch.tensor(relative_pose(poses[a], poses[b]), dtype=torch.float32),
                "time": torch.tensor([a, b])}

    def settings(self) -> dict:
        return {"max_gap": self.max_gap}


class MotionClassification(VideoMethod):
    name = "egomotion"
    description = "learning to see by moving: Siamese trunk on two frames, classify the binned camera motion " \
                  "(forward, left, turn) between them"
    data_kinds = ("egomotion",)
    defaults = {"max_gap": 7, "n_bins": 10, "bin_size": 0.0, "fc6_dim": 2048, "fc7_dim": 2048, "dropout": 0.5,
                "crop_scale_min": 1.0}
    optim = optim_config("sgd", lr=0.001, weight_decay=5e-4, base_batch_size=128)
    short = {"hp": {"fc6_dim": 256, "fc7_dim": 256}, "optim": {"lr": 0.01}}

    def __init__(self, arch, hp=None, **kw):
        super().__init__(arch, hp, **kw)
        hp = self.hp
        if hp["max_gap"] < 1 or hp["n_bins"] < 1 or hp["bin_size"] < 0 or min(hp["fc6_dim"], hp["fc7_dim"]) < 1:
            raise UserError("egomotion: needs max_gap >= 1, n_bins >= 1, bin_size >= 0, fc6_dim and fc7_dim >= 1")
        size = hp["bin_size"] or hp["max_gap"] / 7
        edges = torch.linspace(-hp["n_bins"] * size, hp["n_bins"] * size, 2 * hp["n_bins"])
        self.register_buffer("edges", edges)
        self.register_buffer("motion_mean", torch.zeros(3))
        self.register_buffer("motion_div", torch.ones(3))
        self.n_classes = 2 * hp["n_bins"] + 1
        self.fc6 = nn.Sequential(nn.Linear(self.feat_dim, hp["fc6_dim"]), nn.ReLU(inplace=True))
        self.fc7 = nn.Sequential(nn.Linear(2 * hp["fc6_dim"], hp["fc7_dim"]), nn.ReLU(inplace=True),
                                 nn.Dropout(hp["dropout"]))
        self.heads = nn.Linear(hp["fc7_dim"], 3 * self.n_classes)

    def sampler(self, image_size):
        return MotionPairSampler(image_size, self.hp["max_gap"], self.hp["crop_scale_min"])

    @torch.no_grad()
    def on_train_start(self, trainer) -> None:
        steps = np.concatenate([trainer.data.relative(i) for i in range(trainer.n_images)])
        if len(steps) == 0:
            raise UserError("egomotion: the training sequences have no consecutive frames")
        sd = steps.std(0)
        div = np.array([max(sd[0], sd[1]), max(sd[0], sd[1]), sd[2]])
        self.motion_mean.copy_(torch.from_numpy(steps.mean(0)))
        self.motion_div.copy_(torch.from_numpy(np.maximum(div, 1e-12)))

    def training_step(self, batch: Batch):
        frames = batch.extra["frames"]
        b = frames.shape[0]
        codes = self.fc6(self.embed(frames.flatten(0, 1))).view(b, -1)
        logits = self.heads(self.fc7(codes)).view(b, 3, self.n_classes)
        labels = motion_bins(batch.extra["motion"], self.motion_mean, self.motion_div, self.edges)
        with torch.no_grad():
            acc = (logits.argmax(2) == labels).float().mean(0)
        return binned_motion_loss(logits, labels), {f"acc_{d}": float(a) for d, a in zip(MOTION_DIMS, acc)}

    def metadata(self) -> dict:
        return {**super().metadata(), "egomotion": {
            "classes_per_dim": self.n_classes, "edges": [round(float(e), 6) for e in self.edges],
            "motion_mean": [round(float(m), 6) for m in self.motion_mean],
            "motion_div": [round(float(d), 6) for d in self.motion_div], "dims": list(MOTION_DIMS)}}
