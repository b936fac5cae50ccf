"""Object detection transfer: Fast R-CNN on VOC07 (or VOC07+12) trainval, evaluated on VOC07 test.

The Goyal et al. (2019) benchmark (fair_self_supervision_benchmark,
``configs/benchmark_tasks/object_detection_frozen/voc07/fast_rcnn_R-50-C4_with_ss_proposals_trainval.yaml``,
run with Detectron): Fast R-CNN, ResNet-50-C4 initialised from the checkpoint, selective-search
proposals, res5 RoI head. Model, sampler, losses and test-time post-processing live in
``fast_rcnn.py``; the VOC metric in ``voc_eval.py``; proposals in ``proposals.py``.

Presets:

- ``goyal19``: ``FREEZE_AT: 4`` (stem and res2..res4 frozen, "training RoI heads only"), BN frozen
  everywhere, SGD lr 0.002 (2 GPUs x 2 images: 4 images per iteration), x0.1 at 22k, stop at 30k
  (VOC07+12: 66k / 80k), Detectron defaults otherwise: 64 RoIs per image, 25% foreground at
  IoU >= 0.5, background IoU in [0, 0.5), momentum 0.9, weight decay 1e-4 (not on biases, which
  get 2x lr), 500 linear warm-up iterations from lr/3, horizontal flips, shortest side 600 /
  longest at most 1000, at most 2000 proposals per image, RoIAlign 14x14, test NMS 0.3, score
  threshold 0 (the benchmark's setting: every class score is kept, so low-confidence detections
  still count toward recall; Detectron's own default ``TEST.SCORE_THRESH`` is 0.05, available as
  ``--set detection.score_thresh=0.05``), at most 100 detections per image. Metric: VOC07
  11-point AP at IoU 0.5 per class and its mean over the 20 classes.
- ``vissl``: the same detector with every layer fine-tuned (``freeze_at 0``, BN still frozen),
  the setting of the "all layers fine-tuned" rows of the published tables.
- ``quick``: 128 px images (longest 192), 2 images x 32 RoIs pooled to 4x4, 300 iterations, lr 0.01
  (x0.1 at 240, 20 warm-up iterations), at most 200 selective-search proposals per image
  (``proposals=sliding_window`` skips the search); same freezing as goyal19. For CPU and CI; numbers
  are not comparable to published ones, but they rank trunks: on the default synthetic VOC-like data
  (112 px images, 20 shape x texture x parts classes) a random ResNet-18 reaches ~4 mAP (untrained head
  ~0) and ~20 class-agnostic AP: the boxes are found, the classes are not told apart (a linear probe on
  its RoI features classifies 9% of held-out objects, chance 5%), while a ResNet-18 pretrained 3 minutes
  (supervised, on ``write_object_imagefolder``) reaches ~15 mAP from the same 300 iterations
  (``benchmarks/bench_detection.py --quality-checkpoints``). lr 0.02 was ~1 mAP better on those two
  trunks but diverged on another pretrained one (classification loss 1.8 -> 5.0, above chance), as
  0.04 did on a SwAV checkpoint; 0.01 trained every trunk tried. On data whose classes a random trunk
  can separate (solid coloured shapes, written by ``tests/test_detection.py``) the same detector goes from
  0 to ~60 mAP in 150 iterations.

``freeze_at`` (0..4), ``train_sets``, ``proposals`` and every solver field can be overridden with ``--set``.

VOC07+12: ``--set detection.train_sets=voc07+12`` (= ``["voc2007:trainval", "voc2012:trainval"]``) trains on
both trainval sets (VOC2012 read from ``<data root>/VOCdevkit/VOC2012``, or ``data_paths.voc2012``) and tests on
VOC2007 test; the benchmark's 07+12 schedule is ``--set detection.max_iter=80000 --set detection.steps=[66000]``
(not changed automatically). The sets used and their image counts are recorded in params.

Deviations, recorded in every result's params: selective search is OpenCV's re-implementation (fast
mode) rather than the MATLAB boxes of Detectron's published proposal files (which ``proposals=file`` with
``proposal_files={"voc2007:trainval": PKL, "voc2007:test": PKL}`` reads as they are: ``tasks.detection.proposals``);
images are normalised with the checkpoint's mean/std rather than Caffe2's BGR pixel means; RoIAlign uses
``aligned=True``.

Bad input: training images whose annotations have no (non-difficult) box are skipped (count recorded);
boxes reaching outside the image are clipped to it; a box that is empty after clipping raises BadData
naming the annotation file; an image with no proposals is trained on its ground-truth boxes only and
yields no detections at test time; a checkpoint without res5 weights (or a non-ResNet trunk) is refused.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np

from evalsuite.errors import BadData, UserError
from evalsuite.protocols import check_preset
from evalsuite.results import Result
from evalsuite.task import TaskContext
from tasks.detection import proposals as props
from tasks.detection import voc_eval as deval
from tasks.detection.fast_rcnn import (
    ImageRecord,
    ModelConfig,
    SamplerConfig,
    TestConfig,
    TrainConfig,
    config_dict,
    get_backend,
    prepare_proposals,
    xml_to_continuous,
)

SELECTIVE_SEARCH_NOTE = ("OpenCV ximgproc selective search (fast mode), not Detectron's published MATLAB "
                         "selective_search_msra_voc_2007_*.pkl boxes")


class DetectionTask:
    name = "detection"
    description = "Fast R-CNN (ResNet-C4, res5 head) on VOC07 trainval, VOC07 test 11-point mAP@0.5"

    def default_protocol(self, preset: str) -> dict[str, Any]:
        check_preset(preset)
        p: dict[str, Any] = {
            "backend": "torchvision",
            "train_sets": ["voc2007:trainval"],
            "test_set": "voc2007:test",
            "data_path": None,
            "data_paths": {},
            "train_use_difficult": False,
            "freeze_at": 4,
            "pooler": "roi_align",
            "pool_size": 14,
            "cls_agnostic_bbox_reg": False,
            "proposals": "selective_search",
            "proposal_mode": "fast",
            "proposal_max_side": 500,
            "proposal_limit": 2000,
            "proposal_cache": None,
            "proposal_files": {},
            "max_iter": 30000,
            "lr": 0.002,
            "steps": [22000],
            "gamma": 0.1,
            "momentum": 0.9,
            "weight_decay": 1e-4,
            "bias_double_lr": True,
            "bias_weight_decay": False,
            "warmup_iters": 500,
            "warmup_factor": 1.0 / 3,
            "ims_per_batch": 4,
            "rois_per_image": 64,
            "fg_fraction": 0.25,
            "fg_thresh": 0.5,
            "bg_thresh_hi": 0.5,
            "bg_thresh_lo": 0.0,
            "train_scales": [600],
            "train_max_size": 1000,
            "flip": True,
            "smooth_l1_beta": 1.0,
            "checkpoint_period": 500,
            "test_scale": 600,
            "test_max_size": 1000,
            "nms": 0.3,
            "score_thresh": 0.0,
            "max_dets": 100,
            "iou_thresh": 0.5,
            "ap_method": "voc07",
            "iou_compare": ">",
            "extra_metrics": True,
            "max_train_images": None,
            "max_test_images": None,
        }
        if preset == "vissl":
            p["freeze_at"] = 0
        elif preset == "quick":
            p.update({"proposal_limit": 200, "pool_size": 4, "max_iter": 300, "lr": 0.01,
                      "steps": [240], "warmup_iters": 20, "ims_per_batch": 2, "rois_per_image": 32,
                      "train_scales": [128], "train_max_size": 192, "test_scale": 128, "test_max_size": 192,
                      "checkpoint_period": 100})
        return p

    # ------------------------------------------------------------------ run

    def run(self, ctx: TaskContext) -> list[Result]:
        p = ctx.protocol
        train_names = expand_train_sets(p["train_sets"])
        train_sets = [_parse_set(s) for s in train_names]
        test_kind, test_split = _parse_set(p["test_set"])
        datasets = [ctx.open_dataset(k, s, dataset_path(p, k)) for k, s in train_sets]
        test = ctx.open_dataset(test_kind, test_split, dataset_path(p, test_kind))
        classes = list(getattr(test, "classes", []))
        if not hasattr(test, "annotations") or not classes:
            raise BadData(f"{test_kind} has no box annotations", test.root)
        for d in datasets:
            if list(d.classes) != classes:
                raise BadData("training and test sets have different class lists", d.root)
        missing_res5 = [k for k in getattr(ctx.checkpoint.report, "missing", []) if k.startswith("layer4.")]
        if missing_res5:
            raise UserError(f"checkpoint {ctx.checkpoint.spec} has no res5 weights ({len(missing_res5)} layer4 keys "
                            "missing); the Fast R-CNN C4 head is the trunk's res5")

        # proposals live under the run's cache directory unless the protocol names a cache of its own
        run_cache = str(ctx.cache_dir / "proposals") if ctx.cache_dir else None
        p = {**p, "proposal_cache": p["proposal_cache"] or run_cache}
        train_records, skipped, per_set = [], 0, {}
        for name, d in zip(train_names, datasets):
            recs, sk = build_records(d, p, train=True, limit=p["max_train_images"], progress=ctx.progress,
                                     set_name=name)
            train_records += recs
            skipped += sk
            per_set[name] = len(recs)
        if not train_records:
            raise BadData("no training image has a usable box", datasets[0].root)
        test_records, _ = build_records(test, p, train=False, limit=p["max_test_images"], progress=ctx.progress,
                                        set_name=p["test_set"])
        gts = [ground_truth(test, i) for i in range(len(test_records))]

        meta = ctx.checkpoint.metadata or {}
        normalize = {**(meta.get("normalize") or {}), "input_space": meta.get("input_space", "rgb")}
        model_cfg = ModelConfig(pooler=p["pooler"], pool_size=int(p["pool_size"]), freeze_at=int(p["freeze_at"]),
                                cls_agnostic_bbox_reg=bool(p["cls_agnostic_bbox_reg"]))
        backend = get_backend(p["backend"], ctx.trunk, len(classes), model_cfg, device=ctx.device, normalize=normalize)
        train_cfg = train_config(p, ctx.seed)
        test_cfg = test_config(p)
        fingerprint = _fingerprint(ctx, [d.fingerprint() for d in datasets], train_cfg, model_cfg, len(train_records))
        state = ctx.out_dir / "detection_state" / f"{fingerprint[:16]}.pt"
        fit = backend.fit(train_records, train_cfg, state_path=state, fingerprint=fingerprint, progress=ctx.progress)
        preds = backend.predict(test_records, test_cfg, progress=ctx.progress)
        dets = detections_from(preds)

        per_class = deval.evaluate_detections(dets, gts, len(classes), p["iou_thresh"], p["ap_method"],
                                              p["iou_compare"])
        layer = layer_name(int(p["freeze_at"]))
        params = {
            "arch": ctx.checkpoint.arch, "num_classes": len(classes), "num_train_images": len(train_records),
            "train_sets_used": train_names, "num_train_images_per_set": per_set,
            "train_images_without_boxes_skipped": skipped, "num_test_images": len(test_records),
            "num_detections": int(len(dets.score)), "backend": backend.name,
            "solver": config_dict(train_cfg), "test": config_dict(test_cfg), "model": config_dict(model_cfg),
            "iterations_run": fit.iterations, "resumed_from_iteration": fit.resumed_from,
            "train_curve": fit.summary(), "device": ctx.device,
            "proposal_method": p["proposals"],
            "proposal_params": props.method_params(p["proposals"], _pp(p, p["test_set"])),
            "proposal_recall": proposal_recall(test_records, gts),
            "metric_definition": f"{p['ap_method']} AP at IoU {p['iou_compare']} {p['iou_thresh']}, "
                                 "difficult ignored, mean over classes with ground truth",
            "box_coordinates": "VOC XML 1-based inclusive pixels",
        }
        if p["proposals"] == "selective_search":
            params["proposal_note"] = SELECTIVE_SEARCH_NOTE
        fp = test.fingerprint()
        results = [ctx.result(test_kind, test_split, layer, "mAP", 100 * deval.mean_ap(per_class), params=params,
                              note=f"{p['ap_method']} mAP@{p['iou_thresh']}", dataset_fingerprint=fp)]
        for c, ev in zip(classes, per_class):
            value = None if ev.npos == 0 else 100 * ev.ap
            results.append(ctx.result(test_kind, test_split, layer, f"AP/{c}", value, params=params,
                                      note="" if ev.npos else "no ground truth for this class",
                                      dataset_fingerprint=fp))
        if p["extra_metrics"]:
            other = "area" if p["ap_method"] == "voc07" else "voc07"
            extra = deval.mean_ap(deval.evaluate_detections(dets, gts, len(classes), p["iou_thresh"], other,
                                                            p["iou_compare"]))
            results.append(ctx.result(test_kind, test_split, layer, f"mAP_{other}", 100 * extra, params=params,
                                      note=f"{other} AP at IoU {p['iou_thresh']} (extra metric)",
                                      dataset_fingerprint=fp))
            results.append(ctx.result(test_kind, test_split, layer, "mAP_coco_style",
                                      100 * deval.coco_style_ap(dets, gts, len(classes)), params=params,
                                      note="area AP averaged over IoU 0.50:0.05:0.95 (extra metric, not the COCO "
                                           "toolkit)", dataset_fingerprint=fp))
            agn = deval.class_agnostic_ap(dets, gts, p["nms"], p["iou_thresh"], p["ap_method"], p["iou_compare"])
            results.append(ctx.result(test_kind, test_split, layer, "AP_class_agnostic", 100 * agn, params=params,
                                      note=f"{p['ap_method']} AP of the boxes whatever their class (classes merged, "
                                           f"NMS {p['nms']} across classes; extra diagnostic of localisation)",
                                      dataset_fingerprint=fp))
        state.unlink(missing_ok=True)
        return results


# ---------------------------------------------------------------------- helpers


# Shorthands for train_sets (Fast R-CNN / Detectron's names for the VOC training sets).
TRAIN_SET_ALIASES = {"voc07": ["voc2007:trainval"], "voc07+12": ["voc2007:trainval", "voc2012:trainval"],
                     "voc2007+2012": ["voc2007:trainval", "voc2012:trainval"]}


def expand_train_sets(value) -> list[str]:
    """``train_sets`` as a list of ``kind:split``: a list, one ``kind:split`` string, or an alias
    (``voc07+12`` = VOC2007 trainval + VOC2012 trainval)."""
    if isinstance(value, str):
        value = TRAIN_SET_ALIASES.get(value.lower(), [value])
    if not isinstance(value, (list, tuple)) or not value:
        raise UserError(f"detection.train_sets must be a list of kind:split or one of "
                        f"{', '.join(TRAIN_SET_ALIASES)}, got {value!r}")
    out = [s for v in value for s in TRAIN_SET_ALIASES.get(str(v).lower(), [v])]
    return list(dict.fromkeys(out))


def dataset_path(p: dict[str, Any], kind: str) -> str | None:
    """Where a kind's data is: ``data_paths[kind]``, else ``data_path`` (every set), else the data-root layout."""
    paths = p.get("data_paths") or {}
    if not isinstance(paths, dict):
        raise UserError(f"detection.data_paths must map dataset kinds to paths, got {paths!r}")
    if paths.get(kind):
        return str(paths[kind])
    if p.get("data_path"):
        return str(p["data_path"])
    return None  # the data root's layout (evalsuite.task.DATA_LAYOUT)


def _parse_set(s: str) -> tuple[str, str]:
    if not isinstance(s, str) or ":" not in s:
        raise UserError(f"detection data sets are written kind:split (e.g. voc2007:trainval), got {s!r}")
    kind, split = s.split(":", 1)
    return kind, split


def _pp(p: dict[str, Any], set_name: str | None = None) -> dict[str, Any]:
    if p["proposals"] == "file":
        return {"file": (p.get("proposal_files") or {}).get(set_name)}
    return {"mode": p["proposal_mode"], "max_side": p["proposal_max_side"], "max_boxes": p["proposal_limit"]}


def layer_name(freeze_at: int) -> str:
    """How the reference tables name what was trained: finetune_all, finetune_above_conv1, ..._res4."""
    return {0: "finetune_all", 1: "finetune_above_conv1"}.get(freeze_at, f"finetune_above_res{freeze_at}")


def gt_boxes(dataset, i: int) -> tuple[dict[str, Any], np.ndarray]:
    """Annotations of image ``i`` and its boxes in continuous coordinates, clipped to the image."""
    a = dataset.annotations(i)
    src = dataset.annotation_path(i) if hasattr(dataset, "annotation_path") else dataset.root
    b = xml_to_continuous(a["boxes"])
    if len(b) and (np.any(b[:, 2] <= b[:, 0]) or np.any(b[:, 3] <= b[:, 1])):
        raise BadData("a box has xmax < xmin or ymax < ymin", src)
    b[:, 0::2] = b[:, 0::2].clip(0, a["width"])
    b[:, 1::2] = b[:, 1::2].clip(0, a["height"])
    if len(b) and (np.any(b[:, 2] <= b[:, 0]) or np.any(b[:, 3] <= b[:, 1])):
        raise BadData("a box lies entirely outside the image", src)
    return a, b


def ground_truth(dataset, i: int) -> deval.GroundTruth:
    a = dataset.annotations(i)
    return deval.GroundTruth(boxes=np.asarray(a["boxes"], np.float64), labels=np.asarray(a["labels"]),
                             difficult=np.asarray(a["difficult"], bool))


def build_records(dataset, p: dict[str, Any], train: bool, limit: int | None = None, progress: bool = False,
                  set_name: str | None = None) -> tuple[list[ImageRecord], int]:
    """Image records with ground truth and (cached) proposals; training skips images without boxes.
    ``set_name`` (``voc2007:test``) picks the set's file of ``proposal_files`` when ``proposals=file``."""
    cache = props.ProposalCache(p["proposal_cache"], p["proposals"], _pp(p, set_name),
                                dataset_key=dataset.fingerprint())
    n = len(dataset) if limit is None else min(len(dataset), int(limit))
    if progress:
        cache.precompute(_Subset(dataset, n), progress=True)
    records, skipped = [], 0
    for i in range(n):
        a, boxes = gt_boxes(dataset, i)
        keep = np.ones(len(boxes), bool) if (not train or p["train_use_difficult"]) else ~a["difficult"]
        if train and not keep.any():
            skipped += 1
            continue
        proposals = prepare_proposals(cache.get(dataset, i), a["width"], a["height"], p["proposal_limit"])
        records.append(ImageRecord(image_id=dataset.ids[i], width=int(a["width"]), height=int(a["height"]),
                                   boxes=boxes[keep], labels=np.asarray(a["labels"])[keep], proposals=proposals,
                                   load=_loader(dataset, i)))
    return records, skipped


class _Subset:
    def __init__(self, dataset, n: int):
        self.dataset, self.n = dataset, n

    @property
    def ids(self) -> list[str]:
        return self.dataset.ids[: self.n]

    def load_image(self, i: int):
        return self.dataset.load_image(i)


def _loader(dataset, i: int):
    return lambda: dataset.load_image(i)


def proposal_recall(records: list[ImageRecord], gts: list[deval.GroundTruth], thresholds=(0.5, 0.7)
                    ) -> dict[str, float | int]:
    """Fraction of the non-difficult ground-truth boxes that some proposal covers at IoU >= t (test set),
    and the mean number of proposals per image: what the detector can find at best."""
    import torch
    from torchvision.ops import box_iou

    best, counts = [], []
    for rec, g in zip(records, gts):
        counts.append(len(rec.proposals))
        gt = rec.boxes[~g.difficult]
        if not len(gt):
            continue
        if not len(rec.proposals):
            best += [0.0] * len(gt)
            continue
        best += box_iou(torch.from_numpy(gt), torch.from_numpy(rec.proposals)).max(1).values.tolist()
    out: dict[str, float | int] = {f"iou_{t}": round(float(np.mean(np.asarray(best) >= t)), 4) if best else 0.0
                                   for t in thresholds}
    out.update(num_boxes=len(best), mean_proposals=round(float(np.mean(counts)), 1) if counts else 0.0)
    return out


def detections_from(preds) -> deval.Detections:
    from tasks.detection.fast_rcnn import continuous_to_xml

    parts = [deval.Detections(np.full(len(s), i, np.int64), np.asarray(lab, np.int64), np.asarray(s, np.float32),
                              continuous_to_xml(b)) for i, (b, lab, s) in enumerate(preds)]
    return deval.Detections.concat(parts)


def train_config(p: dict[str, Any], seed: int) -> TrainConfig:
    return TrainConfig(
        max_iter=int(p["max_iter"]), lr=float(p["lr"]), steps=tuple(int(s) for s in p["steps"]),
        gamma=float(p["gamma"]),
        momentum=float(p["momentum"]), weight_decay=float(p["weight_decay"]), bias_double_lr=bool(p["bias_double_lr"]),
        bias_weight_decay=bool(p["bias_weight_decay"]), warmup_iters=int(p["warmup_iters"]),
        warmup_factor=float(p["warmup_factor"]), ims_per_batch=int(p["ims_per_batch"]),
        scales=tuple(int(s) for s in p["train_scales"]), max_size=int(p["train_max_size"]), flip=bool(p["flip"]),
        smooth_l1_beta=float(p["smooth_l1_beta"]), checkpoint_period=int(p["checkpoint_period"]), seed=seed,
        sampler=SamplerConfig(rois_per_image=int(p["rois_per_image"]), fg_fraction=float(p["fg_fraction"]),
                              fg_thresh=float(p["fg_thresh"]), bg_thresh_hi=float(p["bg_thresh_hi"]),
                              bg_thresh_lo=float(p["bg_thresh_lo"])),
    )


def test_config(p: dict[str, Any]) -> TestConfig:
    return TestConfig(scale=int(p["test_scale"]), max_size=int(p["test_max_size"]), nms=float(p["nms"]),
                      score_thresh=float(p["score_thresh"]), max_dets=int(p["max_dets"]))


test_config.__test__ = False  # not a pytest test


def _fingerprint(ctx: TaskContext, data_fps: list[str], train_cfg: TrainConfig, model_cfg: ModelConfig,
                 n: int) -> str:
    """Identifies one training run: resuming is allowed only into exactly the same run."""
    payload = {"checkpoint": ctx.checkpoint.sha256, "data": data_fps, "train": config_dict(train_cfg),
               "model": config_dict(model_cfg), "n": n, "device": ctx.device, "proto": ctx.protocol}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


task = DetectionTask()
