"""`evalsuite compare --paired`: two runs compared sample by sample from their per-sample outputs (paired bootstrap,
McNemar, Holm), on hand-made records and outputs files written through the public API (docs/uncertainty.md)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import binomtest, chi2

from evalsuite.cli import main
from evalsuite.outputs import SampleOutputs, attach_intervals
from evalsuite.results import Result, append_results

N = 100


def record(metric: str, samples: SampleOutputs, outputs, *, layer="res5", ck="a", fingerprint="fp-val") -> Result:
    r = Result(task="knn", dataset="imagefolder", split="val", layer=layer, metric=metric, value=outputs.value(),
               checkpoint_id=ck * 64, checkpoint=f"/ckpts/{ck}.pth", checkpoint_name=ck, method=ck, arch="resnet50",
               pretrain_data="imagenet1k", protocol="quick", params={"k": 10}, seed=0,
               dataset_fingerprint=fingerprint)
    r.pending_outputs = outputs
    return r


def run(folder: Path, records: list[Result]) -> Path:
    attach_intervals(records, resamples=100)
    append_results(folder / "results.jsonl", records)
    return folder


def hits_with(only_a: int, only_b: int, both: int = 50, n: int = N) -> tuple[np.ndarray, np.ndarray]:
    """Two correctness vectors with ``both`` right in each, ``only_a`` right in A only, ``only_b`` in B only."""
    a, b = np.zeros(n, bool), np.zeros(n, bool)
    a[:both] = b[:both] = True
    a[both:both + only_a] = True
    b[both + only_a:both + only_a + only_b] = True
    return a, b


def top1_record(hits: np.ndarray, targets: np.ndarray, **kw) -> Result:
    s = SampleOutputs({"top1": hits, "targets": targets})
    return record("top1", s, s.mean("top1"), **kw)


def map_record(scores: np.ndarray, labels: np.ndarray, **kw) -> Result:
    s = SampleOutputs({"scores": scores, "labels": labels})
    return record("mAP", s, s.metric("map_voc", scores="scores", labels="labels"), **kw)


def voc_labels(rng: np.random.Generator, n: int = N, classes: int = 4) -> np.ndarray:
    labels = np.where(rng.random((n, classes)) < 0.3, 1, -1).astype(np.int8)
    labels[:classes, :] = -1
    labels[np.arange(classes), np.arange(classes)] = 1  # every class has a positive
    return labels


def compare(tmp_path: Path, a: Path, b: Path, *args: str) -> tuple[int, dict]:
    report = tmp_path / "paired.json"
    rc = main(["compare", "--results", str(a), "--against", str(b), "--paired", "--report", str(report), *args])
    return rc, json.loads(report.read_text())


def test_a_run_against_itself_has_no_difference_and_p_one(tmp_path, capsys) -> None:
    rng = np.random.default_rng(0)
    targets = rng.integers(0, 5, N)
    labels = voc_labels(rng)
    a = run(tmp_path / "a", [top1_record(rng.random(N) < 0.6, targets), top1_record(rng.random(N) < 0.4, targets,
                                                                                    layer="res4"),
                             map_record(labels + rng.normal(size=labels.shape), labels)])
    rc, rep = compare(tmp_path, a, a, "--resamples", "200")
    assert rc == 0 and rep["summary"]["compared"] == 3 and rep["summary"]["same"] == 3 and rep["summary"]["passed"]
    for row in rep["rows"]:
        assert row["delta"] == 0.0 and row["diff_low"] == 0.0 and row["diff_high"] == 0.0
        assert row["p_bootstrap"] == 1.0 and row["p_holm"] == 1.0 and row["status"] == "same"
    mcnemar = {r["metric"]: r["mcnemar"] for r in rep["rows"]}
    assert mcnemar["mAP"] is None  # not per-sample correctness: the bootstrap is the row's test
    assert mcnemar["top1"] == {"only_a": 0, "only_b": 0, "statistic": 0.0, "p_value": 1.0, "method": "exact"}
    out = capsys.readouterr().out
    assert "3 not significantly different" in out and "PASS" in out


def test_an_obvious_difference_is_significant_and_fails_only_outside_the_tolerance(tmp_path) -> None:
    rng = np.random.default_rng(1)
    targets = rng.integers(0, 5, N)
    good, bad = hits_with(only_a=35, only_b=0, both=55)  # 90 % vs 55 % correct
    labels = voc_labels(rng)
    strong = labels + 0.1 * rng.normal(size=labels.shape)  # ranks almost perfectly
    weak = rng.normal(size=labels.shape)  # ranks at random
    a = run(tmp_path / "trained", [top1_record(good, targets), map_record(strong, labels)])
    b = run(tmp_path / "random", [top1_record(bad, targets, ck="r"), map_record(weak, labels, ck="r")])
    rc, rep = compare(tmp_path, a, b, "--resamples", "200", "--tolerance", "0.5")
    assert rc == 1 and rep["summary"]["differs"] == 2
    rows = {r["metric"]: r for r in rep["rows"]}
    top1 = rows["top1"]
    assert top1["delta"] == pytest.approx(35.0) and top1["test"] == "McNemar (chi2)"
    assert top1["mcnemar"]["only_a"] == 35 and top1["mcnemar"]["only_b"] == 0
    assert top1["p_value"] == pytest.approx(chi2.sf(34 ** 2 / 35, 1))  # (|b - c| - 1)^2 / (b + c), 1 dof
    assert top1["diff_low"] > 0 and top1["status"] == "differs"
    # every resampled mAP difference lies far from the null: the bootstrap p-value is its floor 1 / (B + 1)
    assert rows["mAP"]["p_bootstrap"] == pytest.approx(1 / 201) and rows["mAP"]["test"] == "paired bootstrap"
    # the same differences within a wide tolerance are significant but do not fail
    rc, rep = compare(tmp_path, a, b, "--resamples", "200", "--tolerance", "70")
    assert rc == 0 and {r["status"] for r in rep["rows"]} == {"differs_within_tolerance"}


def test_the_bootstrap_interval_and_p_value_of_a_float_metric_match_a_hand_loop(tmp_path) -> None:
    """Per-query values (with undefined NaN queries): the same resamples drawn by hand, the mean of each run over
    the drawn queries, the difference's percentiles and the shifted-null p-value."""
    rng = np.random.default_rng(2)
    va, vb = rng.random(N), rng.random(N) * 0.9
    va[::17] = vb[::17] = np.nan
    sa, sb = SampleOutputs({"ap": va}), SampleOutputs({"ap": vb})
    a = run(tmp_path / "a", [record("retrieval_mAP@20", sa, sa.mean("ap"))])
    b = run(tmp_path / "b", [record("retrieval_mAP@20", sb, sb.mean("ap"), ck="b")])
    rc, rep = compare(tmp_path, a, b, "--resamples", "300", "--seed", "7", "--level", "0.9", "--tolerance", "50")
    (row,) = rep["rows"]
    idx = np.random.default_rng(7).integers(0, N, (300, N))
    diffs = 100 * (np.nanmean(va[idx], axis=1) - np.nanmean(vb[idx], axis=1))
    d = 100 * (np.nanmean(va) - np.nanmean(vb))
    assert row["delta"] == pytest.approx(d)
    assert row["diff_low"] == pytest.approx(np.quantile(diffs, 0.05))
    assert row["diff_high"] == pytest.approx(np.quantile(diffs, 0.95))
    assert row["p_bootstrap"] == pytest.approx((1 + np.sum(np.abs(diffs - d) >= abs(d))) / 301)
    assert row["mcnemar"] is None and rc == 0


def test_holm_adjusts_the_p_values_of_all_rows_compared(tmp_path) -> None:
    rng = np.random.default_rng(3)
    targets = rng.integers(0, 5, N)
    discordant = {"conv1": (0, 0), "res2": (6, 0), "res3": (14, 1), "res4": (30, 10), "res5": (7, 1)}
    ours, theirs = [], []
    for layer, (only_a, only_b) in discordant.items():
        ha, hb = hits_with(only_a, only_b, both=40)
        ours.append(top1_record(ha, targets, layer=layer))
        theirs.append(top1_record(hb, targets, layer=layer, ck="b"))
    rc, rep = compare(tmp_path, run(tmp_path / "a", ours), run(tmp_path / "b", theirs), "--resamples", "50",
                      "--tolerance", "0.5", "--alpha", "0.05")
    rows = {r["layer"]: r for r in rep["rows"]}

    def mcnemar_p(b: int, c: int) -> float:  # exact below 25 discordant pairs, else chi-square with continuity
        if b + c == 0:
            return 1.0
        return binomtest(b, b + c, 0.5).pvalue if b + c < 25 else chi2.sf((abs(b - c) - 1) ** 2 / (b + c), 1)

    raw = {layer: mcnemar_p(*bc) for layer, bc in discordant.items()}
    order = sorted(raw, key=raw.get)
    m, running, holm = len(raw), 0.0, {}
    for i, layer in enumerate(order):  # step-down: (m - i) p_(i), made monotone, capped at 1
        running = max(running, min(1.0, (m - i) * raw[layer]))
        holm[layer] = running
    for layer in discordant:
        assert rows[layer]["p_value"] == pytest.approx(raw[layer])
        assert rows[layer]["p_holm"] == pytest.approx(holm[layer])
        assert rows[layer]["significant"] == (holm[layer] <= 0.05)
    # res2 (6 vs 0: raw p 0.031) is significant alone but not after Holm over five rows
    assert raw["res2"] < 0.05 and not rows["res2"]["significant"]
    assert rows["res3"]["significant"] and rows["res4"]["significant"]
    assert rc == 1 and rep["summary"]["differs"] == 2 and rep["summary"]["same"] == 3


def test_rows_of_other_test_sets_or_without_outputs_are_skipped_with_the_reason(tmp_path, capsys) -> None:
    rng = np.random.default_rng(4)
    targets = rng.integers(0, 5, N)
    hits = rng.random(N) < 0.5
    perm = rng.permutation(N)
    a = run(tmp_path / "a", [top1_record(hits, targets, layer="res2"), top1_record(hits, targets, layer="res3"),
                             top1_record(hits, targets, layer="res4"), top1_record(hits, targets, layer="res5"),
                             top1_record(hits, targets, layer="conv1")])
    no_outputs = Result(task="knn", dataset="imagefolder", split="val", layer="res4", metric="top1",
                        value=float(hits.mean() * 100), checkpoint_name="b", protocol="quick", params={"k": 10},
                        dataset_fingerprint="fp-val")
    b = run(tmp_path / "b", [top1_record(hits, targets, layer="res2", fingerprint="fp-other"),
                             top1_record(hits[perm], targets[perm], layer="res3"), no_outputs,
                             top1_record(hits[:50], targets[:50], layer="res5")])
    rc, rep = compare(tmp_path, a, b)
    reasons = {s["layer"]: s["reason"] for s in rep["skipped"]}
    assert reasons["res2"].startswith("different test sets (dataset fingerprints")
    assert reasons["res3"] == "the test samples differ in order or labels (targets arrays differ)"
    assert reasons["res4"] == "no per-sample outputs in B"
    assert reasons["res5"] == "different numbers of test samples (100 vs 50)"
    assert rep["summary"]["compared"] == 0 and [r["layer"] for r in rep["only_ours"]] == ["conv1"]
    assert rc == 0 and not rep["summary"]["passed"]
    assert "no per-sample outputs in B" in capsys.readouterr().out
    assert compare(tmp_path, a, b, "--strict")[0] == 1


def test_paired_needs_two_result_sets(tmp_path, capsys) -> None:
    a = run(tmp_path / "a", [top1_record(np.ones(N, bool), np.zeros(N, int))])
    assert main(["compare", "--results", str(a), "--against", "references", "--paired"]) == 2
    assert main(["compare", "--results", str(a), "--against", str(a), "--paired", "--duplicates", "mean"]) == 2
    assert "--paired compares two runs" in capsys.readouterr().err
