"""Method discovery: every :class:`pretrain.base.Method` subclass with a ``name`` defined in a module of
``pretrain.methods`` is registered automatically (drop a file in, nothing else to edit); third-party
packages add theirs under the ``evalsuite.methods`` entry-point group (value: the Method class)."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import warnings

from evalsuite import registry as core
from evalsuite.errors import UserError

from .base import Method

_cache: dict[str, type[Method]] | None = None
#: modules of pretrain.methods that failed to import: module name -> error (one bad file never hides the rest)
broken: dict[str, str] = {}


def _builtin() -> dict[str, type[Method]]:
    pkg = importlib.import_module(f"{__package__}.methods")
    found: dict[str, type[Method]] = {}
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        try:
            mod = importlib.import_module(f"{pkg.__name__}.{info.name}")
        except Exception as e:  # a broken or half-written method file: report it, keep the others usable
            broken[info.name] = f"{type(e).__name__}: {e}"
            warnings.warn(f"pretrain.methods.{info.name} cannot be imported ({broken[info.name]})", stacklevel=2)
            continue
        for _, obj in inspect.getmembers(mod, inspect.isclass):
            if issubclass(obj, Method) and obj.__module__ == mod.__name__ and obj.name:
                found[obj.name] = obj
    return found


def catalog() -> dict[str, type[Method]]:
    """The built-in methods (what the ``evalsuite.catalogs`` entry ``methods`` offers the core)."""
    global _cache
    if _cache is None:
        _cache = _builtin()
    return dict(_cache)


def methods() -> dict[str, type[Method]]:
    """name -> Method class, built-ins plus entry points plus programmatic registrations."""
    out = catalog()
    for name in core.entry_points(core.METHOD_GROUP):
        out.setdefault(name, None)  # loaded lazily by get_method
    out.update(core.registered(core.METHOD_GROUP))
    return out


def get_method(name: str) -> type[Method]:
    known = methods()
    obj = known.get(name)
    if obj is None and name in core.entry_points(core.METHOD_GROUP):
        try:
            obj = core.entry_points(core.METHOD_GROUP)[name].load()
        except ImportError as e:
            raise UserError(f"method {name!r} cannot be imported ({e})") from None
    if obj is None:
        bad = ", ".join(f"{k}: {v}" for k, v in broken.items())
        hint = f" (modules that failed to import: {bad})" if broken else ""
        raise UserError(f"unknown method {name!r}; available: {', '.join(sorted(known))}{hint}")
    if not (inspect.isclass(obj) and issubclass(obj, Method)):
        raise UserError(f"entry point {name!r} is not a pretrain.base.Method subclass")
    return obj


def register_method(cls: type[Method]) -> type[Method]:
    """Register a Method class at run time (tests, notebooks); usable as a decorator."""
    core.register(core.METHOD_GROUP, cls.name, cls)
    return cls
