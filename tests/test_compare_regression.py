"""Pinned numbers: the suite's `quick` runs on synthetic data must reproduce the committed expectations
(tests/regression/) within tolerance, compared by `evalsuite compare --strict` (a moved metric, a changed
hyper-parameter or a vanished number fails)."""

from __future__ import annotations

import json

import pytest

from evalsuite.cli import main
from tests.regression.harness import cases, expected_dir, run_case


@pytest.mark.parametrize("case", cases(), ids=lambda c: c["name"])
def test_quick_run_matches_pinned_values(case, tmp_path, capsys) -> None:
    expected = expected_dir(case) / "results.jsonl"
    assert expected.exists(), f"run `python -m tests.regression.harness {case['name']}`"
    out = run_case(case, tmp_path)
    report = tmp_path / "compare.json"
    args = ["compare", "--results", str(out), "--against", str(expected), "--strict", "--report", str(report)]
    for t in case["tolerance"]:
        args += ["--tolerance", t]
    for p in case["ignore_params"]:
        args += ["--ignore-param", p]
    rc = main(args)
    text = capsys.readouterr().out
    summary = json.loads(report.read_text())["summary"]
    n_expected = len(expected.read_text().splitlines())
    assert rc == 0, text
    assert summary["ok"] == n_expected and summary["missing"] == 0 and summary["protocol_mismatch"] == 0


def test_the_check_would_catch_a_moved_metric(tmp_path) -> None:
    """Shift one pinned value by more than the tolerance: the same comparison must fail."""
    case = cases()[0]
    expected = [json.loads(x) for x in (expected_dir(case) / "results.jsonl").read_text().splitlines()]
    expected[0]["value"] += 2 * float(case["tolerance"][0]) + 1
    moved = tmp_path / "moved"
    moved.mkdir()
    (moved / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in expected))
    assert main(["compare", "--results", str(expected_dir(case)), "--against", str(moved), "--strict",
                 "--tolerance", case["tolerance"][0]]) == 1
