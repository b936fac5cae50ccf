"""Result records (atomic JSONL, DataFrame reader) and protocol overrides."""

from __future__ import annotations

import json
import math

import pytest

from evalsuite.errors import UserError
from evalsuite.protocols import apply_overrides, parse_overrides, parse_value
from evalsuite.results import Result, append_results, read_results


def _r(value, **kw) -> Result:
    return Result(task="t", dataset="d", split="test", layer="res5", metric="top1", value=value,
                  params={"k": 20, "costs": [0.1, 1.0]}, **kw)


def test_append_and_read_roundtrip(tmp_path) -> None:
    path = append_results(tmp_path, [_r(1.5), _r(2.5, note="x")])
    append_results(path, [_r(3.0)])
    df = read_results(tmp_path)
    assert list(df["value"]) == [1.5, 2.5, 3.0]
    assert df["params"][0] == {"k": 20, "costs": [0.1, 1.0]}
    assert df["params_json"][0] == json.dumps({"costs": [0.1, 1.0], "k": 20}, sort_keys=True)


def test_nan_needs_a_note_and_nothing_is_written(tmp_path) -> None:
    with pytest.raises(ValueError, match="note"):
        append_results(tmp_path / "r.jsonl", [_r(1.0), _r(math.nan)])
    assert not (tmp_path / "r.jsonl").exists()
    append_results(tmp_path / "r.jsonl", [_r(math.nan, note="class has no positives in test")])
    rec = json.loads((tmp_path / "r.jsonl").read_text())
    assert rec["value"] is None and "no positives" in rec["note"]


def test_torn_last_line_does_not_glue_and_is_reported(tmp_path) -> None:
    path = tmp_path / "results.jsonl"
    path.write_text(_r(1.0).to_json() + "\n" + '{"task": "t", "met')
    append_results(path, [_r(2.0)])
    lines = path.read_text().splitlines()
    assert json.loads(lines[-1])["value"] == 2.0
    with pytest.raises(UserError, match="line 2"):
        read_results(path)


def test_override_parsing_and_scoping() -> None:
    assert parse_value("1e-3") == 0.001 and parse_value("[1, 2]") == [1, 2]
    assert parse_value("sklearn") == "sklearn" and parse_value("True") is True
    protos = {"a": {"svm": {"backend": "torch"}, "k": 20}, "b": {"k": 10}}
    out = apply_overrides(protos, parse_overrides(["k=5", "a.svm.backend=sklearn"]))
    assert out == {"a": {"svm": {"backend": "sklearn"}, "k": 5}, "b": {"k": 5}}
    assert protos["a"]["k"] == 20  # inputs untouched
    with pytest.raises(UserError, match="no selected task"):
        apply_overrides(protos, parse_overrides(["svm.backnd=x"]))
    with pytest.raises(UserError, match="key=value"):
        parse_overrides(["novalue"])
