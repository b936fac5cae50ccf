"""Unsupervised learning of visual representations using videos (Wang & Gupta, ICCV 2015): a patch of a moving
object and the same object tracked a few frames later must be closer, in cosine distance, than a patch of another
video (a triplet ranking loss).

Data (per example, ``TrackedPairSampler``). The paper finds moving patches with SURF points and IDT trajectories
and tracks them with KCF; here, on the frames shrunk to at most ``motion_size`` px: frame t is compared with frame
t + ``diff_gap`` by frame differencing after undoing the camera's translation (``motion_masks.camera_shift``), a
pixel moves when a colour channel changes by more than ``diff_threshold`` grey levels, and the square window of
side ``patch_frac`` x the short side holding the most moving pixels is the first patch (up to ``tries`` frames are
drawn until its moving fraction reaches ``min_motion``; otherwise the best one is kept). An off-the-shelf OpenCV
tracker (``tracker``: ``medianflow``, Kalal et al.'s forward-backward Lucas-Kanade point tracker, the default;
``kcf``, the paper's; ``csrt``) follows it over ``track_frames`` frames; its box in the last frame it tracked is the
second patch. Each patch is resized to the image size and mirrored with probability 0.5 on its own (Caffe's
``mirror``).

Network and loss (xiaolonw/caffe-video_triplet rank_scripts/rank_alexnet/imagenet_train.prototxt): the trunk's
pooled embedding, a linear layer to ``dim`` (the prototxt's fc7, 1024) + ReLU, L2 normalisation, and the
RankHardLoss layer (``pretrain.losses.triplet_ranking_loss``): the patches of the batch's other videos are the
negatives, ``neg_num`` (4) per pair, ``hard_ratio`` of them among the hardest and ``rand_ratio`` at random, margin
``margin`` (the paper's 0.5; the released prototxts use 1). Solver (solver.prototxt): SGD lr 0.001, momentum 0.9,
weight decay 5e-4, 80 patches (40 pairs) per batch.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from evalsuite.errors import UserError

from ..base import Batch, optim_config
from ..losses import triplet_ranking_loss
from ..video import VideoMethod, VideoSampler, read_frames
from .motion_masks import camera_shift, opencv, shrink, undo_camera

TRACKERS = ("medianflow", "kcf", "csrt")


def make_tracker(name: str):
    """A fresh OpenCV tracker: ``medianflow`` (cv2.legacy, the contrib build), ``kcf`` or ``csrt``."""
    cv2 = opencv()
    makers = {"medianflow": lambda: cv2.legacy.TrackerMedianFlow_create(), "kcf": lambda: cv2.TrackerKCF_create(),
              "csrt": lambda: cv2.TrackerCSRT_create()}
    if name not in makers:
        raise UserError(f"tracking: unknown tracker {name!r}; choose one of {', '.join(TRACKERS)}")
    try:
        return makers[name]()
    except AttributeError:
        raise UserError(f"tracking: OpenCV has no {name} tracker here; install opencv-contrib-python-headless")\
            from None


def moving_window(a: np.ndarray, b: np.ndarray, side: int, max_shift: float = 0.1,
                  diff_threshold: int = 20) -> tuple[tuple[int, int], float]:
    """The ``side`` x ``side`` window of RGB frame ``a`` (uint8 (H, W, 3)) holding the most pixels that change in
    the later frame ``b`` once the camera's translation is undone (any channel by more than ``diff_threshold``):
    ((x, y) its top-left corner, the moving fraction of its pixels). Ties: the first in row-major order."""
    cv2 = opencv()
    ga, gb = (cv2.cvtColor(np.ascontiguousarray(f), cv2.COLOR_RGB2GRAY) for f in (a, b))
    shift = camera_shift(ga, gb, max(1, round(max_shift * min(ga.shape))))
    moving = (np.abs(undo_camera(b, shift).astype(np.int16) - a.astype(np.int16)).max(2) > diff_threshold)
    total = cv2.integral(moving.astype(np.uint8))  # (H + 1, W + 1) running sums
    sums = total[side:, side:] - total[:-side, side:] - total[side:, :-side] + total[:-side, :-side]
    y, x = np.unravel_index(int(np.argmax(sums)), sums.shape)
    return (int(x), int(y)), float(sums[y, x]) / side**2


def track(frames: np.ndarray, box: tuple[float, float, float, float], tracker: str) -> tuple[int, tuple]:
    """Follow ``box`` (x, y, w, h in frame 0) through RGB ``frames`` (uint8 (T, H, W, 3)) with an OpenCV tracker:
    (the last frame it tracked, its box there); it stops at the first frame where the tracker reports a loss."""
    cv2 = opencv()
    t = make_tracker(tracker)
    t.init(cv2.cvtColor(frames[0], cv2.COLOR_RGB2BGR), tuple(int(round(v)) for v in box))
    last, last_box = 0, tuple(float(v) for v in box)
    for k in range(1, len(frames)):
        ok, found = t.update(cv2.cvtColor(frames[k], cv2.COLOR_RGB2BGR))
        if not ok or found[2] < 1 or found[3] < 1:
            break
        last, last_box = k, tuple(float(v) for v in found)
    return last, last_box


def frame_box(box: tuple[float, float, float, float], scale: tuple[float, float], h: int, w: int) -> list[int]:
    """A motion-scale (x, y, w, h) box as integer frame pixels [x1, y1, x2, y2) (x2, y2 exclusive), inside the
    frame and at least 2 px wide and high."""
    sx, sy = scale
    x1, y1 = math.floor(box[0] * sx), math.floor(box[1] * sy)
    x2, y2 = math.ceil((box[0] + box[2]) * sx), math.ceil((box[1] + box[3]) * sy)
    x1, y1 = min(max(0, x1), w - 2), min(max(0, y1), h - 2)
    return [x1, y1, min(w, max(x2, x1 + 2)), min(h, max(y2, y1 + 2))]


class TrackedPairSampler(VideoSampler):
    """A patch of a moving object and the same object tracked later: ``frames`` (2, 3, S, S) [first, tracked],
    ``boxes`` (2, 4) their [x1, y1, x2, y2) in frame pixels, ``time`` (2,) their frames, ``motion`` the moving
    fraction of the first window."""

    name = "tracked_pair"

    def __init__(self, image_size: int, track_frames: int = 30, diff_gap: int = 2, patch_frac: float = 0.4,
                 min_motion: float = 0.1, tries: int = 5, tracker: str = "medianflow", motion_size: int = 64,
                 max_shift: float = 0.1, diff_threshold: int = 20, flip: bool = True):
        super().__init__(image_size, 1.0, flip)  # each patch whole, resized, mirrored on its own
        self.track_frames, self.diff_gap, self.patch_frac = int(track_frames), int(diff_gap), float(patch_frac)
        self.min_motion, self.tries, self.tracker = float(min_motion), int(tries), str(tracker)
        self.motion_size, self.max_shift, self.diff_threshold = int(motion_size), float(max_shift), int(diff_threshold)

    @property
    def min_frames(self) -> int:
        return max(self.track_frames, self.diff_gap) + 1

    def draw(self, dataset, video: int, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        n = dataset.info(video).num_frames
        span = max(self.track_frames, self.diff_gap)
        best = None
        for _ in range(self.tries):
            t = int(rng.integers(0, n - span))
            small = shrink(read_frames(dataset, video, [t, t + self.diff_gap]).numpy(), self.motion_size)
            side = max(2, round(self.patch_frac * min(small.shape[1:3])))
            corner, motion = moving_window(small[0], small[1], side, self.max_shift, self.diff_threshold)
            if best is None or motion > best[2]:
                best = (t, (corner[0], corner[1], side, side), motion)
            if motion >= self.min_motion:
                break
        t, box, motion = best
        clip = read_frames(dataset, video, range(t, t + self.track_frames + 1)).numpy()
        small = shrink(clip, self.motion_size)
        last, last_box = track(small, box, self.tracker)
        h, w = clip.shape[1:3]
        scale = (w / small.shape[2], h / small.shape[1])
        boxes = [frame_box(box, scale, h, w), frame_box(last_box, scale, h, w)]
        patches = [self.crop(torch.from_numpy(clip[k, y1:y2, x1:x2][None]), rng)
                   for k, (x1, y1, x2, y2) in zip((0, last), boxes)]
        return {"frames": torch.cat(patches), "boxes": torch.tensor(boxes), "time": torch.tensor([t, t + last]),
                "motion": torch.tensor(motion)}

    def settings(self) -> dict:
        return {"track_frames": self.track_frames, "diff_gap": self.diff_gap, "patch_frac": self.patch_frac,
                "min_motion": self.min_motion, "tries": self.tries, "tracker": self.tracker,
                "motion_size": self.motion_size, "max_shift": self.max_shift, "diff_threshold": self.diff_threshold}


class Tracking(VideoMethod):
    name = "tracking"
    description = "Wang & Gupta: a moving patch and its track a few frames later closer (cosine) than patches of " \
                  "other videos (triplet ranking loss, hard negatives)"
    defaults = {"track_frames": 30, "diff_gap": 2, "patch_frac": 0.4, "min_motion": 0.1, "tries": 5,
                "tracker": "medianflow", "motion_size": 64, "max_shift": 0.1, "diff_threshold": 20, "flip": True,
                "dim": 1024, "margin": 0.5, "neg_num": 4, "hard_ratio": 0.5, "rand_ratio": 0.5}
    optim = optim_config("sgd", lr=0.001, weight_decay=5e-4, base_batch_size=40)
    #: tracks of 5 frames (0.5 s of the synthetic 10 fps videos; the paper's 30 frames at 30 fps are 1 s)
    short = {"hp": {"track_frames": 5, "dim": 256}, "optim": {"lr": 0.01}}

    def __init__(self, arch, hp=None, **kw):
        super().__init__(arch, hp, **kw)
        hp = self.hp
        if hp["tracker"] not in TRACKERS:
            raise UserError(f"tracking: tracker must be one of {', '.join(TRACKERS)}")
        if not (hp["track_frames"] >= 1 and hp["diff_gap"] >= 1 and 0 < hp["patch_frac"] <= 1 and hp["tries"] >= 1
                and hp["neg_num"] >= 1 and 0 <= hp["hard_ratio"] <= 1 and 0 <= hp["rand_ratio"] <= 1):
            raise UserError("tracking: needs track_frames >= 1, diff_gap >= 1, 0 < patch_frac <= 1, tries >= 1, "
                            "neg_num >= 1, hard_ratio and rand_ratio in [0, 1]")
        self.head = nn.Sequential(nn.Linear(self.feat_dim, hp["dim"]), nn.ReLU(inplace=True))

    def sampler(self, image_size):
        hp = self.hp
        return TrackedPairSampler(image_size, hp["track_frames"], hp["diff_gap"], hp["patch_frac"], hp["min_motion"],
                                  hp["tries"], hp["tracker"], hp["motion_size"], hp["max_shift"],
                                  hp["diff_threshold"], hp["flip"])

    def training_step(self, batch: Batch):
        frames = batch.extra["frames"]
        b = frames.shape[0]
        z = self.head(self.embed(frames.flatten(0, 1))).view(b, 2, -1)
        hp = self.hp
        loss, chosen = triplet_ranking_loss(z[:, 0], z[:, 1], batch.index, hp["margin"], hp["neg_num"],
                                            hp["hard_ratio"], hp["rand_ratio"])
        with torch.no_grad():
            u = torch.nn.functional.normalize(z.float(), dim=2)
            logs = {"cos_pos": float((u[:, 0] * u[:, 1]).sum(1).mean()),
                    "negatives": float(chosen.sum(1).float().mean()),
                    "motion": float(batch.extra["motion"].float().mean())}
        return loss, logs
