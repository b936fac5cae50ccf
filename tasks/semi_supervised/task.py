"""The ``semi_supervised`` task: the whole trunk and a linear head fine-tuned on 1 % / 10 % of a training split's
labels, top-1 / top-5 on its val split (SimCLR's Table 7 protocol; VISSL's and mmselfsup's 1 % / 10 % benchmarks).

The labelled images are a published list (``subset_file``: SimCLR's ``imagenet_subsets/1percent.txt``) or a seeded
class-balanced sample (``subsets.py``); the training loop, optimisers and schedule are in ``finetune.py``, the
training views in ``augment.py``. Presets, references and measured numbers: ``docs/tasks/semi_supervised.md``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from evalsuite.console import warn
from evalsuite.io import ResumeState
from evalsuite.outputs import SampleOutputs
from evalsuite.plan import TaskPlan
from evalsuite.protocols import Interpolation, ResizeMode, TaskProtocol, preset_changes
from evalsuite.results import Result
from evalsuite.task import TaskContext
from tasks.semi_supervised.augment import RECIPE_NOTES, TrainView
from tasks.semi_supervised.finetune import FineTuneModel, FitConfig, Schedule, evaluate, fine_tune
from tasks.semi_supervised.subsets import Subset, choose_subset, subset_size

LAYER = "finetune_all"  # every trunk layer is trained (the reference tables' name)


@dataclass(frozen=True)
class SemiSupervisedProtocol(TaskProtocol):
    """The ``goyal19`` values: google-research/simclr's README command for fine-tuning the whole network on 1 % of
    the labels, under run.py's defaults; each field's reference in ``conformance.py``."""

    # data
    dataset: str = "imagefolder"  # any single-label kind
    data_path: str | None = None
    train_split: str = "train"
    val_split: str = "val"
    label_fraction: float = 0.01
    subset_file: str | None = None  # one training image per line; a relative path is under --data-root
    subset_seed: int = 0  # the class-balanced sample's seed (without subset_file)
    # training
    epochs: int | None = None  # None: 60 for label_fraction <= 1 %, else 30 (SimCLR)
    batch_size: int = 1024
    micro_batch: int | None = None  # None: the whole batch in one pass (BatchNorm statistics over all of it)
    optimizer: Literal["lars", "momentum"] = "lars"
    lr: float = 0.005
    lr_scaling: Literal["linear", "sqrt"] = "sqrt"
    lr_schedule: Literal["cosine", "multistep"] = "cosine"
    lr_milestones: tuple[float, ...] = ()  # epochs (multistep)
    lr_gamma: float = 0.1
    warmup_epochs: float = 0.0
    momentum: float = 0.9
    nesterov: bool = False
    lars_eta: float = 0.001
    weight_decay: float = 0.0
    head_lr_mult: float = 1.0
    head_init: Literal["zeros", "gaussian", "pytorch_default"] = "zeros"
    train_augmentation: Literal["simclr", "vissl"] = "simclr"
    precision: Literal["fp32", "bf16"] = "fp32"
    # evaluation
    image_size: int = 224
    resize_mode: ResizeMode = "center_crop"
    resize: int | None = 256
    interpolation: Interpolation = "bicubic"
    topk: tuple[int, ...] = (1, 5)
    eval_batch_size: int = 256
    workers: int = 8  # data-loader processes


#: each preset as its changes to the goyal19 values
_PRESET_CHANGES: dict[str, dict[str, Any]] = {
    "goyal19": {},
    # vissl:configs/config/benchmark/semi_supervised/imagenet1k/eval_resnet_8gpu_transfer_in1k_semi_sup_fulltune.yaml:
    # 8 GPUs x 32 images without SyncBN, i.e. BatchNorm statistics over each 32 of the 256
    "vissl": {"epochs": 70, "batch_size": 256, "micro_batch": 32, "optimizer": "momentum", "nesterov": True,
              "lr": 0.05, "lr_scaling": "linear", "lr_schedule": "multistep", "lr_milestones": (30,),
              "head_init": "pytorch_default", "train_augmentation": "vissl", "interpolation": "bilinear"},
    "quick": {"label_fraction": 0.5, "epochs": 2, "batch_size": 16, "image_size": 64, "resize": None,
              "interpolation": "bilinear", "eval_batch_size": 64, "workers": 0},
}

# Fields a saved training state may differ in: they do not change the trained model (a run that failed while
# evaluating resumes with its training done).
_RESUME_MAY_CHANGE = frozenset(f"protocol.{k}" for k in (
    "val_split", "resize_mode", "resize", "interpolation", "topk", "eval_batch_size", "workers"))


def epochs_for(p: SemiSupervisedProtocol) -> int:
    """The protocol's epochs, or SimCLR's for the fraction: 60 for 1 % of the labels (or fewer), 30 above."""
    if p.epochs is not None:
        return int(p.epochs)
    return 60 if p.label_fraction <= 0.01 else 30


def labels_token(fraction: float) -> str:
    """``"1%"``, ``"10%"``: the label fraction as the reference tables name it (the records' ``labels``)."""
    return f"{round(fraction * 100, 6):g}%"


class SemiSupervisedTask:
    name = "semi_supervised"
    description = ("whole trunk + linear head fine-tuned on 1%/10% of the labels (SimCLR), top-1/top-5 "
                   "(ImageNet, any single-label data)")
    headline_metrics = ("top1",)
    seeded = True  # the head's init, the batches and the augmentations (the label subset has its subset_seed)

    def default_protocol(self, preset: str) -> SemiSupervisedProtocol:
        return SemiSupervisedProtocol(**preset_changes(_PRESET_CHANGES, preset, self.name))

    # ------------------------------------------------------------------ run

    def run(self, ctx: TaskContext) -> list[Result]:
        p: SemiSupervisedProtocol = ctx.protocol
        train, val, classes = self._splits(ctx)
        subset = labelled_subset(ctx, train, len(classes))
        epochs = epochs_for(p)
        schedule = Schedule(len(subset), p.batch_size, epochs, p.lr, p.lr_scaling, p.lr_schedule, p.warmup_epochs,
                            tuple(float(m) for m in p.lr_milestones), p.lr_gamma)
        transform = ctx.transform()
        view = TrainView(p.train_augmentation, p.image_size, transform.mean, transform.std, transform.input_space)
        model = FineTuneModel(ctx.trunk, len(classes), p.image_size, p.head_init, ctx.seed)
        cfg = FitConfig(schedule, p.optimizer, p.momentum, p.nesterov, p.weight_decay, p.lars_eta, p.head_lr_mult,
                        p.micro_batch, p.precision, p.workers, ctx.seed)
        resume = resume_state(ctx, train.fingerprint(), subset, epochs)
        fit = fine_tune(model, train, train.labels, subset.indices, view, cfg, device=ctx.device, resume=resume,
                        save_every=max(1, len(subset) // p.batch_size), progress=ctx.progress,
                        desc=f"{self.name} train")
        ks = [int(k) for k in p.topk if int(k) < len(classes) or int(k) == 1]
        ev = evaluate(model, val, val.labels, transform, ks, batch_size=p.eval_batch_size, workers=p.workers,
                      device=ctx.device, precision=p.precision, progress=ctx.progress, desc=f"{self.name} eval")
        micro = min(p.micro_batch or p.batch_size, p.batch_size)
        params = {
            "labels": labels_token(p.label_fraction), "subset": subset.record, "num_labeled": len(subset),
            "num_train_images": len(train), "num_val": len(val), "num_classes": len(classes),
            "epochs_run": epochs, "schedule": schedule.to_dict(), "steps_run": fit.total_steps,
            "resumed_from_step": fit.resumed_from_step, "train_curve": fit.summary(),
            "optimizer_groups": fit.groups, "batchnorm": f"batch statistics over each {micro} images while training "
                                                           "(momentum 0.1), running averages when evaluating",
            "head_input": {"tap": model.tap, "pool_op": model.pool.op, "dim": model.pool.dim},
            "train_augmentation_note": RECIPE_NOTES[p.train_augmentation], "transform": transform.to_dict(),
            "trunk_weight_change": round(fit.trunk_change, 6), "val_loss": round(ev["loss"], 6),
            "device": ctx.device,
        }
        fp = val.fingerprint()
        # per val image: the targets, the argmax and each top-k hit, whose mean is the record (the intervals' input)
        samples = SampleOutputs({"targets": np.asarray(val.labels, np.int64), "pred": ev["pred"],
                                 **{f"top{k}": ev["hits"][k] for k in ks}})
        results = [ctx.result(p.dataset, p.val_split, LAYER, f"top{k}", 100.0 * ev["topk"][k], params=params,
                              dataset_fingerprint=fp, outputs=samples.mean(f"top{k}")) for k in ks]
        resume.clear()  # finished: nothing left to resume
        return results

    def _splits(self, ctx: TaskContext):
        p: SemiSupervisedProtocol = ctx.protocol
        return ctx.open_classification_splits(p.train_split, p.val_split)

    # ------------------------------------------------------------------ plan

    def plan(self, ctx: TaskContext) -> TaskPlan:
        """The val images at the evaluation size; the training steps over the labelled images."""
        p: SemiSupervisedProtocol = ctx.protocol
        train, val, classes = self._splits(ctx)
        subset = labelled_subset(ctx, train, len(classes))
        steps = Schedule(len(subset), p.batch_size, epochs_for(p), p.lr).total_steps
        return TaskPlan(images={p.val_split: len(val)}, image_size=p.image_size, train_iterations=steps,
                        images_per_iteration=p.batch_size, train_image_size=p.image_size,
                        train_images={p.train_split: len(subset)},
                        note=f"{labels_token(p.label_fraction)} of the labels, {epochs_for(p)} epochs")


# ---------------------------------------------------------------------- helpers


def subset_path(ctx: TaskContext) -> Path | None:
    """The protocol's subset file: absolute, or relative to the data root."""
    name = ctx.protocol.subset_file
    if not name:
        return None
    path = Path(name).expanduser()
    return path if path.is_absolute() else ctx.data_root / path


def labelled_subset(ctx: TaskContext, train, num_classes: int) -> Subset:
    """The labelled images; a file whose size is not the protocol's fraction of the split is used, with a warning."""
    p: SemiSupervisedProtocol = ctx.protocol
    path = subset_path(ctx)
    subset = choose_subset(train.ids, train.labels, num_classes, p.label_fraction, p.subset_seed, path)
    expected = subset_size(len(train), p.label_fraction)
    if path is not None and abs(len(subset) - expected) > max(1, 0.01 * expected):
        warn(f"{path} lists {len(subset)} images, not the {expected} of label_fraction={p.label_fraction} "
             f"({len(train)} training images); the records carry the fraction set, the subset its size")
    return subset


def resume_state(ctx: TaskContext, train_fingerprint: str, subset: Subset, epochs: int) -> ResumeState:
    """The training state of this checkpoint and seed under the run's folder; resuming needs the same checkpoint,
    data, subset, device and protocol (evaluation-only fields aside)."""
    settings = {"checkpoint": ctx.checkpoint.sha256, "seed": ctx.seed, "device": ctx.device,
                "train_data": train_fingerprint, "subset": subset.record["ids_sha256"], "epochs": epochs,
                "protocol": ctx.protocol.to_dict()}
    fraction = labels_token(ctx.protocol.label_fraction).replace("%", "pct")
    path = ctx.out_dir / "semi_supervised_state" / f"{ctx.checkpoint.sha256[:16]}-{fraction}-seed{ctx.seed}.pt"
    return ResumeState(path, settings, what="semi_supervised training", may_change=_RESUME_MAY_CHANGE)


task = SemiSupervisedTask()
