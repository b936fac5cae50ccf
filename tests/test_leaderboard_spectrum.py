"""Leaderboard (#29): the spectrum task's label-free metrics against kNN / VOC07 SVM across checkpoints."""

from __future__ import annotations

import math

import pytest
from scipy.stats import spearmanr

from leaderboard.aggregate import deduplicate, frame_from_records, spectrum_correlations
from leaderboard.site import build_site
from tests.test_leaderboard import parse, rec

# per checkpoint: kNN top-1 at res4 / res5 and RankMe at res4 / res5 (hand-made; the best kNN tap differs)
KNN = {"a": (40.0, 50.0), "b": (61.0, 55.0), "c": (30.0, 35.0), "d": (70.0, 20.0)}
RANKME = {"a": (100.0, 300.0), "b": (250.0, 90.0), "c": (80.0, 120.0), "d": (500.0, 10.0)}


def records(ckpts):
    out = []
    for ck in ckpts:
        for layer, top1, rank in zip(("res4", "res5"), KNN[ck], RANKME[ck]):
            out.append(rec(top1, task="knn", metric="top1", layer=layer, ck=ck, method=f"m{ck}", dataset="imagenet",
                           split="val", protocol="quick"))
            out.append(rec(rank, task="spectrum", metric="rankme", layer=layer, ck=ck, method=f"m{ck}",
                           dataset="imagenet", split="train", protocol="quick"))
    return out


def agg_of(recs):
    return deduplicate(frame_from_records([r.__dict__ for r in recs]), "mean")


def test_correlation_pairs_each_checkpoint_at_its_best_knn_tap_and_equals_scipy() -> None:
    (c,) = spectrum_correlations(agg_of(records("abcd")))
    assert c.metric == "rankme" and c.target[:2] == ("knn", "top1")
    # best kNN tap: a res5, b res4, c res5, d res4; RankMe at the same tap
    by_ck = {ck[0]: (layer, x, y) for ck, layer, x, y in c.points}
    assert by_ck == {"a": ("res5", 300.0, 50.0), "b": ("res4", 250.0, 61.0), "c": ("res5", 120.0, 35.0),
                     "d": ("res4", 500.0, 70.0)}
    xs, ys = [300.0, 250.0, 120.0, 500.0], [50.0, 61.0, 35.0, 70.0]
    ref = spearmanr(xs, ys)
    assert c.rho == pytest.approx(ref.statistic) and c.p_value == pytest.approx(ref.pvalue)
    # by hand: ranks x (3, 2, 1, 4), y (2, 3, 1, 4): sum d^2 = 2, rho = 1 - 6 * 2 / (4 * 15)
    assert c.rho == pytest.approx(0.8)


def test_a_checkpoint_without_the_metric_at_its_tap_is_left_out_and_fewer_than_three_give_nothing() -> None:
    recs = [r for r in records("abcd") if not (r.task == "spectrum" and r.checkpoint_id[0] == "d"
                                                and r.layer == "res4")]
    (c,) = spectrum_correlations(agg_of(recs))
    assert sorted(ck[0] for ck, *_ in c.points) == ["a", "b", "c"]
    assert c.rho == pytest.approx(spearmanr([300.0, 250.0, 120.0], [50.0, 61.0, 35.0]).statistic)
    assert spectrum_correlations(agg_of(records("ab"))) == []


def test_constant_metric_gives_nan_not_an_error() -> None:
    recs = [r if r.task != "spectrum" else rec(7.0, task="spectrum", metric="rankme", layer=r.layer,
                                               ck=r.checkpoint_id[0], method=r.method, dataset="imagenet",
                                               split="train", protocol="quick") for r in records("abc")]
    (c,) = spectrum_correlations(agg_of(recs))
    assert math.isnan(c.rho)


def test_spectrum_page_and_markdown_show_the_correlation_only_with_three_checkpoints(tmp_path) -> None:
    report = build_site(frame_from_records([r.__dict__ for r in records("abcd")]), tmp_path / "site",
                        tie_resamples=0)
    page = next(p for p in report.pages if p.startswith("tasks/spectrum"))
    html = (tmp_path / "site" / page).read_text(encoding="utf-8")
    table = parse(tmp_path / "site" / page).tables["correlation-table"]
    assert table[1][:3] == ["rankme (imagenet, quick)", "knn top1 (imagenet/val, quick)", "4"]
    assert table[1][3] == "0.80"
    img = html.split('<section id="label-free-vs-labelled">')[1].split('<img src="../')[1].split('"')[0]
    assert (tmp_path / "site" / img).read_text().startswith("<?xml")
    md = (tmp_path / "site" / "leaderboard.md").read_text(encoding="utf-8")
    assert "## spectrum: label-free metrics vs labelled results" in md and "| 4 | 0.80 |" in md

    report = build_site(frame_from_records([r.__dict__ for r in records("ab")]), tmp_path / "site2",
                        tie_resamples=0, plots=False)
    page = next(p for p in report.pages if p.startswith("tasks/spectrum"))
    assert "label-free-vs-labelled" not in (tmp_path / "site2" / page).read_text(encoding="utf-8")
    assert "label-free metrics vs labelled" not in (tmp_path / "site2" / "leaderboard.md").read_text()
