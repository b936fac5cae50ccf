"""Learning features by watching objects move (Pathak, Girshick, Dollár, Darrell & Hariharan, CVPR 2017): a network
learns to segment, from ONE frame, the objects that an unsupervised motion segmentation found moving in the video.

Pseudo ground truth (per example, ``MotionMaskSampler``): the paper segments its videos with uNLC (pathak22/videoseg);
here a simple motion segmentation, documented and tested instead: frames t and t + ``flow_gap`` are shrunk to at
most ``motion_size`` px (short side), the camera's motion between them is estimated as the integer translation
under which most pixels keep their grey level (:func:`camera_shift`, a consensus over the whole frame, as RANSAC
over point matches is) and undone, and the pixels whose Farneback optical flow (OpenCV
``calcOpticalFlowFarneback``) between the aligned frames exceeds ``flow_threshold`` px are moving; the mask is
cleaned (morphological opening and closing, holes filled, components under ``min_area`` of the frame dropped).
A frame whose mask covers less than ``min_area`` or more than ``max_area`` of it is redrawn (``tries`` frames);
an example without a usable mask gets weight 0 (``valid``). Frame and mask share one crop and flip.

Network (pathak22/unsupervised-video motionseg/DeepMaskAlexNet.lua, the DeepMask heads it trains): the trunk's last
feature map (a ViT's patch tokens as a map), a 1x1 conv to 128 channels + BN + ReLU, average-pooled to ``grid`` x
``grid``, a linear bottleneck to ``bottleneck`` + BN, a linear layer to ``out_size`` x ``out_size`` mask logits,
bilinearly upsampled to the frame; per-pixel sigmoid cross-entropy (``pretrain.losses.mask_loss``; DeepMask's
SoftMarginCriterion). Requires OpenCV (``opencv-python-headless`` or the contrib build).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from evalsuite.errors import UserError
from evalsuite.vit import ViTTaps, patch_grid

from ..base import Batch, optim_config
from ..losses import mask_loss
from ..video import VideoMethod, VideoSampler, read_frames

# Farneback settings for frames of about 64 px (pyramid scale 0.5 over 2 levels, 7 px windows, 3 iterations,
# 5-pixel polynomial neighbourhood with sigma 1.1: OpenCV's documented values for small neighbourhoods)
FARNEBACK = (0.5, 2, 7, 3, 5, 1.1, 0)


def opencv():
    """The cv2 module, or a UserError saying how to install it."""
    try:
        import cv2
    except ImportError:
        raise UserError("this method needs OpenCV: pip install opencv-contrib-python-headless") from None
    cv2.setNumThreads(1)  # data-loading workers each run their own sampler
    return cv2


def shrink(frames: np.ndarray, size: int) -> np.ndarray:
    """uint8 (T, H, W, 3) frames scaled (area interpolation) so that the short side is at most ``size``."""
    cv2 = opencv()
    h, w = frames.shape[1:3]
    scale = size / min(h, w)
    if scale >= 1:
        return frames
    dsize = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.stack([cv2.resize(f, dsize, interpolation=cv2.INTER_AREA) for f in frames])


def gray(frame: np.ndarray) -> np.ndarray:
    cv2 = opencv()
    return cv2.cvtColor(np.ascontiguousarray(frame), cv2.COLOR_RGB2GRAY)


def camera_shift(a: np.ndarray, b: np.ndarray, max_shift: int, tolerance: int = 8) -> tuple[int, int]:
    """The integer translation (dx, dy) under which ``b[y + dy, x + dx]`` matches ``a[y, x]`` (grey levels within
    ``tolerance``) at the most pixels of their overlap, |dx|, |dy| <= ``max_shift``: the camera's motion from a to
    b when the static scene covers more of the frame than any one moving object. Ties: the smallest shift."""
    a16, b16 = a.astype(np.int16), b.astype(np.int16)
    h, w = a.shape
    shifts = sorted(((dx, dy) for dy in range(-max_shift, max_shift + 1) for dx in range(-max_shift, max_shift + 1)),
                    key=lambda s: (abs(s[0]) + abs(s[1]), s[1], s[0]))
    best, arg = -1.0, (0, 0)
    for dx, dy in shifts:
        pa = a16[max(0, -dy):h - max(0, dy), max(0, -dx):w - max(0, dx)]
        pb = b16[max(0, dy):h + min(0, dy), max(0, dx):w + min(0, dx)]
        score = float((np.abs(pa - pb) < tolerance).mean()) if pa.size else -1.0
        if score > best:
            best, arg = score, (dx, dy)
    return arg


def undo_camera(b: np.ndarray, shift: tuple[int, int]) -> np.ndarray:
    """``b`` moved back by the camera ``shift`` (so that it lines up with the frame the shift was measured from);
    the uncovered border repeats the edge."""
    cv2 = opencv()
    m = np.float32([[1, 0, shift[0]], [0, 1, shift[1]]])
    return cv2.warpAffine(b, m, (b.shape[1], b.shape[0]), flags=cv2.INTER_NEAREST | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_REPLICATE)


def clean_mask(moving: np.ndarray, min_area: float) -> np.ndarray:
    """Opening (3 px ellipse) removes specks, closing (5 px) joins an object's parts, holes are filled, and
    components smaller than ``min_area`` of the frame are dropped: bool (H, W)."""
    cv2 = opencv()
    m = cv2.morphologyEx(moving.astype(np.uint8), cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (3, 3)))
    m = cv2.morphologyEx(m, cv2.MORPH_CLOSE, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5)))
    contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    keep = [c for c in contours if cv2.contourArea(c) >= min_area * m.size]
    return cv2.drawContours(np.zeros_like(m), keep, -1, 1, cv2.FILLED).astype(bool)


def motion_mask(a: np.ndarray, b: np.ndarray, flow_threshold: float = 1.0, max_shift: float = 0.1,
                min_area: float = 0.01) -> np.ndarray:
    """The moving pixels of RGB frame ``a`` (uint8 (H, W, 3)) given a later frame ``b``: the camera's translation
    (:func:`camera_shift`, up to ``max_shift`` of the short side) undone, Farneback flow magnitude above
    ``flow_threshold`` px, cleaned (:func:`clean_mask`). bool (H, W)."""
    cv2 = opencv()
    ga, gb = gray(a), gray(b)
    shift = camera_shift(ga, gb, max(1, round(max_shift * min(ga.shape))))
    flow = cv2.calcOpticalFlowFarneback(ga, undo_camera(gb, shift), None, *FARNEBACK)
    return clean_mask(np.linalg.norm(flow, axis=2) > flow_threshold, min_area)


class MotionMaskSampler(VideoSampler):
    """A frame and its motion mask: ``frames`` (1, 3, S, S), ``mask`` (S, S) in {0, 1}, ``valid`` (1 when the
    mask covers ``min_area``..``max_area`` of the frame, else 0), ``time`` (2,) the frame and its flow partner."""

    name = "motion_mask"

    def __init__(self, image_size: int, flow_gap: int = 2, flow_threshold: float = 1.0, motion_size: int = 64,
                 max_shift: float = 0.1, min_area: float = 0.01, max_area: float = 0.75, tries: int = 3,
                 crop_scale_min: float = 1.0, flip: bool = False):
        super().__init__(image_size, crop_scale_min, flip)
        self.flow_gap, self.flow_threshold, self.motion_size = int(flow_gap), float(flow_threshold), int(motion_size)
        self.max_shift, self.tries = float(max_shift), int(tries)
        self.min_area, self.max_area = float(min_area), float(max_area)

    @property
    def min_frames(self) -> int:
        return self.flow_gap + 1

    def draw(self, dataset, video: int, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        n = dataset.info(video).num_frames
        best = None
        for _ in range(self.tries):
            t = int(rng.integers(0, n - self.flow_gap))
            pair = read_frames(dataset, video, [t, t + self.flow_gap]).numpy()
            small = shrink(pair, self.motion_size)
            mask = motion_mask(small[0], small[1], self.flow_threshold, self.max_shift, self.min_area)
            area = float(mask.mean())
            valid = self.min_area <= area <= self.max_area
            if best is None or valid:
                best = (t, pair, mask, valid)
            if valid:
                break
        t, pair, mask, valid = best
        h, w = pair.shape[1:3]
        cv2 = opencv()
        full = cv2.resize(mask.astype(np.uint8) * 255, (w, h), interpolation=cv2.INTER_LINEAR)
        both = torch.from_numpy(np.stack([pair[0], np.repeat(full[:, :, None], 3, axis=2)]))
        out = self.crop(both, rng)  # one crop and flip for the frame and its mask
        return {"frames": out[:1], "mask": (out[1, 0] >= 0.5).float(), "valid": torch.tensor(float(valid)),
                "time": torch.tensor([t, t + self.flow_gap])}

    def settings(self) -> dict:
        return {"flow_gap": self.flow_gap, "flow_threshold": self.flow_threshold, "motion_size": self.motion_size,
                "max_shift": self.max_shift, "min_area": self.min_area, "max_area": self.max_area,
                "tries": self.tries, "segmentation": "camera translation undone, Farneback flow magnitude "
                                                     "thresholded, opened, closed, holes filled"}


def last_map(trunk: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The trunk's last feature map (B, C, h, w): a ResNet's last tap, a ViT's last block's patch tokens."""
    if isinstance(trunk, ViTTaps):
        tap = f"block{len(trunk.blocks) - 1}"
        return patch_grid(trunk(x, [tap])[tap], trunk.num_prefix_tokens)
    last = trunk.tap_names[-1]
    return trunk(x, [last])[last]


class MaskHead(nn.Module):
    """DeepMask's mask branch as Pathak et al. train it: 1x1 conv to ``width`` + BN + ReLU on the feature map,
    pooled to ``grid`` x ``grid``, Linear to ``bottleneck`` + BN, Linear to ``out_size``^2 logits, upsampled."""

    def __init__(self, in_ch: int, grid: int = 7, bottleneck: int = 512, out_size: int = 56, width: int = 128):
        super().__init__()
        self.grid, self.out_size = grid, out_size
        self.reduce = nn.Sequential(nn.Conv2d(in_ch, width, 1), nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        self.fc = nn.Sequential(nn.Linear(width * grid * grid, bottleneck), nn.BatchNorm1d(bottleneck),
                                nn.Linear(bottleneck, out_size * out_size))

    def forward(self, fmap: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        h = F.adaptive_avg_pool2d(self.reduce(fmap), self.grid)
        logits = self.fc(h.flatten(1)).view(-1, 1, self.out_size, self.out_size)
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False).squeeze(1)


class MotionMasks(VideoMethod):
    name = "motion_masks"
    description = "watching objects move: segment from one frame the moving objects that an unsupervised motion " \
                  "segmentation found (per-pixel sigmoid cross-entropy)"
    defaults = {"flow_gap": 2, "flow_threshold": 1.0, "motion_size": 64, "max_shift": 0.1, "min_area": 0.01,
                "max_area": 0.75, "tries": 3, "grid": 7, "bottleneck": 512, "out_size": 56, "crop_scale_min": 1.0,
                "flip": True}
    #: DeepMask's solver (facebookresearch/deepmask train.lua, TrainerDeepMask.lua): SGD lr 1e-3, momentum 0.9,
    #: weight decay 5e-4, batch 32, with the mask loss's gradient multiplied by the batch size: lr 0.032 on the
    #: batch-mean loss
    optim = optim_config("sgd", lr=0.032, weight_decay=5e-4, base_batch_size=32)
    short = {"hp": {"grid": 2, "bottleneck": 256, "out_size": 16}, "optim": {"lr": 0.064}}

    def __init__(self, arch, hp=None, **kw):
        super().__init__(arch, hp, **kw)
        hp = self.hp
        if not (hp["flow_gap"] >= 1 and 0 <= hp["min_area"] < hp["max_area"] <= 1 and hp["tries"] >= 1
                and hp["grid"] >= 1 and hp["out_size"] >= 1 and hp["motion_size"] >= 8):
            raise UserError("motion_masks: needs flow_gap >= 1, 0 <= min_area < max_area <= 1, tries >= 1, "
                            "grid >= 1, out_size >= 1, motion_size >= 8")
        self.head = MaskHead(self.feat_dim, hp["grid"], hp["bottleneck"], hp["out_size"])

    def sampler(self, image_size):
        hp = self.hp
        return MotionMaskSampler(image_size, hp["flow_gap"], hp["flow_threshold"], hp["motion_size"], hp["max_shift"],
                                 hp["min_area"], hp["max_area"], hp["tries"], hp["crop_scale_min"], hp["flip"])

    def training_step(self, batch: Batch):
        frames, target, valid = batch.extra["frames"][:, 0], batch.extra["mask"], batch.extra["valid"]
        logits = self.head(last_map(self.trunk, frames).float(), tuple(target.shape[-2:]))
        loss = mask_loss(logits, target, valid)
        with torch.no_grad():
            pred, gt = logits > 0, target > 0.5
            iou = (pred & gt).flatten(1).sum(1) / (pred | gt).flatten(1).sum(1).clamp_min(1)
            logs = {"iou": float((iou * valid).sum() / valid.sum().clamp_min(1)), "valid": float(valid.mean())}
        return loss, logs
