"""Linear classification on frozen features, one probe per tap: ``places205_linear`` and ``imagenet_linear``.

One task body (:class:`LinearTask`), two instances that differ in their dataset, their ``goyal19`` schedule and their
reference tables. For each tap (conv1, res2..res5 on a ResNet): pooled features from the cache (the trunk runs once
per split and training view, never during training), a linear classifier (with a BatchNorm in the Goyal et al.
benchmark) trained by SGD (``tasks.linear.probe``), top-1 / top-5 on the val split. The heads of all taps train in one
pass over the cached features (one read of each batch updates every head; each head's weights are those of training it
alone), recorded as ``solver.one_pass``.

Training views (``train_views``): ``augmented`` (the benchmarks') extracts K = ``augmented_views`` augmented views
of every training image once (``tasks.linear.augment``, each cached under its own key) and epoch e trains on view
e mod K, so with K >= epochs every epoch sees a fresh random crop of every image, as the references' data loaders
give it. The trunk stays out of the training loop, at K times the extraction and disk of one view. ``center``:
every epoch reads the cached evaluation transform (resize 256, centre crop 224) of every training image: one
extraction, a recorded shortcut.

Presets (both tasks; the fidelity of every field is in :mod:`tasks.linear.conformance`):
- ``goyal19``: fair_self_supervision_benchmark's ResNet-50 linear configs (``places205/resnet50_*_finetune_linear.yaml``
  and ``legacy_tasks/imagenet_linear_tune/resnet50_*_finetune_linear.yaml``, the same solver): batch 256, lr 0.01,
  Nesterov momentum 0.9, weight decay 1e-4 on the FC weight and bias, FC init N(0, 0.01^2), BN without scale/shift
  (eps 1e-5, Caffe2 momentum 0.9 = PyTorch 0.1); random_sized_crop + flip + colour jitter + lighting views, one per
  epoch; 140k iterations with x0.1 steps every 40k, run as VISSL's ports do: Places205 14 epochs stepped at 4/8/12
  (14.6 epochs in the benchmark), ImageNet 28 epochs stepped at 8/16/24 (27.98).
- ``vissl``: VISSL's ``eval_resnet_8gpu_transfer_{places205,in1k}_linear.yaml`` with its ``eval_mlp`` head: BN with
  scale/shift (not decayed), PyTorch's default Linear init, weight decay 5e-4, RandomResizedCrop + flip views.
- ``dino21``: DINO's ``eval_linear.py`` (Caron et al. 2021): the [CLS] tokens of a ViT's last 4 blocks (a ResNet's
  global average), no BN, N(0, 0.01^2) init, SGD momentum 0.9 without weight decay, lr 0.001 x batch / 256 at
  batch 1024, cosine to 0 over 100 epochs, RandomResizedCrop + flip views (one per epoch), bicubic resize 256 /
  centre crop 224 at evaluation, the best val top-1 over the epochs reported (DINO's ``best_acc``).
- ``quick``: 4 epochs (step at 3), batch 16, 64 px images, centre-crop features: for CPU and CI.

Any single-label dataset the suite reads works (``--set places205_linear.dataset=imagefolder``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import numpy as np

from evalsuite.errors import UserError
from evalsuite.features import Transform
from evalsuite.outputs import SampleOutputs
from evalsuite.plan import TaskPlan
from evalsuite.protocols import FeatureTaskProtocol, Interpolation, ResizeMode, preset_changes
from evalsuite.results import Result
from evalsuite.task import TaskContext
from tasks.linear import conformance as C
from tasks.linear.augment import RECIPE_NOTES, AugmentedTransform
from tasks.linear.probe import (
    ProbeConfig,
    ProbeHyperParameters,
    evaluate_probe,
    num_epochs,
    topk_hits,
    train_linear_probes,
)

DEFAULT_LAYERS = ("conv1", "res2", "res3", "res4", "res5")
CENTER_NOTE = ("none: every epoch reads the cached evaluation transform "
               "(the benchmark trains on random crops: train_views=augmented)")


@dataclass(frozen=True)
class LinearProtocol(ProbeHyperParameters, FeatureTaskProtocol):
    """The fields of both linear tasks (Places205's ``goyal19`` values); the solver fields are
    :class:`tasks.linear.probe.ProbeConfig`'s."""

    dataset: str = "places205"
    val_split: str = "val"
    layers: tuple[str, ...] | None = DEFAULT_LAYERS
    resize_mode: ResizeMode = "center_crop"
    resize: int | None = 256
    interpolation: Interpolation = "cv2_bilinear"  # fair_ssb's cv2.resize
    train_views: Literal["center", "augmented"] = "augmented"
    augmented_views: int = 14  # K views extracted per training image; epoch e reads view e mod K
    train_augmentation: Literal["goyal19", "vissl", "dino21"] = "goyal19"
    topk: tuple[int, ...] = (1, 5)
    # last: the final model's accuracies; best_val: those of the epoch with the best val top-1 (DINO's best_acc)
    report_epoch: Literal["last", "best_val"] = "last"

    def tuned_on_test(self) -> tuple[str, ...]:
        # best_val picks the epoch on val_split, the split the accuracies are reported on (ImageNet val: the test set)
        return ("epoch",) if self.report_epoch == "best_val" else ()


@dataclass(frozen=True)
class Places205LinearProtocol(LinearProtocol):
    """places205_linear's ``goyal19`` values."""


@dataclass(frozen=True)
class ImageNetLinearProtocol(LinearProtocol):
    """imagenet_linear's ``goyal19`` values: fair_ssb's 140k x 256 iterations are 27.98 ImageNet epochs."""

    dataset: str = "imagenet"
    epochs: float = 28
    lr_milestones: tuple[float, ...] = (8, 16, 24)
    augmented_views: int = 28


#: each preset as its changes to the task's goyal19 values (the same for both tasks)
_PRESET_CHANGES: dict[str, dict[str, Any]] = {
    "goyal19": {},
    "vissl": {"weight_decay": 5e-4, "bn_affine": True, "init": "pytorch_default", "train_augmentation": "vissl",
              "interpolation": "bilinear", "pooling": "vissl"},
    # facebookresearch/dino eval_linear.py with its defaults and the README's 8 GPUs (128 images each)
    "dino21": {"layers": ("last4",), "pooling": "avg", "interpolation": "bicubic", "epochs": 100, "batch_size": 1024,
               "lr": 0.001, "lr_base_batch": 256, "lr_schedule": "cosine", "lr_milestones": (), "nesterov": False,
               "weight_decay": 0.0, "bn": "none", "augmented_views": 100, "train_augmentation": "dino21",
               "report_epoch": "best_val"},
    "quick": {"image_size": 64, "resize": None, "interpolation": "bilinear", "epochs": 4, "lr_milestones": (3,),
              "batch_size": 16, "train_views": "center"},
}


def training_views(p: LinearProtocol, transform: Transform, num_train: int, seed: int,
                   task: str = "places205_linear") -> list[Transform]:
    """The transforms training reads in turn: the evaluation transform alone (``center``), or one augmented
    view per epoch up to ``augmented_views`` (views no epoch would read are not extracted)."""
    if p.train_views == "center":
        return [transform]
    if p.augmented_views < 1:
        raise UserError(f"{task}.augmented_views must be >= 1, got {p.augmented_views}")
    epochs = num_epochs(num_train, ProbeConfig.from_protocol(p))
    return [AugmentedTransform.of(transform, p.train_augmentation, seed, v)
            for v in range(min(p.augmented_views, epochs))]


def augmentation_note(p: LinearProtocol, views: int) -> str:
    if p.train_views == "center":
        return CENTER_NOTE
    return (f"{p.train_augmentation}: {RECIPE_NOTES[p.train_augmentation]}; {views} cached view(s) per image, "
            f"epoch e reads view e mod {views}")


def reported_epoch(history: list[dict[str, float]], ks: list[int]) -> tuple[int, dict[int, float]]:
    """(1-based epoch, {k: top-k fraction}) of the epoch with the best val top-1 (the first of equal ones)."""
    best = max(range(len(history)), key=lambda e: (history[e]["val_top1"], -e))
    return best + 1, {k: history[best][f"val_top{k}"] for k in ks}


class LinearTask:
    """Per-tap linear probes on one dataset; ``places205_linear`` and ``imagenet_linear`` are two instances."""

    headline_metrics = ("top1",)
    seeded = True  # the probe's init, the batch order and the augmented views are seeded
    distributed = True  # under torchrun every rank trains on its share of each batch (tasks.linear.ddp)

    def __init__(self, name: str, description: str, protocol: type[LinearProtocol],
                 conformance: Mapping[str, tuple[str, str, str]],
                 preset_conformance: Mapping[str, Mapping[str, tuple[str, str, str]]],
                 benchmark_schedule: Mapping[str, str]):
        self.name, self.description, self.protocol = name, description, protocol
        self.conformance, self.preset_conformance = dict(conformance), dict(preset_conformance)
        self.reference_variants = {"dino21": C.DINO21_VARIANTS}
        self.benchmark_schedule = dict(benchmark_schedule)  # preset -> the reference's schedule, recorded

    def default_protocol(self, preset: str) -> LinearProtocol:
        return self.protocol(**preset_changes(_PRESET_CHANGES, preset, self.name))

    def run(self, ctx: TaskContext) -> list[Result]:
        p: LinearProtocol = ctx.protocol
        train, val, classes = ctx.open_classification_splits(p.train_split, p.val_split)
        num_classes = len(classes)
        taps = ctx.taps(p.layers)
        transform = ctx.transform()
        views = training_views(p, transform, len(train), ctx.seed, self.name)
        config = ProbeConfig.from_protocol(p, seed=ctx.seed)
        ks = [int(k) for k in p.topk if int(k) < num_classes or int(k) == 1]
        eval_ks = sorted({1, *ks})  # top-1 always: it picks the reported epoch and is recorded
        specs = ctx.extractor.pool_specs(taps, p.pooling, transform)
        # stores: nothing loaded yet; the probe loads features that fit the memory budget and streams larger ones
        ftr = ctx.feature_stores(train, taps, pooling=p.pooling, transform=views[0])
        if len(views) > 1:  # every view through the trunk once (all taps per pass); training reads them back below
            ftr = None
            for view in views[1:]:
                ctx.feature_stores(train, taps, pooling=p.pooling, transform=view)
        fva = ctx.feature_stores(val, taps, pooling=p.pooling, transform=transform)
        if ftr is None:  # each view loaded from the cache when training reaches it: one view in memory at a time
            ftr = {tap: [partial(_cached_view, ctx, train, tap, p.pooling, view) for view in views] for tap in taps}
        channels = {tap: int(specs[tap].out_shape[0]) for tap in taps}
        # one resume state per checkpoint, tap and seed (`--seeds`); it refuses to continue under other settings
        states = {tap: ctx.out_dir / "probe_state" / f"{tap}-{ctx.checkpoint.sha256[:16]}-seed{ctx.seed}.pt"
                  for tap in taps}
        settings = {tap: {"checkpoint": ctx.checkpoint.sha256, "data": train.fingerprint(), "tap": tap,
                          "pool": specs[tap].op, "transform": transform.to_dict(),
                          "precision": ctx.extractor.precision, "device": ctx.device,
                          "train_views": augmentation_note(p, len(views))} for tap in taps}
        evaluate = None
        if p.report_epoch == "best_val":  # the val split after every epoch, kept in the (resumable) history
            evaluate = {tap: partial(_val_metrics, x_va=fva[tap], labels=val.labels, ks=eval_ks, source=val.root)
                        for tap in taps}
        # every tap's head in one pass: each epoch reads every batch once (the taps' stores in lockstep; loaded when
        # together they fit the memory budget, else streamed) and updates every head with it
        fits = train_linear_probes({tap: ftr.pop(tap) for tap in taps}, train.labels, num_classes, config,
                                   channels=channels, device=ctx.device, state_paths=states, settings=settings,
                                   progress=ctx.progress, desc=self.name, evaluate=evaluate, source=train.root)
        results = []
        for tap in taps:
            fit = fits[tap]
            x_va = fva.pop(tap).resident()  # in memory when it fits the budget, else read in blocks
            ev = evaluate_probe(fit.model, x_va, val.labels, eval_ks, source=val.root)
            epoch, topk = fit.epochs_run, ev["topk"]
            if p.report_epoch == "best_val":
                epoch, topk = reported_epoch(fit.history, ks)
            params = {
                "num_train": len(train), "num_val": len(val), "num_classes": num_classes,
                "feature_dim": int(x_va.shape[1]), "pool_op": specs[tap].op,
                "pool_shape": list(specs[tap].out_shape),
                "bn_channels": channels[tap] if config.bn == "channel" else None,
                "solver": {**config.to_dict(), "scaled_lr": config.scaled_lr, "optimizer": "sgd",
                           "loss": "softmax_cross_entropy",
                           "weight_decay_on": "linear weight and bias (none on BN scale/shift)", "drop_last": True,
                           "shuffle": fit.order, "stream": fit.stream, "one_pass": fit.pass_record()},
                "iterations_per_epoch": fit.iters_per_epoch, "total_iterations": fit.total_iterations,
                "epochs_run": fit.epochs_run, "resumed_from_epoch": fit.resumed_from_epoch,
                "train_curve": fit.loss_summary(), "val_loss": round(ev["loss"], 6),
                "reported_epoch": epoch, "last_epoch_top1": round(100.0 * ev["topk"][1], 6),
                "transform": transform.to_dict(), "augmentation": augmentation_note(p, len(views)),
                "train_transform": views[0].to_dict(), "views_extracted": len(views), "views_read": fit.views,
                "device": ctx.device,
            }
            if ctx.preset in self.benchmark_schedule:
                params["benchmark_schedule"] = self.benchmark_schedule[ctx.preset]
            if evaluate is not None:
                params["val_top1_per_epoch"] = [round(100.0 * h["val_top1"], 6) for h in fit.history]
            # per-sample outputs of the final model (best_val reports an earlier epoch's model, not kept: none)
            samples = _sample_outputs(ev["logits"], val.labels, ks) if p.report_epoch == "last" else None
            for k in ks:
                results.append(ctx.result(p.dataset, p.val_split, tap, f"top{k}", 100.0 * topk[k],
                                          params=params, dataset_fingerprint=val.fingerprint(),
                                          outputs=None if samples is None else samples.mean(f"top{k}")))
            states[tap].unlink(missing_ok=True)  # finished: nothing left to resume
        return results

    def plan(self, ctx: TaskContext) -> TaskPlan:
        """Features of both splits at the protocol's size; the probe trains on the cached features."""
        p: LinearProtocol = ctx.protocol
        train, val = ctx.open_splits(p.train_split, p.val_split)
        views = len(training_views(p, ctx.transform(), len(train), ctx.seed, self.name))  # a pass over train each
        return TaskPlan(images={p.train_split: views * len(train), p.val_split: len(val)}, image_size=p.image_size,
                        held_images={p.train_split: len(train), p.val_split: len(val)},  # one view at a time
                        note=f"probe: {p.epochs:g} epochs x batch {p.batch_size} per tap on cached features")


def _cached_view(ctx: TaskContext, dataset, tap: str, pooling: str, view: Transform):
    return ctx.feature_stores(dataset, [tap], pooling=pooling, transform=view)[tap]


def _sample_outputs(logits: np.ndarray, labels: np.ndarray, ks: list[int]) -> SampleOutputs:
    """Targets, top-1 predictions and top-k hits per val image (probe.topk_hits: their mean is the recorded top-k)."""
    y = np.asarray(labels, np.int64)
    hits = topk_hits(logits, y, ks)
    return SampleOutputs({"targets": y, "pred": logits.argmax(axis=1), **{f"top{k}": hits[k] for k in ks}})


def _val_metrics(model, x_va: np.ndarray, labels: np.ndarray, ks: list[int], source) -> dict[str, float]:
    ev = evaluate_probe(model, x_va, labels, ks, source=source)
    return {**{f"val_top{k}": ev["topk"][k] for k in ks}, "val_loss": ev["loss"]}


task = LinearTask(
    "places205_linear",
    "per-tap linear classifier (BatchNorm + linear in the Goyal et al. benchmark) on frozen features, top-1/top-5 "
    "(Places205, any single-label data)",
    Places205LinearProtocol, C.CONFORMANCE, {"dino21": C.PLACES205_DINO21}, C.PLACES205_SCHEDULES)

imagenet_task = LinearTask(
    "imagenet_linear",
    "per-tap linear classifier on frozen features, top-1/top-5 on ImageNet (ILSVRC2012 class folders or the "
    "official val layout with the devkit)",
    ImageNetLinearProtocol, C.IMAGENET_CONFORMANCE, {"dino21": C.IMAGENET_DINO21}, C.IMAGENET_SCHEDULES)
