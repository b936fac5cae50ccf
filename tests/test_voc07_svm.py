"""voc07_svm: presets, the benchmark's protocol re-run independently, ignore labels, bad data, CLI."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from sklearn.model_selection import cross_val_score
from sklearn.svm import LinearSVC

import tasks.svm.voc07 as voc
from evalsuite.checkpoints import load_checkpoint
from evalsuite.errors import BadFeatures
from evalsuite.features import l2_normalize
from tasks.svm import solver as svm
from tests.helpers import make_context, make_extractor, read_records, run_cli_with_task
from tests.svm_fakes import CLASSES, FakeVOC, handed_context

GOOD, NOISE = "res5", "res4"  # taps of the context's trunk; the tests hand in their features


def run_voc(out, ytr, yte, train_feats, test_feats, *overrides):
    """voc07_svm at the quick preset on the given labels and features (tap -> matrix) with ``overrides``."""
    layers = ",".join(train_feats)
    ctx = handed_context("voc07_svm", out, FakeVOC("trainval", ytr), FakeVOC("test", yte),
                         {"trainval": train_feats, "test": test_feats}, [f"voc07_svm.layers={layers}", *overrides])
    return ctx, voc.task.run(ctx)


def benchmark_l2(x):
    return l2_normalize(x, 1e-5, dtype=np.float64)


def separable(n, rng, noise=0.3):
    labels = np.where(rng.random((n, len(CLASSES))) < 0.35, 1, -1).astype(np.int8)
    labels[np.arange(len(CLASSES)), np.arange(len(CLASSES))] = 1  # every class has a positive
    feats = labels + noise * rng.normal(size=labels.shape)
    return labels, np.hstack([feats, rng.normal(size=(n, 4))]).astype(np.float32)


def test_presets_follow_the_benchmark():
    g, v, q = (voc.task.default_protocol(p) for p in ("goyal19", "vissl", "quick"))
    assert len(g.costs) == 26 and g.costs[:10] == (1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0, 100.0)
    assert g.costs[10:] == tuple(0.5**n for n in range(4, 20))
    assert v.costs == (0.01, 0.1, 1.0, 2.0, 5.0, 10.0, 15.0, 20.0, 50.0, 100.0, 1000.0)
    for p in (g, v):  # shorter side 256, then 224 x 224 (fair_ssb's scale + global_resize; VISSL's two Resizes)
        assert (p.folds, p.difficult_in_train, p.normalize, p.resize_mode, p.resize, p.image_size) == (
            3, "negative", "l2", "scale_square", 256, 224)
        assert p.svm.pos_weight == 2.0 and p.svm.neg_weight == 1.0 and p.svm.loss == "squared_hinge"
        assert p.layers == ("conv1", "res2", "res3", "res4", "res5") and p.undefined_ap == "nan"
    # fair_ssb: cv2.resize, Caffe2 AveragePool without padding; VISSL: PIL resize, nn.AvgPool2d with padding
    assert (g.interpolation, g.pooling, v.interpolation, v.pooling) == ("cv2_bilinear", "goyal", "bilinear", "vissl")
    assert (q.resize_mode, q.interpolation) == ("square", "bilinear")
    assert q.image_size < 224 and len(q.costs) < 26


def test_signal_scores_high_noise_near_chance_and_ignore_labels_are_dropped(tmp_path):
    rng = np.random.default_rng(0)
    ytr, ftr = separable(120, rng)
    yte, fte = separable(200, rng)
    noise_tr, noise_te = rng.normal(size=ftr.shape).astype(np.float32), rng.normal(size=fte.shape).astype(np.float32)
    ctx, (good, noise) = run_voc(tmp_path, ytr, yte, {GOOD: ftr, NOISE: noise_tr}, {GOOD: fte, NOISE: noise_te})
    assert (good.layer, noise.layer) == (GOOD, NOISE)
    assert good.value > 95
    prevalence = 100 * (yte == 1).mean()
    assert abs(noise.value - prevalence) < 15  # chance AP is the positive rate
    assert good.value == pytest.approx(np.mean(list(good.params["ap_per_class"].values())))
    assert set(good.params["chosen_cost"]) == set(CLASSES)
    assert all(c in ctx.protocol.costs for c in good.params["chosen_cost"].values())

    # ignore (0) test labels: an ignored image ranked first by a strong false score changes nothing
    yte2, fte2 = yte.copy(), fte.copy()
    yte2[0, 0], fte2[0, 0] = 0, 50.0
    again = run_voc(tmp_path, ytr, yte2, {GOOD: ftr}, {GOOD: fte2})[1][0]
    yte3 = yte.copy()
    yte3[0, 0] = -1  # the same image as a negative: now it hurts class c0
    hurt = run_voc(tmp_path, ytr, yte3, {GOOD: ftr}, {GOOD: fte2})[1][0]
    keep = np.arange(1, len(yte))
    sol = svm.cv_sweep(benchmark_l2(ftr), ytr, ctx.protocol.costs, 3, svm.SVMConfig()).final
    expect = svm.voc_ap(yte[keep, 0], sol.decision(benchmark_l2(fte2[keep]))[:, 0])
    assert again.params["ap_per_class"]["c0"] == pytest.approx(100 * expect, abs=1e-3)
    assert hurt.params["ap_per_class"]["c0"] < again.params["ap_per_class"]["c0"]


def test_difficult_in_train_modes(tmp_path):
    rng = np.random.default_rng(1)
    ytr, ftr = separable(90, rng)
    yte, fte = separable(60, rng)
    ytr[:10, 1] = 0
    neg = run_voc(tmp_path, ytr, yte, {GOOD: ftr}, {GOOD: fte})[1]
    ign = run_voc(tmp_path, ytr, yte, {GOOD: ftr}, {GOOD: fte}, "voc07_svm.difficult_in_train=ignore")[1]
    assert neg[0].params["difficult_in_train"] == "negative" and ign[0].params["difficult_in_train"] == "ignore"
    n_neg = int((ytr[:, 1] == -1).sum())
    assert neg[0].params["train_negatives"]["c1"] == n_neg + 10 and ign[0].params["train_negatives"]["c1"] == n_neg
    assert neg[0].params["train_negatives"]["c0"] == ign[0].params["train_negatives"]["c0"]


def test_class_without_test_positives_and_bad_features(tmp_path):
    rng = np.random.default_rng(2)
    ytr, ftr = separable(90, rng)
    yte, fte = separable(60, rng)
    yte[:, 3] = -1
    r = run_voc(tmp_path, ytr, yte, {GOOD: ftr}, {GOOD: fte}, "voc07_svm.undefined_ap=nan")[1][0]
    assert r.value is None and "no test positives: c3" in r.note and r.params["ap_per_class"]["c3"] is None
    r = run_voc(tmp_path, ytr, yte, {GOOD: ftr}, {GOOD: fte}, "voc07_svm.undefined_ap=exclude")[1][0]
    assert r.value == pytest.approx(np.mean([r.params["ap_per_class"][c] for c in CLASSES[:3]]))
    assert "not comparable" in r.note
    bad = ftr.copy()
    bad[5, 2] = np.nan
    with pytest.raises(BadFeatures, match=r"res5 features of voc2007 trainval contain NaN/Inf in 1\+ row\(s\), "
                                          r"first at row 5"):
        run_voc(tmp_path, ytr, yte, {GOOD: bad}, {GOOD: fte})
    with pytest.raises(BadFeatures, match="res5 features of voc2007 trainval: every image has the same feature vector"):
        run_voc(tmp_path, ytr, yte, {GOOD: np.zeros_like(ftr)}, {GOOD: fte})


def test_end_to_end_on_synthetic_voc_matches_the_benchmark_loop(synthetic_voc, tmp_path, cache_dir):
    """Run the task, then redo the benchmark's train_svm_kfold + test_svm with sklearn on the same features."""
    ckpt = load_checkpoint("random:resnet18", seed=0)
    ctx = make_context("voc07_svm", synthetic_voc, tmp_path / "out", overrides=["voc07_svm.image_size=32"],
                       checkpoint=ckpt, layers=["res5"],
                       extractor_factory=lambda: make_extractor(ckpt, cache_dir, batch_size=32))
    prot = ctx.protocol
    (res,) = voc.task.run(ctx)
    assert res.layer == "res5" and res.metric == "mAP" and res.params["num_train"] == 60
    train, test = ctx.open_dataset("voc2007", "trainval"), ctx.open_dataset("voc2007", "test")
    x_tr = benchmark_l2(ctx.features(train, ["res5"])["res5"])
    x_te = benchmark_l2(ctx.features(test, ["res5"])["res5"])
    ytr = train.label_matrix.astype(np.int32)
    ytr[ytr == 0] = -1
    aps = []
    for j, c in enumerate(train.classes):
        cv = []
        for cost in prot.costs:
            clf = LinearSVC(C=cost, class_weight={1: 2, -1: 1}, intercept_scaling=1.0, penalty="l2",
                            loss="squared_hinge", tol=1e-8, dual=True, max_iter=200000, random_state=0)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cv.append(cross_val_score(clf, x_tr, ytr[:, j], cv=3, scoring="average_precision").mean())
        best = prot.costs[int(np.argmax(cv))]
        assert res.params["chosen_cost"][c] == best
        clf.set_params(C=best).fit(x_tr, ytr[:, j])
        keep = test.label_matrix[:, j] != 0
        aps.append(svm.voc_ap(test.label_matrix[keep, j], clf.decision_function(x_te[keep])))
    assert res.value == pytest.approx(100 * np.nanmean(aps), abs=0.05)


def test_cli_run_on_synthetic_voc(synthetic_voc, tmp_path, cache_dir):
    rc = run_cli_with_task(voc.task, ["--set", "voc07_svm.image_size=32", "--set", "voc07_svm.svm.backend=sklearn",
                                      "--layers", "conv1", "--data-root", str(synthetic_voc),
                                      "--out", str(tmp_path / "runs")])
    assert rc == 0
    rows = read_records(tmp_path / "runs")
    assert [(r["task"], r["layer"], r["metric"]) for r in rows] == [("voc07_svm", "conv1", "mAP")]
    p = rows[0]["params"]
    assert p["solver"]["backend"] == "sklearn" and len(p["chosen_cost"]) == 20 and 0 <= rows[0]["value"] <= 100


def test_cli_missing_voc_exits_2(tmp_path, cache_dir, capsys):
    rc = run_cli_with_task(voc.task, ["--data-root", str(tmp_path / "nowhere"), "--out", str(tmp_path / "runs")])
    assert rc == 2
    assert "voc2007 data not found" in capsys.readouterr().err


def test_conformance_has_a_row_for_every_goyal19_field():
    from evalsuite.conformance import task_conformance
    from evalsuite.protocols import field_paths

    table = task_conformance(voc.task)
    assert set(table) == set(field_paths(voc.task.default_protocol("goyal19")))
    for _ref, source, status in table.values():
        assert status.split(":")[0].split(" ")[0] in ("same", "deviation", "ours")
        assert status.startswith("ours") or source.startswith("facebookresearch/fair_self_supervision_benchmark:")
    assert table["svm.backend"][2].startswith("deviation") and table["svm.sklearn_max_iter"][0].startswith("2000 ")
