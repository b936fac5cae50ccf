"""The one way tests build a task context: a real TaskContext over a real (seeded random) checkpoint, with
the task's preset and ``--set`` overrides applied exactly as ``evalsuite run`` applies them. Also: the check
that opening a broken dataset raises BadData, and ``evalsuite run`` with one task registered."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from evalsuite import registry
from evalsuite.cache import FeatureCache
from evalsuite.checkpoints import LoadedCheckpoint, load_checkpoint
from evalsuite.data import open_dataset
from evalsuite.errors import BadData
from evalsuite.features import FeatureExtractor
from evalsuite.protocols import apply_overrides, parse_overrides
from evalsuite.task import TaskContext


def make_extractor(ckpt: LoadedCheckpoint, cache_dir: Path, **options: Any) -> FeatureExtractor:
    """A fp32 extractor on ``ckpt`` with a private cache (``options`` override batch size, precision, ...)."""
    kw = {"precision": "fp32", "batch_size": 16, "progress": False, **options}
    return FeatureExtractor(ckpt.build_trunk(), ckpt.sha256, ckpt.arch, cache=FeatureCache(cache_dir), **kw)


def make_context(task: str, data_root: Path, out: Path, *, overrides: Sequence[str] = (), preset: str = "quick",
                 checkpoint: str | LoadedCheckpoint = "random:resnet18", cache_dir: Path | None = None,
                 extractor_factory: Callable[[], FeatureExtractor] | None = None,
                 layers: Sequence[str] | None = None, seed: int = 0, device: str = "cpu") -> TaskContext:
    """A TaskContext for ``task`` at ``preset`` with ``overrides`` (``task.key=value`` or ``key=value``).

    Features go to ``cache_dir`` (default ``out/cache``) unless ``extractor_factory`` is given.
    """
    ckpt = checkpoint if isinstance(checkpoint, LoadedCheckpoint) else load_checkpoint(checkpoint, seed=seed)
    protocol = apply_overrides({task: registry.get_task(task).default_protocol(preset)},
                               parse_overrides(list(overrides)))[task]
    cache = Path(cache_dir) if cache_dir is not None else Path(out) / "cache"
    factory = extractor_factory or (lambda: make_extractor(ckpt, cache))
    return TaskContext(task=task, checkpoint=ckpt, preset=preset, protocol=protocol, data_root=Path(data_root),
                       out_dir=Path(out), extractor_factory=factory, device=device, seed=seed, layers=layers,
                       progress=False, cache_dir=cache)


def open_dataset_error(kind: str, root: Path, split: str, match: str | None = None, **options: Any) -> BadData:
    """The BadData that ``open_dataset(kind, root, split, **options)`` must raise (its message matching
    ``match``), returned so the test can check the file it names."""
    with pytest.raises(BadData, match=match) as e:
        open_dataset(kind, root, split, **options)
    return e.value


def run_cli_with_task(task: Any, args: Sequence[str]) -> int:
    """The exit code of ``evalsuite run --checkpoint random:resnet18 --tasks <task> --protocol quick ARGS
    --no-progress`` with ``task`` (a Task object) registered for this call only."""
    from evalsuite.cli import main as cli_main

    registry.register_task(task)
    try:
        return cli_main(["run", "--checkpoint", "random:resnet18", "--tasks", task.name, "--protocol", "quick",
                         *args, "--no-progress"])
    finally:
        registry.unregister(registry.TASK_GROUP, task.name)


def read_records(out: Path) -> list[dict[str, Any]]:
    """The records of ``out/results.jsonl``, one per line."""
    return [json.loads(line) for line in (Path(out) / "results.jsonl").read_text().splitlines()]
