"""The ``detection`` task: Fast R-CNN (ResNet-C4, res5 head; on a ViT, ViTDet's simple feature pyramid and box
head) trained on VOC07 (or VOC07+12) trainval with the checkpoint's trunk, evaluated on VOC07 test (11-point
mAP@0.5). Protocol, presets and measured numbers: ``docs/tasks/detection.md``; the model in ``fast_rcnn.py`` and
``vitdet.py``, proposals in ``proposals.py``, the metric in ``voc_eval.py``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from evalsuite.errors import BadData, UserError
from evalsuite.io import ResumeState
from evalsuite.outputs import MetricOutputs, SampleOutputs
from evalsuite.plan import TaskPlan
from evalsuite.protocols import TaskProtocol, check_preset, preset_changes
from evalsuite.results import Result
from evalsuite.task import TaskContext
from evalsuite.trunks import arch_info
from tasks.detection import fast_rcnn as frcnn
from tasks.detection import proposals as props
from tasks.detection import vitdet
from tasks.detection import voc_eval as deval

VISSL_REFUSAL = (
    "detection has no vissl preset: VISSL's VOC07 detection is a detectron2 Faster R-CNN C4 (SyncBN, every layer "
    "trained; vissl:configs/config/benchmark/object_detection/voc07/rn50_transfer_voc07_detectron2_e2e.yaml), "
    "which this task (Fast R-CNN on external proposals) does not implement; use --protocol goyal19, with --set "
    "detection.freeze_at=0 to fine-tune every layer")
SELECTIVE_SEARCH_NOTE = ("OpenCV ximgproc selective search (fast mode), not Detectron's published MATLAB "
                         "selective_search_msra_voc_2007_*.pkl boxes")
VIT_NOT_COMPARABLE = ("Goyal et al.'s detection protocol is Fast R-CNN on ResNet-50-C4 (RoI pooling on res4, res5 "
                      "head); a ViT is evaluated here through ViTDet's simple feature pyramid, multi-level RoIAlign "
                      "and its box head, under that protocol's solver and proposals: the mAP is not comparable to "
                      "the published ResNet numbers, nor to ViTDet's (Mask R-CNN with RPN, AdamW, LSJ at 1024 px)")


@dataclass(frozen=True)
class ViTHeadProtocol(TaskProtocol):
    """What a ViT trunk is given instead of the C4 layout (ViTDet, detectron2 projects/ViTDet); ResNets ignore it."""

    backbone: Literal["frozen", "finetune"] = "frozen"  # frozen: the suite evaluates the ViT's features
    box_head: Literal["4conv1fc", "2fc"] = "4conv1fc"  # ViTDet's 4conv1fc; 2fc: detectron2's FPN default
    pool_size: int = 7  # RoIAlign output (detectron2's box_pooler output_size 7)
    lr_decay: float = 1.0  # layer-wise lr decay of a fine-tuned ViT (ViTDet's ViT-B: 0.7); 1.0: none


@dataclass(frozen=True)
class DetectionProtocol(TaskProtocol):
    """The ``goyal19`` protocol: fair_ssb's Fast R-CNN R-C4 config of Goyal et al. (2019) under Detectron's
    defaults (``detectron/core/config.py``); each field's reference in ``conformance.py``."""

    # data
    train_sets: tuple[str, ...] = ("voc2007:trainval",)  # kind:split, or an alias such as voc07+12
    test_set: str = "voc2007:test"
    data_path: str | None = None  # every set's folder (default: the data root's layout)
    data_paths: dict = field(default_factory=dict)  # dataset kind -> folder, before data_path
    train_use_difficult: bool = False
    # model
    freeze_at: int = 4  # 0 trains everything, k >= 1 freezes the stem and res2..res_k
    pooler: Literal["roi_pool", "roi_align"] = "roi_pool"  # Detectron's FAST_RCNN.ROI_XFORM_METHOD RoIPoolF
    pool_size: int = 14
    cls_agnostic_bbox_reg: bool = False
    # proposals
    proposals: Literal["selective_search", "sliding_window", "file"] = "selective_search"
    proposal_mode: Literal["fast", "quality"] = "fast"
    proposal_max_side: int | None = None  # selective search on the image downscaled to this longer side
    proposal_limit: int = 2000  # test images: the first 2000 (Detectron's TEST.PROPOSAL_LIMIT)
    train_proposal_limit: int | None = None  # training images: every box (Detectron's get_roidb proposal_limit -1)
    proposal_min_size: float = 2.0  # boxes whose sides are at most this are dropped (get_roidb min_proposal_size)
    proposal_cache: str | None = None  # default: <run cache>/proposals
    proposal_files: dict = field(default_factory=dict)  # kind:split -> Detectron/detectron2 pickle
    # solver
    max_iter: int = 30000
    lr: float = 0.002
    steps: tuple[int, ...] = (22000,)
    gamma: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 0.0005
    bias_double_lr: bool = True
    bias_weight_decay: bool = False
    warmup_iters: int = 500
    warmup_factor: float = 1.0 / 3
    ims_per_batch: int = 4
    rois_per_image: int = 64
    fg_fraction: float = 0.25
    fg_thresh: float = 0.5
    bg_thresh_hi: float = 0.5
    bg_thresh_lo: float = 0.0
    train_scales: tuple[int, ...] = (600,)
    train_max_size: int = 1000
    flip: bool = True
    smooth_l1_beta: float = 1.0
    clip_grad_norm: float | None = None  # cap on each step's total gradient norm; Detectron has none
    checkpoint_period: int = 500
    # test and metric
    test_scale: int = 600
    test_max_size: int = 1000
    nms: float = 0.3
    score_thresh: float = 0.05  # Detectron's TEST.SCORE_THRESH: a class score must exceed it
    max_dets: int = 100
    iou_thresh: float = 0.5
    ap_method: Literal["voc07", "area"] = "voc07"
    iou_compare: Literal[">", ">="] = ">"
    extra_metrics: bool = True
    # subsets (CI, debugging)
    max_train_images: int | None = None
    max_test_images: int | None = None
    # ViT trunks (ResNets ignore it; freeze_at, pooler and pool_size do not apply to ViTs)
    vit: ViTHeadProtocol = field(default_factory=ViTHeadProtocol)


# quick keeps RoIAlign (RoIPool's rounding to whole res4 cells is coarse on 128 px images) and every score (its
# short-trained heads score most objects under 0.05): both measured in benchmarks/fidelity/detection.py.
# On a ViT, quick's box head is detectron2's 2fc (FPN default) instead of ViTDet's 4conv1fc: the four 3x3 convs on
# 7x7 RoIs doubled a ViT-Tiny training iteration and made a test image 3.6x slower (docs/tasks/detection.md).
_PRESET_CHANGES: dict[str, dict[str, Any]] = {
    "goyal19": {},
    "quick": {"proposal_limit": 200, "train_proposal_limit": 200, "pool_size": 4, "pooler": "roi_align",
              "max_iter": 300, "lr": 0.01, "steps": (240,),
              "warmup_iters": 20, "ims_per_batch": 2, "rois_per_image": 32, "train_scales": (128,),
              "train_max_size": 192, "test_scale": 128, "test_max_size": 192, "checkpoint_period": 100,
              "clip_grad_norm": 35.0, "score_thresh": 0.0, "vit": ViTHeadProtocol(box_head="2fc")},
}

# Fields a saved training state may differ in: they do not change the trained model (a run that failed
# while testing resumes with its training done).
_RESUME_MAY_CHANGE = frozenset(f"protocol.{k}" for k in (
    "test_set", "proposal_limit", "max_test_images", "test_scale", "test_max_size", "nms", "score_thresh", "max_dets",
    "iou_thresh", "ap_method", "iou_compare", "extra_metrics", "proposal_cache", "checkpoint_period"))


class DetectionTask:
    name = "detection"
    description = ("Fast R-CNN (ResNet-C4 with res5 head; ViTs: ViTDet's simple feature pyramid) on VOC07 trainval, "
                   "VOC07 test 11-point mAP@0.5")
    seeded = True  # the heads' init, the image order and the RoI sampling are seeded

    def default_protocol(self, preset: str) -> DetectionProtocol:
        if check_preset(preset) == "vissl":
            raise UserError(VISSL_REFUSAL)
        return DetectionProtocol(**preset_changes(_PRESET_CHANGES, preset, self.name))

    # ------------------------------------------------------------------ run

    def run(self, ctx: TaskContext) -> list[Result]:
        p: DetectionProtocol = ctx.protocol
        info = arch_info(ctx.checkpoint.arch)
        is_vit = info["family"] == "vit"
        train_names = expand_train_sets(p.train_sets)
        train_sets = [_parse_set(s) for s in train_names]
        test_kind, test_split = _parse_set(p.test_set)
        datasets = [ctx.open_dataset(k, s, dataset_path(p, k)) for k, s in train_sets]
        test = ctx.open_dataset(test_kind, test_split, dataset_path(p, test_kind))
        classes = list(getattr(test, "classes", []))
        if not hasattr(test, "annotations") or not classes:
            raise BadData(f"{test_kind} has no box annotations", test.root)
        for d in datasets:
            if list(d.classes) != classes:
                raise BadData("training and test sets have different class lists", d.root)
        missing_res5 = [k for k in getattr(ctx.checkpoint.report, "missing", []) if k.startswith("layer4.")]
        if missing_res5 and not is_vit:
            raise UserError(f"checkpoint {ctx.checkpoint.spec} has no res5 weights ({len(missing_res5)} layer4 keys "
                            "missing); the Fast R-CNN C4 head is the trunk's res5")

        # proposals live under the run's cache directory unless the protocol names a cache of its own
        run_cache = str(ctx.cache_dir / "proposals") if ctx.cache_dir else None
        p = p.replace(proposal_cache=p.proposal_cache or run_cache)
        train_records, counts, per_set = [], {"skipped": 0, "background_only": 0}, {}
        for name, d in zip(train_names, datasets):
            recs, c = build_records(d, p, train=True, limit=p.max_train_images, progress=ctx.progress,
                                    set_name=name)
            train_records += recs
            counts = {k: counts[k] + c[k] for k in counts}
            per_set[name] = len(recs)
        if not any(len(r.boxes) for r in train_records):
            raise BadData("no training image has a usable box", datasets[0].root)
        test_records, _ = build_records(test, p, train=False, limit=p.max_test_images, progress=ctx.progress,
                                        set_name=p.test_set)
        gts = [ground_truth(test, i) for i in range(len(test_records))]

        meta = ctx.checkpoint.metadata or {}
        normalize = {**(meta.get("normalize") or {}), "input_space": meta.get("input_space", "rgb")}
        model_cfg = vit_model_config(p, info) if is_vit else model_config(p)
        train_cfg, test_cfg = train_config(p, ctx.seed), test_config(p)
        detector = frcnn.TorchvisionFastRCNN(ctx.trunk, len(classes), model_cfg, device=ctx.device, normalize=normalize)
        resume = resume_state(ctx, {n: d.fingerprint() for n, d in zip(train_names, datasets)}, len(train_records))
        fit = detector.fit(train_records, train_cfg, resume=resume, progress=ctx.progress)
        preds = detector.predict(test_records, test_cfg, progress=ctx.progress)
        dets = detections_from(preds)

        per_class = deval.evaluate_detections(dets, gts, len(classes), p.iou_thresh, p.ap_method, p.iou_compare)
        layer = vit_layer_name(p.vit, info) if is_vit else layer_name(p.freeze_at)
        params = {
            "arch": ctx.checkpoint.arch, "num_classes": len(classes), "num_train_images": len(train_records),
            "train_sets_used": train_names, "num_train_images_per_set": per_set,
            "train_images_skipped": counts["skipped"], "train_images_background_only": counts["background_only"],
            "num_test_images": len(test_records),
            "num_detections": int(len(dets.score)), "backend": detector.name,
            "solver": frcnn.config_dict(train_cfg), "test": frcnn.config_dict(test_cfg),
            "model": frcnn.config_dict(model_cfg),
            "iterations_run": fit.iterations, "resumed_from_iteration": fit.resumed_from,
            "train_curve": fit.summary(), "device": ctx.device,
            "proposal_method": p.proposals,
            "proposal_params": props.method_params(p.proposals, _pp(p, p.test_set)),
            "proposal_selection": {"train_limit": p.train_proposal_limit, "test_limit": p.proposal_limit,
                                   "min_size": p.proposal_min_size,
                                   "order": "clip, drop duplicates, drop small boxes, first limit"},
            "proposal_recall": proposal_recall(test_records, gts),
            "metric_definition": f"{p.ap_method} AP at IoU {p.iou_compare} {p.iou_thresh}, "
                                 "difficult ignored, mean over classes with ground truth",
            "box_coordinates": "VOC XML 1-based inclusive pixels",
        }
        if p.proposals == "selective_search":
            params["proposal_note"] = SELECTIVE_SEARCH_NOTE
        if is_vit:
            params.update(backbone=p.vit.backbone, head=vitdet.describe(model_cfg, info["patch"]),
                          head_reference="detectron2:configs/common/models/mask_rcnn_vitdet.py, "
                                         "detectron2/modeling/backbone/vit.py (SimpleFeaturePyramid)",
                          not_applied=["freeze_at", "pooler", "pool_size"],
                          comparable_to_published=False, not_comparable_reason=VIT_NOT_COMPARABLE)
        fp = test.fingerprint()
        agnostic = None
        if p.extra_metrics:
            merged, one = deval.class_agnostic_merge(dets, gts, p.nms)
            agnostic = (merged, deval.evaluate_detections(merged, one, 1, p.iou_thresh, p.ap_method,
                                                          p.iou_compare)[0], one)
        samples = SampleOutputs(sample_arrays(dets, per_class, gts, agnostic))  # per test image: intervals
        results = [ctx.result(test_kind, test_split, layer, "mAP", 100 * deval.mean_ap(per_class), params=params,
                              note=f"{p.ap_method} mAP@{p.iou_thresh}", dataset_fingerprint=fp,
                              outputs=ap_outputs(samples, p.ap_method))]
        for j, (c, ev) in enumerate(zip(classes, per_class)):
            value = None if ev.npos == 0 else 100 * ev.ap
            results.append(ctx.result(test_kind, test_split, layer, f"AP/{c}", value, params=params,
                                      note="" if ev.npos else "no ground truth for this class",
                                      dataset_fingerprint=fp,
                                      outputs=ap_outputs(samples, p.ap_method, class_mask=f"only_class{j}")))
        if agnostic is not None:
            other = "area" if p.ap_method == "voc07" else "voc07"
            extra = deval.mean_ap(deval.evaluate_detections(dets, gts, len(classes), p.iou_thresh, other,
                                                            p.iou_compare))
            results.append(ctx.result(test_kind, test_split, layer, f"mAP_{other}", 100 * extra, params=params,
                                      note=f"{other} AP at IoU {p.iou_thresh} (extra metric)",
                                      dataset_fingerprint=fp, outputs=ap_outputs(samples, other)))
            results.append(ctx.result(test_kind, test_split, layer, "AP_class_agnostic", 100 * agnostic[1].ap,
                                      params=params,
                                      note=f"{p.ap_method} AP of the boxes whatever their class (classes merged, "
                                           f"NMS {p.nms} across classes; extra diagnostic of localisation)",
                                      dataset_fingerprint=fp,
                                      outputs=ap_outputs(samples, p.ap_method, prefix="agnostic_")))
        resume.clear()
        return results

    # ------------------------------------------------------------------ plan

    headline_metrics = ("mAP",)

    def plan(self, ctx: TaskContext) -> TaskPlan:
        """The test images at the test scale; max_iter iterations of ims_per_batch images at the (largest) train
        scale, drawn from the training sets (as many images as run() reads: max_*_images applied per set)."""
        p: DetectionProtocol = ctx.protocol

        def count(name: str, limit: int | None) -> int:
            kind, split = _parse_set(name)
            n = len(ctx.open_dataset(kind, split, dataset_path(p, kind)))
            return n if limit is None else min(n, int(limit))

        train = {name: count(name, p.max_train_images) for name in expand_train_sets(p.train_sets)}
        test = {p.test_set: count(p.test_set, p.max_test_images)}
        note = "" if p.proposals == "file" else (
            f"{p.proposals} proposals for {sum(train.values()) + sum(test.values())} images first "
            "(cached, not timed)")
        return TaskPlan(images=test, image_size=p.test_scale, train_iterations=p.max_iter,
                        images_per_iteration=p.ims_per_batch, train_image_size=max(p.train_scales),
                        train_images=train, note=note)


# ---------------------------------------------------------------------- helpers


# Shorthands for train_sets (Fast R-CNN / Detectron's names for the VOC training sets).
TRAIN_SET_ALIASES = {"voc07": ["voc2007:trainval"], "voc07+12": ["voc2007:trainval", "voc2012:trainval"],
                     "voc2007+2012": ["voc2007:trainval", "voc2012:trainval"]}


def expand_train_sets(names: str | Sequence[str]) -> list[str]:
    """``train_sets`` as a list of ``kind:split``, aliases expanded (``voc07+12`` = VOC2007 + VOC2012 trainval)."""
    if isinstance(names, str):
        names = [names]
    out = [s for v in names for s in TRAIN_SET_ALIASES.get(str(v).lower(), [v])]
    if not out:
        raise UserError(f"detection.train_sets must name kind:split sets or one of {', '.join(TRAIN_SET_ALIASES)}")
    return list(dict.fromkeys(out))


def dataset_path(p: DetectionProtocol, kind: str) -> str | None:
    """Where a kind's data is: ``data_paths[kind]``, else ``data_path`` (every set), else the data-root layout."""
    if p.data_paths.get(kind):
        return str(p.data_paths[kind])
    return str(p.data_path) if p.data_path else None


def _parse_set(s: str) -> tuple[str, str]:
    if ":" not in s:
        raise UserError(f"detection data sets are written kind:split (e.g. voc2007:trainval), got {s!r}")
    kind, split = s.split(":", 1)
    return kind, split


def _pp(p: DetectionProtocol, set_name: str | None = None) -> dict[str, Any]:
    """The parameters of one set's proposals (every box: the limits apply when records are built)."""
    if p.proposals == "file":
        return {"file": p.proposal_files.get(set_name)}
    return {"mode": p.proposal_mode, "max_side": p.proposal_max_side}


def layer_name(freeze_at: int) -> str:
    """How the reference tables name what was trained: finetune_all, finetune_above_conv1, ..._res4."""
    return {0: "finetune_all", 1: "finetune_above_conv1"}.get(freeze_at, f"finetune_above_res{freeze_at}")


def gt_boxes(dataset, i: int) -> tuple[dict[str, Any], np.ndarray]:
    """Annotations of image ``i`` and its boxes in continuous coordinates, clipped to the image."""
    a = dataset.annotations(i)
    src = dataset.annotation_path(i) if hasattr(dataset, "annotation_path") else dataset.root
    b = frcnn.xml_to_continuous(a["boxes"])
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


def build_records(dataset, p: DetectionProtocol, train: bool, limit: int | None = None, progress: bool = False,
                  set_name: str | None = None) -> tuple[list[frcnn.ImageRecord], dict[str, int]]:
    """Image records with ground truth and (cached) proposals, and how many training images were skipped (no
    usable RoI) or kept as background only (no non-difficult box). ``set_name`` (``voc2007:test``) picks the
    set's file of ``proposal_files`` when ``proposals=file``."""
    cache = props.ProposalCache(p.proposal_cache, p.proposals, _pp(p, set_name), dataset_key=dataset.fingerprint())
    n = len(dataset) if limit is None else min(len(dataset), int(limit))
    if progress:
        cache.precompute(_Subset(dataset, n), progress=True)
    records, counts = [], {"skipped": 0, "background_only": 0}
    cap = p.train_proposal_limit if train else p.proposal_limit
    for i in range(n):
        a, boxes = gt_boxes(dataset, i)
        keep = np.ones(len(boxes), bool) if (not train or p.train_use_difficult) else ~a["difficult"]
        proposals = frcnn.prepare_proposals(cache.get(dataset, i), a["width"], a["height"], cap,
                                            p.proposal_min_size)
        if train and not has_training_rois(boxes[keep], proposals, p):
            counts["skipped"] += 1
            continue
        counts["background_only"] += int(train and not keep.any())
        records.append(frcnn.ImageRecord(image_id=dataset.ids[i], width=int(a["width"]), height=int(a["height"]),
                                         boxes=boxes[keep], labels=np.asarray(a["labels"])[keep],
                                         proposals=proposals, load=_loader(dataset, i)))
    return records, counts


def has_training_rois(gt: np.ndarray, proposals: np.ndarray, p: DetectionProtocol) -> bool:
    """Detectron's ``filter_for_training`` (detectron/datasets/roidb.py): an image trains when one of its RoIs (its
    ground-truth boxes and proposals) is foreground or background; an image without boxes trains as background."""
    import torch
    from torchvision.ops import box_iou

    rois = np.concatenate([gt, proposals]).astype(np.float32)
    if not len(gt):
        overlap = np.zeros(len(rois))
    else:
        overlap = box_iou(torch.from_numpy(rois), torch.from_numpy(gt.astype(np.float32))).max(1).values.numpy()
    fg = overlap >= p.fg_thresh
    bg = (overlap < p.bg_thresh_hi) & (overlap >= p.bg_thresh_lo)
    return bool((fg | bg).any())


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


def proposal_recall(records: list[frcnn.ImageRecord], gts: list[deval.GroundTruth], thresholds=(0.5, 0.7)
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


def sample_arrays(dets: deval.Detections, per_class: list[deval.ClassEval], gts: list[deval.GroundTruth],
                  agnostic: tuple[deval.Detections, deval.ClassEval, list[deval.GroundTruth]] | None = None
                  ) -> dict[str, np.ndarray]:
    """What every AP of a run is computed from, for a bootstrap over the test images (docs/uncertainty.md): each
    detection's ``image``, ``label``, ``score`` and ``outcome`` (1 TP, 0 FP, -1 matched a difficult box), each
    image's non-difficult boxes per class (``npos``), one class mask per class (``only_class<j>``, for AP/<class>);
    with ``agnostic`` (merged detections, their evaluation, ground truth) the same prefixed ``agnostic_``."""
    k = len(per_class)
    out = {"image": dets.image, "label": dets.label, "score": dets.score,
           "outcome": deval.image_outcomes(dets, per_class), "npos": deval.positives_per_image(gts, k),
           **{f"only_class{j}": np.arange(k) == j for j in range(k)}}
    if agnostic is not None:
        merged, ev, one = agnostic
        out.update(agnostic_image=merged.image, agnostic_label=merged.label, agnostic_score=merged.score,
                   agnostic_outcome=ev.outcome, agnostic_npos=deval.positives_per_image(one, 1))
    return out


def ap_outputs(samples: SampleOutputs, method: str, prefix: str = "", class_mask: str | None = None) -> MetricOutputs:
    """A record's AP statistic over :func:`sample_arrays` (``prefix``: the class-agnostic arrays)."""
    roles = {r: prefix + r for r in ("image", "label", "score", "outcome", "npos")}
    if class_mask is not None:
        roles["class_mask"] = class_mask
    return samples.metric(f"map_det_{method}", **roles)


def detections_from(preds) -> deval.Detections:
    parts = [deval.Detections(np.full(len(s), i, np.int64), np.asarray(lab, np.int64), np.asarray(s, np.float32),
                              frcnn.continuous_to_xml(b)) for i, (b, lab, s) in enumerate(preds)]
    return deval.Detections.concat(parts)


def model_config(p: DetectionProtocol) -> frcnn.ModelConfig:
    return frcnn.ModelConfig(pooler=p.pooler, pool_size=p.pool_size, freeze_at=p.freeze_at,
                             cls_agnostic_bbox_reg=p.cls_agnostic_bbox_reg)


def vit_model_config(p: DetectionProtocol, info: dict) -> vitdet.ViTDetConfig:
    """The ViT detector's settings: the pyramid reads the last block's patch grid."""
    v = p.vit
    return vitdet.ViTDetConfig(backbone=v.backbone, box_head=v.box_head, pool_size=v.pool_size, lr_decay=v.lr_decay,
                               cls_agnostic_bbox_reg=p.cls_agnostic_bbox_reg, tap=f"block{info['depth'] - 1}")


def vit_layer_name(v: ViTHeadProtocol, info: dict) -> str:
    """What was trained, named as for ResNets: above the last block (frozen ViT) or everything."""
    return "finetune_all" if v.backbone == "finetune" else f"finetune_above_block{info['depth'] - 1}"


def train_config(p: DetectionProtocol, seed: int) -> frcnn.TrainConfig:
    return frcnn.TrainConfig(
        max_iter=p.max_iter, lr=p.lr, steps=tuple(p.steps), gamma=p.gamma, momentum=p.momentum,
        weight_decay=p.weight_decay, bias_double_lr=p.bias_double_lr, bias_weight_decay=p.bias_weight_decay,
        warmup_iters=p.warmup_iters, warmup_factor=p.warmup_factor, ims_per_batch=p.ims_per_batch,
        scales=tuple(p.train_scales), max_size=p.train_max_size, flip=p.flip, smooth_l1_beta=p.smooth_l1_beta,
        clip_grad_norm=p.clip_grad_norm, checkpoint_period=p.checkpoint_period, seed=seed,
        sampler=frcnn.SamplerConfig(rois_per_image=p.rois_per_image, fg_fraction=p.fg_fraction,
                                    fg_thresh=p.fg_thresh, bg_thresh_hi=p.bg_thresh_hi, bg_thresh_lo=p.bg_thresh_lo),
    )


def test_config(p: DetectionProtocol) -> frcnn.TestConfig:
    return frcnn.TestConfig(scale=p.test_scale, max_size=p.test_max_size, nms=p.nms, score_thresh=p.score_thresh,
                            max_dets=p.max_dets)


test_config.__test__ = False  # not a pytest test


def resume_state(ctx: TaskContext, train_data: dict[str, str], num_train_images: int) -> ResumeState:
    """The training state of this checkpoint and seed under the run's folder; resuming needs the same
    checkpoint, data, device and protocol (test-time fields aside)."""
    settings = {"checkpoint": ctx.checkpoint.sha256, "seed": ctx.seed, "device": ctx.device,
                "train_data": train_data, "train_images": num_train_images, "protocol": ctx.protocol.to_dict()}
    path = ctx.out_dir / "detection_state" / f"{ctx.checkpoint.sha256[:16]}-seed{ctx.seed}.pt"
    return ResumeState(path, settings, what="detection training", may_change=_RESUME_MAY_CHANGE)


task = DetectionTask()
