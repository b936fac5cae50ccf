"""Intervals on the fine-tuning tasks (docs/uncertainty.md): detection, surface normals, navigation and
semi-supervised records carry ci fields and per-sample outputs that give back their values; the detection
bootstrap equals a slow loop of the task's own VOC evaluation on every resample; the normals median from the
per-image histograms lies within one bin of the exact median, resampled or not."""

from __future__ import annotations

import numpy as np
import pytest

import tasks.detection.task as det
import tasks.navigation.task as navigation
import tasks.semi_supervised.task as semi
import tasks.surface_normals.task as sn
from evalsuite import stats
from evalsuite.data import READERS
from evalsuite.outputs import SampleOutputs, attach_intervals, load_outputs
from evalsuite.results import append_results
from tasks.detection import voc_eval as deval
from tasks.navigation.metrics import Episode, summarize
from tasks.surface_normals.metrics import THRESHOLDS_DEG, ErrorAccumulator, metric_outputs
from tests.helpers import make_context, read_records
from tests.test_surface_normals import PlanarScenes
from tests.test_task_outputs import check_records

RESAMPLES = 200
NORMALS_1_EPOCH = ["surface_normals.epochs=1", "surface_normals.codebook_size=6"]


def recorded(out, results) -> list[dict]:
    """``results`` with intervals attached and written as ``evalsuite run`` does; the records read back."""
    attach_intervals(results, resamples=RESAMPLES, level=0.95, seed=0)
    append_results(out, results)
    return read_records(out)


def with_intervals(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r["value"] is not None and np.isfinite(r["value"])]


# ------------------------------------------------------------------------------------------------ detection


def detection_case(n_images: int = 14, classes: int = 3, seed: int = 0):
    """Ground truth with difficult boxes and empty images; detections near the boxes (TPs, duplicates, misses),
    random boxes (FPs), scores rounded so that some tie within and across images."""
    rng = np.random.default_rng(seed)
    gts, parts = [], []
    for i in range(n_images):
        m = int(rng.integers(0, 4))
        xy = rng.uniform(0, 60, (m, 2))
        boxes = np.hstack([xy, xy + rng.uniform(10, 30, (m, 2))]).round()
        labels = rng.integers(0, classes, m)
        gts.append(deval.GroundTruth(boxes, labels, rng.random(m) < 0.2))
        hit = np.flatnonzero(rng.random(m) < 0.8)
        hit = np.concatenate([hit, hit[:1]])  # the first found box twice: a duplicate, an FP
        k = int(rng.integers(0, 4))
        rand_xy = rng.uniform(0, 60, (k, 2))
        b = np.vstack([boxes[hit] + rng.normal(0, 2, (len(hit), 4)), np.hstack([rand_xy, rand_xy + 15])])
        lab = np.concatenate([labels[hit], rng.integers(0, classes, k)]).astype(np.int64)
        score = np.round(rng.random(len(b)), 1).astype(np.float32)  # ties
        parts.append(deval.Detections(np.full(len(b), i, np.int64), lab, score, b.astype(np.float32)))
    dets = deval.Detections.concat(parts)
    gts[0] = deval.GroundTruth(np.array([[5.0, 5, 30, 30]]), np.array([0]), np.array([False]))  # class 0 has a box
    return dets, gts


def slow_resample(dets: deval.Detections, gts, counts: np.ndarray):
    """The resampled test set itself: an image drawn c times becomes c images with its boxes, each detection's
    c copies listed side by side (the ranking the statistic uses for tied scores)."""
    copy_id, new_gts = {}, []
    for i, c in enumerate(counts):
        for k in range(int(c)):
            copy_id[i, k] = len(new_gts)
            new_gts.append(gts[i])
    rows, images = [], []
    for d in range(len(dets.score)):
        for k in range(int(counts[dets.image[d]])):
            rows.append(d)
            images.append(copy_id[int(dets.image[d]), k])
    rows = np.asarray(rows, np.int64)
    return deval.Detections(np.asarray(images, np.int64), dets.label[rows], dets.score[rows], dets.boxes[rows]), new_gts


@pytest.mark.parametrize("method", ["voc07", "area"])
def test_detection_bootstrap_equals_a_slow_loop_of_the_voc_evaluation(method):
    dets, gts = detection_case()
    k = 3
    per_class = deval.evaluate_detections(dets, gts, k, method=method)
    merged, one = deval.class_agnostic_merge(dets, gts, 0.3)
    agn = deval.evaluate_detections(merged, one, 1, method=method)[0]
    samples = SampleOutputs(det.sample_arrays(dets, per_class, gts, (merged, agn, one)))
    assert (samples.arrays["outcome"] == -1).any() and (samples.arrays["outcome"] == 1).any()
    items = [("mAP", det.ap_outputs(samples, method)),
             ("AP/c1", det.ap_outputs(samples, method, class_mask="only_class1")),
             ("agnostic", det.ap_outputs(samples, method, prefix="agnostic_"))]
    # the point values are the task's own
    assert items[0][1].value() == pytest.approx(100 * deval.mean_ap(per_class), abs=1e-12)
    assert items[1][1].value() == pytest.approx(100 * per_class[1].ap, abs=1e-12)
    assert items[2][1].value() == pytest.approx(100 * agn.ap, abs=1e-12)
    got = stats.resampled_values([(m.statistic, m.arrays()) for _, m in items], resamples=25, seed=3)
    for b, idx in enumerate(stats.bootstrap_indices(len(gts), 25, seed=3)):
        counts = np.bincount(idx, minlength=len(gts))
        rd, rg = slow_resample(dets, gts, counts)
        evs = deval.evaluate_detections(rd, rg, k, method=method)
        rm, ro = slow_resample(merged, one, counts)
        expected = [deval.mean_ap(evs), evs[1].ap, deval.evaluate_detections(rm, ro, 1, method=method)[0].ap]
        np.testing.assert_allclose(got[b], expected, rtol=1e-12, atol=1e-12, equal_nan=True, err_msg=f"resample {b}")


def test_detection_records_carry_intervals_and_their_outputs(tmp_path_factory, tmp_path):
    from evalsuite.data.synthetic import write_voc2007

    root = tmp_path_factory.mktemp("voc")
    write_voc2007(root, seed=0, scale=0.1, image_size=72)
    ctx = make_context("detection", root, tmp_path, overrides=["detection.max_iter=1", "detection.max_test_images=4"])
    rows = recorded(tmp_path, det.task.run(ctx))
    by = {r["metric"]: r for r in rows}
    assert {"mAP", "mAP_area", "AP_class_agnostic"} <= set(by)
    assert by["mAP"]["outputs"]["statistic"] == "map_det_voc07"
    assert by["mAP_area"]["outputs"]["statistic"] == "map_det_area"
    assert by["mAP"]["outputs"]["samples"] == 4 and len({r["outputs"]["file"] for r in rows}) == 1
    check_records(tmp_path, with_intervals(rows), RESAMPLES)
    _, arrays, _ = load_outputs(tmp_path, by["mAP"])
    assert arrays["npos"].shape == (4, 20) and len(arrays["score"]) == by["mAP"]["params"]["num_detections"]


# ------------------------------------------------------------------------------------------------ surface normals


def test_normals_weighted_means_and_histogram_median_against_the_pooled_pixels():
    """Per-image arrays of a few images of different sizes: every metric of every resample equals the pooled
    pixels of the resampled images (mean, RMSE and % within exactly, the median within one 0.01 degree bin)."""
    rng = np.random.default_rng(0)
    images = [rng.gamma(2.0, rng.uniform(3, 12), int(rng.integers(50, 400))) for _ in range(9)]
    acc = ErrorAccumulator()
    for e in images:
        acc.add(e)
    outputs = metric_outputs(SampleOutputs(acc.sample_arrays()))
    pooled = np.concatenate(images)
    width = acc.bin_deg
    assert width == 0.01
    assert outputs["median_angle_error_deg"].value() == pytest.approx(np.median(pooled), abs=width)
    assert outputs["median_angle_error_deg"].value() == acc.summary()["median_angle_error_deg"]
    names = list(outputs)
    got = stats.resampled_values([(outputs[m].statistic, outputs[m].arrays()) for m in names], resamples=30, seed=1)
    for b, idx in enumerate(stats.bootstrap_indices(len(images), 30, seed=1)):
        e = np.concatenate([images[i] for i in idx])
        exact = {"mean_angle_error_deg": e.mean(), "median_angle_error_deg": np.median(e),
                 "rmse_angle_error_deg": np.sqrt(np.mean(e**2)),
                 **{f"pct_within_{t:g}deg": np.mean(e < t) for t in THRESHOLDS_DEG}}
        for j, m in enumerate(names):
            tol = width if m.startswith("median") else 1e-12
            assert got[b, j] == pytest.approx(exact[m], abs=tol), (b, m)


def test_normals_records_carry_intervals_and_their_outputs(tmp_path, monkeypatch):
    (tmp_path / "data" / "nyuv2").mkdir(parents=True)
    monkeypatch.setitem(READERS, "nyuv2", PlanarScenes)
    out = tmp_path / "out"
    ctx = make_context("surface_normals", tmp_path / "data", out, overrides=NORMALS_1_EPOCH)
    rows = recorded(out, sn.task.run(ctx))
    assert len(rows) == 6 and {r["outputs"]["statistic"] for r in rows} == {"weighted_mean", "root_weighted_mean",
                                                                            "median_hist"}
    check_records(out, rows, RESAMPLES)
    by = {r["metric"]: r for r in rows}
    _, arrays, _ = load_outputs(out, by["median_angle_error_deg"])
    assert arrays["hist"].shape == (6, 18001) and arrays["hist"].sum() == by["mean_angle_error_deg"]["params"][
        "valid_test_pixels"]
    assert by["median_angle_error_deg"]["params"]["median_bin_deg"] == 0.01


# ------------------------------------------------------------------------------------------------ navigation


def fake_run(agent, p, seed, *args, **kwargs):
    """A finished (agent, seed) without the simulator: seeded episodes, seed 1 with an unknown shortest path."""
    rng = np.random.default_rng([seed, len(agent)])
    eps = [Episode(bool(rng.random() < 0.6), float(rng.uniform(1, 5)), float(rng.uniform(1, 9)),
                   float(rng.normal()), int(rng.integers(5, 50))) for _ in range(p.eval_episodes)]
    if seed == 1:
        eps[0] = Episode(True, float("nan"), 3.0, 1.0, 7)
    return {"agent": agent, "seed": seed, **summarize(eps), "episodes": [e.to_dict() for e in eps]}


def test_navigation_records_are_seed_means_of_resampled_episodes(tmp_path, monkeypatch):
    monkeypatch.setattr(navigation, "run_agent", fake_run)
    ctx = make_context("navigation", tmp_path, tmp_path / "out", overrides=["num_seeds=2", "eval_episodes=9"],
                       extractor_factory=lambda: None)
    rows = recorded(tmp_path / "out", navigation.task.run(ctx))
    assert len(rows) == 12 and {r["outputs"]["samples"] for r in rows} == {18}
    check_records(tmp_path / "out", rows, RESAMPLES)
    spl = next(r for r in rows if r["metric"] == "spl" and r["layer"] == "random")
    assert spl["value"] == pytest.approx(np.mean([s["spl"] for s in spl["params"]["per_seed"]]))
    # the weighted mean of a resample: each seed's episodes weigh 1 / (its episodes with a value)
    _, arrays, _ = load_outputs(tmp_path / "out", spl)
    v, w = arrays["values"], arrays["weights"]
    assert np.isnan(v[9]) and w[0] == 1 / 9 and w[10] == 1 / 8
    got = stats.resampled_values([("weighted_mean", arrays)], resamples=20, seed=2)[:, 0]
    for b, idx in enumerate(stats.bootstrap_indices(18, 20, seed=2)):
        ok = np.isfinite(v[idx])
        assert got[b] == pytest.approx(np.average(v[idx][ok], weights=w[idx][ok]), abs=1e-12)


# ------------------------------------------------------------------------------------------------ semi-supervised


def test_semi_supervised_records_carry_intervals_and_per_image_hits(tiny_imagefolder, tmp_path):
    out = tmp_path / "out"
    ctx = make_context("semi_supervised", tiny_imagefolder, out,
                       overrides=["semi_supervised.image_size=32", "semi_supervised.batch_size=8"])
    rows = recorded(out, semi.task.run(ctx))
    assert [r["metric"] for r in rows] == ["top1", "top5"] and {r["outputs"]["samples"] for r in rows} == {24}
    check_records(out, rows, RESAMPLES)
    with np.load(out / rows[0]["outputs"]["file"]) as z:
        assert (z["top1"] == (z["pred"] == z["targets"])).all() and (z["top5"] >= z["top1"]).all()
