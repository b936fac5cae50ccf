"""The leaderboard's uncertainty: intervals beside the numbers and as error bars, mean ± std over seeds, the "tied
for first" marks (paired test, Welch over seeds, interval overlap) and the test-set tuning flag
(docs/uncertainty.md); and the record fields behind them (protocol_hash, tuned_on_test)."""

from __future__ import annotations

import statistics

import numpy as np
import pandas as pd
import pytest
from scipy.stats import binomtest, ttest_ind

from evalsuite.checkpoints import load_checkpoint
from evalsuite.outputs import SampleOutputs, attach_intervals
from evalsuite.results import Result, append_results, iter_records
from leaderboard.site import build_site
from tests.helpers import make_context
from tests.test_leaderboard import inline, parse

N = 100


def rec(value, *, task="knn", metric="top1", layer="res5", ck="a", seed=0, **kw) -> Result:
    return Result(task=task, dataset="imagefolder", split="val", layer=layer, metric=metric, value=value,
                  checkpoint_id=ck * 64, checkpoint=f"/ckpts/{ck}.pth", checkpoint_name=ck, method=ck, arch="resnet50",
                  pretrain_data="imagenet1k", protocol="quick", seed=seed, created="2024-01-01T00:00:00Z",
                  **{"params": {}, **kw})


def with_hits(hits: np.ndarray, targets: np.ndarray, **kw) -> Result:
    s = SampleOutputs({"top1": hits, "targets": targets})
    r = rec(100.0 * hits.mean(), dataset_fingerprint="fp-val", **kw)
    r.pending_outputs = s.mean("top1")
    return r


def cell(site, label: str, column: str) -> str:
    table = parse(site / "index.html").tables["overview-table"]
    col = table[0].index(column)
    return next(r[col] for r in table[1:] if r[0].startswith(label))


def test_intervals_error_bars_and_a_paired_tie_bracket(tmp_path) -> None:
    rng = np.random.default_rng(0)
    targets = rng.integers(0, 5, N)
    a, b, c = (np.zeros(N, bool) for _ in range(3))
    a[:90] = True  # 90 %
    b[:85], b[90:92] = True, True  # 87 %: 5 right only in a, 2 only in b
    c[:50] = True  # 50 %: 40 right only in a
    records = [with_hits(h, targets, ck=ck, layer="res5") for ck, h in (("a", a), ("b", b), ("c", c))]
    records += [with_hits(np.r_[np.zeros(10, bool), h[10:]], targets, ck=ck, layer="res4")  # 10 points lower
                for ck, h in (("a", a), ("b", b), ("c", c))]
    attach_intervals(records, resamples=200)
    append_results(tmp_path / "runs" / "results.jsonl", records)
    build_site([tmp_path / "runs"], tmp_path / "site", tie_resamples=200)
    site = tmp_path / "site"
    written = {(r["checkpoint_name"], r["layer"]): r for r in iter_records(tmp_path / "runs" / "results.jsonl")}
    ra = written["a", "res5"]
    assert ra["ci_low"] < 90.0 < ra["ci_high"]
    # overview: the value, ± the interval's half-width (its bounds on hover), the bracket
    assert cell(site, "a /", "knn top1") == f"90.00 ± {(ra['ci_high'] - ra['ci_low']) / 2:.2f} res5 1st"
    # McNemar against the best, computed independently: b is tied with it, c is not
    assert binomtest(2, 7, 0.5).pvalue > 0.05 > binomtest(0, 40, 0.5).pvalue
    assert cell(site, "b /", "knn top1").endswith(" res5 =1st")
    assert not cell(site, "c /", "knn top1").endswith("1st")
    ties = [t for t in inline(site / "index.html", "tie") if "title" in t]
    assert any(t["text"] == "=1st" and "McNemar (exact), p = 0.453" in t["title"] for t in ties)
    hover = f'title="95% bootstrap interval over the test samples: [{ra["ci_low"]:.3f}, {ra["ci_high"]:.3f}]"> ± '
    assert hover in (site / "index.html").read_text()
    # task page: [low, high]; the per-layer plot has error bars
    task = next((site / "tasks").glob("knn-*.html"))
    row = next(r for r in parse(task).tables["table0"] if r[0].startswith("a /"))
    assert row[3] == f"90.00 [{ra['ci_low']:.2f}, {ra['ci_high']:.2f}]"
    svg = next((site / "plots").glob("*.svg")).read_text()
    assert 'id="LineCollection_1"' in svg
    md = (site / "leaderboard.md").read_text()
    assert f"90.00 ± {(ra['ci_high'] - ra['ci_low']) / 2:.2f} (res5) [1st]" in md
    csv = pd.read_csv(site / "leaderboard.csv")
    assert csv.loc[(csv["checkpoint_name"] == "a") & (csv["layer"] == "res5"), "ci_low"].item() == \
        pytest.approx(ra["ci_low"])


def test_seeds_are_averaged_and_ties_fall_back_to_welch_and_interval_overlap(tmp_path) -> None:
    seeds = {"d": [60.0, 61.0, 62.0], "e": [59.0, 61.5, 60.5], "f": [40.0, 41.0, 42.0]}
    records = []
    for ck, values in seeds.items():
        for s, v in enumerate(values):  # what the probe measured differs per seed; the protocol does not
            records.append(rec(v, task="places205_linear", ck=ck, seed=s, protocol_hash="p" * 64,
                               params={"lr": 0.01, "train_curve": [v, s]}))
    intervals = {"g": (85.0, 80.0, 90.0), "h": (79.0, 75.0, 81.0), "i": (50.0, 45.0, 55.0)}
    records += [rec(v, task="voc07_svm", metric="mAP", ck=ck, ci_low=lo, ci_high=hi, ci_level=0.95)
                for ck, (v, lo, hi) in intervals.items()]
    append_results(tmp_path / "runs" / "results.jsonl", records)
    build_site([tmp_path / "runs"], tmp_path / "site", plots=False, references=False)  # mean over seeds: default
    site = tmp_path / "site"
    d = seeds["d"]
    assert cell(site, "d /", "places205_linear top1") == \
        f"{statistics.mean(d):.2f} ± {statistics.stdev(d):.2f} (n=3) res5 1st"
    assert ttest_ind(seeds["e"], d, equal_var=False).pvalue > 0.05 > ttest_ind(seeds["f"], d, equal_var=False).pvalue
    assert cell(site, "e /", "places205_linear top1").endswith("=1st")
    assert not cell(site, "f /", "places205_linear top1").endswith("1st")
    # no outputs, no seeds: intervals that overlap the best's ([75, 81] and [80, 90]) are tied, others are not
    assert cell(site, "g /", "voc07_svm mAP") == "85.00 ± 5.00 res5 1st"
    assert cell(site, "h /", "voc07_svm mAP").endswith("=1st")
    assert cell(site, "i /", "voc07_svm mAP") == "50.00 ± 5.00 res5"
    assert any("overlapping intervals" in t.get("title", "") for t in inline(site / "index.html", "tie"))
    # --duplicates latest: the latest seed alone
    build_site([tmp_path / "runs"], tmp_path / "site", mode="latest", plots=False, references=False)
    assert cell(site, "d /", "places205_linear top1").startswith("62.00 res5")


def test_numbers_tuned_on_the_test_set_are_flagged(tmp_path) -> None:
    records = [rec(40.0, task="lowshot_svm", metric="mAP", ck="a", tuned_on_test=True, tuned_on_test_params=["cost"],
                   params={"k": 1}),
               rec(70.0, task="imagenet_linear", ck="a", params={"report_epoch": "best_val"}),  # an older record
               rec(68.0, task="imagenet_linear", ck="b", params={"report_epoch": "last"})]
    append_results(tmp_path / "runs" / "results.jsonl", records)
    build_site([tmp_path / "runs"], tmp_path / "site", plots=False, references=False)
    site = tmp_path / "site"
    marks = {m.get("title") for m in inline(site / "index.html", "tuned")}
    assert "chosen on the test set: cost (an optimistic number)" in marks
    assert "chosen on the test set: epoch (an optimistic number)" in marks
    assert cell(site, "a /", "imagenet_linear top1") == "70.00 res5 test-tuned"
    assert cell(site, "b /", "imagenet_linear top1") == "68.00 res5"
    assert "| 40.00 (res5) † |" in (site / "leaderboard.md").read_text()
    csv = pd.read_csv(site / "leaderboard.csv").set_index(["task", "checkpoint_name"])
    assert csv.loc[("lowshot_svm", "a"), "tuned_on_test_params"] == "cost"
    assert not csv.loc[("imagenet_linear", "b"), "tuned_on_test"]


def test_task_records_carry_their_protocol_hash_and_test_set_tuning(tmp_path) -> None:
    ck = load_checkpoint("random:resnet18", seed=0)

    def record(task: str, preset: str, *overrides: str) -> Result:
        ctx = make_context(task, tmp_path, tmp_path / "out", preset=preset, overrides=overrides, checkpoint=ck)
        return ctx.result("d", "test", "res5", "mAP", 1.0)

    published, cv = record("lowshot_svm", "quick"), record("lowshot_svm", "quick", "cost_selection=cv")
    assert (published.tuned_on_test, published.tuned_on_test_params) == (True, ["cost"])
    assert (cv.tuned_on_test, cv.tuned_on_test_params) == (False, [])
    assert record("imagenet_linear", "dino21").tuned_on_test_params == ["epoch"]
    assert not record("imagenet_linear", "goyal19").tuned_on_test
    assert published.protocol_hash == record("lowshot_svm", "quick").protocol_hash != cv.protocol_hash
