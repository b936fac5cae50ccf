"""Fidelity of places205_linear: how far each deviation kept as an option moves top-1, side by side in one run.

Variants, all at the goyal19 preset (with the small-data overrides listed in the output), per tap:

- ``augmented``: the benchmark's training views (``train_views=augmented``: ``--views`` cached goyal19 views,
  fair_ssb's random_sized_crop + flip + colour jitter + lighting; epoch e reads view e mod K);
- ``center``: the recorded shortcut (``train_views=center``: the cached evaluation centre crop every epoch);
- ``augmented_fair_ssb_schedule``: the augmented views with fair_ssb's own schedule, 140k x 256 iterations on
  2,448,873 images = 14.63 epochs with steps at 4.18/8.36/12.54, instead of our 14 epochs stepped at 4/8/12;
- ``augmented_vissl`` (``--vissl``): VISSL's RandomResizedCrop + flip views.

Every variant runs with each seed of ``--seeds`` (the seed draws the views, the probe's init and its batch order),
so each difference is reported next to the seed-to-seed spread.

Data: the synthetic Places205 of ``evalsuite.data.synth_places`` (default), or ``--imagefolder DIR`` with
``train/`` and ``val/`` class folders, e.g. the real CIFAR-10 photos of shared/realdata unpacked under /tmp
(``--imagefolder /tmp/cifar10_dev --val-split test``; a development measurement only).
Trunk: ``--checkpoint`` (default random:resnet18).

    python -m benchmarks.fidelity.linear [--scale 1] [--views 14] [--seeds 0 1 2] [--image-size 112]

Writes benchmarks/out/fidelity_linear.json.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.fidelity import arg_parser, run_cli
from evalsuite import registry
from evalsuite.cache import FeatureCache
from evalsuite.checkpoints import load_checkpoint
from evalsuite.features import FeatureExtractor
from evalsuite.protocols import apply_overrides, parse_overrides
from evalsuite.task import TaskContext

PLACES205_TRAIN = 2_448_873  # fair_ssb: NUM_ITERATIONS 140000, BATCH_SIZE 256, STEP_SIZES 40000
FAIR_SSB_EPOCHS = 140_000 * 256 / PLACES205_TRAIN
FAIR_SSB_MILESTONES = tuple(round(40_000 * k * 256 / PLACES205_TRAIN, 4) for k in (1, 2, 3))
DEFAULTS = {"scale": 1.0, "imagefolder": None, "checkpoint": "random:resnet18", "views": 14, "seeds": [0, 1, 2],
            "image_size": 112, "resize": 128, "batch_size": 32, "layers": None, "vissl": False, "val_split": "val",
            "device": "cuda" if torch.cuda.is_available() else "cpu", "workers": 0}


def variants(args) -> dict[str, list[str]]:
    milestones = ",".join(str(m) for m in FAIR_SSB_MILESTONES)
    out = {
        "augmented": [],
        "center": ["train_views=center"],
        "augmented_fair_ssb_schedule": [f"epochs={FAIR_SSB_EPOCHS:.4f}", f"lr_milestones={milestones}"],
    }
    if args.vissl:
        out["augmented_vissl"] = ["train_augmentation=vissl"]
    return out


def _run(root: Path, dataset: str, cache: Path, work: Path, ckpt, args, overrides: list[str], seed: int):
    task = registry.get_task("places205_linear")
    text = [f"places205_linear.{o}" for o in overrides]
    protocol = apply_overrides({task.name: task.default_protocol("goyal19")}, parse_overrides(text))[task.name]

    def extractor():
        return FeatureExtractor(ckpt.build_trunk(), ckpt.sha256, ckpt.arch, cache=FeatureCache(cache),
                                device=args.device, precision="fp32", batch_size=64, workers=args.workers,
                                progress=False)

    ctx = TaskContext(task=task.name, checkpoint=ckpt, preset="goyal19", protocol=protocol, data_root=root,
                      out_dir=work, extractor_factory=extractor, device=args.device, seed=seed,
                      layers=args.layers, progress=False, cache_dir=cache)
    t0 = time.perf_counter()
    records = task.run(ctx)
    return {r.layer: r.value for r in records if r.metric == "top1"}, records[0].params, time.perf_counter() - t0


def _stats(values: list[float]) -> dict[str, float]:
    return {"mean": round(statistics.mean(values), 2),
            "std": round(statistics.stdev(values), 2) if len(values) > 1 else 0.0}


def measure(args) -> dict:
    """Every variant on one dataset (missing attributes of ``args`` take ``DEFAULTS``)."""
    for key, value in DEFAULTS.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    ckpt = load_checkpoint(args.checkpoint, seed=0)
    base = [f"image_size={args.image_size}", f"resize={args.resize}", f"batch_size={args.batch_size}",
            f"augmented_views={args.views}"]
    table = variants(args)
    with tempfile.TemporaryDirectory(prefix="fidelity_linear_") as tmp:
        tmp = Path(tmp)
        if args.imagefolder:
            root, dataset, data_name = Path(args.imagefolder).parent, "imagefolder", str(args.imagefolder)
            base += ["dataset=imagefolder", f"data_path={Path(args.imagefolder).name}", f"val_split={args.val_split}"]
        else:
            from evalsuite.data.synth_places import write_places205

            root, dataset = tmp / "data", "places205"
            write_places205(root, seed=0, scale=args.scale, image_size=96)
            data_name = f"synthetic places205 (evalsuite.data.synth_places, scale {args.scale}, 96 px)"
        top1: dict[str, dict[str, list[float]]] = {name: {} for name in table}
        seconds: dict[str, float] = dict.fromkeys(table, 0.0)
        params: dict[str, Any] = {}
        for seed in args.seeds:
            for name, changes in table.items():
                values, p, secs = _run(root, dataset, tmp / "cache", tmp / f"out_{name}_{seed}", ckpt, args,
                                       base + changes, seed)
                seconds[name] += secs
                params[name] = {k: p[k] for k in ("num_train", "num_val", "num_classes", "augmentation",
                                                  "views_extracted", "total_iterations", "epochs")}
                for tap, v in values.items():
                    top1[name].setdefault(tap, []).append(v)
    taps = list(top1["augmented"])
    rows = []
    for tap in taps:
        row: dict[str, Any] = {"tap": tap}
        for name in table:
            row[name] = _stats(top1[name][tap])
        for name in table:
            if name != "augmented":  # paired by seed: same data, trunk and seed
                diffs = [a - b for a, b in zip(top1[name][tap], top1["augmented"][tap])]
                row[f"{name}_minus_augmented"] = _stats(diffs)
        rows.append(row)
    best = {name: max(statistics.mean(v) for v in top1[name].values()) for name in table}
    return {"data": data_name, "checkpoint": args.checkpoint, "preset": "goyal19", "overrides": base,
            "variants": table, "seeds": list(args.seeds), "device": args.device, "rows": rows,
            "best_tap_top1": {k: round(v, 2) for k, v in best.items()},
            "seconds": {k: round(v, 1) for k, v in seconds.items()}, "params": params, "top1_by_seed": top1}


def _print(result: dict) -> None:
    names = list(result["variants"])
    print(f"places205_linear fidelity on {result['data']} ({result['checkpoint']}, seeds {result['seeds']}, "
          f"{result['device']}); goyal19 + {' '.join(result['overrides'])}")
    print("top-1 % mean +- std over seeds; differences paired by seed")
    print(f"{'tap':<7}" + "".join(f"{n:>30}" for n in names))
    for r in result["rows"]:
        cells = [f"{r[n]['mean']:.2f} +- {r[n]['std']:.2f}" for n in names]
        print(f"{r['tap']:<7}" + "".join(f"{c:>30}" for c in cells))
        for n in names[1:]:
            d = r[f"{n}_minus_augmented"]
            print(f"{'':<7}{n} - augmented: {d['mean']:+.2f} +- {d['std']:.2f}")
    print(f"best tap: {result['best_tap_top1']}; seconds: {result['seconds']}")


def main(argv=None) -> int:
    ap = arg_parser(__doc__)
    ap.add_argument("--scale", type=float, help="synthetic Places205 images per class x this (30 train, 10 val)")
    ap.add_argument("--imagefolder", help="an ImageFolder root with train/ and val/ instead of the synthetic set")
    ap.add_argument("--val-split", help="the --imagefolder split to score (default val)")
    ap.add_argument("--checkpoint")
    ap.add_argument("--views", type=int, help="augmented views K")
    ap.add_argument("--seeds", type=int, nargs="+")
    ap.add_argument("--image-size", type=int)
    ap.add_argument("--resize", type=int)
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--layers", nargs="+")
    ap.add_argument("--vissl", action="store_true", default=None, help="also VISSL's augmentation")
    ap.add_argument("--workers", type=int, help="data-loader workers of the extraction")
    return run_cli(ap, argv, measure, _print, "fidelity_linear")


if __name__ == "__main__":
    raise SystemExit(main())
