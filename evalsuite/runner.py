"""``evalsuite run``: load a checkpoint once, run the selected tasks, append result records."""

from __future__ import annotations

import dataclasses
import random
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import registry
from .cache import FeatureCache
from .checkpoints import LoadedCheckpoint, load_checkpoint
from .console import note, warn
from .distributed import env_rank, env_world_size, process_group
from .errors import TaskSkipped, UserError
from .features import FeatureExtractor, preset_decode, preset_precision
from .outputs import attach_intervals
from .plan import (
    LONG_ON_CPU_S,
    TaskPlan,
    describe,
    describe_costs,
    estimate_seconds,
    for_seeds,
    human_bytes,
    human_time,
    measure_throughput,
    peak_memory,
    profile_trunk,
)
from .protocols import FeatureTaskProtocol, apply_overrides, check_preset, parse_overrides
from .results import RESULTS_FILE, Result, append_results, host_name, library_versions, now_iso
from .stats import DEFAULT_LEVEL, DEFAULT_RESAMPLES
from .task import TaskContext, environment_problem, task_distributed, task_seeded
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
    # --seeds: each seeded task (evalsuite.task.task_seeded) runs once per seed, the others once at the first; the
    # checkpoint (a random init too) is loaded once, with the first. None: `seed` alone; refused beside a `seed` != 0
    seeds: Sequence[int] | None = None
    batch_size: int = 64
    workers: int = 0
    cache_dir: Path | None = None
    memory_budget: str | int | None = None  # features a task holds at once (--memory-budget); None: the default
    precision: str | None = None  # None: the preset's (fp32 for goyal19 / vissl, auto for quick)
    allow_partial: bool = False
    trust_pickle: bool = False
    weights: str | None = None  # the checkpoint file's entry to evaluate (--weights), None = the default choice
    name: str | None = None  # the checkpoint's name in the records (--name), None = from the file name
    progress: bool = True
    show_plan: bool = False  # print each task's plan and time estimate before starting
    dry_run: bool = False  # stop after the plan
    # the bootstrap interval of every number with per-sample outputs (docs/uncertainty.md); 0 resamples: none
    ci_resamples: int = DEFAULT_RESAMPLES
    ci_level: float = DEFAULT_LEVEL
    decode: str | None = None  # None: the preset's (cpu for the published protocols, auto for quick)
    # an evalsuite.extract_array.ArrayExtraction: large splits extracted as an array job (`--launcher`, `--array`)
    array: Any = None


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


def run_seeds(opts: RunOptions) -> list[int]:
    """The seeds of a run: ``opts.seeds`` (distinct, in the order given) or ``[opts.seed]``."""
    if opts.seeds is None:
        return [int(opts.seed)]
    seeds = [int(s) for s in opts.seeds]
    if opts.seed != 0:
        raise UserError(f"give one seed ({opts.seed}) or a list of seeds ({','.join(map(str, seeds))}), not both")
    if not seeds:
        raise UserError("--seeds needs at least one seed")
    twice = sorted({s for s in seeds if seeds.count(s) > 1})
    if twice:
        raise UserError(f"--seeds lists {', '.join(map(str, twice))} more than once")
    return seeds


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


def preset_protocols(tasks: dict[str, Any], preset: str, all_mode: bool) -> tuple[dict[str, Any], dict[str, str]]:
    """Each task's protocol for ``preset``, and the tasks that refuse the preset with why (a task may have no
    faithful version of a preset, e.g. detection's ``vissl``); a task asked for by name passes its refusal on."""
    protocols, refused = {}, {}
    for name, task in tasks.items():
        try:
            protocols[name] = task.default_protocol(preset)
        except UserError as e:
            if not all_mode:
                raise
            refused[name] = str(e)
    return protocols, refused


def seeded_tasks(task_names: Sequence[str], preset: str, overrides: Sequence[str]) -> dict[str, bool]:
    """Which of the tasks of one run `--seeds` runs once per seed (:func:`evalsuite.task.task_seeded` on each
    resolved protocol); a task that cannot be resolved here (unknown, refusing the preset, a bad override) is
    taken as seeded, and the run itself reports the problem."""
    out = dict.fromkeys(task_names, True)
    tasks = {}
    for n in task_names:
        try:
            tasks[n] = registry.get_task(n)
        except UserError:
            pass
    try:
        defaults, refused = preset_protocols(tasks, preset, all_mode=True)
        protocols = apply_overrides(defaults, [o for o in parse_overrides(overrides) if o[0][0] not in refused])
    except UserError:
        return out
    out.update({n: task_seeded(tasks[n], protocols[n]) for n in protocols})
    return out


def validate_layers(arch: str, layers: Sequence[str] | None) -> list[str] | None:
    if not layers:
        return None
    taps = arch_info(arch)["taps"]
    flat = [x for item in layers for x in item.split(",") if x]
    bad = [x for x in flat if x not in taps]
    if bad:
        raise UserError(f"unknown layer(s) {', '.join(bad)} for {arch}; available: {', '.join(taps)}")
    return flat


def check_interval_options(resamples: int, level: float) -> None:
    if int(resamples) < 0:
        raise UserError(f"--ci-resamples must be 0 (no intervals) or more, got {resamples}")
    if not 0.0 < float(level) < 1.0:
        raise UserError(f"--ci-level must lie strictly between 0 and 1, got {level}")


def run(opts: RunOptions) -> RunReport:
    """Run the tasks of ``opts``. Under torchrun (``WORLD_SIZE`` > 1) every rank runs this: features are extracted by
    all ranks together (each its share of the shards), the data-parallel tasks (``task_distributed``) run on every
    rank in one process group, then rank 0 alone runs the others; rank 0 alone prints the plan and writes results."""
    seeds = run_seeds(opts)
    opts = dataclasses.replace(opts, seed=seeds[0])  # the checkpoint's load (a random init) and array jobs
    main = _is_main_process()
    if not main:  # the other ranks stay quiet
        opts = dataclasses.replace(opts, progress=False, show_plan=False)
    check_preset(opts.preset)
    check_interval_options(opts.ci_resamples, opts.ci_level)
    if opts.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {opts.device} requested but no CUDA device is available")
    task_names, all_mode = resolve_tasks(opts.tasks)
    if all_mode and not Path(opts.data_root).is_dir():
        raise UserError("the data root does not exist (a typo? `evalsuite data synth --out DIR` writes a small "
                        "dataset of every kind)", opts.data_root)
    tasks = {n: registry.get_task(n) for n in task_names}
    defaults, refused = preset_protocols(tasks, opts.preset, all_mode)
    tasks = {n: t for n, t in tasks.items() if n in defaults}
    overrides = [(parts, text) for parts, text in parse_overrides(opts.overrides) if parts[0] not in refused]
    protocols = apply_overrides(defaults, overrides)
    ckpt = load_checkpoint(opts.checkpoint, arch=opts.arch, allow_partial=opts.allow_partial,
                           trust_pickle=opts.trust_pickle, seed=opts.seed, weights=opts.weights, name=opts.name)
    layers = validate_layers(ckpt.arch, opts.layers)
    cache = FeatureCache(opts.cache_dir, memory_budget=opts.memory_budget)
    shared: dict[str, FeatureExtractor] = {}

    def extractor() -> FeatureExtractor:
        if "x" not in shared:
            shared["x"] = FeatureExtractor(
                ckpt.build_trunk(), ckpt.sha256, ckpt.arch, cache=cache, device=opts.device,
                precision=preset_precision(opts.preset, opts.precision), batch_size=opts.batch_size,
                workers=opts.workers, progress=opts.progress, source=ckpt.spec,
                decode=preset_decode(opts.preset, opts.decode), array=array_options(opts, ckpt),
            )
        return shared["x"]

    run_id = uuid.uuid4().hex[:12]
    report = RunReport(checkpoint=ckpt)
    say = note if main else (lambda message: None)
    for name, why in refused.items():
        say(f"skipped {name}: {why}")
        report.skipped.append((name, why))
    out_file = Path(opts.out) / RESULTS_FILE
    contexts = {name: TaskContext(
        task=name, checkpoint=ckpt, preset=opts.preset, protocol=protocols[name], data_root=Path(opts.data_root),
        out_dir=Path(opts.out) / name, extractor_factory=extractor, device=opts.device, seed=opts.seed,
        layers=layers, progress=opts.progress, run_id=run_id, cache_dir=cache.root) for name in tasks}

    def skip(name: str, e: TaskSkipped) -> None:
        if not all_mode:
            raise e
        say(f"skipped {name}: {e}")
        report.skipped.append((name, str(e)))
        contexts.pop(name)

    if all_mode:
        for name in list(contexts):
            why = environment_problem(tasks[name])
            if why:
                say(f"skipped {name}: this machine cannot run it ({why})")
                report.skipped.append((name, why))
                contexts.pop(name)
    task_seeds = {name: seeds if task_seeded(tasks[name], protocols[name]) else seeds[:1] for name in contexts}
    if main and (opts.show_plan or opts.dry_run):
        for name, e in print_plan(tasks, contexts, ckpt, opts, task_seeds):
            skip(name, e)
    if opts.dry_run:
        return report

    def run_tasks(names: list[str]) -> None:
        for name in names:
            ctx = contexts[name]
            for seed in task_seeds[name]:  # the features come from the cache after the first seed
                ctx.seed = seed  # one context for every seed: its trunk copy and extractor are shared
                try:
                    results = run_task(tasks[name], ctx, opts, shared)
                except TaskSkipped as e:  # its data is missing: at every seed
                    skip(name, e)
                    break
                if main:
                    append_results(out_file, results)
                report.results.extend(results)

    # torchrun: the data-parallel tasks on every rank, then the others on rank 0 alone once the group is gone (so that
    # its extraction waits for no other rank); one process: every task in order
    parallel = env_world_size() > 1
    together = [n for n in contexts if not parallel or task_distributed(tasks[n])]
    alone = [n for n in contexts if n not in together]
    if alone:
        say(f"{', '.join(alone)}: not data-parallel, run by rank 0 alone"
            + (f" after {', '.join(together)}" if together else ""))
    with process_group(opts.device):
        run_tasks(together)
    if main:
        run_tasks(alone)
    report.results_file = out_file
    return report


def run_task(task, ctx: TaskContext, opts: RunOptions, shared: dict) -> list[Result]:
    """One task at ``ctx.seed``: everything random seeded with it, the records stamped and given their intervals
    (resampled with the same seed)."""
    seed_everything(ctx.seed)
    t0 = time.perf_counter()
    results = task.run(ctx)
    wall = time.perf_counter() - t0
    attach_intervals(results, opts.ci_resamples, opts.ci_level, ctx.seed)
    stamp, versions, host = now_iso(), library_versions(), host_name()
    for r in results:
        r.wall_time_s = round(wall, 3)
        r.created, r.versions, r.host = stamp, versions, host
        r.params.setdefault("feature_precision", shared["x"].precision if "x" in shared else None)
        if "x" in shared and shared["x"].decode == "gpu":  # absent: PIL's decoding, as in every earlier record
            r.params.setdefault("feature_decode", "gpu")
    return results


def array_options(opts: RunOptions, ckpt: LoadedCheckpoint):
    """``opts.array`` with the checkpoint's loading arguments, so that each array task loads the same trunk."""
    if opts.array is None:
        return None
    load = {"spec": opts.checkpoint, "arch": ckpt.arch, "allow_partial": opts.allow_partial,
            "trust_pickle": opts.trust_pickle, "seed": opts.seed, "weights": opts.weights, "name": opts.name}
    return dataclasses.replace(opts.array, checkpoint=load)


def print_plan(tasks: dict, contexts: dict[str, TaskContext], ckpt: LoadedCheckpoint, opts: RunOptions,
               task_seeds: dict[str, list[int]] | None = None) -> list[tuple[str, TaskSkipped]]:
    """Print what each task will do (at each of its seeds) and an estimate of its time on this machine; return the
    tasks whose data is missing (found while planning, so their notes come before any work)."""
    plans: dict[str, TaskPlan | None] = {}
    missing = []
    for name, ctx in contexts.items():
        planner = getattr(tasks[name], "plan", None)
        try:
            plans[name] = planner(ctx) if planner is not None else None
        except TaskSkipped as e:
            missing.append((name, e))
    for name, p in plans.items():
        ctx = contexts[name]
        if p is not None and p.images and isinstance(ctx.protocol, FeatureTaskProtocol):  # through the cache
            specs = ctx.extractor.pool_specs(ctx.taps(ctx.protocol.layers), ctx.protocol.pooling, ctx.transform())
            p.feature_dims = {t: spec.dim for t, spec in specs.items()}
        if p is not None:
            plans[name] = for_seeds(p, len((task_seeds or {}).get(name, [ctx.seed])))
    sizes = sorted({s for p in plans.values() if p for s in (p.image_size, p.train_image_size) if s})
    if sizes:
        trunk = ckpt.build_trunk()
        rates = {size: measure_throughput(trunk, size, opts.device) for size in sizes}
        profiles = {size: profile_trunk(trunk, size, opts.device) for size in sizes}
    total, disk = 0.0, 0
    print(f"plan ({opts.preset} preset, {opts.device}):")
    for name, p in plans.items():
        if p is None:
            print(f"  {name:18s} (no estimate)")
            continue
        secs = estimate_seconds(p, rates)
        total += secs
        disk += p.cache_bytes
        print(f"  {name:18s} {describe(p)}: ~{human_time(secs)}")
        costs = describe_costs(p, peak_memory(p, profiles, opts.batch_size), opts.batch_size)
        big = [k for k, v in p.images.items() if opts.array is not None and v >= opts.array.min_images]
        if big and p.feature_dims:
            costs += f"; {', '.join(big)} by an array job of {opts.array.tasks} tasks"
        if costs:
            print(f"  {'':18s} {costs}")
    if plans:
        print(f"  {'total':18s} ~{human_time(total)}, cache {human_bytes(disk)} (features already cached are not "
              "extracted again)")
    if total > LONG_ON_CPU_S and opts.device == "cpu":
        warn(f"this plan takes ~{human_time(total)} on this CPU; --protocol quick or fewer --tasks run in minutes "
             "(--dry-run prints the plan only)")
    return missing


def _is_main_process() -> bool:
    return env_rank() == 0
