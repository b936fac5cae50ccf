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

import hashlib
import json
from typing import Any

from evalsuite.errors import BadData
from evalsuite.protocols import check_preset
from evalsuite.results import Result
from evalsuite.task import TaskContext
from tasks.linear.probe import ProbeConfig, evaluate_probe, train_linear_probe

DEFAULT_LAYERS = ["conv1", "res2", "res3", "res4", "res5"]
AUGMENTATION_NOTE = ("none: cached features of the evaluation transform "
                     "(anchors use random-resized crops + flips)")
GOYAL19_SCHEDULE_NOTE = ("benchmark: 140000 iterations x 256, lr x0.1 at 40k/80k/120k "
                         "(= 14.6 Places205 epochs, steps at 2/7, 4/7, 6/7)")


class Places205LinearTask:
    name = "places205_linear"
    description = ("per-tap BatchNorm + linear classifier on frozen features, top-1/top-5 "
                   "(Places205, any single-label data)")

    def default_protocol(self, preset: str) -> dict[str, Any]:
        check_preset(preset)
        protocol: dict[str, Any] = {
            "dataset": "places205",
            "data_path": None,
            "train_split": "train",
            "val_split": "val",
            "layers": list(DEFAULT_LAYERS),
            "pooling": "goyal",
            "image_size": 224,
            "resize_mode": "center_crop",
            "resize": 256,
            "epochs": 14,
            "batch_size": 256,
            "lr": 0.01,
            "lr_milestones": [4, 8, 12],
            "lr_gamma": 0.1,
            "momentum": 0.9,
            "nesterov": True,
            "weight_decay": 1e-4,
            "bn": "channel",
            "bn_eps": 1e-5,
            "bn_momentum": 0.1,
            "init_std": 0.01,
            "topk": [1, 5],
        }
        if preset == "vissl":
            protocol["weight_decay"] = 5e-4
        elif preset == "quick":
            protocol.update({"image_size": 64, "resize": None, "epochs": 4, "lr_milestones": [3],
                             "batch_size": 16})
        return protocol

    def run(self, ctx: TaskContext) -> list[Result]:
        p = ctx.protocol
        train = ctx.open_dataset(p["dataset"], p["train_split"], p["data_path"])
        val = ctx.open_dataset(p["dataset"], p["val_split"], p["data_path"])
        classes = getattr(train, "classes", None)
        if classes is None or not hasattr(train, "labels"):
            raise BadData(f"{p['dataset']} is not a single-label classification dataset", train.root)
        if list(classes) != list(getattr(val, "classes", [])):
            raise BadData(f"the {p['train_split']} and {p['val_split']} splits have different class lists",
                          val.root)
        num_classes = len(classes)
        trunk_taps = list(ctx.extractor.trunk.tap_names)
        # the preset lists ResNet taps; another trunk (AlexNet: conv1..conv5) uses all of its own
        taps = ctx.taps(p["layers"] if all(t in trunk_taps for t in p["layers"]) else trunk_taps)
        transform = ctx.transform()
        pooling = p["pooling"]
        config = ProbeConfig.from_protocol(p, seed=ctx.seed)
        ks = [int(k) for k in p["topk"] if int(k) < num_classes or int(k) == 1]
        specs = ctx.extractor.pool_specs(taps, pooling, transform)
        ftr = ctx.features(train, taps, pooling=pooling, transform=transform)
        fva = ctx.features(val, taps, pooling=pooling, transform=transform)
        results = []
        for tap in taps:
            x_tr, x_va = ftr.pop(tap), fva.pop(tap)
            channels = int(specs[tap].out_shape[0])
            fingerprint = _state_fingerprint(ctx, train.fingerprint(), tap, specs[tap].op,
                                             transform.to_dict(), config, num_classes, x_tr.shape)
            state = ctx.out_dir / "probe_state" / f"{tap}-{fingerprint[:16]}.pt"
            fit = train_linear_probe(x_tr, train.labels, num_classes, config, channels=channels,
                                     device=ctx.device, state_path=state, fingerprint=fingerprint,
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
                results.append(ctx.result(p["dataset"], p["val_split"], tap, f"top{k}", 100.0 * ev["topk"][k],
                                          params=params, dataset_fingerprint=val.fingerprint()))
            state.unlink(missing_ok=True)  # finished: nothing left to resume
        return results


def _state_fingerprint(ctx: TaskContext, data_fp: str, tap: str, pool_op: str, transform: dict,
                       config: ProbeConfig, num_classes: int, shape: tuple[int, ...]) -> str:
    """Identifies one probe fit: resuming is allowed only into exactly the same fit."""
    payload = {
        "checkpoint": ctx.checkpoint.sha256, "data": data_fp, "tap": tap, "pool": pool_op,
        "transform": transform, "precision": ctx.extractor.precision, "config": config.to_dict(),
        "num_classes": num_classes, "shape": list(shape), "device": ctx.device,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


task = Places205LinearTask()
