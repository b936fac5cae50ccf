"""Benchmark schedules: which checkpoint x task x preset (x seed) runs make up a leaderboard.

The machine-readable model index that regenerates the tables (the role of mmselfsup's model-zoo
``.yml``), written in TOML (standard library ``tomllib``; JSON is accepted too)::

    # leaderboard.toml
    out = "runs/leaderboard"          # results directory (relative paths: to this file)
    data_root = "data/demo"

    [defaults]
    protocol = "quick"
    tasks = ["centroid", "knn", "voc07_svm"]
    seeds = [0]

    [[run]]
    checkpoint = "random:resnet18"

    [[run]]
    checkpoint = "ckpts/simclr.safetensors"
    name = "simclr_200ep"             # the name in records (--name); also arch, weights (--arch, --weights)
    tasks = ["voc07_svm"]
    set = ["voc07_svm.costs=[0.1,1,10]"]   # --set overrides
    layers = ["res4", "res5"]
    seeds = [0, 1, 2]

:func:`run_schedule` expands it into jobs and runs the pending ones. It resumes: a job
(checkpoint, task, preset, seed) is *done* when the results file already holds a record of it whose
params carry every ``set`` override, and done jobs are not recomputed unless ``force``. ``seeds`` are
``evalsuite run --seeds``: a seed-independent task (``evalsuite.task.task_seeded``: knn's exact search,
centroid, voc07_svm) has one job, at the first seed; the tasks sharing a checkpoint, preset, overrides,
layers and pending seeds are one ``evalsuite run --seeds`` (the checkpoint, a random init too, is loaded
once, from the first seed, and the features are extracted once); the runner appends each (task, seed)'s
records as soon as it finishes, so an interrupted schedule loses at most the one in progress.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UserError
from .protocols import cast_like, check_preset, parse_overrides
from .results import RESULTS_FILE, iter_records

RUN_KEYS = {"checkpoint", "arch", "tasks", "protocol", "seeds", "seed", "set", "layers", "name"}
TOP_KEYS = {"out", "data_root", "cache_dir", "device", "defaults", "run", "runs", "batch_size", "workers",
            "precision"}


@dataclass
class Job:
    checkpoint: str
    task: str
    protocol: str
    seed: int
    overrides: tuple[str, ...] = ()
    layers: tuple[str, ...] = ()
    arch: str | None = None
    weights: str | None = None  # which weights of the file (--weights)
    name: str | None = None  # the checkpoint's name in records (--name)
    status: str = "pending"  # pending | done (before) | ran | failed | data_missing | not_applicable | planned
    message: str = ""

    @property
    def group(self) -> tuple:
        return (self.checkpoint, self.arch, self.weights, self.name, self.protocol, self.seed, self.overrides,
                self.layers)

    @property
    def run_key(self) -> tuple:
        """What one `evalsuite run` shares: everything but the seed (a run takes several, `--seeds`)."""
        return (self.checkpoint, self.arch, self.weights, self.name, self.protocol, self.overrides, self.layers)

    def to_dict(self) -> dict[str, Any]:
        return {"checkpoint": self.checkpoint, "task": self.task, "protocol": self.protocol, "seed": self.seed,
                "overrides": list(self.overrides), "layers": list(self.layers), "status": self.status,
                "message": self.message}


@dataclass
class ScheduleReport:
    path: Path
    results_file: Path
    jobs: list[Job] = field(default_factory=list)
    dry_run: bool = False

    def count(self, status: str) -> int:
        return sum(j.status == status for j in self.jobs)

    @property
    def ok(self) -> bool:
        return not any(j.status in ("failed", "data_missing", "not_applicable") for j in self.jobs)

    @property
    def exit_code(self) -> int:
        return 0 if self.ok else 1

    def summary(self) -> str:
        parts = [f"{len(self.jobs)} job(s)"]
        for s in ("done", "ran", "planned", "data_missing", "not_applicable", "failed"):
            if self.count(s):
                parts.append(f"{self.count(s)} {'already done' if s == 'done' else s}")
        return ", ".join(parts) + f"; results in {self.results_file}"


def load_schedule(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError("schedule file not found", path)
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"not a valid schedule ({e})", path) from None
    if not isinstance(data, dict):
        raise UserError("a schedule is a table with [[run]] entries", path)
    unknown = set(data) - TOP_KEYS
    if unknown:
        raise UserError(f"unknown top-level key(s) {', '.join(sorted(unknown))}", path)
    runs = data.get("run", data.get("runs"))
    if not isinstance(runs, list) or not runs:
        raise UserError("no [[run]] entries", path)
    return data


def _as_list(v: Any) -> list:
    if v is None:
        return []
    if isinstance(v, str):
        return [x for x in v.split(",") if x]
    return list(v)


def expand_jobs(data: dict[str, Any], base: Path, only_tasks: Sequence[str] | None = None,
                path: Path | None = None) -> list[Job]:
    """Schedule table -> list of jobs (one per checkpoint x task x seed), in file order."""
    defaults = data.get("defaults", {}) or {}
    jobs: list[Job] = []
    seen = set()
    for i, run in enumerate(data.get("run", data.get("runs"))):
        where = f"[[run]] #{i + 1}"
        if not isinstance(run, dict):
            raise UserError(f"{where} is not a table", path)
        unknown = set(run) - RUN_KEYS
        if unknown:
            raise UserError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}", path)
        cfg = {**defaults, **run}
        ck = cfg.get("checkpoint")
        if not isinstance(ck, str) or not ck:
            raise UserError(f"{where}: 'checkpoint' is required", path)
        if ":" not in ck.split("/")[0]:  # a file path (not random:/torchvision:): relative to the schedule
            ck = str((base / ck).resolve())
        tasks = _as_list(cfg.get("tasks"))
        if not tasks:
            raise UserError(f"{where}: no tasks (set 'tasks' in the run or in [defaults])", path)
        if only_tasks:
            tasks = [t for t in tasks if t in set(only_tasks)]
        protocol = check_preset(str(cfg.get("protocol", "goyal19")))
        seeds = _as_list(cfg.get("seeds", [cfg.get("seed", 0)]))
        if not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
            raise UserError(f"{where}: seeds must be integers", path)
        overrides = tuple(str(x) for x in _as_list(cfg.get("set")))
        parse_overrides(overrides)  # validate early
        layers = tuple(str(x) for x in _as_list(cfg.get("layers")))
        for seed in seeds:
            for task in tasks:
                job = Job(ck, task, protocol, int(seed), overrides, layers, cfg.get("arch"), cfg.get("weights"),
                          cfg.get("name"))
                key = (job.group, task)
                if key not in seen:
                    seen.add(key)
                    jobs.append(job)
    return jobs


def seeded_jobs(jobs: list[Job]) -> dict[tuple, bool]:
    """``(run_key, task) -> whether --seeds runs the task once per seed`` (evalsuite.runner.seeded_tasks, over the
    tasks of each run as the run resolves them)."""
    from .runner import seeded_tasks

    tasks: dict[tuple, list[str]] = {}
    for j in jobs:
        tasks.setdefault(j.run_key, [])
        if j.task not in tasks[j.run_key]:
            tasks[j.run_key].append(j.task)
    return {(key, task): seeded for key, names in tasks.items()
            for task, seeded in seeded_tasks(names, key[4], key[5]).items()}


def once_if_unseeded(jobs: list[Job], seeded: dict[tuple, bool]) -> list[Job]:
    """A seed-independent task's job at the first of its seeds only: the others would give the same numbers."""
    seen, out = set(), []
    for j in jobs:
        if not seeded[j.run_key, j.task]:
            if (j.run_key, j.task) in seen:
                continue
            seen.add((j.run_key, j.task))
        out.append(j)
    return out


def seed_groups(pending: list[Job], seeded: dict[tuple, bool]) -> list[tuple[tuple[int, ...], list[Job]]]:
    """The pending jobs as runs: one per (run key, the seeds a task still needs), each seed a `--seeds` entry; a
    seed-independent task (one job) joins a run of its run key whose first seed is its own, where it runs once."""
    by_task: dict[tuple, list[Job]] = {}
    for j in pending:
        by_task.setdefault((j.run_key, j.task), []).append(j)
    runs = [(key, tuple(j.seed for j in js)) for (key, task), js in by_task.items() if seeded[key, task]]
    groups: dict[tuple, list[Job]] = {}
    for (key, task), js in by_task.items():  # in file order
        if seeded[key, task]:
            home = (key, tuple(j.seed for j in js))
        else:
            home = next((r for r in runs if r[0] == key and r[1][0] == js[0].seed), (key, (js[0].seed,)))
        groups.setdefault(home, []).extend(js)
    return [(seeds, js) for (_, seeds), js in groups.items()]


def _recorded_as(params: Any, parts: list[str], text: str) -> bool:
    """The record's resolved protocol has field ``parts`` with the value ``--set`` text ``text`` casts to."""
    for p in parts:
        if not isinstance(params, dict) or p not in params:
            return False
        params = params[p]
    if params is None:
        return text.strip().lower() in ("none", "null")
    try:
        return cast_like(text, params) == params
    except (ValueError, json.JSONDecodeError):
        return False


def _task_names() -> set[str]:
    from . import registry

    try:
        return set(registry.task_names())
    except Exception:  # a broken plugin must not stop the resume check
        return set()


def _is_done(job: Job, records: list[dict], task_names: set[str] | None = None) -> bool:
    """A record of this (checkpoint, task, preset, seed) exists and its params carry every override."""
    names = _task_names() if task_names is None and job.overrides else (task_names or set())
    wanted = []
    for parts, text in parse_overrides(job.overrides):
        if len(parts) > 1 and parts[0] == job.task:
            parts = parts[1:]
        elif len(parts) > 1 and parts[0] in names:
            continue  # scoped to another task
        wanted.append((parts, text))
    for r in records:
        if (r.get("checkpoint") == job.checkpoint and r.get("task") == job.task and r.get("protocol") == job.protocol
                and r.get("seed") == job.seed):
            params = r.get("params") or {}
            if all(_recorded_as(params, parts, text) for parts, text in wanted):
                return True
    return False


def run_schedule(path: str | Path, force: bool = False, *, out: str | Path | None = None,
                 data_root: str | Path | None = None, cache_dir: str | Path | None = None, device: str | None = None,
                 tasks: Sequence[str] | str | None = None, dry_run: bool = False, progress: bool = True,
                 echo: Callable[[str], Any] = print, run_fn: Callable[[Any], Any] | None = None) -> ScheduleReport:
    """Run every pending job of a schedule file; arguments that are not None override the file's values.

    ``run_fn(RunOptions) -> RunReport`` defaults to :func:`evalsuite.runner.run` (tests pass a fake).
    """
    path = Path(path)
    data = load_schedule(path)
    base = path.resolve().parent

    def pick(arg, key, default=None):
        if arg is not None:
            return Path(arg) if key != "device" else arg
        v = data.get(key, default)
        if v is None:
            return None
        return v if key == "device" else (base / v)

    out_dir = pick(out, "out", "runs")
    root = pick(data_root, "data_root", "data")
    cache = pick(cache_dir, "cache_dir")
    dev = pick(device, "device", "cpu")
    only = _as_list(tasks) if tasks else None
    jobs = expand_jobs(data, base, only, path)
    seeded = seeded_jobs(jobs)
    jobs = once_if_unseeded(jobs, seeded)
    results_file = Path(out_dir) / RESULTS_FILE
    records = list(iter_records(results_file)) if results_file.exists() else []
    report = ScheduleReport(path=path, results_file=results_file, jobs=jobs, dry_run=dry_run)
    for job in jobs:
        if not force and _is_done(job, records):
            job.status = "done"
    pending = [j for j in jobs if j.status == "pending"]
    echo(f"schedule {path}: {len(jobs)} job(s), {len(jobs) - len(pending)} already done, {len(pending)} to run"
         + (" (forced)" if force else ""))
    if dry_run:
        for j in pending:
            j.status = "planned"
            echo(f"  would run {j.checkpoint} x {j.task} ({j.protocol}, seed {j.seed}"
                 + (f", set {' '.join(j.overrides)}" if j.overrides else "") + ")")
        return report
    if run_fn is None:
        from .runner import run as run_fn
    from .runner import RunOptions

    done_jobs = 0
    groups = seed_groups(pending, seeded)
    for n, (seeds, group) in enumerate(groups, 1):
        ck, arch, weights, name, protocol, overrides, layers = group[0].run_key
        names = list(dict.fromkeys(j.task for j in group))
        echo(f"[{n}/{len(groups)}] {ck}: {', '.join(names)} ({protocol}, seed{'s' if len(seeds) > 1 else ''} "
             f"{','.join(map(str, seeds))}) — {done_jobs}/{len(pending)} jobs finished")
        opts = RunOptions(checkpoint=ck, arch=arch, weights=weights, name=name, tasks=[",".join(names)],
                          layers=list(layers) or None,
                          preset=protocol, overrides=list(overrides), data_root=Path(root), out=Path(out_dir),
                          device=dev, seed=seeds[0] if len(seeds) == 1 else 0,
                          seeds=list(seeds) if len(seeds) > 1 else None,
                          cache_dir=Path(cache) if cache else None, progress=progress,
                          batch_size=int(data.get("batch_size", 64)), workers=int(data.get("workers", 0)),
                          precision=data.get("precision"))
        try:
            rep = run_fn(opts)
        except UserError as e:
            from .errors import NotApplicable
            from .task import DataMissing

            status = ("data_missing" if isinstance(e, DataMissing) else "not_applicable" if isinstance(e, NotApplicable)
                      else "failed")
            # tasks that finished before the error have their records: mark those that did
            fresh = list(iter_records(results_file)) if results_file.exists() else []
            for j in group:
                if _is_done(j, fresh) and not force:
                    j.status = "ran"
                else:
                    j.status, j.message = status, str(e)
            echo(f"  {status}: {e}")
            done_jobs += len(group)
            continue
        got = {(getattr(r, "task", None), getattr(r, "seed", None)) for r in getattr(rep, "results", [])}
        skipped = dict(getattr(rep, "skipped", []) or [])
        for j in group:
            if j.task in skipped:
                j.status, j.message = "data_missing", skipped[j.task]
            elif (j.task, j.seed) in got:
                j.status = "ran"
            else:
                j.status, j.message = "failed", "the run produced no record for this task"
        done_jobs += len(group)
    echo(report.summary())
    return report
