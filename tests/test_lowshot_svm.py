"""lowshot_svm: the benchmark's k-shot sampling (counts, pools, seeds), stats over samples, cost selection, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.svm import LinearSVC

import tasks.svm.lowshot as ls
from evalsuite import registry
from evalsuite.cli import main as cli_main
from evalsuite.features import l2_normalize
from tasks.svm import solver as svm
from tests.svm_fakes import CLASSES, FakeVOC, handed_context

SIGNAL, NOISE = "res5", "res4"  # taps of the context's trunk; the tests hand in their features


def run_lowshot(out, ytr, yte, train_feats, test_feats, *overrides):
    """lowshot_svm at the quick preset on the given labels and features (tap -> matrix) with ``overrides``."""
    layers = ",".join(train_feats)
    ctx = handed_context("lowshot_svm", out, FakeVOC("trainval", ytr), FakeVOC("test", yte),
                         {"trainval": train_feats, "test": test_feats}, [f"lowshot_svm.layers={layers}", *overrides])
    return ls.task.run(ctx)


def voc_like(n, rng, noise=0.8):
    labels = np.where(rng.random((n, len(CLASSES))) < 0.3, 1, -1).astype(np.int8)
    labels[rng.random(labels.shape) < 0.05] = 0  # difficult-only
    feats = np.hstack([labels + noise * rng.normal(size=labels.shape), rng.normal(size=(n, 4))])
    return labels, feats.astype(np.float32)


def test_voc_sampling_counts_pools_and_seeds():
    rng = np.random.default_rng(0)
    labels, _ = voc_like(400, rng)
    for k in (1, 2, 4):
        s = ls.sample_voc_lowshot(labels, k, seed=0, sample=0)
        for j in range(len(CLASSES)):
            pos, neg = np.nonzero(s[:, j] == 1)[0], np.nonzero(s[:, j] == -1)[0]
            assert len(pos) == k and len(neg) == (len(CLASSES) - 1) * k  # k and (K-1)k, distinct rows
            assert (labels[pos, j] == 1).all() and (labels[neg, j] == -1).all()  # never a difficult-only image
        assert (ls.sample_voc_lowshot(labels, k, seed=0, sample=0) == s).all()  # reproducible
        assert (ls.sample_voc_lowshot(labels, k, seed=0, sample=1) != s).any()  # independent samples differ
        assert (ls.sample_voc_lowshot(labels, k, seed=1, sample=0) != s).any()
    with pytest.raises(ls.NotEnoughImages, match="class 0 has"):
        ls.sample_voc_lowshot(labels[:20], 8, seed=0, sample=0)


def test_single_label_sampling():
    labels = np.repeat(np.arange(3), [5, 6, 7])
    s = ls.sample_single_label_lowshot(labels, 3, 4, seed=0, sample=0)
    picked = (s != 0).any(axis=1)
    assert picked.sum() == 12 and all((labels[picked] == c).sum() == 4 for c in range(3))
    assert ((s == 1).sum(axis=0) == 4).all() and ((s == -1).sum(axis=0) == 8).all()
    assert (s[picked, labels[picked]] == 1).all()
    with pytest.raises(ls.NotEnoughImages):
        ls.sample_single_label_lowshot(labels, 3, 6, seed=0, sample=0)


def test_presets():
    g, v, q = (ls.task.default_protocol(p) for p in ("goyal19", "vissl", "quick"))
    assert g.k_values == (1, 2, 4, 8, 16, 32, 64, 96) == v.k_values
    assert g.num_samples == 5 and len(g.costs) == 26
    # the published choice (fair_ssb, VISSL, mmselfsup: the cost picked on the test set) everywhere; CV is opt-in
    assert g.cost_selection == v.cost_selection == q.cost_selection == "test"
    assert v.costs[-1] == 1000.0 and q.num_samples < 5


def test_test_selected_stats_follow_the_benchmark_aggregation(tmp_path):
    rng = np.random.default_rng(1)
    ytr, ftr = voc_like(300, rng)
    yte, fte = voc_like(150, rng)
    r2, r100 = run_lowshot(tmp_path, ytr, yte, {SIGNAL: ftr}, {SIGNAL: fte}, "lowshot_svm.k_values=2,100",
                           "lowshot_svm.num_samples=3", "lowshot_svm.costs=0.01,1.0", "lowshot_svm.cost_selection=test")
    assert [(r.metric, r.params["k"]) for r in (r2, r100)] == [("mAP", 2), ("mAP", 100)]
    assert r100.value is None and "k=100 skipped" in r100.note
    assert r100.params["cost_selection"] == "test" and r100.params["test_set_tuned"] is True
    p = r2.params
    maps = np.array(p["per_sample_map"])
    assert r2.value == pytest.approx(maps.mean(), abs=1e-3) and p["std"] == pytest.approx(maps.std(), abs=1e-3)
    assert (p["min"], p["max"]) == (pytest.approx(maps.min(), abs=1e-3), pytest.approx(maps.max(), abs=1e-3))
    assert p["map_per_cost"][str(p["chosen_cost"])] == max(p["map_per_cost"].values())
    # recompute sample 0 at the chosen cost independently (one LinearSVC-objective solve per class)
    lab = ls.sample_voc_lowshot(ytr, 2, seed=0, sample=0)
    xtr, xte = l2_normalize(ftr, dtype=np.float64), l2_normalize(fte, dtype=np.float64)
    aps = []
    for j in range(len(CLASSES)):
        rows = lab[:, j] != 0
        sol = svm.solve(xtr[rows], lab[rows, j:j + 1], np.array([p["chosen_cost"]]), svm.SVMConfig(backend="sklearn",
                        sklearn_tol=1e-8, sklearn_max_iter=100000))
        aps.append(svm.voc_ap(yte[:, j], sol.decision(xte)[:, 0]))
    assert maps[0] == pytest.approx(100 * np.mean(aps), abs=0.05)
    assert "TEST set" in p["cost_selection_note"]


def shifted(n, rng, train):
    """Two features per class: in training a clean one with a tiny margin and a loud noisy one; at test the clean
    one carries nothing and the loud one is informative. A large C fits the tiny margin (what CV on the training
    rows prefers), a small C the class-mean gap (what the test set prefers)."""
    labels = np.where(rng.random((n, len(CLASSES))) < 0.3, 1, -1).astype(np.int8)
    labels[rng.random(labels.shape) < 0.05] = 0  # difficult-only
    sign = np.where(labels > 0, 1.0, -1.0)
    noise = rng.normal(size=(2,) + sign.shape)
    clean, loud = (0.1 * sign + 0.01 * noise[0], sign + 3.0 * noise[1]) if train else (0.01 * noise[0], sign + noise[1])
    return labels, np.hstack([clean, loud]).astype(np.float32)


def test_cost_chosen_on_test_is_the_published_loop_and_cv_is_not(tmp_path):
    """The published procedure (fair_ssb test_svm_low_shot.py + aggregate_low_shot_svm_stats.py), written out: per
    k, for every sample and cost, one LinearSVC per class, the test mAP over classes; the mean over samples; argmax."""
    rng = np.random.default_rng(3)
    ytr, ftr = shifted(300, rng, train=True)
    yte, fte = shifted(200, rng, train=False)
    costs, samples = [1e-3, 0.1, 100.0], 3
    sets = ("lowshot_svm.k_values=4,8", f"lowshot_svm.num_samples={samples}", "lowshot_svm.costs=0.001,0.1,100",
            "lowshot_svm.normalize=none")
    published = run_lowshot(tmp_path, ytr, yte, {SIGNAL: ftr}, {SIGNAL: fte}, *sets)  # the default selection
    cv = run_lowshot(tmp_path, ytr, yte, {SIGNAL: ftr}, {SIGNAL: fte}, *sets, "lowshot_svm.cost_selection=cv")
    xtr, xte = ftr.astype(np.float64), fte.astype(np.float64)
    for rec, cv_rec, k in zip(published, cv, (4, 8)):
        maps = np.zeros((samples, len(costs)))
        for s in range(samples):
            lab = ls.sample_voc_lowshot(ytr, k, seed=0, sample=s)
            for c, cost in enumerate(costs):
                aps = []
                for j in range(len(CLASSES)):
                    rows = lab[:, j] != 0
                    clf = LinearSVC(C=cost, class_weight={1: 2, -1: 1}, intercept_scaling=1.0, penalty="l2",
                                    loss="squared_hinge", tol=1e-8, dual=True, max_iter=10**6, random_state=0)
                    clf.fit(xtr[rows], lab[rows, j])
                    aps.append(svm.voc_ap(yte[:, j], clf.decision_function(xte)))
                maps[s, c] = np.mean(aps)
        best = int(np.argmax(maps.mean(axis=0)))
        assert rec.params["k"] == k and rec.params["chosen_cost"] == costs[best]
        assert rec.value == pytest.approx(100 * maps[:, best].mean(), abs=1e-3)
        np.testing.assert_allclose(rec.params["per_sample_map"], 100 * maps[:, best], atol=1e-3)
        assert rec.params["cost_selection"] == "test" and rec.params["test_set_tuned"] is True
        assert cv_rec.params["cost_selection"] == "cv" and cv_rec.params["test_set_tuned"] is False
    # at k=8 CV on the training rows mostly picks the large cost: far below the published number
    picks = [c for chosen in cv[1].params["chosen_cost_per_sample"] for c in chosen.values()]
    assert picks.count(100.0) > len(picks) / 2 and published[1].params["chosen_cost"] != 100.0
    assert published[1].value - cv[1].value > 10


def test_cv_selection_and_noise_is_near_chance(tmp_path):
    rng = np.random.default_rng(2)
    ytr, ftr = voc_like(300, rng, noise=0.3)
    yte, fte = voc_like(200, rng, noise=0.3)
    good, noise = run_lowshot(tmp_path, ytr, yte, {SIGNAL: ftr, NOISE: rng.normal(size=ftr.shape)},
                              {SIGNAL: fte, NOISE: rng.normal(size=fte.shape)}, "lowshot_svm.k_values=4",
                              "lowshot_svm.num_samples=2", "lowshot_svm.cost_selection=cv")
    assert (good.layer, noise.layer) == (SIGNAL, NOISE)
    assert good.params["cost_selection"] == "cv" and good.params["folds_used"] == 3
    assert len(good.params["chosen_cost_per_sample"]) == 2
    assert good.value > 85 and abs(noise.value - 100 * (yte == 1).sum() / (yte != 0).sum()) < 15


def test_cli_run_on_synthetic_voc(synthetic_voc, tmp_path, cache_dir):
    registry.register_task(ls.task)
    try:
        rc = cli_main(["run", "--checkpoint", "random:resnet18", "--tasks", "lowshot_svm", "--protocol", "quick",
                       "--set", "lowshot_svm.image_size=32", "--set", "lowshot_svm.k_values=[1]",
                       "--data-root", str(synthetic_voc), "--out", str(tmp_path / "runs"), "--no-progress"])
    finally:
        registry.unregister(registry.TASK_GROUP, "lowshot_svm")
    assert rc == 0
    rows = [json.loads(ln) for ln in (tmp_path / "runs" / "results.jsonl").read_text().splitlines()]
    assert [(r["layer"], r["metric"]) for r in rows] == [("res5", "mAP")]
    assert rows[0]["params"]["k"] == 1 and len(rows[0]["params"]["per_sample_map"]) == 2


def test_conformance_has_a_row_for_every_goyal19_field():
    from evalsuite.conformance import task_conformance
    from evalsuite.protocols import field_paths

    table = task_conformance(ls.task)
    assert set(table) == set(field_paths(ls.task.default_protocol("goyal19")))
    for _ref, _source, status in table.values():
        assert status.split(":")[0].split(" ")[0] in ("same", "deviation", "ours")
    assert table["cost_selection"][1].endswith("tools/svm/aggregate_low_shot_svm_stats.py")
    assert table["cost_selection"][2].startswith("same") and "{" not in table["cost_selection"][2]
