"""Plug-in discovery through entry points.

Groups: ``evalsuite.tasks`` (task objects), ``evalsuite.methods`` (pretraining
methods), ``evalsuite.commands`` (extra CLI sub-commands: a callable that takes
argparse's sub-parsers and adds one). A third-party package adds to any group
in its own ``pyproject.toml``; tests may also ``register_task`` directly.
"""

from __future__ import annotations

from importlib import metadata
from typing import Any

from .errors import UserError

TASK_GROUP = "evalsuite.tasks"
METHOD_GROUP = "evalsuite.methods"
COMMAND_GROUP = "evalsuite.commands"

_registered: dict[str, dict[str, Any]] = {TASK_GROUP: {}, METHOD_GROUP: {}, COMMAND_GROUP: {}}


def entry_points(group: str) -> dict[str, metadata.EntryPoint]:
    return {ep.name: ep for ep in metadata.entry_points(group=group)}


def names(group: str) -> list[str]:
    return sorted(set(entry_points(group)) | set(_registered[group]))


def load(group: str, name: str, what: str) -> Any:
    if name in _registered[group]:
        obj = _registered[group][name]
    else:
        eps = entry_points(group)
        if name not in eps:
            raise UserError(f"unknown {what} {name!r}; available: {', '.join(names(group)) or 'none'}")
        try:
            obj = eps[name].load()
        except ImportError as e:
            raise UserError(f"{what} {name!r} cannot be imported ({e}); is its optional extra installed?") from None
    return obj() if isinstance(obj, type) else obj


def register(group: str, name: str, obj: Any) -> None:
    _registered[group][name] = obj


def registered(group: str) -> dict[str, Any]:
    """Objects registered programmatically (tests, plugins loaded at run time)."""
    return dict(_registered[group])


def unregister(group: str, name: str) -> None:
    _registered[group].pop(name, None)


def task_names() -> list[str]:
    return names(TASK_GROUP)


def get_task(name: str):
    return load(TASK_GROUP, name, "task")


def register_task(task: Any) -> None:
    register(TASK_GROUP, task.name, task)
