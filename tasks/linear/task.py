"""Places205 linear classification on frozen features, one probe per tap (Goyal et al. 2019).

For each tap (conv1, res2..res5 on a ResNet): Goyal pooling to ~9k dims, features
from the cache (the trunk runs once per split and training view, never during training),
a BatchNorm + linear classifier trained by SGD (``tasks.linear.probe``), top-1 / top-5 on
the val split.

Training views (``train_views``): ``augmented`` (the benchmark's) extracts K =
``augmented_views`` augmented views of every training image once (``tasks.linear.augment``,
each cached under its own key) and epoch e trains on view e mod K, so with K >= epochs every
epoch sees a fresh random crop of every image, as the references' data loaders give it. The
trunk stays out of the training loop, at K times the extraction and disk of one view.
``center``: every epoch reads the cached evaluation transform (resize 256, centre crop 224) of
every training image: one extraction, a recorded shortcut.

Presets:
- ``goyal19``: fair_self_supervision_benchmark ``places205/resnet50_*_finetune_linear.yaml``:
  batch 256, lr 0.01, Nesterov momentum 0.9, weight decay 1e-4 on the FC weight and bias, FC
  init N(0, 0.01^2), BN without scale/shift (eps 1e-5, Caffe2 momentum 0.9 = PyTorch 0.1);
  random_sized_crop + flip + colour jitter + lighting views, one per epoch; 140k iterations
  with x0.1 steps every 40k, i.e. 14.6 Places205 epochs with steps at 2/7, 4/7 and 6/7 of
  training, run here as 14 epochs with steps at epochs 4, 8, 12 (VISSL's port).
- ``vissl``: VISSL's ``eval_resnet_8gpu_transfer_places205_linear.yaml`` with its ``eval_mlp``
  head: BN with scale/shift (not decayed), PyTorch's default Linear init, weight decay 5e-4,
  RandomResizedCrop + flip views.
- ``quick``: 4 epochs (step at 3), batch 16, 64 px images, centre-crop features: for CPU and CI.

Any single-label dataset the suite reads works (``--set places205_linear.dataset=imagefolder``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

from evalsuite.errors import BadData, UserError
from evalsuite.features import Transform
from evalsuite.plan import TaskPlan
from evalsuite.protocols import FeatureTaskProtocol, Interpolation, ResizeMode, check_preset
from evalsuite.results import Result
from evalsuite.task import TaskContext
from tasks.linear.augment import RECIPE_NOTES, AugmentedTransform
from tasks.linear.probe import ProbeConfig, ProbeHyperParameters, evaluate_probe, num_epochs, train_linear_probe

DEFAULT_LAYERS = ("conv1", "res2", "res3", "res4", "res5")
CENTER_NOTE = ("none: every epoch reads the cached evaluation transform "
               "(the benchmark trains on random crops: train_views=augmented)")
GOYAL19_SCHEDULE_NOTE = ("benchmark: 140000 iterations x 256, lr x0.1 at 40k/80k/120k "
                         "(= 14.6 Places205 epochs, steps at 2/7, 4/7, 6/7)")


@dataclass(frozen=True)
class Places205LinearProtocol(ProbeHyperParameters, FeatureTaskProtocol):
    """The ``goyal19`` values; the solver fields are :class:`tasks.linear.probe.ProbeConfig`'s."""

    dataset: str = "places205"
    val_split: str = "val"
    layers: tuple[str, ...] | None = DEFAULT_LAYERS
    resize_mode: ResizeMode = "center_crop"
    resize: int | None = 256
    interpolation: Interpolation = "cv2_bilinear"  # fair_ssb's cv2.resize
    train_views: Literal["center", "augmented"] = "augmented"
    augmented_views: int = 14  # K views extracted per training image; epoch e reads view e mod K
    train_augmentation: Literal["goyal19", "vissl"] = "goyal19"
    topk: tuple[int, ...] = (1, 5)


#: each preset as its changes to the goyal19 values
_PRESET_CHANGES: dict[str, dict[str, Any]] = {
    "goyal19": {},
    "vissl": {"weight_decay": 5e-4, "bn_affine": True, "init": "pytorch_default", "train_augmentation": "vissl",
              "interpolation": "bilinear", "pooling": "vissl"},
    "quick": {"image_size": 64, "resize": None, "interpolation": "bilinear", "epochs": 4, "lr_milestones": (3,),
              "batch_size": 16, "train_views": "center"},
}


def training_views(p: Places205LinearProtocol, transform: Transform, num_train: int, seed: int) -> list[Transform]:
    """The transforms training reads in turn: the evaluation transform alone (``center``), or one augmented
    view per epoch up to ``augmented_views`` (views no epoch would read are not extracted)."""
    if p.train_views == "center":
        return [transform]
    if p.augmented_views < 1:
        raise UserError(f"places205_linear.augmented_views must be >= 1, got {p.augmented_views}")
    epochs = num_epochs(num_train, ProbeConfig.from_protocol(p))
    return [AugmentedTransform.of(transform, p.train_augmentation, seed, v)
            for v in range(min(p.augmented_views, epochs))]


def augmentation_note(p: Places205LinearProtocol, views: int) -> str:
    if p.train_views == "center":
        return CENTER_NOTE
    return (f"{p.train_augmentation}: {RECIPE_NOTES[p.train_augmentation]}; {views} cached view(s) per image, "
            f"epoch e reads view e mod {views}")


class Places205LinearTask:
    name = "places205_linear"
    description = ("per-tap BatchNorm + linear classifier on frozen features, top-1/top-5 "
                   "(Places205, any single-label data)")
    headline_metrics = ("top1",)

    def default_protocol(self, preset: str) -> Places205LinearProtocol:
        return Places205LinearProtocol(**_PRESET_CHANGES[check_preset(preset)])

    def run(self, ctx: TaskContext) -> list[Result]:
        p: Places205LinearProtocol = ctx.protocol
        train, val = ctx.open_splits(p.train_split, p.val_split)
        classes = getattr(train, "classes", None)
        if classes is None or not hasattr(train, "labels"):
            raise BadData(f"{p.dataset} is not a single-label classification dataset", train.root)
        if list(classes) != list(getattr(val, "classes", [])):
            raise BadData(f"the {p.train_split} and {p.val_split} splits have different class lists", val.root)
        num_classes = len(classes)
        taps = ctx.taps(p.layers)
        transform = ctx.transform()
        views = training_views(p, transform, len(train), ctx.seed)
        config = ProbeConfig.from_protocol(p, seed=ctx.seed)
        ks = [int(k) for k in p.topk if int(k) < num_classes or int(k) == 1]
        specs = ctx.extractor.pool_specs(taps, p.pooling, transform)
        ftr = ctx.features(train, taps, pooling=p.pooling, transform=views[0])
        if len(views) > 1:  # every view through the trunk once (all taps per pass); each tap reads them back below
            ftr = None
            for view in views[1:]:
                ctx.features(train, taps, pooling=p.pooling, transform=view)
        fva = ctx.features(val, taps, pooling=p.pooling, transform=transform)
        results = []
        for tap in taps:
            x_va = fva.pop(tap)
            if ftr is not None:
                x_tr = ftr.pop(tap)
            else:  # loaded from the cache when training reaches the view: one view in memory at a time
                x_tr = [partial(_cached_view, ctx, train, tap, p.pooling, view) for view in views]
            channels = int(specs[tap].out_shape[0])
            # one resume state per checkpoint and tap; it refuses to continue under other settings
            state = ctx.out_dir / "probe_state" / f"{tap}-{ctx.checkpoint.sha256[:16]}.pt"
            settings = {
                "checkpoint": ctx.checkpoint.sha256, "data": train.fingerprint(), "tap": tap,
                "pool": specs[tap].op, "transform": transform.to_dict(), "precision": ctx.extractor.precision,
                "device": ctx.device, "train_views": augmentation_note(p, len(views)),
            }
            fit = train_linear_probe(x_tr, train.labels, num_classes, config, channels=channels,
                                     device=ctx.device, state_path=state, settings=settings,
                                     progress=ctx.progress, desc=f"{self.name} {tap}", source=train.root)
            ev = evaluate_probe(fit.model, x_va, val.labels, ks, source=val.root)
            params = {
                "num_train": len(train), "num_val": len(val), "num_classes": num_classes,
                "feature_dim": int(x_va.shape[1]), "pool_op": specs[tap].op,
                "pool_shape": list(specs[tap].out_shape),
                "bn_channels": channels if config.bn == "channel" else None,
                "solver": {**config.to_dict(), "optimizer": "sgd", "loss": "softmax_cross_entropy",
                           "weight_decay_on": "linear weight and bias (none on BN scale/shift)", "drop_last": True,
                           "shuffle": "numpy default_rng([seed, epoch]).permutation"},
                "iterations_per_epoch": fit.iters_per_epoch, "total_iterations": fit.total_iterations,
                "epochs_run": fit.epochs_run, "resumed_from_epoch": fit.resumed_from_epoch,
                "train_curve": fit.loss_summary(), "val_loss": round(ev["loss"], 6),
                "transform": transform.to_dict(), "augmentation": augmentation_note(p, len(views)),
                "train_transform": views[0].to_dict(), "views_extracted": len(views), "views_read": fit.views,
                "device": ctx.device,
            }
            if ctx.preset in ("goyal19", "vissl"):
                params["benchmark_schedule"] = GOYAL19_SCHEDULE_NOTE
            for k in ks:
                results.append(ctx.result(p.dataset, p.val_split, tap, f"top{k}", 100.0 * ev["topk"][k],
                                          params=params, dataset_fingerprint=val.fingerprint()))
            state.unlink(missing_ok=True)  # finished: nothing left to resume
        return results

    def plan(self, ctx: TaskContext) -> TaskPlan:
        """Features of both splits at the protocol's size; the probe trains on the cached features."""
        p: Places205LinearProtocol = ctx.protocol
        train, val = ctx.open_splits(p.train_split, p.val_split)
        views = len(training_views(p, ctx.transform(), len(train), ctx.seed))  # each view: one pass over train
        return TaskPlan(images={p.train_split: views * len(train), p.val_split: len(val)}, image_size=p.image_size,
                        note=f"probe: {p.epochs:g} epochs x batch {p.batch_size} per tap on cached features")


def _cached_view(ctx: TaskContext, dataset, tap: str, pooling: str, view: Transform):
    return ctx.features(dataset, [tap], pooling=pooling, transform=view)[tap]


task = Places205LinearTask()
