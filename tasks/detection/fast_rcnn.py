"""Fast R-CNN (Girshick 2015) with a ResNet-C4 trunk on torchvision ops, as in Detectron's ``ResNet50_fast_rcnn``
used by Goyal et al. (2019): boxes and their regression targets, the RoI sampler, the loss, the model (frozen
BatchNorm, ``freeze_at``), training (resumable) and test-time post-processing. ViT trunks get ViTDet's model
(``vitdet.py``) under the same training and test. Details: docs/tasks/detection.md.

Boxes are continuous 0-based x1, y1, x2, y2 (an XML box [a, b] in 1-based pixels spans [a-1, b]), so IoU here
equals the devkit's inclusive-pixel IoU.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import batched_nms, box_iou, roi_align, roi_pool
from torchvision.ops.misc import FrozenBatchNorm2d

from evalsuite.colorspace import IMAGENET_MEAN, IMAGENET_STD, to_input_space
from evalsuite.console import progress as progress_bar
from evalsuite.errors import UserError
from evalsuite.io import ResumeState
from tasks.detection.vitdet import ViTDetConfig, ViTDetFastRCNN

BBOX_WEIGHTS = (10.0, 10.0, 5.0, 5.0)
DELTA_CLIP = math.log(1000.0 / 16)


# ----------------------------------------------------------------------------- boxes


def encode_boxes(ref: torch.Tensor, gt: torch.Tensor, weights=BBOX_WEIGHTS) -> torch.Tensor:
    """Regression targets taking ``ref`` boxes to ``gt`` boxes (both (N, 4) continuous)."""
    wx, wy, ww, wh = weights
    rw, rh = ref[:, 2] - ref[:, 0], ref[:, 3] - ref[:, 1]
    rx, ry = ref[:, 0] + 0.5 * rw, ref[:, 1] + 0.5 * rh
    gw, gh = gt[:, 2] - gt[:, 0], gt[:, 3] - gt[:, 1]
    gx, gy = gt[:, 0] + 0.5 * gw, gt[:, 1] + 0.5 * gh
    return torch.stack([wx * (gx - rx) / rw, wy * (gy - ry) / rh, ww * torch.log(gw / rw), wh * torch.log(gh / rh)], 1)


def decode_boxes(deltas: torch.Tensor, ref: torch.Tensor, weights=BBOX_WEIGHTS) -> torch.Tensor:
    """Apply (N, 4k) deltas to (N, 4) ``ref`` boxes -> (N, 4k) boxes (inverse of ``encode_boxes``)."""
    wx, wy, ww, wh = weights
    rw, rh = (ref[:, 2] - ref[:, 0])[:, None], (ref[:, 3] - ref[:, 1])[:, None]
    rx, ry = ref[:, 0:1] + 0.5 * rw, ref[:, 1:2] + 0.5 * rh
    dx, dy = deltas[:, 0::4] / wx, deltas[:, 1::4] / wy
    dw, dh = (deltas[:, 2::4] / ww).clamp(max=DELTA_CLIP), (deltas[:, 3::4] / wh).clamp(max=DELTA_CLIP)
    cx, cy, w, h = dx * rw + rx, dy * rh + ry, torch.exp(dw) * rw, torch.exp(dh) * rh
    out = torch.empty_like(deltas)
    out[:, 0::4], out[:, 1::4] = cx - 0.5 * w, cy - 0.5 * h
    out[:, 2::4], out[:, 3::4] = cx + 0.5 * w, cy + 0.5 * h
    return out


def clip_boxes(boxes: torch.Tensor, width: float, height: float) -> torch.Tensor:
    b = boxes.clone()
    b[:, 0::2] = b[:, 0::2].clamp(0, width)
    b[:, 1::2] = b[:, 1::2].clamp(0, height)
    return b


def xml_to_continuous(boxes: np.ndarray) -> np.ndarray:
    """1-based inclusive pixel boxes (VOC XML) -> continuous 0-based boxes."""
    b = np.asarray(boxes, dtype=np.float32).reshape(-1, 4).copy()
    b[:, :2] -= 1.0
    return b


def continuous_to_xml(boxes: np.ndarray) -> np.ndarray:
    b = np.asarray(boxes, dtype=np.float32).reshape(-1, 4).copy()
    b[:, :2] += 1.0
    return b


def prepare_proposals(boxes: np.ndarray, width: int, height: int, limit: int | None, min_size: float = 2.0
                      ) -> np.ndarray:
    """Detectron's proposal filtering (``json_dataset._add_proposals_from_file``): clip to the image, drop
    duplicates (coordinates rounded, first kept), keep boxes whose sides exceed ``min_size`` pixels, then the
    first ``limit`` (None or <= 0: all)."""
    b = np.asarray(boxes, dtype=np.float32).reshape(-1, 4).copy()
    b[:, 0::2] = b[:, 0::2].clip(0, width)
    b[:, 1::2] = b[:, 1::2].clip(0, height)
    if len(b):
        _, first = np.unique(np.round(b), axis=0, return_index=True)
        b = b[np.sort(first)]
    b = b[((b[:, 2] - b[:, 0]) > min_size) & ((b[:, 3] - b[:, 1]) > min_size)]
    return b[:limit] if limit is not None and limit > 0 else b


# ----------------------------------------------------------------------------- sampling


@dataclass
class SamplerConfig:
    """Detectron's ``fast_rcnn_roi_data`` settings (values: the task's protocol)."""

    rois_per_image: int
    fg_fraction: float
    fg_thresh: float
    bg_thresh_hi: float
    bg_thresh_lo: float


def sample_rois(proposals: torch.Tensor, gt_boxes: torch.Tensor, gt_labels: torch.Tensor, cfg: SamplerConfig,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample training RoIs for one image.

    ``gt_labels`` are 0..K-1; returned labels are 1..K for foreground and 0 for background;
    targets (R, 4) are the normalised deltas to the matched ground truth (zeros for background).
    """
    rois = torch.cat([proposals.reshape(-1, 4), gt_boxes.reshape(-1, 4)]) if len(gt_boxes) else proposals
    if len(gt_boxes):
        max_iou, arg = box_iou(rois, gt_boxes).max(dim=1)
    else:
        max_iou, arg = torch.zeros(len(rois)), torch.zeros(len(rois), dtype=torch.long)
    fg = torch.nonzero(max_iou >= cfg.fg_thresh).flatten()
    bg = torch.nonzero((max_iou < cfg.bg_thresh_hi) & (max_iou >= cfg.bg_thresh_lo)).flatten()
    n_fg = min(int(round(cfg.fg_fraction * cfg.rois_per_image)), len(fg))
    fg = fg[torch.randperm(len(fg), generator=generator)[:n_fg]]
    n_bg = min(cfg.rois_per_image - n_fg, len(bg))
    bg = bg[torch.randperm(len(bg), generator=generator)[:n_bg]]
    keep = torch.cat([fg, bg])
    labels = torch.zeros(len(keep), dtype=torch.long)
    targets = torch.zeros(len(keep), 4)
    if n_fg:
        labels[:n_fg] = gt_labels[arg[fg]] + 1
        targets[:n_fg] = encode_boxes(rois[fg], gt_boxes[arg[fg]])
    return rois[keep], labels, targets


def fast_rcnn_loss(cls_logits: torch.Tensor, box_deltas: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor,
                   beta: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax cross-entropy (mean over RoIs) and smooth-L1 on the true class of fg RoIs (sum / #RoIs)."""
    loss_cls = F.cross_entropy(cls_logits, labels)
    fg = torch.nonzero(labels > 0).flatten()
    if len(fg) == 0:
        return loss_cls, box_deltas.sum() * 0.0
    d = box_deltas.reshape(len(labels), -1, 4)
    d = d[fg, 0] if d.shape[1] == 1 else d[fg, labels[fg]]  # class-agnostic: one box for every class
    loss_box = F.smooth_l1_loss(d, targets[fg], beta=beta, reduction="sum") / max(1, len(labels))
    return loss_cls, loss_box


# ----------------------------------------------------------------------------- model


def freeze_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d by a FrozenBatchNorm2d holding the same statistics and affine."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            with torch.no_grad():
                frozen.weight.copy_(child.weight if child.affine else torch.ones(child.num_features))
                frozen.bias.copy_(child.bias if child.affine else torch.zeros(child.num_features))
                frozen.running_mean.copy_(child.running_mean)
                frozen.running_var.copy_(child.running_var)
            setattr(module, name, frozen)
        else:
            freeze_batchnorm(child)
    return module


def check_c4_trunk(trunk: nn.Module) -> None:
    if not all(hasattr(trunk, a) for a in ("conv1", "layer1", "layer2", "layer3", "layer4")):
        arch = getattr(trunk, "arch", type(trunk).__name__)
        raise UserError(f"detection needs a ResNet trunk with res4 and res5 (C4 body + res5 head); got {arch}")


@dataclass
class ModelConfig:
    """The model's protocol settings (values: the task's protocol) and Detectron's fixed ones."""

    pooler: str  # roi_pool (Detectron's RoIPoolF) or roi_align
    pool_size: int
    freeze_at: int
    cls_agnostic_bbox_reg: bool  # Detectron MODEL.CLS_AGNOSTIC_BBOX_REG: one box per RoI for every class
    sampling_ratio: int = 0  # FAST_RCNN.ROI_XFORM_SAMPLING_RATIO (RoIAlign only)
    cls_init_std: float = 0.01
    box_init_std: float = 0.001


class FastRCNN(nn.Module):
    stride = 16

    def __init__(self, trunk: nn.Module, num_classes: int, cfg: ModelConfig):
        super().__init__()
        check_c4_trunk(trunk)
        self.cfg = cfg
        if not 0 <= self.cfg.freeze_at <= 4:
            raise UserError(f"freeze_at must be 0..4 (stem, res2, res3, res4), got {self.cfg.freeze_at}")
        if self.cfg.pooler not in ("roi_align", "roi_pool"):
            raise UserError(f"pooler must be roi_align or roi_pool, got {self.cfg.pooler!r}")
        freeze_batchnorm(trunk)
        self.stem = nn.Sequential(trunk.conv1, trunk.bn1, trunk.relu, trunk.maxpool)
        self.res2, self.res3, self.res4, self.res5 = trunk.layer1, trunk.layer2, trunk.layer3, trunk.layer4
        self.num_classes = num_classes
        channels = [m for m in self.res5.modules() if isinstance(m, nn.Conv2d)][-1].out_channels
        self.cls_score = nn.Linear(channels, num_classes + 1)
        self.bbox_pred = nn.Linear(channels, 4 if self.cfg.cls_agnostic_bbox_reg else 4 * (num_classes + 1))
        nn.init.normal_(self.cls_score.weight, std=self.cfg.cls_init_std)
        nn.init.normal_(self.bbox_pred.weight, std=self.cfg.box_init_std)
        nn.init.zeros_(self.cls_score.bias)
        nn.init.zeros_(self.bbox_pred.bias)
        for stage in self.frozen_stages():
            for p in stage.parameters():
                p.requires_grad_(False)

    def frozen_stages(self) -> list[nn.Module]:
        return [self.stem, self.res2, self.res3, self.res4][: self.cfg.freeze_at]

    def body(self, images: torch.Tensor) -> torch.Tensor:
        """The res4 map (stride 16); frozen leading stages run without autograd."""
        x = images
        for k, stage in enumerate((self.stem, self.res2, self.res3, self.res4)):
            if k < self.cfg.freeze_at:
                with torch.no_grad():
                    x = stage(x)
            else:
                x = stage(x)
        return x

    def rois(self, boxes: torch.Tensor, s: float, index: int = 0) -> torch.Tensor:
        """(R, 5) RoIs (batch ``index``, box) of continuous ``boxes`` already scaled by the image scale ``s``, in the
        pooler's convention: RoIPool takes Detectron's 0-based inclusive pixel boxes times ``s`` (x2, y2 are one
        pixel less: detectron/roi_data/fast_rcnn.py, ``rois = boxes * im_scale``); RoIAlign (aligned) takes
        continuous boxes."""
        b = boxes.reshape(-1, 4)
        if self.cfg.pooler == "roi_pool":
            b = torch.cat([b[:, :2], b[:, 2:] - s], 1)
        return torch.cat([b.new_full((len(b), 1), float(index)), b], 1)

    def pool(self, feat: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
        """RoI features of the res4 map (stride 16): torchvision's roi_pool is Caffe2's RoIPoolF (Detectron's
        FAST_RCNN.ROI_XFORM_METHOD default) at spatial scale 1/16."""
        size, scale = self.cfg.pool_size, 1.0 / self.stride
        if self.cfg.pooler == "roi_align":
            return roi_align(feat, rois, (size, size), scale, self.cfg.sampling_ratio, aligned=True)
        return roi_pool(feat, rois, (size, size), scale)

    def head(self, feat: torch.Tensor, rois: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``rois`` from :meth:`rois` -> class logits, box deltas (res5 at stride 2, then the 7x7 average, as
        Detectron's ``add_ResNet_roi_conv5_head``)."""
        x = self.res5(self.pool(feat, rois)).mean(dim=(2, 3))
        return self.cls_score(x), self.bbox_pred(x)

    def forward(self, images: torch.Tensor, rois: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head(self.body(images), rois)


def build_model(trunk: nn.Module, num_classes: int, cfg: ModelConfig | ViTDetConfig) -> nn.Module:
    """The C4 model for a ResNet's ``ModelConfig``, ViTDet's for a ViT's ``ViTDetConfig``."""
    if isinstance(cfg, ViTDetConfig):
        return ViTDetFastRCNN(trunk, num_classes, cfg)
    return FastRCNN(trunk, num_classes, cfg)


# ----------------------------------------------------------------------------- data records


@dataclass
class ImageRecord:
    """One image for training or testing: boxes continuous 0-based in original pixels."""

    image_id: str
    width: int
    height: int
    boxes: np.ndarray  # (M, 4) ground truth used for training (difficult dropped unless asked)
    labels: np.ndarray  # (M,) 0..K-1
    proposals: np.ndarray  # (P, 4)
    load: Callable[[], Any] = field(repr=False, default=None)  # -> PIL RGB image


@dataclass
class TrainConfig:
    """The solver (values: the task's protocol, ``tasks.detection.task.train_config``)."""

    max_iter: int
    lr: float
    steps: Sequence[int]
    gamma: float
    momentum: float
    weight_decay: float
    bias_double_lr: bool
    bias_weight_decay: bool
    warmup_iters: int
    warmup_factor: float
    ims_per_batch: int
    scales: Sequence[int]
    max_size: int
    flip: bool
    smooth_l1_beta: float
    clip_grad_norm: float | None  # cap on the total gradient norm of each step (None: no cap, as Detectron)
    checkpoint_period: int
    sampler: SamplerConfig
    seed: int = 0


@dataclass
class TestConfig:
    """Test-time settings (values: the task's protocol, ``tasks.detection.task.test_config``)."""

    __test__ = False  # not a pytest class
    scale: int
    max_size: int
    nms: float
    score_thresh: float  # a class score must exceed it (Detectron's TEST.SCORE_THRESH)
    max_dets: int
    roi_chunk: int = 512


def lr_at(it: int, cfg: TrainConfig) -> float:
    """Detectron's ``steps_with_decay`` with linear warm-up."""
    lr = cfg.lr * cfg.gamma ** sum(it >= s for s in cfg.steps)
    if it < cfg.warmup_iters:
        alpha = it / cfg.warmup_iters
        lr *= cfg.warmup_factor * (1 - alpha) + alpha
    return lr


def image_scale(width: int, height: int, scale: int, max_size: int) -> float:
    s = scale / min(width, height)
    if round(s * max(width, height)) > max_size:
        s = max_size / max(width, height)
    return s


def to_input(image, s: float, mean, std, input_space: str, flip: bool = False) -> torch.Tensor:
    """A PIL image scaled by ``s`` (and flipped), in the trunk's input space."""
    from torchvision.transforms import functional as TF

    w, h = image.size
    image = TF.resize(image, [max(1, round(h * s)), max(1, round(w * s))], antialias=True)
    if flip:
        image = TF.hflip(image)
    return to_input_space(TF.to_tensor(image), input_space, mean, std)


def pad_batch(images: list[torch.Tensor], divisor: int = 1) -> torch.Tensor:
    """Images zero-padded at the bottom / right to a common size whose sides are multiples of ``divisor``."""
    h = -(-max(i.shape[1] for i in images) // divisor) * divisor
    w = -(-max(i.shape[2] for i in images) // divisor) * divisor
    out = images[0].new_zeros(len(images), images[0].shape[0], h, w)
    for k, im in enumerate(images):
        out[k, :, : im.shape[1], : im.shape[2]] = im
    return out


# ----------------------------------------------------------------------------- training and test


@dataclass
class FitReport:
    iterations: int
    resumed_from: int
    losses: list[dict[str, float]]  # averaged per log window
    clipped: int = 0  # iterations whose gradient norm was above clip_grad_norm

    def summary(self) -> dict[str, Any]:
        return {"first": self.losses[0] if self.losses else None, "last": self.losses[-1] if self.losses else None,
                "windows": len(self.losses), "clipped_iterations": self.clipped}


class TorchvisionFastRCNN:
    """Fast R-CNN on torchvision ops (CPU or CUDA): ``fit`` and ``predict`` on plain image records."""

    name = "torchvision"

    def __init__(self, trunk: nn.Module, num_classes: int, model_cfg: ModelConfig | ViTDetConfig, device: str = "cpu",
                 normalize: dict | None = None):
        self.model = build_model(trunk, num_classes, model_cfg).to(device)
        self.divisor = getattr(self.model, "size_divisibility", 1)  # a ViT needs sides in whole patches
        self.device = torch.device(device)
        norm = normalize or {}
        self.mean = tuple(norm.get("mean", IMAGENET_MEAN))
        self.std = tuple(norm.get("std", IMAGENET_STD))
        self.input_space = norm.get("input_space", "rgb")

    # ------------------------------------------------------------ training

    def param_groups(self, cfg: TrainConfig) -> list[dict]:
        """Weights, then biases (Detectron's bias lr and decay rules), each split by the model's per-parameter lr
        factor when it has one (a fine-tuned ViT's layer-wise decay)."""
        lr_scale = getattr(self.model, "lr_scale", lambda name: 1.0)
        groups: dict[tuple[bool, float], list[nn.Parameter]] = {(False, 1.0): [], (True, 1.0): []}
        for n, p in self.model.named_parameters():
            if p.requires_grad:
                groups.setdefault((n.endswith(".bias"), lr_scale(n)), []).append(p)
        return [{"params": params, "lr_mult": scale * (2.0 if bias and cfg.bias_double_lr else 1.0),
                 "weight_decay": cfg.weight_decay if not bias or cfg.bias_weight_decay else 0.0}
                for (bias, scale), params in sorted(groups.items(), key=lambda g: (g[0][0], -g[0][1])) if params]

    def batch_indices(self, it: int, n: int, cfg: TrainConfig) -> list[int]:
        out = []
        for pos in range(it * cfg.ims_per_batch, (it + 1) * cfg.ims_per_batch):
            epoch, k = divmod(pos, n)
            out.append(int(np.random.default_rng([cfg.seed, epoch]).permutation(n)[k]))
        return out

    def train_step(self, batch: Sequence[ImageRecord], cfg: TrainConfig, gen: torch.Generator
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        images, rois, labels, targets = [], [], [], []
        for b, rec in enumerate(batch):
            scale_px = cfg.scales[int(torch.randint(len(cfg.scales), (1,), generator=gen))]
            flip = cfg.flip and bool(torch.rand(1, generator=gen) < 0.5)
            s = image_scale(rec.width, rec.height, scale_px, cfg.max_size)
            images.append(to_input(rec.load(), s, self.mean, self.std, self.input_space, flip))
            gt, props = torch.from_numpy(rec.boxes).float(), torch.from_numpy(rec.proposals).float()
            if flip:
                gt, props = hflip_boxes(gt, rec.width), hflip_boxes(props, rec.width)
            r, lab, tgt = sample_rois(props * s, gt * s, torch.from_numpy(rec.labels).long(), cfg.sampler, gen)
            rois.append(self.model.rois(r, s, b))
            labels.append(lab)
            targets.append(tgt)
        x = pad_batch(images, self.divisor).to(self.device)
        logits, deltas = self.model(x, torch.cat(rois).to(self.device))
        return fast_rcnn_loss(logits, deltas, torch.cat(labels).to(self.device), torch.cat(targets).to(self.device),
                              cfg.smooth_l1_beta)

    def fit(self, records: Sequence[ImageRecord], cfg: TrainConfig, *, resume: ResumeState | None = None,
            progress: bool = False, on_iteration: Callable[[int], None] | None = None) -> FitReport:
        """SGD for ``cfg.max_iter`` iterations, continuing from ``resume``'s state when it holds one and saving it
        every ``checkpoint_period`` iterations. ``on_iteration(n)`` is called after each iteration with the
        number of iterations done (progress, logging; raising from it stops training)."""
        opt = torch.optim.SGD(self.param_groups(cfg), lr=cfg.lr, momentum=cfg.momentum)
        params = [p for g in opt.param_groups for p in g["params"]]
        start, losses, clipped = 0, [], 0
        state = resume.load(map_location=self.device) if resume is not None else None
        if state is not None:
            self.model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            start, losses, clipped = int(state["iteration"]), list(state["losses"]), int(state.get("clipped", 0))
        self.model.train()
        window: list[tuple[float, float]] = []
        for it in progress_bar(range(start, cfg.max_iter), desc="detection train", enabled=progress,
                               initial=start, total=cfg.max_iter):
            lr = lr_at(it, cfg)
            for g in opt.param_groups:
                g["lr"] = lr * g["lr_mult"]
            gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + it)
            batch = [records[k] for k in self.batch_indices(it, len(records), cfg)]
            loss_cls, loss_box = self.train_step(batch, cfg, gen)
            loss = loss_cls + loss_box
            if not torch.isfinite(loss):
                raise UserError(f"detection training diverged at iteration {it} (loss {loss.item()}); lower the lr "
                                "or cap the gradient norm (detection.clip_grad_norm)")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.clip_grad_norm is not None:
                clipped += int(nn.utils.clip_grad_norm_(params, cfg.clip_grad_norm) > cfg.clip_grad_norm)
            opt.step()
            window.append((loss_cls.item(), loss_box.item()))
            last = it + 1 == cfg.max_iter
            if len(window) >= 20 or last:
                a = np.mean(window, axis=0)
                losses.append({"iter": it + 1, "loss_cls": round(float(a[0]), 5), "loss_box": round(float(a[1]), 5)})
                window = []
            if resume is not None and ((it + 1) % cfg.checkpoint_period == 0 or last):
                resume.save({"model": self.model.state_dict(), "optimizer": opt.state_dict(), "iteration": it + 1,
                             "losses": losses, "clipped": clipped})
            if on_iteration is not None:
                on_iteration(it + 1)
        return FitReport(cfg.max_iter, start, losses, clipped)

    # ------------------------------------------------------------ inference

    @torch.no_grad()
    def detect_one(self, rec: ImageRecord, cfg: TestConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        empty = (np.zeros((0, 4), np.float32), np.zeros(0, np.int64), np.zeros(0, np.float32))
        if len(rec.proposals) == 0:
            return empty
        self.model.eval()
        s = image_scale(rec.width, rec.height, cfg.scale, cfg.max_size)
        x = pad_batch([to_input(rec.load(), s, self.mean, self.std, self.input_space)], self.divisor).to(self.device)
        feat = self.model.body(x)
        props = torch.from_numpy(rec.proposals).float().to(self.device)
        logits, deltas = [], []
        for k in range(0, len(props), cfg.roi_chunk):
            lo, de = self.model.head(feat, self.model.rois(props[k: k + cfg.roi_chunk] * s, s))
            logits.append(lo)
            deltas.append(de)
        scores = torch.softmax(torch.cat(logits), 1).cpu()
        boxes = decode_boxes(torch.cat(deltas).cpu(), props.cpu())  # original pixels: deltas are scale-free
        boxes = clip_boxes(boxes, rec.width, rec.height).reshape(len(props), -1, 4)
        if boxes.shape[1] == 1:  # class-agnostic regression: the same box for every class
            boxes = boxes.expand(len(props), scores.shape[1], 4)
        return postprocess(scores, boxes, cfg.score_thresh, cfg.nms, cfg.max_dets)

    def predict(self, records: Sequence[ImageRecord], cfg: TestConfig, *, progress: bool = False
                ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Per image: boxes (D, 4) continuous original pixels, labels (D,) 0..K-1, scores (D,)."""
        return [self.detect_one(r, cfg) for r in progress_bar(records, desc="detection test", enabled=progress)]


def postprocess(scores: torch.Tensor, boxes: torch.Tensor, score_thresh: float, nms: float, max_dets: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-class thresholding and NMS, then the ``max_dets`` best over all classes (Detectron's
    ``box_results_with_nms_and_limit``). ``scores`` (R, K+1) with background at 0, ``boxes`` (R, K+1, 4).
    Returns boxes (D, 4), labels 0..K-1 and scores, by decreasing score."""
    cls_boxes, cls_scores, cls_ids = [], [], []
    for j in range(1, scores.shape[1]):
        keep = torch.nonzero(scores[:, j] > score_thresh).flatten()
        cls_boxes.append(boxes[keep, j])
        cls_scores.append(scores[keep, j])
        cls_ids.append(torch.full((len(keep),), j - 1, dtype=torch.long))
    b, sc, ids = torch.cat(cls_boxes), torch.cat(cls_scores), torch.cat(cls_ids)
    keep = batched_nms(b, sc, ids, nms)[:max_dets]  # sorted by decreasing score
    return b[keep].numpy(), ids[keep].numpy(), sc[keep].numpy()


def hflip_boxes(boxes: torch.Tensor, width: float) -> torch.Tensor:
    out = boxes.clone()
    out[:, 0], out[:, 2] = width - boxes[:, 2], width - boxes[:, 0]
    return out


def config_dict(*cfgs) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for c in cfgs:
        d = asdict(c)
        out.update({k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()})
    return out


def params_checksum(module: nn.Module) -> str:
    """sha256 of every parameter and buffer (for frozen-layer checks)."""
    h = hashlib.sha256()
    for n, t in sorted(module.state_dict().items()):
        h.update(n.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
