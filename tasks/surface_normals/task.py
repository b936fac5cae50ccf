"""Surface normal estimation on NYUv2 from a (partly) frozen trunk (Goyal et al. 2019, "3D understanding").

The benchmark (Goyal, Mahajan, Gupta & Misra, ICCV 2019, Sec. 6) predicts per-pixel surface normals on NYUv2
(the official 795 train / 654 test split) with a PSPNet on the ResNet-50 trunk, training res5 onwards, and
reports the median angular error and the % of pixels within 11.25 deg. The ``goyal19`` preset follows the
code the paper used, imisra/semantic-segmentation-pytorch (file names below are in that repository):

1. Ground truth of each sample is checked (``metrics.validate_ground_truth``): one clear error naming the
   sample. Pixels outside the reader's valid mask are ignored (the reference: Ladicky's ``depthValid``).
2. Targets: ``target="codebook"`` uses a codebook of ``codebook_size`` normals (Wang et al.'s ``vocab40.mat``
   from ``codebook_file``, else our k-means on the training normals); each valid pixel is labelled with the
   nearest entry (``make_SN_labels.py``) and trained with softmax cross-entropy; the prediction is the
   probability-weighted sum of the entries, renormalised (``codebook_decode="soft"``,
   ``normals_evaluation_utils.py``). ``target="regression"`` (ours) predicts 3 channels with the loss 1 - cos.
3. Model (``dense_heads``): the trunk dilated to ``output_stride``, frozen through ``freeze_through`` with
   those stages' BatchNorm in eval mode; the later stages and a PSP head train, their BatchNorm too
   (``models/models.py``).
4. Training (``train_generic.py``, ``scripts/train_finetune_models.sh``): ``epochs`` x ``iters_per_epoch``
   SGD iterations of ``batch_size`` images drawn from an endlessly reshuffled list, lr poly-decayed per
   iteration, no weight decay on biases and BatchNorm; each batch is resized to a shorter side drawn from
   ``train_short_sides`` and zero-padded to a multiple of ``size_multiple`` (``dataset_generic.py``); the
   loss is taken at the output stride against labels subsampled by nearest neighbour. Frozen stages'
   outputs are computed once per scale when they fit in ``cache_frozen_max_gb``. Training saves its state
   every epoch and resumes after an interruption (:class:`evalsuite.io.ResumeState`).
5. Evaluation (``eval_generic.py``): each test image is resized to shorter side ``test_short_side``, the
   output is upsampled bilinearly to the ground truth's resolution, decoded, and the angular errors of all
   valid pixels of the test set are pooled.

A ViT trunk gets probe3d's DPT head on four of its frozen blocks (``vit_dense``) in place of step 3's model,
trained and scored by steps 1, 2, 4 and 5 unchanged, its inputs padded to a multiple of the patch; its records are
marked not comparable with the published (ResNet-50) numbers.

Every value lands in the result's params; what differs from the reference: docs/tasks/surface_normals.md.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from evalsuite import console
from evalsuite.colorspace import IMAGENET_MEAN, IMAGENET_STD, to_input_space
from evalsuite.errors import BadData, UserError
from evalsuite.io import ResumeState
from evalsuite.outputs import SampleOutputs
from evalsuite.plan import TaskPlan
from evalsuite.protocols import TaskProtocol, preset_changes
from evalsuite.results import Result
from evalsuite.task import TaskContext
from evalsuite.trunks import arch_info
from evalsuite.vit import ViTTaps
from tasks.surface_normals import codebook as codebook_lib
from tasks.surface_normals.dense_heads import FrozenTrunkDenseModel, weight_decay_groups
from tasks.surface_normals.metrics import (
    ErrorAccumulator,
    angular_errors_deg,
    metric_names,
    metric_outputs,
    validate_ground_truth,
)
from tasks.surface_normals.vit_dense import FrozenViTDenseModel

DenseModel = FrozenTrunkDenseModel | FrozenViTDenseModel

PROTOCOL_NOTES = [
    "reference: imisra/semantic-segmentation-pytorch, the NYUv2 normals code of Goyal et al. 2019 "
    "(scripts/train_finetune_models.sh, train_generic.py, dataset_generic.py, eval_generic.py, "
    "normals_evaluation_utils.py, models/models.py)",
    "one device: one training scale per batch, BatchNorm over the whole batch (reference: 8 GPUs x 2 images, "
    "a scale per GPU, synchronised BatchNorm)",
    "the final model is scored (the reference's scripts/test_models.sh scores the checkpoints of epochs 5..145)",
    "padding cells of the label map are ignored (the reference labels them codebook entry 0)",
]
#: what a ViT's records add: the head follows probe3d, the rest of the protocol is goyal19's (docs: ViT backbones)
VIT_NOTES = [
    "ViT head: mbanani/probe3d's DPT (evals/models/probes.py, configs/probe/snorm_dpt.yaml) on blocks "
    "N//4-1, N//2-1, N//4*3-1, N-1 (evals/models/dino.py multilayers); trunk frozen",
    "not probe3d's training: goyal19's data (795 frames, multi-scale), targets, loss, SGD and poly schedule "
    "(probe3d: GeoNet frames at 480x480 with augmentation, 4 outputs with the uncertainty-aware angular loss, "
    "AdamW 5e-4 with warm-up and cosine decay, 10 epochs of batch 8)",
    "block outputs with the final norm applied, as the feature taps (probe3d: before it; SGD at lr 0.02 diverges "
    "on unnormalised ones)",
    "patch tokens only for every ViT (probe3d appends the CLS token to each patch for DINO and DINOv2)",
    "inputs zero-padded at the bottom and right to a multiple of the patch (probe3d pads around the centre)",
    "scored as goyal19: pooled over all valid test pixels at shorter side test_short_side (probe3d: averaged "
    "per image on a 480x480 centre crop)",
]
#: ResNet protocol fields that a ViT's model does not read
VIT_UNUSED_FIELDS = ["freeze_through", "output_stride", "head", "psp_bins", "dropout", "bn_momentum", "size_multiple"]
VIT_NOT_COMPARABLE = ("goyal19's NYUv2 normals (Goyal et al. 2019, Table 7) are a ResNet-50 dilated to stride 8 "
                      "with res5 and a PSP head trained; a ViT gets probe3d's DPT head on its frozen blocks")


@dataclass(frozen=True)
class SurfaceNormalsProtocol(TaskProtocol):
    """The ``goyal19`` values: imisra/semantic-segmentation-pytorch's NYUv2 normals setting (conformance.py)."""

    dataset: str = "nyuv2"
    data_path: str | None = None
    train_split: str = "train"
    test_split: str = "test"
    freeze_through: Literal["conv1", "res2", "res3", "res4", "res5"] = "res4"
    output_stride: Literal[8, 16, 32] = 8
    head: Literal["psp"] = "psp"
    head_channels: int = 512
    psp_bins: tuple[int, ...] = (1, 2, 3, 6)
    dropout: float = 0.1
    target: Literal["codebook", "regression"] = "codebook"
    codebook_size: int = 40
    codebook_decode: Literal["hard", "soft"] = "soft"
    codebook_file: str | None = None  # vocab40.mat (or .npy / text, K x 3); None: k-means on the training normals
    codebook_samples: int = 200_000
    codebook_iters: int = 50
    train_short_sides: tuple[int, ...] = (300, 375, 450, 525, 600)
    test_short_side: int = 450
    max_long_side: int = 1000
    size_multiple: int = 8
    epochs: int = 400
    iters_per_epoch: int = 50
    batch_size: int = 16
    lr: float = 0.02
    lr_policy: Literal["poly", "constant"] = "poly"
    lr_power: float = 0.9
    momentum: float = 0.9
    weight_decay: float = 1e-4
    bn_momentum: float = 0.001
    eval_batch_size: int = 8
    cache_frozen_max_gb: float = 2.0
    unit_tolerance: float = 0.1


#: what each preset changes in the ``goyal19`` values (VISSL ships no NYUv2 normals benchmark)
_PRESET_CHANGES: dict[str, dict[str, Any]] = {
    "goyal19": {},
    "vissl": {},
    # the reference's scales relative to 480x640 frames, applied to 48x64 ones; a short schedule, whose BatchNorm
    # average must cover its last few iterations as 0.001 covers the last ~1000 of the reference's 20000
    "quick": {"train_short_sides": (30, 38, 45, 52, 60), "test_short_side": 45, "max_long_side": 100,
              "head_channels": 64, "epochs": 4, "iters_per_epoch": 4, "batch_size": 4, "bn_momentum": 0.3,
              "codebook_samples": 20_000, "codebook_iters": 20},
}


class SurfaceNormalsTask:
    name = "surface_normals"
    description = ("NYUv2 surface normals: PSP head (+ res5) trained on a frozen ResNet, probe3d's DPT head on a "
                   "frozen ViT; mean/median/RMSE angle and % within 11.25/22.5/30 deg on valid pixels")
    # the paper's median error and % within 11.25 deg, and % within 30 deg
    headline_metrics = ("median_angle_error_deg", "pct_within_11.25deg", "pct_within_30deg")
    lower_is_better = ("mean_angle_error_deg", "median_angle_error_deg", "rmse_angle_error_deg")
    seeded = True  # the dense head's init, the batches, their scales and the codebook's k-means

    def default_protocol(self, preset: str) -> SurfaceNormalsProtocol:
        return SurfaceNormalsProtocol(**preset_changes(_PRESET_CHANGES, preset, self.name))

    def run(self, ctx: TaskContext) -> list[Result]:
        p: SurfaceNormalsProtocol = ctx.protocol
        cfg = TrainConfig.from_protocol(p, seed=ctx.seed, patch=vit_patch(ctx.checkpoint.arch))
        train, test = ctx.open_splits(p.train_split, p.test_split)
        norm = _normalisation(ctx.checkpoint.metadata)
        codebook, codebook_source = initial_codebook(cfg)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(ctx.seed)  # the head's initialisation
            model = build_model(ctx.trunk, p, cfg.num_outputs)
        data = load_split(train, cfg.unit_tolerance, progress=ctx.progress)
        if codebook is not None:  # a file codebook in another camera frame lies far from the training normals
            angle = quantisation_deg(data, codebook, cfg)
            if angle > QUANTISATION_WARN_DEG:
                console.warn(f"surface_normals: training normals lie {angle:.1f} deg from their nearest entry of "
                             f"{p.codebook_file} on average: is it in the reader's frame (x right, y down, z forward)?")
        state = resume_state(ctx, model.layer_name, train.fingerprint(), codebook_source)
        fit = train_dense(model, data, cfg, norm, device=ctx.device, state=state, progress=ctx.progress,
                          codebook=codebook)
        quantisation = None if fit.codebook is None else quantisation_deg(data, fit.codebook, cfg)
        scores = evaluate(model, test, cfg, norm, fit.codebook, device=ctx.device, progress=ctx.progress)
        outputs = metric_outputs(SampleOutputs(scores.pop("per_image")))  # per test image: the intervals' input
        params = {
            "num_train": len(train), "num_test": len(test), "layer": model.layer_name,
            "frozen_stages": list(model.frozen_stages), "trainable_stages": list(model.trainable_stages),
            "trainable_parameters": sum(q.numel() for q in model.parameters() if q.requires_grad),
            "solver": {**cfg.to_dict(), "optimizer": "sgd", "weight_decay_on": "conv weights only",
                       "loss": "softmax_cross_entropy" if cfg.target == "codebook" else "1 - cosine",
                       "loss_at": f"output stride {model.output_stride}, labels subsampled by nearest neighbour",
                       "batches": "endless list, a fresh numpy default_rng([seed, pass]).permutation per pass",
                       "batch_scale": "numpy default_rng([seed, iteration, 1]) draws one shorter side per batch",
                       "trained_batchnorm": f"batch statistics, averaged running statistics (momentum "
                                            f"{p.bn_momentum})"},
            "codebook": None if fit.codebook is None else np.round(fit.codebook, 6).tolist(),
            "codebook_source": codebook_source, "codebook_quantisation_deg": quantisation,
            "valid_mask": {"train": mask_source(train), "test": mask_source(test)},
            "frozen_features_cached": fit.cached, "iterations_per_epoch": fit.iters_per_epoch,
            "total_iterations": fit.total_iterations, "epochs_run": fit.epochs_run,
            "resumed_from_epoch": fit.resumed_from_epoch, "train_curve": fit.curve(),
            "valid_test_pixels": scores.pop("valid_pixels"), "scored_at": "ground-truth resolution",
            "median_bin_deg": ErrorAccumulator().bin_deg, "normalisation": norm, "device": ctx.device,
            "protocol_notes": PROTOCOL_NOTES,
            "augmentation": f"multi-scale: shorter side one of {list(cfg.train_short_sides)} per batch; no flip",
        }
        if isinstance(model, FrozenViTDenseModel):
            params.update({"vit_head": model.description(), "unused_fields": VIT_UNUSED_FIELDS,
                           "protocol_notes": PROTOCOL_NOTES + VIT_NOTES,
                           "comparable_to_published": False, "not_comparable_reason": VIT_NOT_COMPARABLE})
        results = [ctx.result(p.dataset, p.test_split, model.layer_name, m, scores[m], params=params,
                              dataset_fingerprint=test.fingerprint(), outputs=outputs[m]) for m in metric_names()]
        state.clear()  # finished: nothing to resume
        return results

    def plan(self, ctx: TaskContext) -> TaskPlan:
        """The test images and train_dense's iterations (iters_per_epoch x epochs), timed at the square size with
        the pixels of a 480x640 NYUv2 frame at the test / mean training scale."""
        p: SurfaceNormalsProtocol = ctx.protocol
        patch = vit_patch(ctx.checkpoint.arch)
        cfg = TrainConfig.from_protocol(p, patch=patch)
        n_train, n_test = map(len, ctx.open_splits(p.train_split, p.test_split))
        bs = max(1, min(cfg.batch_size, n_train))
        h, w = scaled_size(480, 640, cfg.test_short_side, cfg.max_long_side)
        side = round(math.sqrt(h * w))
        train_side = round(side * sum(cfg.train_short_sides) / len(cfg.train_short_sides) / cfg.test_short_side)
        model = (f"DPT head on a frozen ViT (patch {patch})" if patch else
                 f"trunk dilated to output stride {p.output_stride}")
        return TaskPlan(images={p.test_split: n_test}, image_size=side, train_iterations=cfg.total_iterations,
                        images_per_iteration=bs, train_image_size=train_side, train_images={p.train_split: n_train},
                        note=f"test at {h}x{w}, {model}")


# ---------------------------------------------------------------- configuration

#: a file codebook this far (mean degrees) from the training normals is probably in another camera frame
QUANTISATION_WARN_DEG = 20.0


@dataclass(frozen=True)
class TrainConfig:
    """The protocol's training and evaluation values, checked, plus the run's seed."""

    target: str
    codebook_size: int
    codebook_decode: str
    codebook_file: str | None
    codebook_samples: int
    codebook_iters: int
    train_short_sides: tuple[int, ...]
    test_short_side: int
    max_long_side: int
    pad_multiple: int
    epochs: int
    iters_per_epoch: int
    batch_size: int
    lr: float
    lr_policy: str
    lr_power: float
    momentum: float
    weight_decay: float
    eval_batch_size: int
    cache_frozen_max_gb: float
    unit_tolerance: float
    seed: int = 0

    @classmethod
    def from_protocol(cls, p: SurfaceNormalsProtocol, seed: int = 0, patch: int | None = None) -> TrainConfig:
        """``patch``: a ViT's patch size; its inputs are padded to multiples of it (a ResNet's to
        ``size_multiple`` and the output stride)."""
        sides = tuple(int(s) for s in p.train_short_sides)
        if not sides or min(sides) <= 0 or p.test_short_side <= 0 or p.max_long_side <= 0 or p.size_multiple <= 0:
            raise UserError("surface_normals.train_short_sides, test_short_side, max_long_side and size_multiple "
                            f"must be positive, got {list(sides)}, {p.test_short_side}, {p.max_long_side}, "
                            f"{p.size_multiple}")
        if min(p.epochs, p.iters_per_epoch, p.batch_size, p.eval_batch_size) < 1:
            raise UserError("surface_normals.epochs, iters_per_epoch, batch_size and eval_batch_size must be >= 1")
        return cls(target=p.target, codebook_size=p.codebook_size, codebook_decode=p.codebook_decode,
                   codebook_file=p.codebook_file, codebook_samples=p.codebook_samples,
                   codebook_iters=p.codebook_iters, train_short_sides=sides, test_short_side=p.test_short_side,
                   max_long_side=p.max_long_side,
                   pad_multiple=patch if patch else math.lcm(p.size_multiple, p.output_stride),
                   epochs=p.epochs, iters_per_epoch=p.iters_per_epoch, batch_size=p.batch_size, lr=p.lr,
                   lr_policy=p.lr_policy, lr_power=p.lr_power, momentum=p.momentum, weight_decay=p.weight_decay,
                   eval_batch_size=p.eval_batch_size, cache_frozen_max_gb=p.cache_frozen_max_gb,
                   unit_tolerance=p.unit_tolerance, seed=int(seed))

    @property
    def num_outputs(self) -> int:
        return self.codebook_size if self.target == "codebook" else 3

    @property
    def total_iterations(self) -> int:
        return self.epochs * self.iters_per_epoch

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["train_short_sides"] = list(self.train_short_sides)
        return d


def vit_patch(arch: str) -> int | None:
    """The patch size of a ViT arch, None for a convolutional one."""
    info = arch_info(arch)
    return int(info["patch"]) if info["family"] == "vit" else None


def build_model(trunk: torch.nn.Module, p: SurfaceNormalsProtocol, num_outputs: int) -> DenseModel:
    """The dense model for the trunk: probe3d's DPT on a frozen ViT, or the reference's dilated ResNet + PSP."""
    if isinstance(trunk, ViTTaps):
        return FrozenViTDenseModel(trunk, num_outputs, head_channels=p.head_channels)
    return FrozenTrunkDenseModel(trunk, p.freeze_through, num_outputs=num_outputs, output_stride=p.output_stride,
                                 head_channels=p.head_channels, bins=p.psp_bins, dropout=p.dropout,
                                 bn_momentum=p.bn_momentum)


def _normalisation(meta: dict) -> dict[str, Any]:
    norm = (meta or {}).get("normalize") or {}
    return {"mean": list(norm.get("mean", IMAGENET_MEAN)), "std": list(norm.get("std", IMAGENET_STD)),
            "input_space": (meta or {}).get("input_space", "rgb")}


def to_input(images_u8: torch.Tensor, norm: dict[str, Any]) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> the trunk's normalised float input."""
    return to_input_space(images_u8.float() / 255.0, norm["input_space"], tuple(norm["mean"]), tuple(norm["std"]))


def resume_state(ctx: TaskContext, layer: str, data_fingerprint: str, codebook_source: str | None) -> ResumeState:
    """The fit's resume file, one per layer and checkpoint: a resume is allowed only into the same settings."""
    settings = {"checkpoint": ctx.checkpoint.sha256, "data": data_fingerprint, "protocol": ctx.protocol.to_dict(),
                "codebook": codebook_source, "seed": ctx.seed, "device": ctx.device}
    path = Path(ctx.out_dir) / "normals_state" / f"{layer}-{ctx.checkpoint.sha256[:16]}-seed{ctx.seed}.pt"
    return ResumeState(path, settings, what="surface normals training")


def initial_codebook(cfg: TrainConfig) -> tuple[np.ndarray | None, str | None]:
    """(codebook, source) before training: the file's entries and ``file:<sha256>``, or (None, ``kmeans``) for a
    codebook fitted on the training normals; (None, None) for regression."""
    if cfg.target != "codebook":
        return None, None
    if cfg.codebook_file is None:
        return None, "kmeans"
    cb = codebook_lib.load_codebook_file(cfg.codebook_file)
    if cb.shape[0] != cfg.codebook_size:
        raise UserError(f"surface_normals.codebook_file {cfg.codebook_file} has {cb.shape[0]} entries but "
                        f"codebook_size is {cfg.codebook_size}; set surface_normals.codebook_size={cb.shape[0]}")
    return cb, f"file:{codebook_lib.file_sha256(cfg.codebook_file)}"


def mask_source(ds) -> str:
    """Where the reader's valid-pixel mask comes from (the reference uses Ladicky's ``depthValid``)."""
    declared = getattr(ds, "mask_source", None)
    if declared:
        return str(declared)
    layout, root, split = getattr(ds, "layout", None), getattr(ds, "root", None), getattr(ds, "split", None)
    if layout == "mat" and getattr(ds, "_mat_mask", False):
        return "normals_mask of the .mat"
    if root is not None and split is not None and (Path(root) / "mask" / str(split)).is_dir():
        return f"mask/{split}/*.png"
    if layout is not None:
        return "decoded normals of unit length (no mask file)"
    return f"{type(ds).__name__}.valid_mask"


# ---------------------------------------------------------------- data


def sample_name(ds, i: int) -> str:
    ids = getattr(ds, "ids", None)
    sid = ids[i] if ids is not None and i < len(ids) else str(i)
    return f"{getattr(ds, 'root', ds)} [{getattr(ds, 'split', '?')} sample {i}, id {sid}]"


def load_sample(ds, i: int, unit_tolerance: float):
    """(PIL image, unit normals (H,W,3) float32, mask (H,W) bool) of sample ``i``, checked."""
    image = ds.load_image(i)
    normals, mask = validate_ground_truth(ds.normals(i), ds.valid_mask(i), sample_name(ds, i),
                                          image_hw=(image.height, image.width), unit_tolerance=unit_tolerance)
    return image, normals, mask


def scaled_size(h: int, w: int, short_side: int, max_long_side: int) -> tuple[int, int]:
    """(H, W) scaled to shorter side ``short_side`` with the longer side at most ``max_long_side``, truncated
    to integers (dataset_generic.py)."""
    scale = min(short_side / min(h, w), max_long_side / max(h, w))
    return int(h * scale), int(w * scale)


def round_up(x: int, m: int) -> int:
    """The smallest multiple of ``m`` >= ``x`` (the reference's round2nearest_multiple)."""
    return ((x - 1) // m + 1) * m


@functools.lru_cache(maxsize=1024)
def nearest_index(src: int, dst: int) -> np.ndarray:
    """Source index of each of ``dst`` samples under PIL's nearest-neighbour resize, which the reference's
    ``scipy.misc.imresize(interp='nearest')`` runs."""
    from PIL import Image

    line = Image.fromarray(np.arange(src, dtype=np.int32)[None, :])
    out = np.asarray(line.resize((dst, 1), Image.NEAREST), dtype=np.int64)[0]
    out.setflags(write=False)
    return out


@functools.lru_cache(maxsize=1024)
def label_index(src: int, resized: int, multiple: int, stride: int, cells: int) -> np.ndarray:
    """Along one axis, the ground-truth index each of ``cells`` output cells is labelled from, -1 for padding.

    The reference resizes the label map to the image (nearest), pads it to a multiple of the stride and
    subsamples it by the stride (nearest) (dataset_generic.py ``_get_item_train``).
    """
    padded = round_up(resized, multiple)
    picks = nearest_index(padded, padded // stride)
    out = np.full(cells, -1, dtype=np.int64)
    inside = picks < resized
    out[:picks.size][inside] = nearest_index(src, resized)[picks[inside]]
    out.setflags(write=False)
    return out


def resize_image(image: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """uint8 (H, W, 3) -> uint8 (3, h, w) at ``size`` = (h, w), PIL bilinear (scipy's imresize in the reference)."""
    from PIL import Image

    im = Image.fromarray(image).resize((size[1], size[0]), Image.BILINEAR)
    return torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1)


def test_input(image, cfg: TrainConfig) -> torch.Tensor:
    """A test image (PIL) -> uint8 (3, h, w) at shorter side ``test_short_side``, each side rounded up to the
    padding multiple, bilinear without antialiasing (the reference's cv2.resize, dataset_generic.py
    ``_get_item_test``)."""
    h, w = scaled_size(image.height, image.width, cfg.test_short_side, cfg.max_long_side)
    size = (round_up(h, cfg.pad_multiple), round_up(w, cfg.pad_multiple))
    x = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1)[None].float()
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8)[0]


class SplitData:
    """A training split in memory at its own resolution: uint8 images (H,W,3), unit normals float16 (H,W,3)
    and valid masks (H,W)."""

    def __init__(self, images: list[np.ndarray], normals: list[np.ndarray], masks: list[np.ndarray], source: str):
        self.images, self.normals, self.masks, self.source = images, normals, masks, source
        self.sizes = [tuple(im.shape[:2]) for im in images]

    def __len__(self) -> int:
        return len(self.images)

    def canvas(self, short_side: int, cfg: TrainConfig) -> tuple[int, int]:
        """The padded input size at ``short_side``: the largest resized image, rounded up to the padding multiple
        (the reference pads each batch to its largest image; NYUv2's frames all have one size)."""
        sizes = [scaled_size(h, w, short_side, cfg.max_long_side) for h, w in set(self.sizes)]
        return (round_up(max(h for h, _ in sizes), cfg.pad_multiple),
                round_up(max(w for _, w in sizes), cfg.pad_multiple))


def load_split(ds, unit_tolerance: float, progress: bool = True) -> SplitData:
    n = len(ds)
    if n < 2:
        raise BadData(f"need at least 2 training images for surface normals, found {n}", getattr(ds, "root", None))
    images, normals, masks = [], [], []
    for i in console.progress(range(n), desc="surface_normals: load train", enabled=progress):
        image, nrm, m = load_sample(ds, i, unit_tolerance)
        images.append(np.asarray(image.convert("RGB"), dtype=np.uint8))
        normals.append(nrm.astype(np.float16))
        masks.append(m)
    return SplitData(images, normals, masks, str(getattr(ds, "root", "")))


def train_inputs(data: SplitData, idx, short_side: int, cfg: TrainConfig, norm: dict) -> torch.Tensor:
    """Normalised float (B, 3, H, W): each image resized to ``short_side`` and zero-padded (after normalisation,
    as the reference) to the canvas at the bottom and right."""
    h_c, w_c = data.canvas(short_side, cfg)
    x = torch.zeros(len(idx), 3, h_c, w_c)
    for j, i in enumerate(idx):
        h, w = scaled_size(*data.sizes[i], short_side, cfg.max_long_side)
        x[j, :, :h, :w] = to_input(resize_image(data.images[i], (h, w))[None], norm)[0]
    return x


def train_targets(data: SplitData, idx, short_side: int, cfg: TrainConfig,
                  stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Normals (B, h, w, 3) float32 and valid mask (B, h, w) at the output stride, for :func:`train_inputs`."""
    h_c, w_c = data.canvas(short_side, cfg)
    normals = torch.zeros(len(idx), h_c // stride, w_c // stride, 3)
    masks = torch.zeros(len(idx), h_c // stride, w_c // stride, dtype=torch.bool)
    for j, i in enumerate(idx):
        (h0, w0), (h, w) = data.sizes[i], scaled_size(*data.sizes[i], short_side, cfg.max_long_side)
        rows = label_index(h0, h, cfg.pad_multiple, stride, h_c // stride)
        cols = label_index(w0, w, cfg.pad_multiple, stride, w_c // stride)
        r, c = np.ix_(rows.clip(0), cols.clip(0))
        inside = (rows >= 0)[:, None] & (cols >= 0)[None, :]
        normals[j] = torch.from_numpy(data.normals[i][r, c].astype(np.float32))
        masks[j] = torch.from_numpy(data.masks[i][r, c] & inside)
    return normals, masks


# ---------------------------------------------------------------- losses (pure)


def codebook_loss(logits: torch.Tensor, normals: torch.Tensor, mask: torch.Tensor,
                  codebook: torch.Tensor) -> torch.Tensor:
    """Softmax cross-entropy of logits (B,K,H,W) against the nearest codebook entry of each valid pixel."""
    labels = codebook_lib.assign(normals.float(), codebook)
    labels = torch.where(mask, labels, torch.full_like(labels, -1))
    return F.cross_entropy(logits, labels, ignore_index=-1)


def cosine_loss(pred: torch.Tensor, normals: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of 1 - cos(pred, gt) over valid pixels; pred (B,3,H,W) need not be unit length."""
    p = F.normalize(pred, dim=1).permute(0, 2, 3, 1)
    cos = (p * normals.float()).sum(-1)
    return (1.0 - cos)[mask].mean()


# ---------------------------------------------------------------- training


class Fit:
    def __init__(self, codebook, losses, lrs, iters_per_epoch, epochs_run, resumed_from_epoch, cached):
        self.codebook, self.losses, self.lrs = codebook, losses, lrs
        self.iters_per_epoch, self.epochs_run = iters_per_epoch, epochs_run
        self.resumed_from_epoch, self.cached = resumed_from_epoch, cached

    @property
    def total_iterations(self) -> int:
        return self.iters_per_epoch * self.epochs_run

    def curve(self) -> dict[str, Any]:
        return {"loss_per_epoch": [round(v, 6) for v in self.losses], "lr_per_epoch": self.lrs,
                "loss_final": round(self.losses[-1], 6) if self.losses else None}


def poly_lr(base: float, it: int, total: int, power: float) -> float:
    return base * (1.0 - it / max(1, total)) ** power


def lr_at(cfg: TrainConfig, it: int, total: int) -> float:
    """The rate of iteration ``it``: the reference sets it after each step from the step just taken
    (train_generic.py ``adjust_learning_rate``), so iteration ``it`` runs at poly(it - 1), iteration 0 at the base."""
    return poly_lr(cfg.lr, max(0, it - 1), total, cfg.lr_power) if cfg.lr_policy == "poly" else cfg.lr


@functools.lru_cache(maxsize=64)
def _permutation(seed: int, k: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, k]).permutation(n)


def batch_indices(it: int, n: int, batch_size: int, seed: int) -> np.ndarray:
    """Images of iteration ``it``: the next ``batch_size`` entries of an endless list that is reshuffled each
    time it runs out (the reference's training dataset, ``_get_sub_batch``)."""
    return np.array([_permutation(seed, q // n, n)[q % n] for q in range(it * batch_size, (it + 1) * batch_size)])


def batch_scale(it: int, seed: int, choices: int) -> int:
    """Index of the shorter side iteration ``it`` trains at (the reference draws one per batch of each GPU)."""
    return int(np.random.default_rng([seed, it, 1]).integers(choices))


def sample_valid_normals(data: SplitData, max_samples: int | None, seed: int) -> np.ndarray:
    """Up to ``max_samples`` valid training normals (N, 3) float32, drawn uniformly over all valid pixels."""
    counts = np.array([int(m.sum()) for m in data.masks])
    total = int(counts.sum())
    if max_samples is None or total <= max_samples:
        return np.concatenate([n[m] for n, m in zip(data.normals, data.masks)]).astype(np.float32)
    pick = np.sort(np.random.default_rng(seed).choice(total, max_samples, replace=False))
    bounds = np.searchsorted(pick, np.concatenate([[0], np.cumsum(counts)]))
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    parts = [n[m][pick[bounds[i]:bounds[i + 1]] - starts[i]]
             for i, (n, m) in enumerate(zip(data.normals, data.masks)) if bounds[i + 1] > bounds[i]]
    return np.concatenate(parts).astype(np.float32)


def fit_train_codebook(data: SplitData, cfg: TrainConfig) -> np.ndarray:
    valid = sample_valid_normals(data, cfg.codebook_samples, cfg.seed)
    if valid.shape[0] < cfg.codebook_size:
        raise BadData(f"only {valid.shape[0]} valid training pixels for a {cfg.codebook_size}-entry codebook",
                      data.source)
    return codebook_lib.fit_codebook(valid, cfg.codebook_size, seed=cfg.seed, iters=cfg.codebook_iters,
                                     max_samples=None)


def quantisation_deg(data: SplitData, codebook: np.ndarray, cfg: TrainConfig) -> float:
    """Mean angle (degrees) between valid training normals and their nearest codebook entry."""
    x = sample_valid_normals(data, cfg.codebook_samples, cfg.seed).astype(np.float64)
    cb = np.asarray(codebook, dtype=np.float64)
    return round(float(angular_errors_deg(cb[codebook_lib.assign(x, cb)], x).mean()), 4)


def frozen_cache(model: DenseModel, data: SplitData, cfg: TrainConfig, norm: dict,
                 device: str) -> list[torch.Tensor] | None:
    """The frozen stages' outputs of every training image at every training scale (CPU), or None when they
    would take more than ``cache_frozen_max_gb``."""
    with torch.no_grad():
        per_image = [model.frozen_features(train_inputs(data, [0], s, cfg, norm).to(device))
                     for s in cfg.train_short_sides]
    if sum(f.numel() * f.element_size() for f in per_image) * len(data) > cfg.cache_frozen_max_gb * 2**30:
        return None
    n, bs = len(data), max(1, cfg.batch_size)
    return [torch.cat([model.frozen_features(train_inputs(data, range(i, min(n, i + bs)), s, cfg, norm)
                                             .to(device)).cpu() for i in range(0, n, bs)])
            for s in cfg.train_short_sides]


def _rng_state(device: str) -> dict[str, torch.Tensor]:
    """The generators dropout draws from (the CUDA one too on a GPU)."""
    state = {"cpu": torch.get_rng_state()}
    if device.startswith("cuda"):
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, torch.Tensor], device: str) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def train_dense(model: DenseModel, data: SplitData, cfg: TrainConfig, norm: dict,
                device: str = "cpu", state: ResumeState | None = None, progress: bool = True,
                on_epoch_end: Callable[[int, dict], None] | None = None,
                codebook: np.ndarray | None = None) -> Fit:
    """Train the model's trainable part on ``data``, saving ``state`` after every epoch and resuming from it.

    ``codebook``: the entries to classify into (None: k-means on ``data``). ``on_epoch_end(epoch, {"loss": ...})``
    is called after each epoch's state is saved.
    """
    model.to(device)
    n = len(data)
    bs = min(cfg.batch_size, n)
    iters, total = cfg.iters_per_epoch, cfg.total_iterations
    opt = torch.optim.SGD(weight_decay_groups(model, cfg.weight_decay), lr=cfg.lr, momentum=cfg.momentum)
    start_epoch, losses, lrs, cb, resumed = 0, [], [], codebook, None
    saved = state.load() if state is not None else None
    if saved is not None:
        model.load_state_dict(saved["model"], strict=False)
        opt.load_state_dict(saved["optimizer"])
        start_epoch, losses, lrs = saved["epoch"], list(saved["losses"]), list(saved["lrs"])
        cb = None if saved["codebook"] is None else saved["codebook"].numpy()
        _set_rng_state(saved["rng"], device)
        resumed = start_epoch
    if cfg.target == "codebook" and cb is None:
        cb = fit_train_codebook(data, cfg)
    cb_t = None if cb is None else torch.from_numpy(np.asarray(cb)).float().to(device)
    if resumed is None:
        torch.manual_seed(cfg.seed)  # dropout in the head
    model.eval()
    cached = frozen_cache(model, data, cfg, norm, device)
    stride = model.output_stride
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        epoch_loss = 0.0
        for b in console.progress(range(iters), desc=f"surface_normals epoch {epoch + 1}/{cfg.epochs}",
                                  enabled=progress):
            it = epoch * iters + b
            for g in opt.param_groups:
                g["lr"] = lr_at(cfg, it, total)
            idx = batch_indices(it, n, bs, cfg.seed)
            scale = batch_scale(it, cfg.seed, len(cfg.train_short_sides))
            short = cfg.train_short_sides[scale]
            if cached is not None:
                feats = cached[scale][torch.from_numpy(idx)].to(device)
            else:
                feats = model.frozen_features(train_inputs(data, idx, short, cfg, norm).to(device))
            out = model.forward_from(feats)
            normals, mask = train_targets(data, idx, short, cfg, stride)
            if out.shape[-2:] != mask.shape[-2:]:
                raise AssertionError(f"output {tuple(out.shape[-2:])} vs label grid {tuple(mask.shape[-2:])}")
            normals, mask = normals.to(device), mask.to(device)
            if cfg.target == "codebook":
                loss = codebook_loss(out, normals, mask, cb_t)
            else:
                loss = cosine_loss(out, normals, mask)
            if not torch.isfinite(loss):
                raise BadData(f"training loss became {loss.item()} at epoch {epoch + 1}", data.source)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            epoch_loss += float(loss.detach())
        losses.append(epoch_loss / iters)
        lrs.append(round(lr_at(cfg, epoch * iters, total), 8))
        if state is not None:
            state.save({"epoch": epoch + 1, "model": model.trainable_state(), "optimizer": opt.state_dict(),
                        "losses": losses, "lrs": lrs, "codebook": None if cb is None else torch.from_numpy(cb),
                        "rng": _rng_state(device)})
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, {"loss": losses[-1]})
    model.eval()
    return Fit(cb, losses, lrs, iters, cfg.epochs, resumed, cached is not None)


# ---------------------------------------------------------------- evaluation


@torch.no_grad()
def predict_decodings(model: DenseModel, images_u8: torch.Tensor, out_hw: list[tuple[int, int]],
                      cfg: TrainConfig, norm: dict, codebook: np.ndarray | None, decodes: tuple[str, ...],
                      device: str = "cpu") -> dict[str, list[np.ndarray]]:
    """``{decode: [unit normals (H, W, 3) per image at its ground-truth resolution out_hw[i]]}`` from one forward
    pass: logits upsampled bilinearly, then decoded each way (regression outputs are normalised)."""
    model.eval()
    out = model(to_input(images_u8, norm).to(device))
    cb = None if codebook is None else torch.from_numpy(np.asarray(codebook)).float().to(device)
    preds: dict[str, list[np.ndarray]] = {d: [] for d in decodes}
    for j, hw in enumerate(out_hw):
        up = F.interpolate(out[j:j + 1], size=hw, mode="bilinear", align_corners=False)
        for d in decodes:
            nrm = codebook_lib.decode(up, cb, d) if cfg.target == "codebook" else F.normalize(up, dim=1)
            preds[d].append(nrm[0].permute(1, 2, 0).float().cpu().numpy())
    return preds


def predict_normals(model: DenseModel, images_u8: torch.Tensor, out_hw: list[tuple[int, int]],
                    cfg: TrainConfig, norm: dict, codebook: np.ndarray | None, device: str = "cpu") -> list[np.ndarray]:
    """Unit normals (H, W, 3) per image at its ground-truth resolution, decoded as the protocol says."""
    decode = cfg.codebook_decode
    return predict_decodings(model, images_u8, out_hw, cfg, norm, codebook, (decode,), device)[decode]


def evaluate(model: DenseModel, ds, cfg: TrainConfig, norm: dict, codebook: np.ndarray | None,
             device: str = "cpu", progress: bool = True, decodes: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Pooled metrics over every valid pixel of ``ds`` (predictions upsampled to the ground truth), with
    ``valid_pixels`` and ``per_image`` (the per-image arrays the metrics are computed from). ``decodes``: score
    several codebook decodings of the same outputs, ``{decode: metrics}``."""
    names = decodes or (cfg.codebook_decode,)
    accs = {d: ErrorAccumulator() for d in names}
    n = len(ds)
    if n == 0:
        raise BadData("the test split is empty", getattr(ds, "root", None))
    bs = max(1, cfg.eval_batch_size)
    for start in console.progress(range(0, n, bs), desc="surface_normals: test", enabled=progress):
        batch = [load_sample(ds, i, cfg.unit_tolerance) for i in range(start, min(n, start + bs))]
        inputs = [test_input(im, cfg) for im, _, _ in batch]
        by_size: dict[tuple[int, ...], list[int]] = {}  # images of one input size go through together
        for j, x in enumerate(inputs):
            by_size.setdefault(tuple(x.shape), []).append(j)
        for group in by_size.values():
            preds = predict_decodings(model, torch.stack([inputs[j] for j in group]),
                                      [batch[j][2].shape for j in group], cfg, norm, codebook, names, device)
            for d in names:
                for pred, j in zip(preds[d], group):
                    accs[d].add(angular_errors_deg(pred, batch[j][1], batch[j][2]))
    scores = {d: {**acc.summary(), "valid_pixels": acc.count, "per_image": acc.sample_arrays()}
              for d, acc in accs.items()}
    return scores if decodes else scores[names[0]]


task = SurfaceNormalsTask()
