"""Result records (atomic JSONL, DataFrame reader) and protocol overrides."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Literal

import pytest

from evalsuite.errors import UserError
from evalsuite.protocols import TaskProtocol, apply_overrides, cast_like, parse_overrides
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


@dataclass(frozen=True)
class SolverSettings(TaskProtocol):
    backend: Literal["torch", "sklearn"] = "torch"
    tol: float = 1e-4


@dataclass(frozen=True)
class ProtoA(TaskProtocol):
    k: int = 20
    ks: tuple[int, ...] = (10, 20)
    nlist: int | None = None
    bias: bool = True
    env_kwargs: dict = field(default_factory=dict)
    svm: SolverSettings = field(default_factory=SolverSettings)


@dataclass(frozen=True)
class ProtoB(TaskProtocol):
    k: int = 10


def test_overrides_are_scoped_and_cast_to_the_declared_types() -> None:
    protos = {"a": ProtoA(), "b": ProtoB()}
    out = apply_overrides(protos, parse_overrides(["k=5", "a.svm.backend=sklearn", "a.ks=1,2", "a.nlist=none",
                                                   "a.bias=no", 'a.env_kwargs={"size": 6}', "a.svm.tol=1e-3"]))
    assert out["a"] == ProtoA(k=5, ks=(1, 2), nlist=None, bias=False, env_kwargs={"size": 6},
                              svm=SolverSettings(backend="sklearn", tol=0.001))
    assert out["b"] == ProtoB(k=5) and protos["a"].k == 20  # inputs untouched (frozen)
    assert apply_overrides(protos, parse_overrides(["a.ks=[3]", "a.nlist=64"]))["a"].ks == (3,)
    assert out["a"].to_dict()["svm"] == {"backend": "sklearn", "tol": 0.001} and out["a"].to_dict()["ks"] == [1, 2]


@pytest.mark.parametrize("item, message", [
    ("a.k=abc", "--set a.k=abc: k must be int"),
    ("a.k=1.5", "--set a.k=1.5: k must be int"),
    ("a.nlist=x", "nlist must be int or none"),
    ("a.bias=maybe", "bias must be bool"),
    ("a.svm.backend=cuda", "backend must be one of 'torch', 'sklearn'"),
    ("a.env_kwargs=[1]", "env_kwargs must be JSON object"),
    ("svm.backnd=x", "did you mean svm.backend?"),
    ("a.kk=3", "did you mean a.k?"),
])
def test_a_wrong_type_or_unknown_key_is_one_clear_error(item, message) -> None:
    with pytest.raises(UserError) as e:
        apply_overrides({"a": ProtoA(), "b": ProtoB()}, parse_overrides([item]))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_override_syntax_errors() -> None:
    with pytest.raises(UserError, match="key=value"):
        parse_overrides(["novalue"])
    with pytest.raises(UserError, match="empty key"):
        parse_overrides([".=3"])


def test_cast_like_follows_the_example_type() -> None:
    assert cast_like("3", 1) == 3 and cast_like("3", 1.0) == 3.0 and cast_like("yes", False) is True
    assert cast_like("1,2", [0.5]) == [1.0, 2.0] and cast_like("x", "s") == "x"
    with pytest.raises(ValueError):
        cast_like("abc", 1)
