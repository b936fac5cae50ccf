"""The README's example task is real code: it registers, takes typed --set overrides and produces records."""

from __future__ import annotations

import json
import re
from pathlib import Path

from evalsuite import registry
from evalsuite.cli import main

REPO = Path(__file__).resolve().parents[1]


def _example_task_code() -> str:
    readme = (REPO / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    return next(b for b in blocks if "class LogRegTask" in b)


def test_the_readme_task_example_runs(tmp_path, tiny_imagefolder, cache_dir, capsys) -> None:
    namespace: dict = {}
    exec(compile(_example_task_code(), "README.md", "exec"), namespace)
    registry.register_task(namespace["task"])
    try:
        rc = main(["run", "--checkpoint", "random:resnet18", "--tasks", "logreg", "--protocol", "quick",
                   "--data-root", str(tiny_imagefolder), "--out", str(tmp_path), "--set", "logreg.C=0.5",
                   "--layers", "res5", "--no-progress", "--precision", "fp32"])
        bad = main(["run", "--checkpoint", "random:resnet18", "--tasks", "logreg", "--set", "logreg.C=high",
                    "--data-root", str(tiny_imagefolder), "--out", str(tmp_path / "bad")])
    finally:
        registry.unregister(registry.TASK_GROUP, "logreg")
    records = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert rc == 0 and [r["layer"] for r in records] == ["res5"] and 0 <= records[0]["value"] <= 100
    assert records[0]["params"]["C"] == 0.5 and records[0]["params"]["image_size"] == 64
    assert bad == 2 and "C must be float" in capsys.readouterr().err
