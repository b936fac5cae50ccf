"""Places205 linear classification on frozen features, one probe per tap (Goyal et al. 2019).

For each tap (conv1, res2..res5 on a ResNet): Goyal pooling to ~9k dims, features
from the cache (the trunk runs once per split, never during training), a
BatchNorm-without-affine + linear classifier trained by SGD (``tasks.linear.probe``),
top-1 / top-5 on the val split.

Presets:
- ``goyal19``: the benchmark's solver (fair_self_supervision_benchmark
  ``places205/resnet50_*_finetune_linear.yaml``): batch 256, lr 0.01, Nesterov momentum
  0.9, weight decay 1e-4 on weight and bias, FC init N(0, 0.01^2), BN without scale/shift
  (eps 1e-5, Caffe2 momentum 0.9 = PyTorch 0.1); 140k iterations with x0.1 steps every
  40k, i.e. 14.6 Places205 epochs with steps at 2/7, 4/7 and 6/7 of training, run here as
  14 epochs with steps at epochs 4, 8, 12 (VISSL's port of the same benchmark).
- ``vissl``: VISSL's ``eval_resnet_8gpu_transfer_places205_linear.yaml``: the same with weight
  decay 5e-4.
- ``quick``: 4 epochs (step at 3), batch 16, 64 px images: for CPU and CI.

Deviation from both anchors, recorded in every result: they train on random-resized
crops with flips; a cached-feature probe sees the evaluation transform (resize 256,
centre crop 224) of every training image, every epoch.

Any single-label dataset the suite reads works (``--set places205_linear.dataset=imagefolder``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from evalsuite.errors import BadData
from evalsuite.plan import TaskPlan
from evalsuite.protocols import TaskProtocol, check_preset
from evalsuite.results import Result
from evalsuite.task import TaskContext
from tasks.linear.probe import ProbeConfig, evaluate_probe, train_linear_probe

DEFAULT_LAYERS = ("conv1", "res2", "res3", "res4", "res5")
AUGMENTATION_NOTE = ("none: cached features of the evaluation transform "
                     "(anchors use random-resized crops + flips)")
GOYAL19_SCHEDULE_NOTE = ("benchmark: 140000 iterations x 256, lr x0.1 at 40k/80k/120k "
                         "(= 14.6 Places205 epochs, steps at 2/7, 4/7, 6/7)")


@dataclass(frozen=True)
class Places205LinearProtocol(TaskProtocol):
    """The ``goyal19`` values; the solver fields are :class:`tasks.linear.probe.ProbeConfig`'s."""

    dataset: str = "places205"
    data_path: str | None = None
    train_split: str = "train"
    val_split: str = "val"
    layers: tuple[str, ...] | None = DEFAULT_LAYERS  # None (or taps this trunk lacks): every tap of the trunk
    pooling: Literal["goyal", "avg", "none"] = "goyal"
    image_size: int = 224
    resize_mode: Literal["square", "center_crop"] = "center_crop"
    resize: int | None = 256
    epochs: float = 14
    batch_size: int = 256
    lr: float = 0.01
    lr_milestones: tuple[float, ...] = (4, 8, 12)
    lr_gamma: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-4
    bn: Literal["channel", "feature", "none"] = "channel"
    bn_eps: float = 1e-5
    bn_momentum: float = 0.1
    init_std: float = 0.01
    topk: tuple[int, ...] = (1, 5)


#: each preset as its changes to the goyal19 values
_PRESET_CHANGES: dict[str, dict[str, Any]] = {
    "goyal19": {},
    "vissl": {"weight_decay": 5e-4},
    "quick": {"image_size": 64, "resize": None, "epochs": 4, "lr_milestones": (3,), "batch_size": 16},
}


class Places205LinearTask:
    name = "places205_linear"
    description = ("per-tap BatchNorm + linear classifier on frozen features, top-1/top-5 "
                   "(Places205, any single-label data)")

    def default_protocol(self, preset: str) -> Places205LinearProtocol:
        return Places205LinearProtocol(**_PRESET_CHANGES[check_preset(preset)])

    headline_metrics = ("top1",)

    def run(self, ctx: TaskContext) -> list[Result]:
        p: Places205LinearProtocol = ctx.protocol
        train = ctx.open_dataset(p.dataset, p.train_split, p.data_path)
        val = ctx.open_dataset(p.dataset, p.val_split, p.data_path)
        classes = getattr(train, "classes", None)
        if classes is None or not hasattr(train, "labels"):
            raise BadData(f"{p.dataset} is not a single-label classification dataset", train.root)
        if list(classes) != list(getattr(val, "classes", [])):
            raise BadData(f"the {p.train_split} and {p.val_split} splits have different class lists", val.root)
        num_classes = len(classes)
        taps = ctx.taps(p.layers)
        transform = ctx.transform()
        config = ProbeConfig.from_protocol(p, seed=ctx.seed)
        ks = [int(k) for k in p.topk if int(k) < num_classes or int(k) == 1]
        specs = ctx.extractor.pool_specs(taps, p.pooling, transform)
        ftr = ctx.features(train, taps, pooling=p.pooling, transform=transform)
        fva = ctx.features(val, taps, pooling=p.pooling, transform=transform)
        results = []
        for tap in taps:
            x_tr, x_va = ftr.pop(tap), fva.pop(tap)
            channels = int(specs[tap].out_shape[0])
            # one resume state per checkpoint and tap; it refuses to continue under other settings
            state = ctx.out_dir / "probe_state" / f"{tap}-{ctx.checkpoint.sha256[:16]}.pt"
            settings = {
                "checkpoint": ctx.checkpoint.sha256, "data": train.fingerprint(), "tap": tap,
                "pool": specs[tap].op, "transform": transform.to_dict(), "precision": ctx.extractor.precision,
                "device": ctx.device,
            }
            fit = train_linear_probe(x_tr, train.labels, num_classes, config, channels=channels,
                                     device=ctx.device, state_path=state, settings=settings,
                                     progress=ctx.progress, desc=f"{self.name} {tap}", source=train.root)
            ev = evaluate_probe(fit.model, x_va, val.labels, ks, source=val.root)
            params = {
                "num_train": len(train), "num_val": len(val), "num_classes": num_classes,
                "feature_dim": int(x_tr.shape[1]), "pool_op": specs[tap].op,
                "pool_shape": list(specs[tap].out_shape),
                "bn_channels": channels if config.bn == "channel" else None,
                "solver": {**config.to_dict(), "optimizer": "sgd", "loss": "softmax_cross_entropy",
                           "weight_decay_on": "weight and bias", "drop_last": True,
                           "shuffle": "numpy default_rng([seed, epoch]).permutation"},
                "iterations_per_epoch": fit.iters_per_epoch, "total_iterations": fit.total_iterations,
                "epochs_run": fit.epochs_run, "resumed_from_epoch": fit.resumed_from_epoch,
                "train_curve": fit.loss_summary(), "val_loss": round(ev["loss"], 6),
                "transform": transform.to_dict(), "augmentation": AUGMENTATION_NOTE,
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
        train = ctx.open_dataset(p.dataset, p.train_split, p.data_path)
        val = ctx.open_dataset(p.dataset, p.val_split, p.data_path)
        return TaskPlan(images={p.train_split: len(train), p.val_split: len(val)}, image_size=p.image_size,
                        note=f"probe: {p.epochs:g} epochs x batch {p.batch_size} per tap on cached features")


task = Places205LinearTask()
