"""Records of tiny task runs carry bootstrap intervals and per-sample outputs whose recomputed metric is the
record's value (docs/uncertainty.md)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

import tasks.knn.task as knn
import tasks.svm.lowshot as ls
import tasks.svm.voc07 as voc
from evalsuite import stats
from evalsuite.cli import main as cli_main
from evalsuite.outputs import SampleOutputs, attach_intervals, load_outputs, recompute
from evalsuite.results import append_results
from tasks.knn.search import Neighbours
from tasks.svm.solver import voc_ap
from tests.helpers import read_records
from tests.svm_fakes import CLASSES, FakeVOC, handed_context


def voc_like(n, rng, noise=0.8):
    labels = np.where(rng.random((n, len(CLASSES))) < 0.3, 1, -1).astype(np.int8)
    labels[rng.random(labels.shape) < 0.05] = 0  # difficult-only
    labels[np.arange(len(CLASSES)), np.arange(len(CLASSES))] = 1  # every class has a positive
    feats = np.hstack([labels + noise * rng.normal(size=labels.shape), rng.normal(size=(n, 4))])
    return labels, feats.astype(np.float32)


def check_records(out, rows, resamples=200, level=0.95):
    """Every record with outputs: interval fields, and its outputs file gives back its value."""
    for r in rows:
        assert r["ci_resamples"] == resamples and r["ci_level"] == level and r["ci_seed"] == 0
        assert r["ci_low"] <= r["value"] + 1e-9 and r["value"] <= r["ci_high"] + 1e-9
        assert r["outputs"]["samples"] > 0 and (out / r["outputs"]["file"]).is_file()
        assert recompute(out / "results.jsonl", r) == pytest.approx(r["value"], abs=1e-9)


def test_knn_and_centroid_records_from_a_tiny_run(tiny_imagefolder, tmp_path, cache_dir):
    out = tmp_path / "runs"
    rc = cli_main(["run", "--checkpoint", "random:resnet18", "--tasks", "knn,centroid", "--protocol", "quick",
                   "--layers", "res5", "--data-root", str(tiny_imagefolder), "--out", str(out), "--no-progress",
                   "--ci-resamples", "200"])
    assert rc == 0
    rows = read_records(out)
    knn = {r["metric"]: r for r in rows if r["task"] == "knn"}
    assert {"top1", "top5", "majority_top1@k20", "retrieval_mAP@20", "retrieval_recall@10"} <= set(knn)
    check_records(out, rows)
    # top-1: per-image hits, the weighted vote's predictions and the targets, one file per (task, split, layer)
    _, arrays, _ = load_outputs(out, knn["top1"])
    hits = arrays["values"]
    assert hits.dtype == bool and hits.shape == (24,)
    assert len({r["outputs"]["file"] for r in knn.values()}) == 1
    with np.load(out / knn["top1"]["outputs"]["file"]) as z:
        assert (hits == (z["pred"] == z["targets"])).all()
        assert np.allclose(z["retrieval_precision@10"].mean() * 100, knn["retrieval_precision@10"]["value"])
    (centroid,) = [r for r in rows if r["task"] == "centroid"]
    assert centroid["outputs"]["statistic"] == "mean"


def test_multilabel_knn_outputs_give_back_every_metric():
    """VOC-style kNN on given neighbours: the vote scores give the class-mean AP (scikit-learn's, per class), the
    per-query retrieval values their means."""
    rng = np.random.default_rng(0)
    p = knn.task.default_protocol("quick").replace(k=3, ks=(3, 5), retrieval_ks=(1, 5), retrieval_depth=5)
    train_lm = np.where(rng.random((30, 4)) < 0.4, 1, -1)
    val_lm = np.where(rng.random((40, 4)) < 0.4, 1, -1)
    val_lm[rng.random(val_lm.shape) < 0.1] = 0
    targets = knn._targets(SimpleNamespace(root=Path("/d"), label_matrix=train_lm),
                           SimpleNamespace(root=Path("/d"), label_matrix=val_lm), p)
    ids = np.stack([rng.permutation(30)[:5] for _ in range(40)])
    nb = Neighbours(np.sort(rng.random((40, 5)).astype(np.float32))[:, ::-1].copy(), ids)
    plan = knn._plan(p, 30, 40)
    per_sample = knn._target_arrays(targets)
    values = knn.classification_metrics(nb, targets, p, plan, per_sample)
    values.update(knn.retrieval_metrics(nb, None, None, targets, p, plan, None, False, per_sample))
    samples = SampleOutputs(per_sample)
    assert {"mAP", "mAP@k5", "majority_mAP@k3", "retrieval_mAP@5", "retrieval_recall@5"} <= set(values)
    for metric, value in values.items():
        outputs = knn._metric_outputs(samples, metric)
        assert outputs.statistic == ("map_sklearn" if "mAP" in metric and "retrieval" not in metric else "mean")
        assert outputs.value() == pytest.approx(value, abs=1e-9), metric
    w = np.exp(nb.scores[:, :3].astype(np.float64) / p.temperature)
    scores = (w[:, :, None] * (train_lm > 0)[ids[:, :3]]).sum(1)
    aps = [average_precision_score(val_lm[val_lm[:, c] != 0, c] > 0, scores[val_lm[:, c] != 0, c]) for c in range(4)]
    assert values["mAP"] == pytest.approx(100 * np.mean(aps))


def test_intervals_can_be_turned_off_and_a_bad_level_is_refused(tiny_imagefolder, tmp_path, cache_dir, capsys):
    out = tmp_path / "runs"
    args = ["run", "--checkpoint", "random:resnet18", "--tasks", "centroid", "--protocol", "quick", "--layers",
            "res5", "--data-root", str(tiny_imagefolder), "--out", str(out), "--no-progress"]
    assert cli_main([*args, "--ci-resamples", "0"]) == 0
    (r,) = read_records(out)
    assert r["ci_low"] is None and r["ci_resamples"] is None and recompute(out, r) == pytest.approx(r["value"])
    assert cli_main([*args, "--ci-level", "95"]) == 2
    assert "--ci-level must lie strictly between 0 and 1" in capsys.readouterr().err


def test_voc07_svm_record_outputs_are_the_test_scores(tmp_path):
    rng = np.random.default_rng(0)
    ytr, ftr = voc_like(90, rng)
    yte, fte = voc_like(60, rng)
    ytr[:, 2] = np.where(ytr[:, 2] > 0, -1, ytr[:, 2])  # c2 has no training positive: left out of the mAP
    ctx = handed_context("voc07_svm", tmp_path, FakeVOC("trainval", ytr), FakeVOC("test", yte),
                         {"trainval": {"res5": ftr}, "test": {"res5": fte}},
                         ["voc07_svm.layers=res5", "voc07_svm.costs=0.1,1.0"])
    results = voc.task.run(ctx)
    attach_intervals(results, resamples=200, level=0.95, seed=0)
    append_results(tmp_path, results)
    (row,) = read_records(tmp_path)
    check_records(tmp_path, [row])
    statistic, arrays, scale = load_outputs(tmp_path, row)
    assert statistic == "map_voc" and scale == 100.0 and arrays["class_mask"].tolist() == [True, True, False, True]
    # independently: the benchmark's AP per class on the stored scores, the classes trained on a positive
    aps = [voc_ap(yte[:, j], arrays["scores"][:, j]) for j in (0, 1, 3)]
    assert row["value"] == pytest.approx(100 * np.mean(aps), abs=1e-9)
    iv = stats.bootstrap_map_ci(arrays["scores"], yte, arrays["class_mask"], resamples=200, seed=0)
    assert (row["ci_low"], row["ci_high"]) == pytest.approx((100 * iv.low, 100 * iv.high))


def test_lowshot_svm_record_outputs_hold_every_sample(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    ytr, ftr = voc_like(200, rng)
    yte, fte = voc_like(80, rng)
    for selection in ("cv", "test"):  # the last context (test selection) is reused below
        ctx = handed_context("lowshot_svm", tmp_path, FakeVOC("trainval", ytr), FakeVOC("test", yte),
                             {"trainval": {"res5": ftr}, "test": {"res5": fte}},
                             ["lowshot_svm.layers=res5", "lowshot_svm.k_values=2", "lowshot_svm.num_samples=3",
                              "lowshot_svm.costs=0.1,1.0", f"lowshot_svm.cost_selection={selection}"])
        (r,) = ls.task.run(ctx)
        attach_intervals([r], resamples=200, seed=0)
        out = tmp_path / selection
        append_results(out / "results.jsonl", [r])
        (row,) = read_records(out)
        check_records(out, [row])
        _, arrays, _ = load_outputs(out, row)
        assert arrays["scores"].shape == (3, 80, len(CLASSES))
        per_sample = [np.nanmean([voc_ap(yte[:, j], s[:, j]) for j in range(len(CLASSES))]) for s in arrays["scores"]]
        assert np.allclose(100 * np.array(per_sample), row["params"]["per_sample_map"], atol=1e-4)
    # a record whose scores would be too large keeps none (Places205's 5 x 20500 x 205)
    monkeypatch.setattr(ls, "MAX_KEPT_SCORES", 3 * 80 * len(CLASSES) - 1)
    (r,) = ls.task.run(ctx)
    assert r.value is not None and r.pending_outputs is None


def test_linear_probe_records_carry_intervals(tiny_imagefolder, tmp_path, cache_dir):
    out = tmp_path / "runs"
    rc = cli_main(["run", "--checkpoint", "random:resnet18", "--tasks", "places205_linear", "--protocol", "quick",
                   "--set", "places205_linear.dataset=imagefolder", "--set", "places205_linear.epochs=1",
                   "--set", "places205_linear.lr_milestones=[]", "--layers", "res5", "--data-root",
                   str(tiny_imagefolder), "--out", str(out), "--no-progress", "--ci-resamples", "200"])
    assert rc == 0
    rows = read_records(out)
    assert {r["metric"] for r in rows} == {"top1", "top5"}
    check_records(out, rows)
