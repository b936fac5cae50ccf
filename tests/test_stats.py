"""evalsuite.stats against analytic intervals, slow independent loops and hand-computed tests; the per-sample
outputs of task records (evalsuite.outputs) recompute the recorded values."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from evalsuite import stats
from evalsuite.outputs import SampleOutputs, attach_intervals, load_outputs, recompute, write_outputs
from evalsuite.results import append_results
from tasks.svm.solver import voc_ap

# ------------------------------------------------------------------------------------------------ resamples


def test_counts_are_the_drawn_indices_in_any_chunking():
    idx = stats.bootstrap_indices(37, 25, seed=5)
    expected = np.stack([np.bincount(row, minlength=37) for row in idx])
    for chunk in (37, 37 * 4, 10**6):  # one resample per chunk, four, all at once
        got = np.concatenate(list(stats.bootstrap_counts(37, 25, seed=5, chunk_elements=chunk)))
        np.testing.assert_array_equal(got, expected)
    assert not np.array_equal(stats.bootstrap_indices(37, 25, seed=6), idx)


def wilson(successes: int, n: int, z: float) -> tuple[float, float]:
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


@pytest.mark.parametrize("level,z", [(0.95, 1.959964), (0.8, 1.281552)])
def test_bootstrap_of_a_bernoulli_mean_approximates_the_wilson_interval(level, z):
    correct = np.zeros(400, bool)
    correct[:280] = True
    iv = stats.bootstrap_mean_ci(correct, resamples=2000, level=level, seed=0)
    lo, hi = wilson(280, 400, z)
    half = z * math.sqrt(0.7 * 0.3 / 400)  # the normal interval: 0.7 +- 0.045 at 95 %
    assert iv.estimate == 0.7 and (iv.level, iv.resamples, iv.seed) == (level, 2000, 0)
    assert iv.low == pytest.approx(lo, abs=0.006) and iv.high == pytest.approx(hi, abs=0.006)
    assert iv.low == pytest.approx(0.7 - half, abs=0.006) and iv.high == pytest.approx(0.7 + half, abs=0.006)


def test_mean_leaves_nan_samples_out():
    values = np.array([1.0, np.nan, 0.0, 1.0, np.nan, 1.0])
    assert stats.STATISTICS["mean"].point({"values": values}) == 0.75
    counts = np.array([[1, 5, 1, 1, 5, 1], [0, 3, 2, 0, 0, 2]])
    np.testing.assert_allclose(stats.STATISTICS["mean"].resampled({"values": values}, counts), [0.75, 0.5])


# ------------------------------------------------------------------------------------------------ mAP


def voc_case(n: int = 60, classes: int = 4, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = np.where(rng.random((n, classes)) < 0.3, 1, -1).astype(np.int8)
    labels[rng.random((n, classes)) < 0.1] = 0  # ignored (difficult-only) for that class
    scores = np.round(labels + rng.normal(size=(n, classes)), 1)  # rounded: many tied scores
    return labels, scores


def slow_map(labels, scores, mask=None, kind="voc"):
    """The class-mean AP of one (resampled) test set, class by class, with the reference AP functions."""
    aps = []
    for c in range(labels.shape[1]):
        keep = labels[:, c] != 0
        y, s = labels[keep, c], scores[keep, c]
        if kind == "voc":
            aps.append(voc_ap(y, s))
        else:
            aps.append(average_precision_score(y > 0, s) if (y > 0).any() else np.nan)
    aps = np.asarray(aps)[mask if mask is not None else slice(None)]
    return np.nanmean(aps) if np.isfinite(aps).any() else np.nan


@pytest.mark.parametrize("kind", ["voc", "sklearn"])
def test_map_bootstrap_equals_a_slow_loop_over_the_same_resamples(kind):
    labels, scores = voc_case()
    mask = np.array([True, False, True, True])
    arrays = {"scores": scores, "labels": labels, "class_mask": mask}
    st = stats.STATISTICS[f"map_{kind}"]
    assert st.point(arrays) == pytest.approx(slow_map(labels, scores, mask, kind), abs=1e-12)
    resampled = stats.resampled_values([(st.name, arrays)], resamples=30, seed=3)[:, 0]
    for b, idx in enumerate(stats.bootstrap_indices(len(labels), 30, seed=3)):
        idx = np.sort(idx)  # the resample's images in index order: ties rank as on the unresampled data
        assert resampled[b] == pytest.approx(slow_map(labels[idx], scores[idx], mask, kind), abs=1e-12)
    iv = stats.bootstrap(st.name, arrays, resamples=30, seed=3)
    assert (iv.low, iv.high) == pytest.approx(tuple(np.quantile(resampled, [0.025, 0.975])), abs=1e-12)


def test_lowshot_map_is_the_mean_over_samples():
    labels, scores = voc_case()
    draws = np.stack([scores, scores[::-1], -scores])  # three "samples" of test scores
    got = stats.STATISTICS["map_voc"].point({"scores": draws, "labels": labels})
    assert got == pytest.approx(np.mean([slow_map(labels, d) for d in draws]), abs=1e-12)


def test_voc07_size_interval():
    """VOC07 test size (4952 images x 20 classes), 1000 resamples: the resampled mAPs spread around the
    point estimate (the time of this call is in docs/uncertainty.md)."""
    rng = np.random.default_rng(1)
    labels = np.where(rng.random((4952, 20)) < 0.07, 1, -1).astype(np.int8)
    scores = labels + rng.normal(size=labels.shape)
    iv = stats.bootstrap_map_ci(scores, labels)
    assert iv.low < iv.estimate < iv.high and iv.high - iv.low < 0.05


# ------------------------------------------------------------------------------------------------ paired tests


def test_paired_bootstrap_of_a_run_against_itself_finds_no_difference():
    labels, scores = voc_case()
    same = {"scores": scores, "labels": labels}
    d = stats.paired_bootstrap("map_voc", same, dict(same), resamples=200)
    assert (d.difference, d.low, d.high, d.p_value) == (0.0, 0.0, 0.0, 1.0)
    correct = {"values": np.arange(50) % 3 == 0}
    d = stats.paired_bootstrap("mean", correct, correct, resamples=200)
    assert (d.difference, d.low, d.high, d.p_value) == (0.0, 0.0, 0.0, 1.0)


def test_paired_bootstrap_finds_an_obvious_difference():
    rng = np.random.default_rng(0)
    a = rng.random(300) < 0.9
    b = a & (rng.random(300) < 0.6)  # run B gets a subset of A's right
    d = stats.paired_bootstrap("mean", {"values": a}, {"values": b}, resamples=500, seed=1)
    assert d.difference == pytest.approx(a.mean() - b.mean())
    assert 0 < d.low < d.difference < d.high and d.p_value == pytest.approx(1 / 501)
    # swapping the runs mirrors the interval
    r = stats.paired_bootstrap("mean", {"values": b}, {"values": a}, resamples=500, seed=1)
    assert (r.difference, r.low, r.high) == pytest.approx((-d.difference, -d.high, -d.low))


def test_mcnemar_by_hand():
    def runs(b, c, both=20):  # b: only A right, c: only B right
        a = np.r_[np.ones(b, bool), np.zeros(c, bool), np.ones(both, bool)]
        bb = np.r_[np.zeros(b, bool), np.ones(c, bool), np.ones(both, bool)]
        return a, bb

    m = stats.mcnemar(*runs(10, 2))  # b + c < 25: exact binomial, 2 P(X <= 2), X ~ Bin(12, 1/2)
    assert (m.b, m.c, m.method) == (10, 2, "exact")
    assert m.p_value == pytest.approx(2 * (1 + 12 + 66) / 4096)
    m = stats.mcnemar(*runs(30, 15))  # chi-square with continuity correction, 1 dof: p = erfc(sqrt(x / 2))
    stat = (15 - 1) ** 2 / 45
    assert m.method == "chi2" and m.statistic == pytest.approx(stat)
    assert m.p_value == pytest.approx(math.erfc(math.sqrt(stat / 2)))
    assert stats.mcnemar(*runs(30, 15), method="exact").p_value == pytest.approx(
        2 * sum(math.comb(45, i) for i in range(16)) / 2**45)
    assert stats.mcnemar(*runs(0, 0)).p_value == 1.0 and stats.mcnemar(*runs(3, 3)).p_value == 1.0


def test_holm_by_hand():
    # sorted: 0.005 x 4 = 0.02, 0.01 x 3 = 0.03, 0.03 x 2 = 0.06, 0.04 x 1 = 0.04 -> 0.06 (monotone)
    np.testing.assert_allclose(stats.holm([0.01, 0.04, 0.03, 0.005]), [0.03, 0.06, 0.06, 0.02])
    np.testing.assert_allclose(stats.holm([0.5, 0.2]), [0.5, 0.4])
    np.testing.assert_allclose(stats.holm([0.6, 0.9]), [1.0, 1.0])
    with pytest.raises(ValueError):
        stats.holm([0.1, 1.5])


# ------------------------------------------------------------------------------------------------ outputs


def test_outputs_are_written_once_content_addressed_and_read_back(tmp_path):
    from evalsuite.results import Result

    samples = SampleOutputs({"top1": np.array([1, 0, 1, 1], bool), "targets": np.arange(4)})
    records = []
    for metric in ("top1", "top1_again"):
        r = Result(task="t", dataset="d", split="val", layer="res5", metric=metric, value=75.0)
        r.pending_outputs = samples.mean("top1")
        records.append(r)
    attach_intervals(records, resamples=100, level=0.9, seed=2)
    assert records[0].ci_low <= 75.0 <= records[0].ci_high and records[0].ci_level == 0.9
    assert (records[0].ci_low, records[0].ci_high) == (records[1].ci_low, records[1].ci_high)
    append_results(tmp_path, records)
    assert len(list((tmp_path / "outputs").iterdir())) == 1
    rows = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    ref = rows[0]["outputs"]
    assert ref["file"] == f"outputs/{ref['sha256']}.npz" and ref["samples"] == 4 and ref["arrays"] == {"values": "top1"}
    assert rows[0]["ci_resamples"] == 100 and rows[0]["ci_seed"] == 2 and rows[0]["ci_method"] == stats.CI_METHOD
    assert "pending_outputs" not in rows[0]
    assert recompute(tmp_path / "results.jsonl", rows[0]) == 75.0
    statistic, arrays, scale = load_outputs(tmp_path, rows[1])
    assert (statistic, scale) == ("mean", 100.0) and arrays["values"].tolist() == [True, False, True, True]
    # the same arrays give the same bytes, so a second run's records name the same file
    assert SampleOutputs(dict(samples.arrays)).to_bytes() == samples.to_bytes()
    (tmp_path / ref["file"]).write_bytes(b"changed")
    with pytest.raises(Exception, match="sha256"):
        recompute(tmp_path, rows[0])


def test_a_record_whose_outputs_do_not_give_its_value_gets_no_interval(tmp_path, capsys):
    from evalsuite.results import Result

    r = Result(task="t", dataset="d", split="val", layer="res5", metric="top1", value=50.0)
    r.pending_outputs = SampleOutputs({"top1": np.ones(4, bool)}).mean("top1")
    attach_intervals([r])
    assert r.ci_low is None and "give 100" in capsys.readouterr().err
    write_outputs([r], tmp_path)  # the arrays are still kept
    assert r.outputs["statistic"] == "mean" and (tmp_path / r.outputs["file"]).is_file()


# ------------------------------------------------------------------------------------------------ transfer statistics


def _drawn(counts_row: np.ndarray) -> np.ndarray:
    """The sample indices of one resample, each repeated as often as it was drawn (index order)."""
    return np.repeat(np.arange(len(counts_row)), counts_row)


def test_mean_per_class_and_map_voc11_equal_the_reference_metrics_on_every_resample():
    """The vectorised statistics against tasks.transfer.metrics (ssl-transfer's confusion-matrix score and its
    precision_recall_curve 11-point AP) recomputed on each resampled test set, with tied scores."""
    from tasks.transfer import metrics as M

    rng = np.random.default_rng(3)
    n = 40
    targets = rng.integers(0, 4, n)
    pred = np.where(rng.random(n) < 0.6, targets, rng.integers(0, 4, n))
    labels = np.where(rng.random((n, 3)) < 0.35, 1, np.where(rng.random((n, 3)) < 0.2, 0, -1))  # 0: difficult
    scores = np.round(rng.normal(size=(n, 3)) + labels, 1)  # rounded: ties
    counts = np.concatenate(list(stats.bootstrap_counts(n, 30, seed=1)))
    mpc = stats.STATISTICS["mean_per_class"]
    voc = stats.STATISTICS["map_voc11"]
    got_mpc = mpc.resampled({"targets": targets, "pred": pred}, counts)
    got_voc = voc.resampled({"scores": scores, "labels": labels}, counts)
    checked = 0
    for b in range(len(counts)):
        i = _drawn(counts[b])
        t, p = targets[i], pred[i]
        if np.isin(p, t).all():  # where the reference's score is defined, the statistic is it
            assert got_mpc[b] * 100 == pytest.approx(M.mean_per_class_accuracy(t, p), abs=1e-9)
            checked += 1
        y = labels[i] == 1
        if y.any(axis=0).all():
            assert got_voc[b] * 100 == pytest.approx(M.mean_ap(y, scores[i]), abs=1e-9)
    assert checked > 5
    # the points are the reference metrics on the whole set (NaN where a prediction is no target's class)
    whole = M.mean_per_class_accuracy(targets, pred)
    assert mpc.point({"targets": targets, "pred": pred}) * 100 == pytest.approx(whole)
    assert voc.point({"scores": scores, "labels": labels}) * 100 == pytest.approx(M.mean_ap(labels == 1, scores))
    assert math.isnan(mpc.point({"targets": np.array([0, 0, 1]), "pred": np.array([0, 2, 1])}))


def test_episode_mean_has_the_references_normal_interval():
    """Few-shot: mean +- 1.96 std / sqrt(episodes) (numpy's population std) at 95 %, the normal quantile otherwise;
    no resamples drawn; the other statistics of the same call keep the bootstrap."""
    acc = np.array([60.0, 80.0, 73.3, 66.7, 93.3, 53.3, 86.7, 80.0])
    half = 1.96 * acc.std() / math.sqrt(len(acc))
    iv, boot = stats.bootstrap_many([("episode_mean", {"values": acc}), ("mean", {"values": acc})], 200, 0.95, 0)
    assert (iv.estimate, iv.low, iv.high) == (pytest.approx(acc.mean()), pytest.approx(acc.mean() - half),
                                              pytest.approx(acc.mean() + half))
    assert iv.resamples == 0 and iv.method.startswith("normal over episodes") and boot.resamples == 200
    iv90 = stats.bootstrap("episode_mean", {"values": acc}, level=0.9)
    assert iv90.high - acc.mean() == pytest.approx(1.6448536 * acc.std() / math.sqrt(len(acc)))
    # paired comparisons resample episodes like any mean
    np.testing.assert_allclose(stats.STATISTICS["episode_mean"].resampled({"values": acc}, np.ones((1, 8))),
                               [acc.mean()])
