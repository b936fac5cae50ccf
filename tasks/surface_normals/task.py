"""Surface normal estimation on NYUv2 from a (partly) frozen trunk (Goyal et al. 2019, "3D understanding").

The benchmark (Goyal, Mahajan, Gupta & Misra, ICCV 2019, Sec. 6): predict per-pixel surface normals on
NYUv2 (the official 795 train / 654 test split) with a PSPNet on the ResNet-50 trunk, training "the last few
layers only (res5 onwards)", "same optimisation for all methods"; report the median angular error and the %
of pixels within 11.25 deg (records add mean, RMSE, 22.5 and 30 deg, the standard NYUv2 normals metrics).

What this task does (every value lands in the result's params):

1. Ground truth of each sample is checked (``metrics.validate_ground_truth``): one clear error naming the
   sample.
2. Training images are resized to ``image_size`` (H, W); ground-truth normals and mask to the same size
   by nearest neighbour.
3. Targets: ``target="codebook"`` fits a spherical k-means codebook of ``codebook_size`` normals on the
   training normals (``codebook``), trains per-pixel softmax cross-entropy on the index of the nearest
   centre and predicts the centre (``codebook_decode="hard"``) or the soft-argmax (``"soft"``);
   ``target="regression"`` predicts 3 channels, normalised, with the cosine loss 1 - cos.
4. Model (``dense_heads``): the trunk dilated to ``output_stride``, frozen through ``freeze_through``,
   BatchNorm statistics frozen everywhere in the trunk, a PSP head.
5. SGD with momentum, poly learning-rate decay per iteration, a fixed number of epochs. Frozen stages'
   outputs are computed once when they fit in ``cache_frozen_max_gb``. Training saves its state every epoch
   and resumes after an interruption (:class:`evalsuite.io.ResumeState`).
6. Evaluation: outputs are upsampled bilinearly to each test image's ground-truth resolution, decoded, and
   the angular errors of all valid pixels of the test set are pooled.

Presets and the choices the paper leaves open: docs/tasks/surface_normals.md.
"""

from __future__ import annotations

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
from evalsuite.protocols import TaskProtocol, check_preset
from evalsuite.results import Result
from evalsuite.task import TaskContext
from tasks.surface_normals import codebook as codebook_lib
from tasks.surface_normals.dense_heads import FrozenTrunkDenseModel
from tasks.surface_normals.metrics import ErrorAccumulator, angular_errors_deg, metric_names, validate_ground_truth

PROTOCOL_NOTES = [
    "paper: PSPNet on the ResNet-50 trunk, train res5 onwards, same optimisation for all methods, NYUv2 "
    "795/654, median angle and % within 11.25 deg",
    "not in the paper's text, chosen here: PSPNet's SGD values (lr 0.01 poly 0.9, momentum 0.9, wd 1e-4, "
    "batch 16), the number of epochs, 40-entry k-means codebook (hard decoding), no augmentation, "
    "BatchNorm statistics of the trunk frozen",
]


@dataclass(frozen=True)
class SurfaceNormalsProtocol(TaskProtocol):
    """The ``goyal19`` values (ResNet-50, PSPNet's optimisation)."""

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
    codebook_decode: Literal["hard", "soft"] = "hard"
    codebook_samples: int = 200_000
    codebook_iters: int = 50
    image_size: tuple[int, int] = (480, 640)  # (height, width)
    epochs: int = 60
    batch_size: int = 16
    lr: float = 0.01
    lr_policy: Literal["poly", "constant"] = "poly"
    lr_power: float = 0.9
    momentum: float = 0.9
    weight_decay: float = 1e-4
    eval_batch_size: int = 8
    cache_frozen_max_gb: float = 2.0
    unit_tolerance: float = 0.1


#: what each preset changes in the ``goyal19`` values (VISSL ships no NYUv2 normals benchmark)
_PRESET_CHANGES: dict[str, dict[str, Any]] = {
    "goyal19": {},
    "vissl": {},
    "quick": {"image_size": (48, 64), "head_channels": 64, "epochs": 4, "batch_size": 4, "lr": 0.02,
              "codebook_samples": 20_000, "codebook_iters": 20},
}


class SurfaceNormalsTask:
    name = "surface_normals"
    description = ("NYUv2 surface normals: PSP head (+ res5) trained on a frozen trunk; mean/median/RMSE "
                   "angle and % within 11.25/22.5/30 deg on valid pixels")

    def default_protocol(self, preset: str) -> SurfaceNormalsProtocol:
        return SurfaceNormalsProtocol(**_PRESET_CHANGES[check_preset(preset)])

    def run(self, ctx: TaskContext) -> list[Result]:
        p: SurfaceNormalsProtocol = ctx.protocol
        cfg = TrainConfig.from_protocol(p, seed=ctx.seed)
        train = ctx.open_dataset(p.dataset, p.train_split, p.data_path)
        test = ctx.open_dataset(p.dataset, p.test_split, p.data_path)
        norm = _normalisation(ctx.checkpoint.metadata)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(ctx.seed)  # the head's initialisation
            model = FrozenTrunkDenseModel(ctx.trunk, p.freeze_through, num_outputs=cfg.num_outputs,
                                          output_stride=p.output_stride, head_channels=p.head_channels,
                                          bins=p.psp_bins, dropout=p.dropout)
        data = load_split(train, cfg.image_size, cfg.unit_tolerance, progress=ctx.progress)
        state = resume_state(ctx, model.layer_name, train.fingerprint())
        fit = train_dense(model, data, cfg, norm, device=ctx.device, state=state, progress=ctx.progress)
        scores = evaluate(model, test, cfg, norm, fit.codebook, device=ctx.device, progress=ctx.progress)
        params = {
            "num_train": len(train), "num_test": len(test), "layer": model.layer_name,
            "frozen_stages": list(model.frozen_stages), "trainable_stages": list(model.trainable_stages),
            "trainable_parameters": sum(q.numel() for q in model.parameters() if q.requires_grad),
            "solver": {**cfg.to_dict(), "optimizer": "sgd", "drop_last": True,
                       "loss": "softmax_cross_entropy" if cfg.target == "codebook" else "1 - cosine",
                       "shuffle": "numpy default_rng([seed, epoch]).permutation"},
            "codebook": None if fit.codebook is None else np.round(fit.codebook, 6).tolist(),
            "frozen_features_cached": fit.cached, "iterations_per_epoch": fit.iters_per_epoch,
            "total_iterations": fit.total_iterations, "epochs_run": fit.epochs_run,
            "resumed_from_epoch": fit.resumed_from_epoch, "train_curve": fit.curve(),
            "valid_test_pixels": scores.pop("valid_pixels"), "scored_at": "ground-truth resolution",
            "median_bin_deg": ErrorAccumulator().bin_deg, "normalisation": norm, "device": ctx.device,
            "protocol_notes": PROTOCOL_NOTES, "augmentation": "none",
        }
        results = [ctx.result(p.dataset, p.test_split, model.layer_name, m, scores[m], params=params,
                              dataset_fingerprint=test.fingerprint()) for m in metric_names()]
        state.clear()  # finished: nothing to resume
        return results


# ---------------------------------------------------------------- configuration


@dataclass(frozen=True)
class TrainConfig:
    """The protocol's training and evaluation values, checked, plus the run's seed."""

    target: str
    codebook_size: int
    codebook_decode: str
    codebook_samples: int
    codebook_iters: int
    image_size: tuple[int, int]
    epochs: int
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
    def from_protocol(cls, p: SurfaceNormalsProtocol, seed: int = 0) -> TrainConfig:
        size = tuple(p.image_size)
        if len(size) != 2 or not all(int(s) > 0 for s in size):
            raise UserError(f"surface_normals.image_size must be [height, width], got {list(size)}")
        return cls(target=p.target, codebook_size=p.codebook_size, codebook_decode=p.codebook_decode,
                   codebook_samples=p.codebook_samples, codebook_iters=p.codebook_iters,
                   image_size=(int(size[0]), int(size[1])), epochs=p.epochs, batch_size=p.batch_size, lr=p.lr,
                   lr_policy=p.lr_policy, lr_power=p.lr_power, momentum=p.momentum, weight_decay=p.weight_decay,
                   eval_batch_size=p.eval_batch_size, cache_frozen_max_gb=p.cache_frozen_max_gb,
                   unit_tolerance=p.unit_tolerance, seed=int(seed))

    @property
    def num_outputs(self) -> int:
        return self.codebook_size if self.target == "codebook" else 3

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["image_size"] = list(self.image_size)
        return d


def _normalisation(meta: dict) -> dict[str, Any]:
    norm = (meta or {}).get("normalize") or {}
    return {"mean": list(norm.get("mean", IMAGENET_MEAN)), "std": list(norm.get("std", IMAGENET_STD)),
            "input_space": (meta or {}).get("input_space", "rgb")}


def to_input(images_u8: torch.Tensor, norm: dict[str, Any]) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> the trunk's normalised float input."""
    return to_input_space(images_u8.float() / 255.0, norm["input_space"], tuple(norm["mean"]), tuple(norm["std"]))


def resume_state(ctx: TaskContext, layer: str, data_fingerprint: str) -> ResumeState:
    """The fit's resume file, one per layer and checkpoint: a resume is allowed only into the same settings."""
    settings = {"checkpoint": ctx.checkpoint.sha256, "data": data_fingerprint, "protocol": ctx.protocol.to_dict(),
                "seed": ctx.seed, "device": ctx.device}
    path = Path(ctx.out_dir) / "normals_state" / f"{layer}-{ctx.checkpoint.sha256[:16]}.pt"
    return ResumeState(path, settings, what="surface normals training")


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


def resize_image(image, size: tuple[int, int]) -> torch.Tensor:
    """PIL RGB -> uint8 (3, H, W) at ``size`` = (H, W), bilinear."""
    from PIL import Image

    im = image.resize((size[1], size[0]), Image.BILINEAR)
    return torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1)


def resize_target(normals: np.ndarray, mask: np.ndarray, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest-neighbour (pixel centres) resize of normals (H,W,3) and mask (H,W) to ``size``."""
    n = torch.from_numpy(normals).permute(2, 0, 1)[None]
    m = torch.from_numpy(mask.astype(np.float32))[None, None]
    n = F.interpolate(n, size=size, mode="nearest-exact")[0].permute(1, 2, 0)
    m = F.interpolate(m, size=size, mode="nearest-exact")[0, 0] > 0.5
    return n.contiguous(), m


class SplitData:
    """A training split held in memory at the training resolution."""

    def __init__(self, images: torch.Tensor, normals: torch.Tensor, masks: torch.Tensor, source: str):
        self.images, self.normals, self.masks, self.source = images, normals, masks, source

    def __len__(self) -> int:
        return int(self.images.shape[0])


def load_split(ds, size: tuple[int, int], unit_tolerance: float, progress: bool = True) -> SplitData:
    n = len(ds)
    if n < 2:
        raise BadData(f"need at least 2 training images for surface normals, found {n}", getattr(ds, "root", None))
    images = torch.empty((n, 3, *size), dtype=torch.uint8)
    normals = torch.empty((n, *size, 3), dtype=torch.float16)
    masks = torch.empty((n, *size), dtype=torch.bool)
    for i in console.progress(range(n), desc="surface_normals: load train", enabled=progress):
        image, nrm, m = load_sample(ds, i, unit_tolerance)
        images[i] = resize_image(image, size)
        nt, mt = resize_target(nrm, m, size)
        normals[i], masks[i] = nt.half(), mt
    return SplitData(images, normals, masks, str(getattr(ds, "root", "")))


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


def fit_train_codebook(data: SplitData, cfg: TrainConfig) -> np.ndarray:
    valid = data.normals[data.masks].float().numpy()
    if valid.shape[0] < cfg.codebook_size:
        raise BadData(f"only {valid.shape[0]} valid training pixels for a {cfg.codebook_size}-entry codebook",
                      data.source)
    return codebook_lib.fit_codebook(valid, cfg.codebook_size, seed=cfg.seed, iters=cfg.codebook_iters,
                                     max_samples=cfg.codebook_samples)


def frozen_cache_bytes(model: FrozenTrunkDenseModel, data: SplitData, norm: dict, device: str) -> int:
    with torch.no_grad():
        probe = model.frozen_features(to_input(data.images[:1], norm).to(device))
    return int(probe.numel() * probe.element_size() * len(data))


def lr_at(cfg: TrainConfig, it: int, total: int) -> float:
    return poly_lr(cfg.lr, it, total, cfg.lr_power) if cfg.lr_policy == "poly" else cfg.lr


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


def train_dense(model: FrozenTrunkDenseModel, data: SplitData, cfg: TrainConfig, norm: dict,
                device: str = "cpu", state: ResumeState | None = None, progress: bool = True,
                on_epoch_end: Callable[[int, dict], None] | None = None) -> Fit:
    """Train the model's trainable part on ``data``, saving ``state`` after every epoch and resuming from it.

    ``on_epoch_end(epoch, {"loss": ...})`` is called after each epoch's state is saved.
    """
    model.to(device)
    n = len(data)
    bs = min(cfg.batch_size, n)
    iters = n // bs
    total = iters * cfg.epochs
    trainable = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.SGD(trainable, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    start_epoch, losses, lrs, cb, resumed = 0, [], [], None, None
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
    cb_t = None if cb is None else torch.from_numpy(np.asarray(cb)).to(device)
    if resumed is None:
        torch.manual_seed(cfg.seed)  # dropout in the head
    cached = None
    if frozen_cache_bytes(model, data, norm, device) <= cfg.cache_frozen_max_gb * 2**30:
        model.eval()
        chunks = [model.frozen_features(to_input(data.images[i:i + bs], norm).to(device)).cpu()
                  for i in range(0, n, bs)]
        cached = torch.cat(chunks)
    size = cfg.image_size
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        order = np.random.default_rng([cfg.seed, epoch]).permutation(n)
        epoch_loss = 0.0
        for b in console.progress(range(iters), desc=f"surface_normals epoch {epoch + 1}/{cfg.epochs}",
                                  enabled=progress):
            for g in opt.param_groups:
                g["lr"] = lr_at(cfg, epoch * iters + b, total)
            idx = torch.from_numpy(order[b * bs:(b + 1) * bs])
            if cached is not None:
                feats = cached[idx].to(device)
            else:
                feats = model.frozen_features(to_input(data.images[idx], norm).to(device))
            out = F.interpolate(model.forward_from(feats), size=size, mode="bilinear", align_corners=False)
            normals, mask = data.normals[idx].to(device), data.masks[idx].to(device)
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
        losses.append(epoch_loss / max(1, iters))
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
def predict_normals(model: FrozenTrunkDenseModel, images_u8: torch.Tensor, out_hw: list[tuple[int, int]],
                    cfg: TrainConfig, norm: dict, codebook: np.ndarray | None, device: str = "cpu") -> list[np.ndarray]:
    """Unit normals (H, W, 3) per image at its ground-truth resolution ``out_hw[i]``."""
    model.eval()
    out = model(to_input(images_u8, norm).to(device))
    cb = None if codebook is None else torch.from_numpy(np.asarray(codebook)).to(device)
    preds = []
    for j, hw in enumerate(out_hw):
        up = F.interpolate(out[j:j + 1], size=hw, mode="bilinear", align_corners=False)
        if cfg.target == "codebook":
            nrm = codebook_lib.decode(up, cb, cfg.codebook_decode)
        else:
            nrm = F.normalize(up, dim=1)
        preds.append(nrm[0].permute(1, 2, 0).float().cpu().numpy())
    return preds


def evaluate(model: FrozenTrunkDenseModel, ds, cfg: TrainConfig, norm: dict, codebook: np.ndarray | None,
             device: str = "cpu", progress: bool = True) -> dict[str, float]:
    """Pooled metrics over every valid pixel of ``ds`` (predictions upsampled to the ground truth)."""
    acc = ErrorAccumulator()
    n = len(ds)
    if n == 0:
        raise BadData("the test split is empty", getattr(ds, "root", None))
    bs = max(1, cfg.eval_batch_size)
    for start in console.progress(range(0, n, bs), desc="surface_normals: test", enabled=progress):
        batch = [load_sample(ds, i, cfg.unit_tolerance) for i in range(start, min(n, start + bs))]
        images = torch.stack([resize_image(im, cfg.image_size) for im, _, _ in batch])
        preds = predict_normals(model, images, [m.shape for _, _, m in batch], cfg, norm, codebook, device)
        for pred, (_, gt, m) in zip(preds, batch):
            acc.add(angular_errors_deg(pred, gt, m))
    scores = acc.summary()
    scores["valid_pixels"] = acc.count
    return scores


task = SurfaceNormalsTask()
