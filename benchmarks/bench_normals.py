"""Surface-normal training and evaluation speed at the ``quick`` preset, side by side in one run.

Measured on ray-cast synthetic NYUv2 scenes (``write_nyuv2``) with a random trunk, at the quick preset's
multi-scale sizes (the reference's shorter sides relative to a 480-pixel frame, applied to ``--height``):
- training steps/s with the frozen stages' outputs computed once per image and scale and reused
  ("cached") versus recomputed for every batch ("recomputed"), for the goyal19 split (res5 + head
  trained, ``freeze_through=res4``) and for a head on a fully frozen trunk (``freeze_through=res5``);
  the one-off cost of filling the cache is reported separately and included in the end-to-end time; a ViT
  (``--arch vit_tiny_patch16``) has one row, probe3d's DPT head on its frozen blocks;
- evaluation images/s (forward, upsampling to the ground-truth resolution, decoding, pooled metrics).

    python -m benchmarks.bench_normals [--arch resnet18] [--n-train 32] [--n-test 16]
                                       [--height 48] [--width 64] [--epochs 3] [--threads 1]
                                       (iterations: epochs x the quick preset's iters_per_epoch)

Prints a table and writes benchmarks/out/bench_normals.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import torch

import tasks.surface_normals.task as sn
from benchmarks.common import peak_rss_mb, write_json
from evalsuite.checkpoints import load_checkpoint
from evalsuite.console import HelpFormatter
from evalsuite.data import open_dataset
from evalsuite.data.synthetic import write_nyuv2


def build(arch: str, freeze_through: str | None, cfg: sn.TrainConfig, p: sn.SurfaceNormalsProtocol) -> sn.DenseModel:
    """A ResNet frozen through ``freeze_through``, or a ViT (None: its whole trunk is frozen) with its head."""
    torch.manual_seed(0)
    q = p if freeze_through is None else p.replace(freeze_through=freeze_through)
    return sn.build_model(load_checkpoint(f"random:{arch}", seed=0).build_trunk(), q, cfg.num_outputs)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--n-train", type=int, default=32)
    ap.add_argument("--n-test", type=int, default=16)
    ap.add_argument("--height", type=int, default=48)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    p = sn.task.default_protocol("quick")
    p = p.replace(train_short_sides=tuple(round(s * args.height / 48) for s in p.train_short_sides),
                  test_short_side=round(p.test_short_side * args.height / 48),
                  max_long_side=round(p.max_long_side * args.height / 48), epochs=args.epochs)
    patch = sn.vit_patch(args.arch)
    cfg = sn.TrainConfig.from_protocol(p, seed=0, patch=patch)
    norm = sn._normalisation({})
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = write_nyuv2(Path(tmp), seed=0, n_train=args.n_train, n_test=args.n_test, height=args.height,
                           width=args.width)
        train, test = open_dataset("nyuv2", root, "train"), open_dataset("nyuv2", root, "test")
        t0 = time.perf_counter()
        data = sn.load_split(train, cfg.unit_tolerance, progress=False)
        load_s = time.perf_counter() - t0
        iters = cfg.total_iterations
        for freeze in (None,) if patch else ("res4", "res5"):
            timing = {}
            for cached in (True, False):
                model = build(args.arch, freeze, cfg, p)
                cache_s = 0.0
                if cached:  # time the one-off cache fill on its own
                    t0 = time.perf_counter()
                    sn.frozen_cache(model.eval(), data, dataclasses.replace(cfg, cache_frozen_max_gb=float("inf")),
                                    norm, "cpu")
                    cache_s = time.perf_counter() - t0
                t0 = time.perf_counter()
                # the cache is used when the frozen outputs fit in cache_frozen_max_gb: all or nothing here
                run_cfg = dataclasses.replace(cfg, cache_frozen_max_gb=float("inf") if cached else 0.0)
                fit = sn.train_dense(model, data, run_cfg, norm, progress=False)
                total_s = time.perf_counter() - t0
                train_s = total_s - cache_s
                timing[cached] = {"steps_per_s": iters / train_s, "train_s": train_s, "cache_fill_s": cache_s,
                                  "end_to_end_s": total_s, "loss_final": fit.losses[-1]}
                if not cached:
                    t0 = time.perf_counter()
                    scores = sn.evaluate(model, test, cfg, norm, fit.codebook, progress=False)
                    eval_s = time.perf_counter() - t0
                    timing["eval_images_per_s"] = len(test) / eval_s
                    timing["median_angle_error_deg"] = scores["median_angle_error_deg"]
            rows.append({"freeze_through": freeze, "layer": model.layer_name, "iterations": iters,
                         "cached": timing[True], "recomputed": timing[False],
                         "speedup_steps_per_s": timing[True]["steps_per_s"] / timing[False]["steps_per_s"],
                         "speedup_end_to_end": timing[False]["end_to_end_s"] / timing[True]["end_to_end_s"],
                         "eval_images_per_s": timing["eval_images_per_s"],
                         "median_angle_error_deg": timing["median_angle_error_deg"]})

    print(f"surface normals, {args.arch}, {args.height}x{args.width}, batch {cfg.batch_size}, "
          f"{args.n_train} train / {args.n_test} test, {args.threads} thread(s); loading the split {load_s:.2f}s")
    print(f"{'layer':14s} {'cached st/s':>12s} {'recomp st/s':>12s} {'x steps':>8s} {'x e2e':>7s} {'eval img/s':>11s}")
    for r in rows:
        print(f"{r['layer']:14s} {r['cached']['steps_per_s']:12.2f} {r['recomputed']['steps_per_s']:12.2f} "
              f"{r['speedup_steps_per_s']:8.2f} {r['speedup_end_to_end']:7.2f} {r['eval_images_per_s']:11.1f}")
    write_json("bench_normals", {"args": vars(args), "load_split_s": load_s, "rows": rows,
                                 "peak_rss_mb": peak_rss_mb()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
