"""`evalsuite compare`: matching, tolerances, protocol mismatches, missing rows, exit codes, JSON report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from evalsuite.cli import main
from evalsuite.errors import UserError
from evalsuite.results import Result, append_results
from leaderboard.aggregate import deduplicate, load_results
from leaderboard.compare import Tolerance, compare_to_references, compare_to_results

# Goyal et al. 2019, VOC07 SVM mAP, ImageNet-supervised ResNet-50 (leaderboard/references/voc07_svm.csv)
GOYAL_SUP = {"conv1": 24.49, "res2": 47.75, "res3": 60.54, "res4": 80.36, "res5": 87.95}


def rec(value, layer="res5", *, task="voc07_svm", metric="mAP", protocol="goyal19", method="supervised",
        params=None, created="2024-01-01T00:00:00Z", checkpoint="/ckpts/sup.pth", arch="resnet50") -> Result:
    return Result(task=task, dataset="voc2007", split="test", layer=layer, metric=metric, value=value,
                  checkpoint_id="c" * 64, checkpoint=checkpoint, method=method, arch=arch,
                  pretrain_data="imagenet1k", protocol=protocol, params=params or {"costs": [1, 10]},
                  created=created)


def write(d: Path, records) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    append_results(d / "results.jsonl", records)
    return d


def agg_of(d: Path):
    return deduplicate(load_results([d]))


def test_tolerance_parsing() -> None:
    t = Tolerance.parse(["0.25", "mAP=1.5"], relative=0.01)
    assert t.allowed("top1", 50.0) == pytest.approx(0.25 + 0.5)
    assert t.allowed("mAP", 50.0) == pytest.approx(1.5 + 0.5)
    for bad in (["x"], ["mAP=abc"], ["-1"], ["nan"]):
        with pytest.raises(UserError):
            Tolerance.parse(bad)


def test_against_references_within_and_outside_tolerance(tmp_path) -> None:
    offsets = {"conv1": 0.3, "res2": -0.4, "res3": 0.0, "res4": 1.2, "res5": -2.0}
    d = write(tmp_path / "r", [rec(GOYAL_SUP[lay] + off, lay) for lay, off in offsets.items()])
    rep = compare_to_references(agg_of(d), Tolerance(default=0.5))
    goyal = {r["layer"]: r for r in rep.rows if r["ref_protocol"].startswith("goyal19")}
    assert set(goyal) == set(GOYAL_SUP)
    for lay, off in offsets.items():
        r = goyal[lay]
        assert r["reference"] == GOYAL_SUP[lay] and r["delta"] == pytest.approx(off)
        assert r["status"] == ("ok" if abs(off) <= 0.5 else "regression"), lay
    assert rep.exit_code == 1
    # a wider tolerance for mAP makes it pass
    assert compare_to_references(agg_of(d), Tolerance(default=0.5, per_metric={"mAP": 2.0})).exit_code == 0


def test_protocol_mismatch_is_flagged_not_compared(tmp_path) -> None:
    # our quick-preset numbers are far from the published goyal19 ones, but never compared with them
    d = write(tmp_path / "r", [rec(GOYAL_SUP[lay] - 30, lay, protocol="quick") for lay in GOYAL_SUP])
    rep = compare_to_references(agg_of(d), Tolerance())
    assert rep.rows and {r["status"] for r in rep.rows} == {"protocol_mismatch"}
    assert all(r["delta"] is None for r in rep.rows)
    assert rep.exit_code == 0
    assert any(m["has_mismatched_result"] and m["layer"] == "res5" for m in rep.missing)
    assert compare_to_references(agg_of(d), Tolerance(), strict=True).exit_code == 1
    # accepting the mapping explicitly turns them into (failing) comparisons
    acc = compare_to_references(agg_of(d), Tolerance(), accept=[("quick", "goyal19")])
    assert {r["status"] for r in acc.rows if r["ref_protocol"].startswith("goyal19")} == {"regression"}


def test_lowshot_variant_matches_the_k_row(tmp_path) -> None:
    # mmselfsup MoCo v2 low-shot k=1 at res5 (lowshot.csv); our task name lowshot_svm, k in params
    from leaderboard.references import load_references

    refs = load_references(["lowshot.csv"])
    row = refs[(refs["method"] == "moco_v2") & (refs["variant"] == "k=1") & (refs["source_key"] == "mmselfsup")]
    assert len(row) == 1
    ref = float(row["value"].iloc[0])
    r = rec(ref + 0.1, "res5", task="lowshot_svm", method="moco_v2", params={"k": 1, "costs": [1, 10, 100]})
    d = write(tmp_path / "r", [r])
    rep = compare_to_references(agg_of(d), Tolerance(), references=refs, accept=[("goyal19", "mmselfsup")])
    ok = [x for x in rep.rows if x["status"] == "ok"]
    assert len(ok) == 1 and ok[0]["variant"] == "k=1" and ok[0]["reference"] == ref
    # the other k of the same method are listed as missing
    assert {m["variant"] for m in rep.missing if m["task"] == "lowshot_svm" and m["ref_protocol"].startswith(
        "mmselfsup")} == {f"k={k}" for k in (2, 4, 8, 16, 32, 64, 96)}


def test_against_results_detects_moves_param_changes_and_missing_rows(tmp_path) -> None:
    base = [rec(50.0, "res4"), rec(60.0, "res5"), rec(70.0, "res5", task="places205_linear", metric="top1")]
    exp = write(tmp_path / "expected", base)
    same = write(tmp_path / "same", [rec(50.004, "res4"), rec(59.996, "res5"),
                                     rec(70.0, "res5", task="places205_linear", metric="top1")])
    rep = compare_to_results(agg_of(same), agg_of(exp), Tolerance(default=0.01), strict=True)
    assert rep.summary()["ok"] == 3 and rep.exit_code == 0
    moved = write(tmp_path / "moved", [rec(50.0, "res4"), rec(61.0, "res5"),
                                       rec(70.0, "res5", task="places205_linear", metric="top1")])
    rep = compare_to_results(agg_of(moved), agg_of(exp), Tolerance(default=0.01))
    bad = [r for r in rep.rows if r["status"] == "regression"]
    assert len(bad) == 1 and bad[0]["layer"] == "res5" and bad[0]["delta"] == pytest.approx(1.0)
    assert rep.exit_code == 1
    changed = write(tmp_path / "changed", [rec(50.0, "res4", params={"costs": [1]}), rec(60.0, "res5"),
                                           rec(70.0, "res5", task="places205_linear", metric="top1")])
    rep = compare_to_results(agg_of(changed), agg_of(exp), Tolerance(default=0.01))
    mm = [r for r in rep.rows if r["status"] == "protocol_mismatch"]
    assert len(mm) == 1 and mm[0]["param_diff"] == {"costs": [[1], [1, 10]]}
    assert rep.exit_code == 0 and compare_to_results(agg_of(changed), agg_of(exp), Tolerance(default=0.01),
                                                     strict=True).exit_code == 1
    assert compare_to_results(agg_of(changed), agg_of(exp), Tolerance(default=0.01), ignore_params=["costs"],
                              strict=True).exit_code == 0
    partial = write(tmp_path / "partial", [rec(50.0, "res4"), rec(60.0, "res5")])
    rep = compare_to_results(agg_of(partial), agg_of(exp), Tolerance(default=0.01), strict=True)
    assert [m["task"] for m in rep.missing] == ["places205_linear"] and rep.exit_code == 1


def test_explained_nan_is_a_failure_when_a_number_is_expected(tmp_path) -> None:
    exp = write(tmp_path / "expected", [rec(50.0)])
    r = rec(None)
    r.note = "class without positives"
    got = write(tmp_path / "got", [r])
    rep = compare_to_results(agg_of(got), agg_of(exp), Tolerance())
    assert rep.rows[0]["status"] == "no_value" and rep.exit_code == 1


def test_cli_exit_codes_and_json_report(tmp_path, capsys) -> None:
    within = write(tmp_path / "within", [rec(v + 0.2, lay) for lay, v in GOYAL_SUP.items()])
    outside = write(tmp_path / "outside", [rec(v + (3.0 if lay == "res3" else 0.0), lay)
                                           for lay, v in GOYAL_SUP.items()])
    report = tmp_path / "out" / "report.json"
    assert main(["compare", "--results", str(within), "--against", "references", "--tolerance", "0.5",
                 "--report", str(report)]) == 0
    text = capsys.readouterr().out
    assert "PASS" in text and "87.950" in text
    data = json.loads(report.read_text())
    assert data["summary"]["ok"] == 5 and data["summary"]["regression"] == 0 and data["summary"]["passed"]
    assert main(["compare", "--results", str(outside), "--against", "references", "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    bad = [r for r in data["rows"] if r["status"] == "regression"]
    assert [(r["layer"], round(r["delta"], 6)) for r in bad] == [("res3", 3.0)]
    # results against results
    assert main(["compare", "--results", str(within), "--against", str(within), "--strict"]) == 0
    assert main(["compare", "--results", str(outside), "--against", str(within), "--tolerance", "0.5"]) == 1
    capsys.readouterr()
    # bad input: exit 2, one line naming the file
    bad_file = tmp_path / "bad" / "results.jsonl"
    bad_file.parent.mkdir()
    bad_file.write_text("garbage\n")
    assert main(["compare", "--results", str(bad_file), "--against", "references"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(bad_file) in err[0]
    assert main(["compare", "--results", str(within), "--against", "references", "--tolerance", "x"]) == 2
    assert main(["compare", "--results", str(within), "--against", "references", "--accept-protocol", "x"]) == 2


# ---------------------------------------------------------------- partial loads, nothing compared, bad lines

def lines_with(records, **fields) -> str:
    """JSONL of ``records`` with extra record fields (as newer writers add them; older records lack them)."""
    return "".join(json.dumps({**json.loads(r.to_json()), **fields}) + "\n" for r in records)


PARTIAL = {"weights": "state_dict[backbone.]", "partial": True, "missing": 3,
           "missing_keys": ["layer4.1.bn2.weight", "layer4.1.bn2.bias", "layer4.1.conv2.weight"]}


def test_partial_load_is_flagged_and_not_comparable_under_strict(tmp_path, capsys) -> None:
    d = tmp_path / "partial"
    d.mkdir()
    (d / "results.jsonl").write_text(lines_with([rec(v + 0.1, lay) for lay, v in GOYAL_SUP.items()],
                                                checkpoint_load=PARTIAL))
    rep = compare_to_references(agg_of(d), Tolerance())
    goyal = [r for r in rep.rows if r["ref_protocol"].startswith("goyal19")]
    assert len(goyal) == 5 and {r["status"] for r in goyal} == {"ok"}
    assert all(r["flags"] == ["partial load: 3 missing keys"] for r in goyal)
    strict = compare_to_references(agg_of(d), Tolerance(), strict=True)
    assert {r["status"] for r in strict.rows} == {"protocol_mismatch"} and strict.exit_code == 1
    assert {r["mismatch"] for r in strict.rows if r["ref_protocol"].startswith("goyal19")} == {"partial load"}
    assert "5 from partially loaded checkpoints" in strict.summary()["why_nothing_compared"]
    assert main(["compare", "--results", str(d), "--against", "references"]) == 0
    out = capsys.readouterr().out
    assert out.count("partial load: 3 missing keys") >= 5
    assert main(["compare", "--results", str(d), "--against", "references", "--strict"]) == 1
    # against results too: a partial load is flagged, and a protocol mismatch under --strict
    full = write(tmp_path / "full", [rec(v + 0.1, lay) for lay, v in GOYAL_SUP.items()])
    assert compare_to_results(agg_of(d), agg_of(full), Tolerance(), strict=False).exit_code == 0
    strict = compare_to_results(agg_of(d), agg_of(full), Tolerance(), strict=True)
    assert strict.summary()["protocol_mismatch"] == 5 and strict.exit_code == 1
    # a complete load (and an old record without checkpoint_load) carries no flag
    (full / "results.jsonl").write_text(lines_with([rec(GOYAL_SUP["res5"])], checkpoint_load={
        "weights": "state_dict", "partial": False, "missing": 0, "missing_keys": []}))
    assert all(r["flags"] == [] for r in compare_to_references(agg_of(full), Tolerance(), strict=True).rows)


def test_nothing_compared_is_said_with_the_reason_and_fails_under_strict(tmp_path, capsys) -> None:
    from leaderboard.references import load_references

    # a first run: a random ResNet-18; the references have random init only for other archs
    d = write(tmp_path / "r", [rec(20.0 + i, lay, method="random", arch="resnet18", task="centroid",
                                   metric="top1") for i, lay in enumerate(GOYAL_SUP)])
    refs = load_references()
    archs = sorted(set(refs.loc[(refs["method"] == "random") & refs["value_num"].notna(), "arch"]))
    assert archs and "resnet18" not in archs
    rep = compare_to_references(agg_of(d), Tolerance())
    assert rep.summary()["compared"] == 0 and rep.summary()["nothing_compared"] and not rep.summary()["passed"]
    assert rep.exit_code == 0 and compare_to_references(agg_of(d), Tolerance(), strict=True).exit_code == 1
    assert main(["compare", "--results", str(d), "--against", "references"]) == 0
    out = capsys.readouterr().out
    assert "PASS" not in out and "nothing compared" in out
    why = next(line for line in out.splitlines() if "nothing compared" in line)
    assert "arch" in why and "resnet18" in why and all(a in why for a in archs), why
    assert main(["compare", "--results", str(d), "--against", "references", "--strict"]) == 1
    out = capsys.readouterr().out
    assert "PASS" not in out and "FAIL" in out and "nothing compared" in out
    # against results: nothing shares the task
    other = write(tmp_path / "other", [rec(50.0, "res5", method="random", arch="resnet18", task="places205_linear",
                                           metric="top1")])
    assert main(["compare", "--results", str(d), "--against", str(other)]) == 0
    why = next(line for line in capsys.readouterr().out.splitlines() if "nothing compared" in line)
    assert "task" in why and "centroid" in why and "places205_linear" in why, why
    assert main(["compare", "--results", str(d), "--against", str(other), "--strict"]) == 1
    # matched rows that are all protocol mismatches: nothing compared either, and said so
    q = write(tmp_path / "quick", [rec(GOYAL_SUP[lay], lay, protocol="quick") for lay in GOYAL_SUP])
    rep = compare_to_references(agg_of(q), Tolerance())
    why = rep.summary()["why_nothing_compared"]
    assert rep.summary()["nothing_compared"] and len(rep.rows) >= 5 and "goyal19" in why
    assert f"{len(rep.rows)} with another protocol (ours: quick; theirs: " in why, why
    assert "partial" not in why


def test_compare_skip_bad_lines_counts_and_reports_them(tmp_path, capsys) -> None:
    good = [rec(v, lay) for lay, v in GOYAL_SUP.items()]
    d = tmp_path / "crashed"
    d.mkdir()
    f = d / "results.jsonl"
    body = [r.to_json() for r in good]
    body.insert(2, '{"task": "voc07_svm", "lay')  # cut off by a crash, later appended after
    body.insert(5, "NOT-UTF8")
    text = "\n".join(body) + "\n" + good[0].to_json()[:30]  # torn last line
    f.write_bytes(text.encode().replace(b"NOT-UTF8", b'{"task": "\xff\xfe"}'))
    assert main(["compare", "--results", str(d), "--against", "references"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(f) in err[0] and "line 3" in err[0] and "--skip-bad-lines" in err[0]
    assert main(["compare", "--results", str(d), "--against", "references", "--skip-bad-lines", "--report",
                 str(tmp_path / "rep.json")]) == 0
    cap = capsys.readouterr()
    assert cap.err.strip().splitlines() == [f"evalsuite: warning: skipped 3 unreadable lines in {f} (first at line 3)"]
    assert json.loads((tmp_path / "rep.json").read_text())["summary"]["ok"] == 5
    # the --against side is read the same way
    assert main(["compare", "--results", str(d), "--against", str(d), "--skip-bad-lines", "--strict"]) == 0
    assert capsys.readouterr().err.count("skipped 3 unreadable lines") == 2


def test_a_protocol_deviating_from_the_published_one_is_flagged_and_refused_under_strict(tmp_path) -> None:
    d = write(tmp_path / "dev", [])
    (d / "results.jsonl").write_text(lines_with([rec(v + 0.1, lay) for lay, v in GOYAL_SUP.items()],
                                                deviations=["image_size", "costs"]))
    goyal = [r for r in compare_to_references(agg_of(d), Tolerance()).rows if r["ref_protocol"].startswith("goyal19")]
    assert len(goyal) == 5 and {r["status"] for r in goyal} == {"ok"}
    assert all(r["flags"] == ["deviates from the published protocol in image_size, costs (docs/protocols.md)"]
               for r in goyal)
    strict = compare_to_references(agg_of(d), Tolerance(), strict=True)
    assert {r["mismatch"] for r in strict.rows if r["ref_protocol"].startswith("goyal19")} == {"protocol deviation"}
    assert strict.exit_code == 1 and "deviates from the published one" in strict.summary()["why_nothing_compared"]
    # results compared with results are not judged against the published protocol
    other = write(tmp_path / "other", [rec(v, lay) for lay, v in GOYAL_SUP.items()])
    assert all(r["flags"] == [] for r in compare_to_results(agg_of(d), agg_of(other), Tolerance()).rows)


def test_ericsson21_transfer_rows_match_by_dataset(tmp_path) -> None:
    """Ericsson et al. 2021 (ericsson21_transfer.csv): a linear_transfer / fewshot record compares with the published
    number of its own dataset (and shots) only; one far from it is a regression; another preset is not compared."""
    from leaderboard.references import dataset_of, load_references

    refs = load_references(["ericsson21_transfer.csv"])
    # Table 1: DeepCluster-v2 CIFAR10 94.02, Cars 58.60, Avg. 78.92; Table 8: EuroSAT 5-shot 88.39 (the README's
    # example); SimCLR-v2's Aircraft 46.38 is one of the cells the text shifted (PROVENANCE.md)
    by = {(r["method"], r["dataset"], r["metric"], r["variant"]): float(r["value"]) for r in refs.to_dict("records")}
    assert by[("deepcluster_v2", "cifar10", "top1", "")] == 94.02
    assert by[("deepcluster_v2", "stanford_cars", "top1", "")] == 58.60
    assert by[("deepcluster_v2", "all", "mean", "")] == 78.92
    assert by[("deepcluster_v2", "eurosat", "accuracy", "shots=5")] == 88.39
    assert by[("simclr_v2", "fgvc_aircraft", "mean_per_class", "")] == 46.38
    assert dataset_of("x: a, dataset=cifar10, b") == "cifar10"
    assert dataset_of("run.py --dataset=imagenet2012_subset/1pct") == ""  # a command line's flag is not one

    def transfer(value, dataset, metric, task="linear_transfer", params=None, protocol="ericsson21"):
        r = rec(value, "res5", task=task, metric=metric, method="deepcluster_v2", protocol=protocol,
                params=params or {"C": 0.316})
        r.dataset = dataset
        return r

    d = write(tmp_path / "r", [transfer(94.02 + 0.1, "cifar10", "top1"), transfer(58.60 - 3.0, "stanford_cars", "top1"),
                               transfer(78.92, "all", "mean"),
                               transfer(88.39 - 0.2, "eurosat", "accuracy", "fewshot", {"shots": 5})])
    rep = compare_to_references(agg_of(d), Tolerance(default=0.5), references=refs)
    got = {(r["dataset"], r["metric"], r["variant"]): r for r in rep.rows}
    assert set(got) == {("cifar10", "top1", ""), ("stanford_cars", "top1", ""), ("all", "mean", ""),
                        ("eurosat", "accuracy", "shots=5")}  # each record with its own dataset's number only
    assert got[("cifar10", "top1", "")]["status"] == "ok" and got[("cifar10", "top1", "")]["reference"] == 94.02
    assert got[("cifar10", "top1", "")]["delta"] == pytest.approx(0.1)
    cars = got[("stanford_cars", "top1", "")]
    assert cars["status"] == "regression" and cars["reference"] == 58.60 and cars["delta"] == pytest.approx(-3.0)
    assert got[("all", "mean", "")]["status"] == "ok"
    assert got[("eurosat", "accuracy", "shots=5")]["status"] == "ok"
    assert got[("eurosat", "accuracy", "shots=5")]["reference"] == 88.39
    assert rep.exit_code == 1  # the Cars regression
    # the method's other datasets and shots are listed as missing, each with its dataset
    missing = {(m["dataset"], m["variant"]) for m in rep.missing}
    assert ("dtd", "") in missing and ("eurosat", "shots=20") in missing and ("cifar10", "") not in missing
    assert "linear_transfer/dtd" in rep.format_text(max_missing=1000)
    # the quick preset is flagged, never compared; a dataset no row has is said to be the reason
    q = write(tmp_path / "q", [transfer(10.0, "cifar10", "top1", protocol="quick")])
    rq = compare_to_references(agg_of(q), Tolerance(), references=refs)
    assert [r["status"] for r in rq.rows] == ["protocol_mismatch"] and rq.exit_code == 0
    other = write(tmp_path / "o", [transfer(50.0, "imagefolder:/data/x", "top1")])
    ro = compare_to_references(agg_of(other), Tolerance(), references=refs)
    assert not ro.rows and "dataset" in ro.why_nothing_compared and "imagefolder:/data/x" in ro.why_nothing_compared
