"""Scale-out through submitit: one job per (checkpoint x task), results into the same results directory.

``--launcher slurm`` submits to a Slurm cluster, ``local`` runs each job as a local
subprocess (submitit's LocalExecutor), ``debug`` runs them in this process (submitit's
DebugExecutor). No scheduler of our own: submitit does the submitting, waiting and
log collection (logs under ``OUT/submitit/``).

Resources come from the task: a task may define ``resources(preset) -> dict`` with any of
``gpus``, ``cpus``, ``mem_gb``, ``timeout_min``; otherwise :data:`DEFAULT_RESOURCES`
apply (``quick`` asks for no GPU).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import registry
from .errors import UserError
from .runner import RunOptions, resolve_tasks

LAUNCHERS = ("none", "local", "debug", "slurm")

DEFAULT_RESOURCES: dict[str, dict[str, Any]] = {
    "quick": {"gpus": 0, "cpus": 2, "mem_gb": 8, "timeout_min": 60},
    "goyal19": {"gpus": 1, "cpus": 10, "mem_gb": 64, "timeout_min": 24 * 60},
    "vissl": {"gpus": 1, "cpus": 10, "mem_gb": 64, "timeout_min": 24 * 60},
    "ericsson21": {"gpus": 1, "cpus": 10, "mem_gb": 64, "timeout_min": 24 * 60},
}


@dataclass
class JobSummary:
    """What a job sends back (light and picklable: the records themselves are in results.jsonl)."""

    checkpoint: str
    task: str
    n_results: int = 0
    skipped: str = ""


def task_resources(task_name: str, preset: str) -> dict[str, Any]:
    base = dict(DEFAULT_RESOURCES.get(preset, DEFAULT_RESOURCES["goyal19"]))
    task = registry.get_task(task_name)
    own = getattr(task, "resources", None)
    if callable(own):
        base.update(own(preset) or {})
    return base


def split_by_task(opts: RunOptions) -> tuple[list[RunOptions], bool]:
    """One RunOptions per task (``--tasks all`` resolved to the installed tasks)."""
    names, all_mode = resolve_tasks(opts.tasks)
    return [dataclasses.replace(opts, tasks=[n], progress=False) for n in names], all_mode


def run_one(opts: RunOptions, skip_missing_data: bool = False) -> JobSummary:
    """The job body (runs on the worker): one checkpoint x one task."""
    from .runner import run
    from .task import DataMissing

    task = opts.tasks[0]
    try:
        report = run(opts)
    except DataMissing as e:
        if not skip_missing_data:
            raise
        return JobSummary(opts.checkpoint, task, skipped=str(e))
    return JobSummary(opts.checkpoint, task, n_results=len(report.results))


def extraction_resources(device: str, workers: int) -> dict[str, Any]:
    """One task of an extraction array job: a GPU when extracting on CUDA, a core per loading worker and one for
    the task; it holds one shard of features at a time."""
    return {"gpus": 1 if str(device).startswith("cuda") else 0, "cpus": workers + 1, "mem_gb": 32,
            "timeout_min": 12 * 60}


def make_executor(launcher: str, folder: Path, resources: dict[str, Any], name: str,
                  slurm_partition: str | None = None, slurm_account: str | None = None,
                  array_parallelism: int | None = None):
    """A submitit executor with ``resources``; ``array_parallelism``: how many tasks of an array job
    (``executor.map_array``) Slurm runs at once."""
    import submitit

    if launcher not in ("local", "debug", "slurm"):
        raise UserError(f"unknown launcher {launcher!r}; choose one of {', '.join(LAUNCHERS)}")
    ex = submitit.AutoExecutor(folder=folder, cluster=launcher)
    params: dict[str, Any] = {
        "name": name, "timeout_min": int(resources["timeout_min"]), "cpus_per_task": int(resources["cpus"]),
        "mem_gb": float(resources["mem_gb"]), "tasks_per_node": 1, "nodes": 1,
    }
    if launcher == "slurm":
        params["gpus_per_node"] = int(resources["gpus"])
        if slurm_partition:
            params["slurm_partition"] = slurm_partition
        if slurm_account:
            params["slurm_account"] = slurm_account
        if array_parallelism:
            params["slurm_array_parallelism"] = int(array_parallelism)
    elif launcher == "local":
        params["gpus_per_node"] = 0  # the local executor only hands out GPUs it can see; keep CPU jobs portable
    ex.update_parameters(**params)
    return ex


def launch(
    jobs: Sequence[RunOptions], launcher: str, folder: Path, *, skip_missing_data: bool = True,
    slurm_partition: str | None = None, slurm_account: str | None = None, wait: bool = True,
    echo: Callable[[str], None] = print,
) -> list[JobSummary]:
    """Submit one job per RunOptions (each with a single task); wait and collect their summaries."""
    folder = Path(folder)
    submitted = []
    for opts in jobs:
        task = opts.tasks[0]
        res = task_resources(task, opts.preset)
        ex = make_executor(launcher, folder / "%j", res, name=f"evalsuite-{task}",
                           slurm_partition=slurm_partition, slurm_account=slurm_account)
        job = ex.submit(run_one, opts, skip_missing_data)
        echo(f"submitted {task} for {opts.checkpoint} as job {job.job_id} ({launcher}; "
             f"gpus={res['gpus']} cpus={res['cpus']} mem={res['mem_gb']}G timeout={res['timeout_min']}min)")
        submitted.append((opts, job))
    if not wait:
        return []
    out = []
    failed = []
    for opts, job in submitted:
        try:
            out.append(job.result())
        except Exception as e:  # submitit re-raises the job's exception with its log
            first = str(e).strip().splitlines()
            failed.append(f"{opts.tasks[0]} ({job.job_id}): {first[-1] if first else type(e).__name__}")
    if failed:
        raise UserError("job(s) failed, logs under " + str(folder) + ": " + "; ".join(failed))
    return out
