"""Fidelity of surface_normals: the effect of ``codebook_decode=hard`` (ours, kept as an option) against the
reference's soft decoding (imisra/semantic-segmentation-pytorch ``normals_evaluation_utils.py``).

For each seed one head is trained (the quick preset, i.e. goyal19 with a short schedule, at the reference's scales
relative to the frame size; the protocol is in the output) on a synthetic NYUv2
(``evalsuite.data.render_nyu.write_nyuv2``), and the same outputs are decoded both ways on
- the synthetic test split, and
- the real NYUv2 frame of ``tests/fixtures/nyuv2_mini`` (Ladicky's normals, every pixel valid: the fixture has no
  ``depthValid``), its image resized back to the 480x640 of its normals and both shrunk to the synthetic size:
  a head trained on synthetic rooms scored on a real frame, so only the hard-soft difference means something.
The k-means codebook's mean quantisation angle on each set bounds what hard decoding can reach.

    python -m benchmarks.fidelity.normals [--seeds 0 1] [--n-train 32] [--n-test 8] [--height 48] [--width 64]
                                          [--epochs 8] [--iters-per-epoch 4] [--arch resnet18]

Writes benchmarks/out/fidelity_normals.json.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

import tasks.surface_normals.task as sn
from benchmarks.fidelity import arg_parser, run_cli
from evalsuite.checkpoints import load_checkpoint
from evalsuite.data import open_dataset
from evalsuite.data.nyuv2 import decode_normal_png, unit_mask
from evalsuite.data.render_nyu import write_nyuv2
from tasks.surface_normals import codebook as codebook_lib
from tasks.surface_normals.dense_heads import FrozenTrunkDenseModel
from tasks.surface_normals.metrics import angular_errors_deg

REPO = Path(__file__).resolve().parents[2]
FIXTURE = REPO / "tests" / "fixtures" / "nyuv2_mini" / "sample"
REFERENCE_TRAIN_SIDES, REFERENCE_TEST_SIDE, REFERENCE_HEIGHT = (300, 375, 450, 525, 600), 450, 480
DEFAULTS = {"seeds": [0, 1], "n_train": 32, "n_test": 8, "height": 48, "width": 64, "epochs": 8,
            "iters_per_epoch": 4, "batch_size": 8, "arch": "resnet18", "device": "cpu"}
METRICS = ("median_angle_error_deg", "mean_angle_error_deg", "pct_within_11.25deg", "pct_within_30deg")


class FixtureFrame:
    """The fixture's real frame as a one-sample NYUv2 split at (height, width)."""

    split, ids = "test", ["nyuv2_mini"]

    def __init__(self, height: int, width: int):
        normals = decode_normal_png(np.asarray(Image.open(FIXTURE / "normal.png").convert("RGB")))
        h0, w0 = normals.shape[:2]
        image = Image.open(FIXTURE / "image.png").convert("RGB").resize((w0, h0), Image.BILINEAR)
        self.image = image.resize((width, height), Image.BILINEAR)
        rows, cols = sn.nearest_index(h0, height), sn.nearest_index(w0, width)
        self.normal = normals[np.ix_(rows, cols)]
        self.root = FIXTURE

    def __len__(self) -> int:
        return 1

    def load_image(self, i: int) -> Image.Image:
        return self.image

    def normals(self, i: int) -> np.ndarray:
        return self.normal

    def valid_mask(self, i: int) -> np.ndarray:
        return unit_mask(self.normal)


def protocol(args):
    """The quick preset (goyal19 with a short schedule) at the reference's scales relative to ``args.height``."""
    def rel(side: int) -> int:
        return max(8, round(side * args.height / REFERENCE_HEIGHT))

    return sn.task.default_protocol("quick").replace(
        train_short_sides=tuple(rel(s) for s in REFERENCE_TRAIN_SIDES), test_short_side=rel(REFERENCE_TEST_SIDE),
        max_long_side=round(1000 * args.height / REFERENCE_HEIGHT), epochs=args.epochs,
        iters_per_epoch=args.iters_per_epoch, batch_size=args.batch_size)


def quantisation(ds, codebook: np.ndarray) -> float:
    """Mean angle between the valid normals of ``ds`` and their nearest codebook entry: hard decoding's floor."""
    x = np.concatenate([ds.normals(i)[ds.valid_mask(i)] for i in range(len(ds))]).astype(np.float64)
    return round(float(angular_errors_deg(codebook[codebook_lib.assign(x, codebook)], x).mean()), 3)


def one_seed(seed: int, train, test_sets: dict[str, Any], args) -> dict[str, Any]:
    p = protocol(args)
    cfg = sn.TrainConfig.from_protocol(p, seed=seed)
    norm = sn._normalisation({})
    torch.manual_seed(seed)
    model = FrozenTrunkDenseModel(load_checkpoint(f"random:{args.arch}", seed=seed).build_trunk(), p.freeze_through,
                                  cfg.num_outputs, output_stride=p.output_stride, head_channels=p.head_channels,
                                  bins=p.psp_bins, dropout=p.dropout, bn_momentum=p.bn_momentum)
    t0 = time.perf_counter()
    fit = sn.train_dense(model, sn.load_split(train, cfg.unit_tolerance, progress=False), cfg, norm,
                         device=args.device, progress=False)
    out: dict[str, Any] = {"train_s": round(time.perf_counter() - t0, 1), "loss_final": fit.losses[-1]}
    for name, ds in test_sets.items():
        scores = sn.evaluate(model, ds, cfg, norm, fit.codebook, device=args.device, progress=False,
                             decodes=("soft", "hard"))
        row = {f"{m}_{d}": round(scores[d][m], 3) for m in METRICS for d in ("soft", "hard")}
        row.update({f"{m}_hard_minus_soft": round(scores["hard"][m] - scores["soft"][m], 3) for m in METRICS})
        row["quantisation_deg"] = quantisation(ds, fit.codebook)
        row["valid_pixels"] = scores["soft"]["valid_pixels"]
        out[name] = row
    return out


def measure(args) -> dict:
    """Hard minus soft decoding of the same trained heads, per seed and on average (missing args: ``DEFAULTS``)."""
    for key, value in DEFAULTS.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    with tempfile.TemporaryDirectory(prefix="fidelity_normals_") as tmp:
        root = write_nyuv2(Path(tmp), seed=0, n_train=args.n_train, n_test=args.n_test, height=args.height,
                           width=args.width)
        train = open_dataset("nyuv2", root, "train")
        tests = {"synthetic_nyuv2": open_dataset("nyuv2", root, "test"),
                 "real_nyuv2_fixture": FixtureFrame(args.height, args.width)}
        seeds = {seed: one_seed(seed, train, tests, args) for seed in args.seeds}
    keys = seeds[args.seeds[0]]
    mean = {name: {k: round(float(np.mean([s[name][k] for s in seeds.values()])), 3) for k in keys[name]}
            for name in tests}
    return {"checkpoint": f"random:{args.arch} (seed = run seed)", "protocol": protocol(args).to_dict(),
            "args": vars(args).copy(), "per_seed": seeds, "mean_over_seeds": mean}


def _print(result: dict) -> None:
    for name, row in result["mean_over_seeds"].items():
        print(f"{name} ({row['valid_pixels']:.0f} valid px, mean of {len(result['per_seed'])} seeds; "
              f"k-means quantisation {row['quantisation_deg']:.2f} deg)")
        for m in METRICS:
            print(f"  {m:24s} soft {row[f'{m}_soft']:8.3f}  hard {row[f'{m}_hard']:8.3f}  "
                  f"hard - soft {row[f'{m}_hard_minus_soft']:+8.3f}")


def main(argv=None) -> int:
    ap = arg_parser(__doc__)
    ap.add_argument("--seeds", type=int, nargs="+")
    ap.add_argument("--n-train", type=int)
    ap.add_argument("--n-test", type=int)
    ap.add_argument("--height", type=int)
    ap.add_argument("--width", type=int)
    ap.add_argument("--epochs", type=int)
    ap.add_argument("--iters-per-epoch", type=int)
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--arch")
    return run_cli(ap, argv, measure, _print, "fidelity_normals")


if __name__ == "__main__":
    raise SystemExit(main())
