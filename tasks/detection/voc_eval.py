"""PASCAL VOC detection evaluation (the semantics of the VOC devkit's ``VOCevaldet`` / py-faster-rcnn's ``voc_eval``).

For one class, detections of all images are sorted by decreasing score (ties keep input
order). Each detection is matched to the ground-truth box of its image with the largest
IoU, computed on inclusive integer pixel coordinates (widths ``x2 - x1 + 1``, the devkit
convention for 1-based XML boxes):

- IoU above ``iou_thresh`` (0.5) with a *difficult* box: ignored (neither TP nor FP);
- IoU above ``iou_thresh`` with a non-difficult box not yet matched: TP, the box is now taken;
- IoU above ``iou_thresh`` with a box already taken (a duplicate detection): FP;
- otherwise (below the threshold, or no box in that image): FP.

"Above" is ``>`` as in py-faster-rcnn / Detectron's ``voc_eval.py`` (what produced the
Goyal et al. numbers, ``compare=">"``); the MATLAB devkit's ``VOCevaldet.m`` uses ``>=``
(``compare=">="``). The two differ only for an IoU of exactly 0.5.

Recall is divided by the number of non-difficult boxes (``npos``). AP is:

- ``voc07`` (default for VOC2007 test, Goyal et al. 2019 and Detectron): the 11-point
  interpolated AP, mean over t in {0, 0.1, ..., 1} of max precision at recall >= t;
- ``area`` ("VOC2010+"): the area under the monotone (interpolated) precision/recall curve.

``class_agnostic_ap`` (extra, labelled diagnostic of localisation alone): every class's detections
merged, greedy NMS across classes at ``nms`` per image, then evaluated as one class against all boxes.
A class with no non-difficult ground truth has AP ``nan`` and is left out of the mean.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

AP_METHODS = ("voc07", "area")


@dataclass
class GroundTruth:
    """Boxes of one image, in the XML's 1-based inclusive pixel coordinates."""

    boxes: np.ndarray  # float (M, 4) x1, y1, x2, y2
    labels: np.ndarray  # int (M,)
    difficult: np.ndarray  # bool (M,)


@dataclass
class ClassEval:
    ap: float
    npos: int
    num_dets: int
    tp: int
    fp: int
    recall: np.ndarray
    precision: np.ndarray
    #: per detection, in the order given: 1 TP, 0 FP, -1 ignored (matched a difficult box). Matching is per image,
    #: so an image's outcomes do not depend on the other images: the per-sample outputs of a bootstrap over images
    outcome: np.ndarray | None = None


def voc_ap(recall: np.ndarray, precision: np.ndarray, method: str = "voc07") -> float:
    """AP from a recall/precision curve (both in detection order)."""
    rec, prec = np.asarray(recall, dtype=np.float64), np.asarray(precision, dtype=np.float64)
    if method == "voc07":
        ap = 0.0
        for t in np.arange(0.0, 1.1, 0.1):
            p = prec[rec >= t].max() if np.any(rec >= t) else 0.0
            ap += p / 11.0
        return float(ap)
    if method != "area":
        raise ValueError(f"unknown AP method {method!r}; choose one of {', '.join(AP_METHODS)}")
    mrec = np.concatenate(([0.0], rec, [1.0]))
    mpre = np.concatenate(([0.0], prec, [0.0]))
    for i in range(mpre.size - 1, 0, -1):  # precision envelope
        mpre[i - 1] = max(mpre[i - 1], mpre[i])
    i = np.where(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


def iou_inclusive(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one box with many, inclusive pixel coordinates (devkit: +1 on widths and heights)."""
    ix1 = np.maximum(boxes[:, 0], box[0])
    iy1 = np.maximum(boxes[:, 1], box[1])
    ix2 = np.minimum(boxes[:, 2], box[2])
    iy2 = np.minimum(boxes[:, 3], box[3])
    iw = np.maximum(ix2 - ix1 + 1.0, 0.0)
    ih = np.maximum(iy2 - iy1 + 1.0, 0.0)
    inter = iw * ih
    union = ((box[2] - box[0] + 1.0) * (box[3] - box[1] + 1.0)
             + (boxes[:, 2] - boxes[:, 0] + 1.0) * (boxes[:, 3] - boxes[:, 1] + 1.0) - inter)
    return inter / union


def evaluate_class(
    image_ids: np.ndarray, scores: np.ndarray, boxes: np.ndarray, gt: dict[int, tuple[np.ndarray, np.ndarray]],
    iou_thresh: float = 0.5, method: str = "voc07", compare: str = ">",
) -> ClassEval:
    """AP of one class.

    ``image_ids``/``scores``/``boxes``: the class's detections (boxes 1-based inclusive);
    ``gt``: image id -> (boxes (M,4), difficult (M,)) of this class only.
    """
    npos = int(sum(int((~d).sum()) for _, d in gt.values()))
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    image_ids = np.asarray(image_ids)[order]
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)[order]
    taken = {k: np.zeros(len(d), dtype=bool) for k, (_, d) in gt.items()}
    tp = np.zeros(len(order))
    fp = np.zeros(len(order))
    outcome = np.full(len(order), -1, np.int8)
    for n in range(len(order)):
        img = int(image_ids[n])
        if img in gt and len(gt[img][0]):
            g, diff = gt[img]
            ov = iou_inclusive(boxes[n], np.asarray(g, dtype=np.float64))
            j = int(np.argmax(ov))
            if ov[j] > iou_thresh or (compare == ">=" and ov[j] >= iou_thresh):
                if diff[j]:
                    continue  # ignored
                if not taken[img][j]:
                    tp[n], taken[img][j] = 1, True
                else:
                    fp[n] = 1
                continue
        fp[n] = 1
    outcome[order] = np.where(tp > 0, 1, np.where(fp > 0, 0, -1))
    ctp, cfp = np.cumsum(tp), np.cumsum(fp)
    if npos == 0:
        rec = np.full(len(order), np.nan)
        ap = float("nan")
    else:
        rec = ctp / npos
    prec = ctp / np.maximum(ctp + cfp, np.finfo(np.float64).eps)
    if npos:
        ap = voc_ap(rec, prec, method)
    return ClassEval(ap=ap, npos=npos, num_dets=len(order), tp=int(tp.sum()), fp=int(fp.sum()),
                     recall=rec, precision=prec, outcome=outcome)


@dataclass
class Detections:
    """All detections of a split: parallel arrays (boxes 1-based inclusive pixel coordinates)."""

    image: np.ndarray  # int (D,) image index
    label: np.ndarray  # int (D,) class index 0..K-1
    score: np.ndarray  # float (D,)
    boxes: np.ndarray  # float (D, 4)

    @classmethod
    def concat(cls, parts: Sequence[Detections]) -> Detections:
        if not parts:
            return cls(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32),
                       np.zeros((0, 4), np.float32))
        return cls(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("image", "label", "score", "boxes")))


def evaluate_detections(
    dets: Detections, gts: Sequence[GroundTruth], num_classes: int, iou_thresh: float = 0.5,
    method: str = "voc07", compare: str = ">",
) -> list[ClassEval]:
    """Per-class evaluation of a split (``gts[i]`` belongs to image ``i``)."""
    out = []
    for c in range(num_classes):
        gt = {i: (g.boxes[g.labels == c], g.difficult[g.labels == c]) for i, g in enumerate(gts)}
        gt = {i: v for i, v in gt.items() if len(v[0])}
        m = dets.label == c
        out.append(evaluate_class(dets.image[m], dets.score[m], dets.boxes[m], gt, iou_thresh, method, compare))
    return out


def mean_ap(per_class: Sequence[ClassEval]) -> float:
    """Mean AP over classes that have ground truth (nan when none has)."""
    aps = [c.ap for c in per_class if c.npos > 0]
    return float(np.mean(aps)) if aps else float("nan")


def class_agnostic_ap(dets: Detections, gts: Sequence[GroundTruth], nms: float = 0.3, iou_thresh: float = 0.5,
                      method: str = "voc07", compare: str = ">") -> float:
    """AP of the boxes whatever their class: detections of one image merged over classes, greedy NMS at
    ``nms`` (inclusive-pixel IoU, above ``nms`` suppressed), then one-class evaluation against every box."""
    merged, one = class_agnostic_merge(dets, gts, nms)
    return evaluate_detections(merged, one, 1, iou_thresh, method, compare)[0].ap


def class_agnostic_merge(dets: Detections, gts: Sequence[GroundTruth], nms: float = 0.3
                         ) -> tuple[Detections, list[GroundTruth]]:
    """:func:`class_agnostic_ap`'s one-class detections (NMS across classes) and ground truth (every box)."""
    keep = []
    for i in np.unique(dets.image):
        idx = np.nonzero(dets.image == i)[0]
        idx = idx[np.argsort(-dets.score[idx], kind="stable")]
        alive = np.ones(len(idx), bool)
        for a in range(len(idx)):
            if not alive[a]:
                continue
            keep.append(idx[a])
            rest = np.nonzero(alive[a + 1:])[0] + a + 1
            if len(rest):
                alive[rest[iou_inclusive(dets.boxes[idx[a]], dets.boxes[idx[rest]]) > nms]] = False
    keep = np.asarray(sorted(keep), np.int64)
    merged = Detections(dets.image[keep], np.zeros(len(keep), np.int64), dets.score[keep], dets.boxes[keep])
    return merged, [GroundTruth(g.boxes, np.zeros(len(g.labels), np.int64), g.difficult) for g in gts]


def image_outcomes(dets: Detections, per_class: Sequence[ClassEval]) -> np.ndarray:
    """Every detection's outcome (1 TP, 0 FP, -1 ignored) from :func:`evaluate_detections` of ``dets``."""
    out = np.full(len(dets.label), -1, np.int8)
    for c, ev in enumerate(per_class):
        out[dets.label == c] = ev.outcome
    return out


def positives_per_image(gts: Sequence[GroundTruth], num_classes: int) -> np.ndarray:
    """(images, classes) number of non-difficult boxes: ``npos`` of each image."""
    return np.array([np.bincount(np.asarray(g.labels)[~np.asarray(g.difficult, bool)], minlength=num_classes)
                     for g in gts], np.int32).reshape(len(gts), num_classes)
