"""VOC detection AP: hand-computed cases and a literal port of the devkit's VOCevaldet.m."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tasks.detection.voc_eval import (
    Detections,
    GroundTruth,
    class_agnostic_ap,
    evaluate_class,
    evaluate_detections,
    iou_inclusive,
    mean_ap,
    voc_ap,
)


def gt_of(*boxes, difficult=()):
    return (np.asarray(boxes, dtype=np.float64).reshape(-1, 4), np.asarray(difficult or [False] * len(boxes)))


def ap(dets, gt, **kw):
    """dets: list of (image, score, box)."""
    img = np.array([d[0] for d in dets], dtype=np.int64)
    sc = np.array([d[1] for d in dets], dtype=np.float64)
    bx = np.array([d[2] for d in dets], dtype=np.float64).reshape(-1, 4)
    return evaluate_class(img, sc, bx, gt, **kw)


A = [11, 11, 50, 50]
B = [61, 21, 90, 80]


def test_perfect_detections_give_ap_one_for_both_methods():
    gt = {0: gt_of(A), 1: gt_of(B)}
    for method in ("voc07", "area"):
        ev = ap([(0, 0.9, A), (1, 0.8, B)], gt, method=method)
        assert ev.ap == pytest.approx(1.0) and (ev.tp, ev.fp, ev.npos) == (2, 0, 2)


def test_no_detections_give_zero():
    ev = ap([], {0: gt_of(A)})
    assert ev.ap == 0.0 and ev.npos == 1


def test_duplicate_detection_is_a_false_positive():
    gt = {0: gt_of(A), 1: gt_of(B)}
    ev = ap([(0, 0.9, A), (0, 0.8, A), (1, 0.7, B)], gt)
    # tp = [1, 0, 1], fp = [0, 1, 0]: recall [.5, .5, 1], precision [1, .5, 2/3]
    assert (ev.tp, ev.fp) == (2, 1)
    np.testing.assert_allclose(ev.recall, [0.5, 0.5, 1.0])
    np.testing.assert_allclose(ev.precision, [1.0, 0.5, 2 / 3])
    # 11-point: t = 0 .. 0.5 -> max precision 1 (6 points); t = .6 .. 1 -> 2/3 (5 points)
    assert ev.ap == pytest.approx((6 * 1.0 + 5 * 2 / 3) / 11)
    area = ap([(0, 0.9, A), (0, 0.8, A), (1, 0.7, B)], gt, method="area").ap
    assert area == pytest.approx(0.5 * 1.0 + 0.5 * 2 / 3)


def test_difficult_objects_are_neither_tp_nor_fp():
    gt = {0: gt_of(A, difficult=[True]), 1: gt_of(B)}
    ev = ap([(0, 0.95, A), (1, 0.5, B)], gt)
    assert ev.npos == 1 and (ev.tp, ev.fp) == (1, 0) and ev.ap == pytest.approx(1.0)
    # the same detection on a non-difficult box would be a TP, so it would have counted
    gt2 = {0: gt_of(A), 1: gt_of(B)}
    assert ap([(0, 0.95, A), (1, 0.5, B)], gt2).npos == 2
    # a detection matched (IoU > .5) to a difficult box is ignored even when the box was "taken"
    ev = ap([(0, 0.9, A), (0, 0.8, A), (1, 0.5, B)], gt)
    assert (ev.tp, ev.fp) == (1, 0)


def test_only_difficult_ground_truth_gives_nan_and_is_left_out_of_the_mean():
    ev = ap([(0, 0.9, A)], {0: gt_of(A, difficult=[True])})
    assert ev.npos == 0 and math.isnan(ev.ap)
    dets = Detections(np.array([0]), np.array([1]), np.array([0.9]), np.array([B], dtype=np.float64))
    gts = [GroundTruth(np.array([A, B], dtype=np.float64), np.array([0, 1]), np.array([True, False]))]
    per = evaluate_detections(dets, gts, 2)
    assert math.isnan(per[0].ap) and per[1].ap == pytest.approx(1.0)
    assert mean_ap(per) == pytest.approx(1.0)


def test_high_scoring_false_positive_halves_precision():
    gt = {0: gt_of(A)}
    ev = ap([(0, 0.9, B), (0, 0.8, A)], gt)  # B does not overlap A: FP ranked first
    np.testing.assert_allclose(ev.precision, [0.0, 0.5])
    assert ev.ap == pytest.approx(0.5)  # every threshold sees max precision .5
    assert ap([(0, 0.9, B), (0, 0.8, A)], gt, method="area").ap == pytest.approx(0.5)


def test_iou_is_inclusive_pixels_and_threshold_comparison_is_selectable():
    # [1,1,10,10] has 100 pixels; [1,1,10,5] has 50 inside it: IoU exactly 0.5
    assert iou_inclusive(np.array([1, 1, 10, 5.0]), np.array([[1, 1, 10, 10.0]]))[0] == pytest.approx(0.5)
    gt = {0: gt_of([1, 1, 10, 10])}
    assert ap([(0, 1.0, [1, 1, 10, 5])], gt, compare=">").tp == 0  # py-faster-rcnn / Detectron
    assert ap([(0, 1.0, [1, 1, 10, 5])], gt, compare=">=").tp == 1  # MATLAB devkit


def test_detections_on_images_without_ground_truth_are_false_positives():
    ev = ap([(3, 0.9, A), (0, 0.5, A)], {0: gt_of(A)})
    assert (ev.tp, ev.fp) == (1, 1)
    np.testing.assert_allclose(ev.precision, [0.0, 0.5])


def test_voc07_eleven_point_by_hand():
    rec = np.array([0.1, 0.2, 0.4, 0.4, 0.75])  # no recall on a threshold: float ties differ
    prec = np.array([1.0, 0.8, 0.6, 0.5, 0.55])
    # t=0,.1 -> 1 ; t=.2 -> .8 ; t=.3,.4 -> .6 ; t=.5,.6,.7 -> .55 ; t=.8,.9,1 -> 0
    expected = (1 + 1 + 0.8 + 0.6 + 0.6 + 0.55 * 3) / 11
    assert voc_ap(rec, prec, "voc07") == pytest.approx(expected)
    # area: envelope [1, .8, .6, .6, .55]; steps at .1, .2, .4, .75
    assert voc_ap(rec, prec, "area") == pytest.approx(0.1 * 1 + 0.1 * 0.8 + 0.2 * 0.6 + 0.35 * 0.55)


# ----------------------------------------------------------------------- literal devkit port


def devkit_voc_evaldet(dets, gts, cls, minoverlap=0.5):
    """Line-by-line port of VOCevaldet.m (VOC2007 devkit): ``gts[i] = (boxes, labels, difficult)``."""
    npos = 0
    gt = []
    for boxes, labels, diff in gts:
        sel = [k for k in range(len(labels)) if labels[k] == cls]
        g = {"BB": [boxes[k] for k in sel], "diff": [bool(diff[k]) for k in sel], "det": [False] * len(sel)}
        npos += sum(not d for d in g["diff"])
        gt.append(g)
    mine = [d for d in dets if d[1] == cls]
    confidence = [d[2] for d in mine]
    si = sorted(range(len(mine)), key=lambda k: -confidence[k])  # MATLAB sort is stable
    nd = len(mine)
    tp, fp = [0] * nd, [0] * nd
    for d in range(nd):
        i = mine[si[d]][0]
        bb = mine[si[d]][3]
        ovmax, jmax = -math.inf, None
        for j, bbgt in enumerate(gt[i]["BB"]):
            bi = [max(bb[0], bbgt[0]), max(bb[1], bbgt[1]), min(bb[2], bbgt[2]), min(bb[3], bbgt[3])]
            iw = bi[2] - bi[0] + 1
            ih = bi[3] - bi[1] + 1
            if iw > 0 and ih > 0:
                ua = ((bb[2] - bb[0] + 1) * (bb[3] - bb[1] + 1)
                      + (bbgt[2] - bbgt[0] + 1) * (bbgt[3] - bbgt[1] + 1) - iw * ih)
                ov = iw * ih / ua
                if ov > ovmax:
                    ovmax, jmax = ov, j
        if ovmax >= minoverlap:
            if not gt[i]["diff"][jmax]:
                if not gt[i]["det"][jmax]:
                    tp[d] = 1
                    gt[i]["det"][jmax] = True
                else:
                    fp[d] = 1
        else:
            fp[d] = 1
    fp = np.cumsum(fp)
    tp = np.cumsum(tp)
    rec = tp / npos
    with np.errstate(invalid="ignore"):
        prec = tp / (fp + tp)  # 0/0 = NaN while only ignored (difficult) detections have been seen
    ap = 0.0
    for t in np.arange(0, 1.1, 0.1):
        p = np.nanmax(prec[rec >= t]) if np.any(rec >= t) else 0  # MATLAB's max skips NaN
        ap = ap + p / 11
    return ap


@pytest.mark.parametrize("seed", range(8))
def test_matches_a_literal_port_of_the_devkit_on_random_cases(seed):
    rng = np.random.default_rng(seed)
    n_img, n_cls = 6, 3
    gts, dets = [], []
    for i in range(n_img):
        m = int(rng.integers(0, 5))
        xy = rng.integers(1, 60, size=(m, 2))
        wh = rng.integers(5, 40, size=(m, 2))
        boxes = np.concatenate([xy, xy + wh], 1).astype(np.float64)
        labels = rng.integers(0, n_cls, m)
        diff = rng.random(m) < 0.2
        gts.append((boxes, labels, diff))
        for k in range(m):  # jittered true positives, sometimes twice (duplicates)
            for _ in range(int(rng.integers(0, 3))):
                jit = boxes[k] + rng.integers(-4, 5, 4)
                dets.append((i, int(labels[k]), float(rng.random()), jit))
        for _ in range(int(rng.integers(0, 4))):  # random false positives
            xy = rng.integers(1, 80, 2)
            dets.append((i, int(rng.integers(0, n_cls)), float(rng.random()), np.r_[xy, xy + rng.integers(5, 30, 2)]))
    D = Detections(np.array([d[0] for d in dets]), np.array([d[1] for d in dets]), np.array([d[2] for d in dets]),
                   np.array([d[3] for d in dets], dtype=np.float64).reshape(-1, 4))
    G = [GroundTruth(b, lab, d) for b, lab, d in gts]
    ours = evaluate_detections(D, G, n_cls, 0.5, "voc07", ">=")
    for c in range(n_cls):
        npos = sum(int(((lab == c) & ~d).sum()) for _, lab, d in gts)
        if npos == 0:
            assert math.isnan(ours[c].ap)
            continue
        assert ours[c].ap == pytest.approx(devkit_voc_evaldet(dets, gts, c), abs=1e-12)


def test_class_agnostic_ap_merges_classes_and_suppresses_cross_class_duplicates():
    # image 0: A (class 3) and B (class 5); image 1: A (class 3)
    gts = [GroundTruth(np.array([A, B], float), np.array([3, 5]), np.zeros(2, bool)),
           GroundTruth(np.array([A], float), np.array([3]), np.zeros(1, bool))]
    shifted = [A[0] + 2, A[1], A[2] + 2, A[3]]  # IoU with A 38*40/(42*40) = 0.905 > 0.3: suppressed
    dets = Detections(image=np.array([0, 0, 0, 1, 1]), label=np.array([7, 3, 1, 0, 2]),
                      score=np.array([0.9, 0.8, 0.7, 0.6, 0.1]),
                      boxes=np.array([A, shifted, B, [200, 200, 240, 240], A], float))
    # merged, after NMS: 0.9 A (TP), 0.7 B (TP), 0.6 far box (FP), 0.1 A in image 1 (TP); 3 boxes in all
    # precision at recalls 1/3, 2/3, 2/3, 1: 1, 1, 2/3, 3/4 -> 11-point: 7 points at 1, 4 at 3/4
    assert class_agnostic_ap(dets, gts) == pytest.approx((7 * 1 + 4 * 0.75) / 11)
    # the class-specific mAP of the same detections is far lower (wrong labels everywhere but one)
    assert mean_ap(evaluate_detections(dets, gts, 8)) < 0.6
    # no NMS across classes (threshold 1): the shifted copy is a duplicate, hence a false positive:
    # TP, FP, TP, FP, TP -> (recall, precision) (1/3, 1), (1/3, 1/2), (2/3, 2/3), (2/3, 1/2), (1, 3/5)
    assert class_agnostic_ap(dets, gts, nms=1.0) == pytest.approx((4 * 1 + 3 * 2 / 3 + 4 * 0.6) / 11)
