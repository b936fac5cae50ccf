"""Typed protocols: presets and ``--set key=value`` overrides.

Every task's protocol is a frozen dataclass subclassing :class:`TaskProtocol` (nested ones for groups of
settings, e.g. the SVM solver's); ``Task.default_protocol(preset)`` returns an instance. ``--set`` text is
cast to the field's declared type or refused in one line (exit 2); an unknown key is refused with the
closest valid name. The resolved protocol is recorded with every result (:meth:`TaskProtocol.to_dict`).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any, Literal, Union

from .errors import UserError

PRESETS: dict[str, str] = {
    "goyal19": "the published protocol (Goyal et al. 2019 where the task has one: semi_supervised follows SimCLR, "
               "knn DINO; default for comparisons)",
    "vissl": "VISSL's variants of the same benchmarks",
    "dino21": "DINO's evaluation (Caron et al. 2021): eval_knn.py and eval_linear.py",
    "ericsson21": "Ericsson et al. 2021's transfer evaluation: ssl-transfer's linear.py and few_shot.py",
    "quick": "small sizes for CPU and CI; numbers are not comparable to published ones",
}


def check_preset(name: str) -> str:
    if name not in PRESETS:
        raise UserError(f"unknown protocol preset {name!r}; choose one of {', '.join(PRESETS)}")
    return name


def preset_changes(table: Mapping[str, Mapping[str, Any]], preset: str, task: str) -> dict[str, Any]:
    """A task's changes to its goyal19 values for ``preset`` (``table``: preset -> changes); a known preset the
    task has no version of is refused in one line (``--tasks all`` skips the task with that line)."""
    check_preset(preset)
    if preset not in table:
        raise UserError(f"{task} has no {preset} protocol ({PRESETS[preset]}); its presets: {', '.join(table)}")
    return dict(table[preset])


@dataclasses.dataclass(frozen=True)
class TaskProtocol:
    """Base of every task's protocol (a frozen dataclass; build variants with :meth:`replace`)."""

    def to_dict(self) -> dict[str, Any]:
        """The JSON form recorded with results (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def replace(self, **changes: Any):
        return dataclasses.replace(self, **changes)

    @classmethod
    def field_types(cls) -> dict[str, Any]:
        return _hints(cls)

    def tuned_on_test(self) -> tuple[str, ...]:
        """The hyper-parameters this protocol chooses on the split it reports on (the test set), e.g. ``("cost",)``;
        every record of the task says so (``Result.tuned_on_test``). A protocol that does overrides this."""
        return ()


# the vocabularies of the evaluation transform and per-tap pooling (evalsuite.features, evalsuite.trunks)
Pooling = Literal["goyal", "vissl", "avg", "none", "cls", "mean", "cls+mean", "gem"]  # the last four: ViTs only
ResizeMode = Literal["square", "center_crop", "scale_square", "square_center_crop"]
Interpolation = Literal["bilinear", "bicubic", "cv2_bilinear"]
POOLINGS: tuple[str, ...] = typing.get_args(Pooling)
RESIZE_MODES: tuple[str, ...] = typing.get_args(ResizeMode)
INTERPOLATIONS: tuple[str, ...] = typing.get_args(Interpolation)


@dataclasses.dataclass(frozen=True)
class FeatureTaskProtocol(TaskProtocol):
    """The fields of every task that reads a dataset through frozen taps: where the data is, which taps, and the
    evaluation transform (:meth:`evalsuite.features.Transform.from_protocol`). Tasks set their own defaults."""

    dataset: str = "imagefolder"
    data_path: str | None = None  # relative to --data-root; None: the dataset kind's usual folder
    train_split: str = "train"
    layers: tuple[str, ...] | None = None  # None (or taps this trunk lacks): every tap of the trunk
    pooling: Pooling = "goyal"
    image_size: int = 224
    resize_mode: ResizeMode = "square"
    resize: int | None = None  # the shorter side before the crop / square resize; None: image_size x 256/224
    interpolation: Interpolation = "bilinear"


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


# ------------------------------------------------------------------------------------------- casting

_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _is_protocol(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def describe(tp: Any) -> str:
    """A type as a user reads it: ``int``, ``float or none``, ``list of str``, ``one of 'a', 'b'``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        return " or ".join("none" if a is type(None) else describe(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (list, tuple):
        return f"list of {describe(args[0])}" if args else "list"
    if origin is dict or tp is dict:
        return "JSON object"
    return getattr(tp, "__name__", str(tp))


def cast_value(text: str, tp: Any) -> Any:
    """Cast ``--set`` text to type ``tp``; ValueError when it is not one."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    text = text.strip()
    if tp is Any:
        return _json_or_text(text)
    if origin in (Union, types.UnionType):
        if type(None) in args and text.lower() in ("none", "null"):
            return None
        for a in (a for a in args if a is not type(None)):
            try:
                return cast_value(text, a)
            except ValueError:
                continue
        raise ValueError(text)
    if origin is Literal:
        for a in args:
            if str(a) == text or (isinstance(a, bool) and text.lower() in (_TRUE if a else _FALSE)):
                return a
        raise ValueError(text)
    if tp is bool:
        if text.lower() not in _TRUE + _FALSE:
            raise ValueError(text)
        return text.lower() in _TRUE
    if tp is int:
        return int(text)
    if tp is float:
        return float(text)
    if tp is str:
        return text
    if origin in (list, tuple) or tp in (list, tuple):
        inner = args[0] if args else Any
        if text.startswith("["):
            raw = json.loads(text)
            if not isinstance(raw, list):
                raise ValueError(text)
            items = [cast_value(x if isinstance(x, str) else json.dumps(x), inner) for x in raw]
        else:
            items = [cast_value(t, inner) for t in text.split(",") if t.strip()]
        return tuple(items) if origin is tuple or tp is tuple else items
    if origin is dict or tp is dict:
        value = json.loads(text)
        if not isinstance(value, dict):
            raise ValueError(text)
        return value
    raise ValueError(f"cannot set a field of type {describe(tp)}")


def cast_like(text: str, example: Any) -> Any:
    """Cast text to the type of ``example`` (for settings declared by a default value, e.g. a method's)."""
    if isinstance(example, bool):
        return cast_value(text, bool)
    if isinstance(example, int | float | str):
        return cast_value(text, type(example))
    if isinstance(example, list | tuple):
        return cast_value(text, list[type(example[0])] if example else list)
    if example is None:
        return _json_or_text(text)
    return cast_value(text, type(example))


def _json_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


# ------------------------------------------------------------------------------------------- overrides


def parse_overrides(items: Iterable[str]) -> list[tuple[list[str], str]]:
    """``["svm.backend=sklearn", "k=2"]`` -> ``[(["svm", "backend"], "sklearn"), (["k"], "2")]`` (text kept)."""
    out = []
    for item in items:
        if "=" not in item:
            raise UserError(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise UserError(f"--set has an empty key in {item!r}")
        out.append((parts, value.strip()))
    return out


def field_paths(protocol: Any, prefix: str = "") -> list[str]:
    """Every settable field of a protocol, dotted through nested protocols."""
    out = []
    for f in dataclasses.fields(protocol):
        value = getattr(protocol, f.name)
        if dataclasses.is_dataclass(value):
            out.extend(field_paths(value, f"{prefix}{f.name}."))
        else:
            out.append(f"{prefix}{f.name}")
    return out


def _has_path(protocol: Any, parts: list[str]) -> bool:
    cur = protocol
    for p in parts:
        if not dataclasses.is_dataclass(cur) or p not in {f.name for f in dataclasses.fields(cur)}:
            return False
        cur = getattr(cur, p)
    return not dataclasses.is_dataclass(cur)


def _set_path(protocol: Any, parts: list[str], text: str, shown: str) -> Any:
    name = parts[0]
    if len(parts) > 1:
        return dataclasses.replace(protocol, **{name: _set_path(getattr(protocol, name), parts[1:], text, shown)})
    tp = _hints(type(protocol))[name]
    try:
        value = cast_value(text, tp)
    except (ValueError, json.JSONDecodeError):
        raise UserError(f"--set {shown}={text}: {name} must be {describe(tp)}") from None
    return dataclasses.replace(protocol, **{name: value})


def apply_overrides(protocols: Mapping[str, Any], overrides: list[tuple[list[str], str]]) -> dict[str, Any]:
    """Apply overrides to the protocols of several tasks.

    ``task.key=value`` applies to that task only; ``key=value`` to every task whose protocol has that key.
    A key no selected task knows is refused with the closest known name, so a typo never runs the default.
    """
    out = dict(protocols)
    for parts, text in overrides:
        shown = ".".join(parts)
        if parts[0] in out and len(parts) > 1:
            targets, path = [parts[0]], parts[1:]
        else:
            targets, path = list(out), parts
        hits = [t for t in targets if _has_path(out[t], path)]
        if not hits:
            known = sorted({f"{t}.{k}" for t in targets for k in field_paths(out[t])}
                           | {k for t in targets for k in field_paths(out[t])})
            close = difflib.get_close_matches(shown, known, n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]}?" if close else f" (known: {', '.join(sorted(known)[:12])}…)"
            raise UserError(f"--set {shown}: no selected task has this protocol field{hint}")
        for t in hits:
            out[t] = _set_path(out[t], path, text, shown)
    return out


def format_protocol(protocol: Any) -> str:
    """One ``key = value`` line per field, dotted for nested protocols (for ``evalsuite list --presets``)."""
    flat = protocol.to_dict() if isinstance(protocol, TaskProtocol) else dict(protocol)
    lines = []
    for key in field_paths(protocol) if dataclasses.is_dataclass(protocol) else sorted(flat):
        cur: Any = flat
        for p in key.split("."):
            cur = cur[p]
        lines.append(f"  {key} = {json.dumps(cur)}")
    return "\n".join(lines)
