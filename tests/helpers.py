"""The one way tests build a task context: a real TaskContext over a real (seeded random) checkpoint, with
the task's preset and ``--set`` overrides applied exactly as ``evalsuite run`` applies them. Also: the check
that opening a broken dataset raises BadData, ``evalsuite run`` with one task registered, and the processes torchrun
would start."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from collections.abc import Callable, Mapping, Sequence
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

REPO = Path(__file__).resolve().parents[1]


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


def torchrun_processes(cmd: Sequence[str], cwd: Path, world: int = 2, env: Mapping[str, str] | None = None,
                       timeout: float = 180) -> list[tuple[str, str]]:
    """Run ``cmd`` as the ``world`` processes ``torchrun --nproc_per_node=WORLD`` would start on one machine (its
    environment variables and a free rendezvous port, without its agent process; this repository importable, one
    thread each) and return each rank's (stdout, stderr). A rank that fails fails the test with its stderr; the
    others are then killed rather than left waiting for it."""
    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    base = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "WORLD_SIZE": str(world),
            "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), **(env or {})}
    procs = [subprocess.Popen(list(cmd), cwd=cwd, env={**base, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(world)]
    outputs = []
    try:
        for rank, proc in enumerate(procs):
            out, err = proc.communicate(timeout=timeout)
            assert proc.returncode == 0, f"rank {rank} exited with {proc.returncode}:\n{err[-3000:]}"
            outputs.append((out, err))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    return outputs


def write_feature_store(x, root: Path, shard_rows: int = 256, budget: int | str = "1G",
                        fields: Mapping[str, Any] | None = None):
    """``x`` written as one complete cache entry under ``root`` (its key ``fields``) and opened as a FeatureStore
    under ``budget`` (nothing loaded)."""
    cache = FeatureCache(root, shard_rows=shard_rows, memory_budget=budget)
    entry = cache.entry(dict(fields or {"test": "store", "shape": list(x.shape)}), len(x))
    entry.prepare()
    for i in range(entry.num_shards):
        lo, hi = entry.shard_range(i)
        entry.write_shard(i, x[lo:hi])
    entry.finalize()
    return entry.open(memory_budget=cache.memory_budget)
