"""`evalsuite run --set`: every protocol field of every task refuses a value of the wrong type, and every
unknown key is refused, in one line with exit code 2, before anything is loaded or written."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal, Union

import pytest

from evalsuite import registry
from evalsuite.cli import main
from evalsuite.protocols import field_paths


def _bad_text(tp: Any) -> str | None:
    """A --set text that is not of type ``tp`` (None where every text is valid, e.g. a str field)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        bads = [_bad_text(a) for a in inner]
        return bads[0] if len(inner) == 1 or all(b is not None and b == bads[0] for b in bads) else None
    if origin is Literal:
        return None if all(isinstance(a, str) and a.startswith("no-such") for a in args) else "no-such-choice"
    if tp is bool:
        return "maybe"
    if tp in (int, float):
        return "abc"
    if origin in (list, tuple):
        return _bad_text(args[0]) if args else None
    if tp is dict or origin is dict:
        return "[1]"
    return None


def _fields() -> list[tuple[str, str, str]]:
    cases = []
    for task in registry.task_names():
        proto = registry.get_task(task).default_protocol("quick")
        for path in field_paths(proto):
            owner = proto
            *parents, name = path.split(".")
            for p in parents:
                owner = getattr(owner, p)
            bad = _bad_text(typing.get_type_hints(type(owner))[name])
            if bad is not None:
                cases.append((task, path, bad))
    return cases


FIELDS = _fields()


def _run(tmp_path, task: str, item: str, capsys) -> tuple[int, list[str]]:
    out = tmp_path / "out"
    rc = main(["run", "--checkpoint", "random:resnet18", "--tasks", task, "--protocol", "quick", "--set", item,
               "--data-root", str(tmp_path / "data"), "--out", str(out)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert not out.exists()  # nothing written
    return rc, lines


def test_every_task_protocol_is_a_typed_frozen_dataclass() -> None:
    for task in registry.task_names():
        proto = registry.get_task(task).default_protocol("quick")
        assert dataclasses.is_dataclass(proto) and type(proto).__dataclass_params__.frozen, task
        assert len(FIELDS) > 50  # every task contributes typed fields


@pytest.mark.parametrize("task, path, bad", FIELDS, ids=[f"{t}.{p}" for t, p, _ in FIELDS])
def test_a_value_of_the_wrong_type_exits_2_with_one_line(tmp_path, capsys, task, path, bad) -> None:
    rc, lines = _run(tmp_path, task, f"{task}.{path}={bad}", capsys)
    assert rc == 2 and len(lines) == 1 and f"--set {task}.{path}={bad}" in lines[0] and "must be" in lines[0]


@pytest.mark.parametrize("task", registry.task_names())
def test_an_unknown_key_exits_2_with_one_line(tmp_path, capsys, task) -> None:
    rc, lines = _run(tmp_path, task, f"{task}.no_such_field=1", capsys)
    assert rc == 2 and len(lines) == 1 and "no selected task has this protocol field" in lines[0]
