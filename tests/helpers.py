"""The one way tests build a task context: a real TaskContext over a real (seeded random) checkpoint, with
the task's preset and ``--set`` overrides applied exactly as ``evalsuite run`` applies them."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from evalsuite import registry
from evalsuite.cache import FeatureCache
from evalsuite.checkpoints import LoadedCheckpoint, load_checkpoint
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
