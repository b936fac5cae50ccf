"""Plug-in discovery through entry points.

Groups: ``evalsuite.tasks`` (task objects), ``evalsuite.methods`` (pretraining methods),
``evalsuite.commands`` (extra CLI sub-commands: a callable that takes argparse's sub-parsers and adds
one) and ``evalsuite.catalogs``: a callable named ``tasks`` or ``methods`` that returns
``{name: object or "module:attribute"}`` found at run time (how the built-in ``tasks`` and ``pretrain``
packages offer theirs, so a new file works without a reinstall). The core never imports a plug-in by
name; tests may also ``register_task`` directly.
"""

from __future__ import annotations

import importlib
from importlib import metadata
from typing import Any

from .errors import UserError

TASK_GROUP = "evalsuite.tasks"
METHOD_GROUP = "evalsuite.methods"
COMMAND_GROUP = "evalsuite.commands"
CATALOG_GROUP = "evalsuite.catalogs"
_CATALOG_NAME = {TASK_GROUP: "tasks", METHOD_GROUP: "methods"}

_registered: dict[str, dict[str, Any]] = {TASK_GROUP: {}, METHOD_GROUP: {}, COMMAND_GROUP: {}}
_catalogs: dict[str, dict[str, Any]] = {}


def entry_points(group: str) -> dict[str, metadata.EntryPoint]:
    return {ep.name: ep for ep in metadata.entry_points(group=group)}


def catalog(group: str) -> dict[str, Any]:
    """What the ``evalsuite.catalogs`` entry named for ``group`` offers (empty when none is installed)."""
    if group not in _catalogs:
        found: dict[str, Any] = {}
        ep = entry_points(CATALOG_GROUP).get(_CATALOG_NAME.get(group, ""))
        if ep is not None:
            try:
                found = dict(ep.load()())
            except ImportError as e:
                raise UserError(f"the {ep.name} catalog ({ep.value}) cannot be imported: {e}") from None
        _catalogs[group] = found
    return _catalogs[group]


def names(group: str) -> list[str]:
    return sorted(set(entry_points(group)) | set(catalog(group)) | set(_registered[group]))


def _import(target: str) -> Any:
    module, _, attr = target.partition(":")
    obj = importlib.import_module(module)
    for part in attr.split(".") if attr else ():
        obj = getattr(obj, part)
    return obj


def load(group: str, name: str, what: str) -> Any:
    if name in _registered[group]:
        obj = _registered[group][name]
    elif name in catalog(group):
        obj = catalog(group)[name]
        try:
            obj = _import(obj) if isinstance(obj, str) else obj
        except ImportError as e:
            raise UserError(f"{what} {name!r} cannot be imported ({e}); is its optional extra installed?") from None
    else:
        eps = entry_points(group)
        if name not in eps:
            raise UserError(f"unknown {what} {name!r}; available: {', '.join(names(group)) or 'none'}")
        try:
            obj = eps[name].load()
        except ImportError as e:
            raise UserError(f"{what} {name!r} cannot be imported ({e}); is its optional extra installed?") from None
    return obj() if isinstance(obj, type) and group == TASK_GROUP else obj


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


def method_names() -> list[str]:
    return names(METHOD_GROUP)


def get_method(name: str):
    return load(METHOD_GROUP, name, "method")
