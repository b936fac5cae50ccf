"""The core (`evalsuite/`) imports no plug-in: every module under it imports without pulling in `tasks`,
`pretrain` or `leaderboard` (they reach the core only through entry points)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_no_core_module_imports_a_plugin() -> None:
    modules = sorted(".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
                     for p in (REPO / "evalsuite").rglob("*.py") if p.name != "__main__.py")
    assert "evalsuite.cli" in modules and "evalsuite.data.cli" in modules and len(modules) > 25
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}:\n"
        "    importlib.import_module(m)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('tasks', 'pretrain', 'leaderboard'))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"plug-in modules imported by the core: {out.stdout.strip()}"


def test_the_check_would_see_a_plugin_import() -> None:
    code = "import evalsuite.cli, tasks.knn.metrics, sys; print(sorted(m for m in sys.modules if 'tasks' in m))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert "tasks.knn.metrics" in out.stdout
