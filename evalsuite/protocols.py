"""Protocol presets and ``--set key=value`` overrides.

Every task owns its presets (``Task.default_protocol(preset)`` returns a plain,
JSON-serialisable dict). This module knows the preset names, parses overrides
and applies them, so that the fully resolved protocol can be recorded with each
result.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Mapping
from typing import Any

from .errors import UserError

PRESETS: dict[str, str] = {
    "goyal19": "the published Goyal et al. 2019 protocol (default for comparisons)",
    "vissl": "VISSL's variants of the same benchmarks",
    "quick": "small sizes for CPU and CI; numbers are not comparable to published ones",
}


def check_preset(name: str) -> str:
    if name not in PRESETS:
        raise UserError(f"unknown protocol preset {name!r}; choose one of {', '.join(PRESETS)}")
    return name


def parse_value(text: str) -> Any:
    """Parse an override value: JSON if it parses (numbers, lists, true/null), else the raw string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        low = text.lower()
        if low in ("true", "false"):
            return low == "true"
        if low in ("none", "null"):
            return None
        return text


def parse_overrides(items: Iterable[str]) -> list[tuple[list[str], Any]]:
    """``["svm.backend=sklearn", "epochs=2"]`` -> ``[(["svm", "backend"], "sklearn"), (["epochs"], 2)]``."""
    out = []
    for item in items:
        if "=" not in item:
            raise UserError(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise UserError(f"--set has an empty key in {item!r}")
        out.append((parts, parse_value(value.strip())))
    return out


def _has_path(d: Mapping[str, Any], parts: list[str]) -> bool:
    cur: Any = d
    for p in parts:
        if not isinstance(cur, Mapping) or p not in cur:
            return False
        cur = cur[p]
    return True


def _set_path(d: dict[str, Any], parts: list[str], value: Any) -> None:
    cur = d
    for p in parts[:-1]:
        cur = cur[p]
    cur[parts[-1]] = value


def apply_overrides(
    protocols: Mapping[str, dict[str, Any]], overrides: list[tuple[list[str], Any]]
) -> dict[str, dict[str, Any]]:
    """Apply overrides to the protocols of several tasks.

    ``task.key=value`` applies to that task only; ``key=value`` applies to every
    task whose protocol has that key. An override no task knows is an error, so a
    typo never silently runs the default.
    """
    out = {name: copy.deepcopy(dict(p)) for name, p in protocols.items()}
    for parts, value in overrides:
        if parts[0] in out and len(parts) > 1:
            targets = [parts[0]]
            path = parts[1:]
        else:
            targets = [t for t in out if _has_path(out[t], parts)]
            path = parts
        hit = False
        for t in targets:
            if _has_path(out[t], path):
                _set_path(out[t], path, value)
                hit = True
        if not hit:
            known = sorted({k for p in out.values() for k in _flat_keys(p)})
            raise UserError(
                f"--set {'.'.join(parts)}: no selected task has this protocol field "
                f"(known fields: {', '.join(known) or 'none'})"
            )
    return out


def _flat_keys(d: Mapping[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for k, v in d.items():
        name = f"{prefix}{k}"
        if isinstance(v, Mapping):
            keys.extend(_flat_keys(v, name + "."))
        else:
            keys.append(name)
    return keys


def format_protocol(protocol: Mapping[str, Any]) -> str:
    """One ``key = value`` line per field, dotted for nested dicts (for ``evalsuite list --presets``)."""
    lines = []
    for key in _flat_keys(protocol):
        cur: Any = protocol
        for p in key.split("."):
            cur = cur[p]
        lines.append(f"  {key} = {json.dumps(cur)}")
    return "\n".join(lines)
