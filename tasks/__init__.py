"""Built-in evaluation tasks, one package per task family.

Each package's ``__init__`` declares ``TASKS = {task name: "module:attribute"}`` (module relative to the
package). :func:`catalog` finds them at run time, so a new package works without a reinstall; the core
reaches it through the ``evalsuite.catalogs`` entry point, third-party tasks through ``evalsuite.tasks``.
"""

from __future__ import annotations

import importlib
import pkgutil


def catalog() -> dict[str, str]:
    """Task name -> ``"package.module:attribute"`` for every built-in task (imports only the packages)."""
    found: dict[str, str] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if not info.ispkg or info.name.startswith("_"):
            continue
        pkg = importlib.import_module(f"{__name__}.{info.name}")
        for name, target in getattr(pkg, "TASKS", {}).items():
            found[name] = f"{pkg.__name__}.{target}"
    return found
