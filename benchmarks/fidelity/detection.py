"""Fidelity of detection: the effect of the options goyal19 leaves beside the reference.

- Pooler: Detectron's RoIPoolF (goyal19's ``pooler=roi_pool``) against RoIAlign (``roi_align``, kept as an option
  and used by ``quick``): the same random trunk and head initialisation trained both ways (the quick preset,
  sliding-window proposals) on the synthetic VOC the suite writes, scored at the reference's test score threshold
  0.05 and at the former 0.
- Proposals: OpenCV selective search (fast) on the real VOC2007 images of ``tests/fixtures`` at full resolution
  (goyal19) and downscaled to a 500 px longer side (the former setting): seconds per image, boxes per image and
  the recall of the test images' non-difficult objects by the first ``proposal_limit`` boxes.

    python -m benchmarks.fidelity.detection [--seeds 0 1] [--scale 0.25] [--arch resnet18] [--iters 300]

Writes benchmarks/out/fidelity_detection.json.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import tasks.detection.task as det
from benchmarks.fidelity import arg_parser, run_cli
from evalsuite.data import open_dataset
from evalsuite.data.synth_voc import write_voc2007
from evalsuite.data.voc import VOC_CLASSES
from evalsuite.trunks import build_trunk
from tasks.detection import proposals as props
from tasks.detection import voc_eval as deval
from tasks.detection.fast_rcnn import ImageRecord, TorchvisionFastRCNN, prepare_proposals

REPO = Path(__file__).resolve().parents[2]
FIXTURE = REPO / "tests" / "fixtures" / "voc2007_mini" / "VOCdevkit" / "VOC2007"
DEFAULTS = {"seeds": [0, 1], "scale": 0.25, "arch": "resnet18", "iters": None, "device": "cpu"}
POOLERS = ("roi_pool", "roi_align")
THRESHOLDS = (0.05, 0.0)


def scores(gts, preds, p) -> dict[str, float]:
    """VOC07 mAP and class-agnostic AP (percent) of one test pass."""
    dets = det.detections_from(preds)
    per_class = deval.evaluate_detections(dets, gts, len(VOC_CLASSES), p.iou_thresh, p.ap_method)
    agnostic = deval.class_agnostic_ap(dets, gts, p.nms, p.iou_thresh, p.ap_method)
    return {"mAP": round(100 * deval.mean_ap(per_class), 2), "AP_class_agnostic": round(100 * agnostic, 2),
            "detections": int(len(dets.score))}


def pooler_runs(root: Path, args) -> dict[str, Any]:
    """Train each pooler from the same start per seed; score each trained head at both score thresholds."""
    voc = root / "VOCdevkit" / "VOC2007"
    train, test = open_dataset("voc2007", voc, "trainval"), open_dataset("voc2007", voc, "test")
    base = det.task.default_protocol("quick").replace(proposals="sliding_window",
                                                      proposal_cache=str(root / "proposals"))
    if args.iters is not None:
        base = base.replace(max_iter=args.iters)
    train_recs, _ = det.build_records(train, base, train=True)
    test_recs, _ = det.build_records(test, base, train=False)
    gts = [det.ground_truth(test, i) for i in range(len(test_recs))]
    out: dict[str, Any] = {}
    for seed in args.seeds:
        for pooler in POOLERS:
            p = base.replace(pooler=pooler)
            torch.manual_seed(seed)  # the same head initialisation for both poolers
            be = TorchvisionFastRCNN(build_trunk(args.arch, seed=seed), len(VOC_CLASSES), det.model_config(p),
                                     device=args.device)
            t = time.perf_counter()
            be.fit(train_recs, det.train_config(p, seed))
            row: dict[str, Any] = {"train_seconds": round(time.perf_counter() - t, 1)}
            for thresh in THRESHOLDS:
                preds = be.predict(test_recs, det.test_config(p.replace(score_thresh=thresh)))
                row[f"score_thresh_{thresh}"] = scores(gts, preds, p)
            out.setdefault(f"seed{seed}", {})[pooler] = row
    return {"protocol": base.to_dict(), "train_images": len(train_recs), "test_images": len(test_recs),
            "per_seed": out, "mean_over_seeds": _mean(out)}


def _mean(per_seed: dict[str, Any]) -> dict[str, Any]:
    rows = list(per_seed.values())
    return {pooler: {f"score_thresh_{t}": {k: round(float(np.mean([r[pooler][f"score_thresh_{t}"][k] for r in rows])),
                                                    2) for k in ("mAP", "AP_class_agnostic")} for t in THRESHOLDS}
            for pooler in POOLERS}


def search(ds, max_side: int | None) -> tuple[list[np.ndarray], float]:
    """Every image's selective-search boxes (as the task filters them) and the seconds per image."""
    t, boxes = time.perf_counter(), []
    for i in range(len(ds)):
        a = ds.annotations(i)
        raw = props.compute("selective_search", ds.load_image(i), {"mode": "fast", "max_side": max_side})
        boxes.append(prepare_proposals(raw, a["width"], a["height"], None))
    return boxes, (time.perf_counter() - t) / len(ds)


def proposal_runs(limit: int = 2000) -> dict[str, Any]:
    """Selective search on the fixture's real VOC2007 images at full resolution and at a 500 px longer side."""
    out: dict[str, Any] = {}
    for split in ("trainval", "test"):
        ds = open_dataset("voc2007", FIXTURE, split)
        sides = [max(ds.annotations(i)["width"], ds.annotations(i)["height"]) for i in range(len(ds))]
        runs = {max_side: search(ds, max_side) for max_side in (None, 500)}
        for max_side, (boxes, seconds) in runs.items():
            row: dict[str, Any] = {"seconds_per_image": round(seconds, 2), "images": len(ds),
                                   "largest_image_side": max(sides),
                                   "boxes_per_image": round(float(np.mean([len(b) for b in boxes])), 1)}
            if split == "test":
                recs = [ImageRecord(ds.ids[i], 0, 0, det.gt_boxes(ds, i)[1], np.zeros(0), b[:limit])
                        for i, b in enumerate(boxes)]
                row[f"recall_first_{limit}"] = det.proposal_recall(recs, [det.ground_truth(ds, i)
                                                                          for i in range(len(ds))])
            out[f"{split}_max_side_{max_side or 'full'}"] = row
        out[f"{split}_same_boxes_full_and_500"] = all(np.array_equal(a, b) for a, b in zip(runs[None][0], runs[500][0]))
    return out


def measure(args) -> dict:
    """Poolers (and score thresholds) on synthetic VOC, selective search settings on real VOC images (missing args:
    ``DEFAULTS``)."""
    for key, value in DEFAULTS.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    with tempfile.TemporaryDirectory(prefix="fidelity_detection_") as tmp:
        root = Path(tmp)
        write_voc2007(root, seed=0, scale=args.scale)
        poolers = pooler_runs(root, args)
    return {"checkpoint": f"random:{args.arch} (seed = run seed)", "args": vars(args).copy(), "poolers": poolers,
            "selective_search": proposal_runs()}


def _print(result: dict) -> None:
    for pooler, row in result["poolers"]["mean_over_seeds"].items():
        for t, s in row.items():
            print(f"{pooler:9s} {t:18s} mAP {s['mAP']:6.2f}  class-agnostic AP {s['AP_class_agnostic']:6.2f}")
    for name, row in result["selective_search"].items():
        print(f"{name:28s} {row}")


def main(argv=None) -> int:
    ap = arg_parser(__doc__)
    ap.add_argument("--seeds", type=int, nargs="+")
    ap.add_argument("--scale", type=float, help="synthetic VOC size (0.25: 50 trainval + 50 test images)")
    ap.add_argument("--arch")
    ap.add_argument("--iters", type=int, help="training iterations (default: the quick preset's)")
    return run_cli(ap, argv, measure, _print, "fidelity_detection")


if __name__ == "__main__":
    raise SystemExit(main())
