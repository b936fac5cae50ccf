"""``evalsuite run``: load a checkpoint once, run the selected tasks, append result records."""

from __future__ import annotations

import os
import random
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import registry
from .cache import FeatureCache
from .checkpoints import LoadedCheckpoint, load_checkpoint
from .errors import UserError
from .features import FeatureExtractor
from .protocols import apply_overrides, check_preset, parse_overrides
from .results import RESULTS_FILE, Result, append_results, host_name, library_versions, now_iso
from .task import DataMissing, TaskContext
from .trunks import arch_info


@dataclass
class RunOptions:
    checkpoint: str
    arch: str | None = None
    tasks: Sequence[str] = ("all",)
    layers: Sequence[str] | None = None
    preset: str = "goyal19"
    overrides: Sequence[str] = ()
    data_root: Path = Path("data")
    out: Path = Path("runs")
    device: str = "cpu"
    seed: int = 0
    batch_size: int = 64
    workers: int = 0
    cache_dir: Path | None = None
    precision: str = "auto"
    allow_partial: bool = False
    trust_pickle: bool = False
    progress: bool = True


@dataclass
class RunReport:
    results: list[Result] = field(default_factory=list)
    results_file: Path | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)
    checkpoint: LoadedCheckpoint | None = None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def resolve_tasks(requested: Sequence[str]) -> tuple[list[str], bool]:
    names = [n for item in requested for n in item.split(",") if n]
    if not names or names == ["all"]:
        available = registry.task_names()
        if not available:
            raise UserError("no tasks are installed (entry-point group evalsuite.tasks is empty)")
        return available, True
    for n in names:
        registry.get_task(n)  # raises a clear error for an unknown name
    return names, False


def validate_layers(arch: str, layers: Sequence[str] | None) -> list[str] | None:
    if not layers:
        return None
    taps = arch_info(arch)["taps"]
    flat = [x for item in layers for x in item.split(",") if x]
    bad = [x for x in flat if x not in taps]
    if bad:
        raise UserError(f"unknown layer(s) {', '.join(bad)} for {arch}; available: {', '.join(taps)}")
    return flat


def run(opts: RunOptions) -> RunReport:
    check_preset(opts.preset)
    if opts.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {opts.device} requested but no CUDA device is available")
    task_names, all_mode = resolve_tasks(opts.tasks)
    tasks = {n: registry.get_task(n) for n in task_names}
    protocols = apply_overrides(
        {n: t.default_protocol(opts.preset) for n, t in tasks.items()}, parse_overrides(opts.overrides)
    )
    ckpt = load_checkpoint(opts.checkpoint, arch=opts.arch, allow_partial=opts.allow_partial,
                           trust_pickle=opts.trust_pickle, seed=opts.seed)
    layers = validate_layers(ckpt.arch, opts.layers)
    cache = FeatureCache(opts.cache_dir)
    shared: dict[str, FeatureExtractor] = {}

    def extractor() -> FeatureExtractor:
        if "x" not in shared:
            shared["x"] = FeatureExtractor(
                ckpt.build_trunk(), ckpt.sha256, ckpt.arch, cache=cache, device=opts.device,
                precision=opts.precision, batch_size=opts.batch_size, workers=opts.workers,
                progress=opts.progress,
            )
        return shared["x"]

    run_id = uuid.uuid4().hex[:12]
    report = RunReport(checkpoint=ckpt)
    out_file = Path(opts.out) / RESULTS_FILE
    for name, task in tasks.items():
        seed_everything(opts.seed)
        ctx = TaskContext(
            task=name, checkpoint=ckpt, preset=opts.preset, protocol=protocols[name],
            data_root=Path(opts.data_root), out_dir=Path(opts.out) / name, extractor_factory=extractor,
            device=opts.device, seed=opts.seed, layers=layers, progress=opts.progress, run_id=run_id,
            cache_dir=cache.root,
        )
        t0 = time.perf_counter()
        try:
            results = task.run(ctx)
        except DataMissing as e:
            if not all_mode:
                raise
            report.skipped.append((name, str(e)))
            continue
        wall = time.perf_counter() - t0
        stamp, versions, host = now_iso(), library_versions(), host_name()
        for r in results:
            r.wall_time_s = round(wall, 3)
            r.created, r.versions, r.host = stamp, versions, host
            r.params.setdefault("feature_precision", shared["x"].precision if "x" in shared else None)
        if _is_main_process():
            append_results(out_file, results)
        report.results.extend(results)
    report.results_file = out_file
    return report


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0
