"""Benchmark schedule: expansion, resume (done jobs are not recomputed), --force, interruption, bad files."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest

from evalsuite.errors import UserError
from evalsuite.protocols import TaskProtocol, apply_overrides, parse_overrides
from evalsuite.results import Result, append_results
from evalsuite.runner import run_seeds
from evalsuite.schedule import run_schedule

UNSEEDED = {"centroid", "voc07_svm"}  # real tasks whose `seeded` is False

SCHEDULE = """
out = "runs"
data_root = "data"

[defaults]
protocol = "quick"
tasks = ["alpha", "beta"]

[[run]]
checkpoint = "random:resnet18"
seeds = [0, 1]

[[run]]
checkpoint = "ckpts/mine.pth"
tasks = ["alpha"]
set = ["x=3"]
"""


@dataclass(frozen=True)
class XProtocol(TaskProtocol):
    x: int = 1


class FakeRunner:
    """Stands in for evalsuite.runner.run: writes one record per task and seed (task by task, each at its seeds)
    like the real runner does; a call is (checkpoint, tasks, preset, seeds, overrides)."""

    def __init__(self, interrupt_after: int | None = None):
        self.calls: list[tuple] = []
        self.interrupt_after = interrupt_after
        self.written = 0

    def __call__(self, opts):
        seeds = run_seeds(opts)
        self.calls.append((opts.checkpoint, opts.tasks[0], opts.preset, tuple(seeds), tuple(opts.overrides)))
        results = []
        for task in opts.tasks[0].split(","):
            for seed in seeds if task not in UNSEEDED else seeds[:1]:
                if self.interrupt_after is not None and self.written >= self.interrupt_after:
                    raise KeyboardInterrupt
                params = apply_overrides({task: XProtocol()}, parse_overrides(opts.overrides))[task].to_dict()
                r = Result(task=task, dataset="d", split="test", layer="res5", metric="top1", value=1.0,
                           checkpoint=opts.checkpoint, protocol=opts.preset, seed=seed, params=params)
                opts.out.mkdir(parents=True, exist_ok=True)
                append_results(opts.out / "results.jsonl", [r])
                self.written += 1
                results.append(r)
        return SimpleNamespace(results=results, skipped=[])


def _write(tmp_path: Path, text: str = SCHEDULE) -> Path:
    p = tmp_path / "board.toml"
    p.write_text(text)
    return p


def _lines(tmp_path: Path) -> list[dict]:
    f = tmp_path / "runs" / "results.jsonl"
    return [json.loads(x) for x in f.read_text().splitlines()] if f.exists() else []


def test_expands_runs_and_resumes_without_recomputing(tmp_path) -> None:
    sched = _write(tmp_path)
    fake = FakeRunner()
    rep = run_schedule(sched, run_fn=fake, echo=lambda s: None)
    # 2 seeds x 2 tasks for the first checkpoint (one run, --seeds 0,1), 1 job for the second: 5 jobs in 2 calls
    assert len(rep.jobs) == 5 and rep.count("ran") == 5 and rep.exit_code == 0
    mine = str((tmp_path / "ckpts" / "mine.pth").resolve())
    assert fake.calls == [("random:resnet18", "alpha,beta", "quick", (0, 1), ()),
                          (mine, "alpha", "quick", (0,), ("x=3",))]
    assert len(_lines(tmp_path)) == 5
    again = FakeRunner()
    rep = run_schedule(sched, run_fn=again, echo=lambda s: None)
    assert again.calls == [] and rep.count("done") == 5 and len(_lines(tmp_path)) == 5
    forced = FakeRunner()
    rep = run_schedule(sched, force=True, run_fn=forced, echo=lambda s: None)
    assert len(forced.calls) == 2 and rep.count("ran") == 5 and len(_lines(tmp_path)) == 10


def test_interrupted_schedule_restarts_with_only_the_missing_jobs(tmp_path) -> None:
    sched = _write(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        run_schedule(sched, run_fn=FakeRunner(interrupt_after=3), echo=lambda s: None)
    assert len(_lines(tmp_path)) == 3  # alpha at seeds 0 and 1, beta at seed 0
    resume = FakeRunner()
    rep = run_schedule(sched, run_fn=resume, echo=lambda s: None)
    mine = str((tmp_path / "ckpts" / "mine.pth").resolve())
    assert resume.calls == [("random:resnet18", "beta", "quick", (1,), ()), (mine, "alpha", "quick", (0,), ("x=3",))]
    assert rep.count("done") == 3 and rep.count("ran") == 2
    recs = _lines(tmp_path)
    assert sorted((r["checkpoint"] == mine, r["task"], r["seed"]) for r in recs) == sorted(
        [(False, "alpha", 0), (False, "beta", 0), (False, "alpha", 1), (False, "beta", 1), (True, "alpha", 0)])


def test_a_changed_override_is_not_done(tmp_path) -> None:
    sched = _write(tmp_path)
    run_schedule(sched, run_fn=FakeRunner(), echo=lambda s: None)
    _write(tmp_path, SCHEDULE.replace('set = ["x=3"]', 'set = ["x=4"]'))
    fake = FakeRunner()
    rep = run_schedule(sched, run_fn=fake, echo=lambda s: None)
    assert [c[1] for c in fake.calls] == ["alpha"] and fake.calls[0][4] == ("x=4",) and rep.count("done") == 4


def test_dry_run_and_task_filter_and_overrides(tmp_path) -> None:
    sched = _write(tmp_path)
    fake = FakeRunner()
    lines = []
    rep = run_schedule(sched, dry_run=True, run_fn=fake, echo=lines.append)
    assert fake.calls == [] and rep.count("planned") == 5 and not (tmp_path / "runs").exists()
    assert any("would run random:resnet18 x beta (quick, seed 1)" in x for x in lines)
    rep = run_schedule(sched, tasks="beta", out=tmp_path / "other", run_fn=fake, echo=lambda s: None)
    assert [(c[1], c[3]) for c in fake.calls] == [("beta", (0, 1))]
    assert rep.results_file == tmp_path / "other" / "results.jsonl"


def test_a_seed_independent_task_has_one_job_and_runs_once_inside_the_seeds_run(tmp_path) -> None:
    """centroid (seeded = False) with seeds [0, 1, 2]: one job, at seed 0, run inside alpha's --seeds 0,1,2 run;
    a later schedule run finds everything done (no seed-1 centroid job waiting for a record that never comes)."""
    sched = _write(tmp_path, '[[run]]\ncheckpoint = "random:resnet18"\ntasks = ["alpha", "centroid"]\n'
                             'protocol = "quick"\nseeds = [0, 1, 2]\n')
    fake = FakeRunner()
    rep = run_schedule(sched, run_fn=fake, echo=lambda s: None)
    assert sorted((j.task, j.seed) for j in rep.jobs) == [("alpha", 0), ("alpha", 1), ("alpha", 2), ("centroid", 0)]
    assert fake.calls == [("random:resnet18", "alpha,centroid", "quick", (0, 1, 2), ())]
    assert rep.count("ran") == 4 and sorted((r["task"], r["seed"]) for r in _lines(tmp_path)) == [
        ("alpha", 0), ("alpha", 1), ("alpha", 2), ("centroid", 0)]
    again = FakeRunner()
    rep = run_schedule(sched, run_fn=again, echo=lambda s: None)
    assert again.calls == [] and rep.count("done") == 4


@pytest.mark.parametrize("text,message", [
    ("not toml [", "not a valid schedule"),
    ("[defaults]\nprotocol='quick'\n", "no \\[\\[run\\]\\]"),
    ("[[run]]\ntasks=['a']\n", "'checkpoint' is required"),
    ("[[run]]\ncheckpoint='random:resnet18'\n", "no tasks"),
    ("[[run]]\ncheckpoint='random:resnet18'\ntasks=['a']\nprotocol='fast'\n", "unknown protocol preset"),
    ("[[run]]\ncheckpoint='random:resnet18'\ntasks=['a']\ncheckpiont='x'\n", "unknown key"),
    ("[[run]]\ncheckpoint='random:resnet18'\ntasks=['a']\nset=['novalue']\n", "key=value"),
])
def test_bad_schedule_files_are_user_errors(tmp_path, text, message) -> None:
    sched = _write(tmp_path, text)
    with pytest.raises(UserError, match=message):
        run_schedule(sched, run_fn=FakeRunner(), echo=lambda s: None)


def test_real_runner_end_to_end_and_resume(tmp_path, tiny_imagefolder, cache_dir) -> None:
    sched = _write(tmp_path, 'precision = "fp32"\n[[run]]\ncheckpoint = "random:resnet18"\ntasks = ["centroid"]\n'
                             'protocol = "quick"\n')
    rep = run_schedule(sched, data_root=tiny_imagefolder, cache_dir=cache_dir, progress=False, echo=lambda s: None)
    assert rep.count("ran") == 1
    recs = _lines(tmp_path)
    assert {r["task"] for r in recs} == {"centroid"} and len(recs) == 5  # one per ResNet-18 tap
    rep = run_schedule(sched, data_root=tiny_imagefolder, cache_dir=cache_dir, progress=False, echo=lambda s: None)
    assert rep.count("done") == 1 and len(_lines(tmp_path)) == 5


def test_a_task_that_does_not_apply_to_the_checkpoint_is_marked_not_applicable(tmp_path) -> None:
    from evalsuite.errors import NotApplicable

    def refuse(opts):
        raise NotApplicable("surface_normals needs a convolutional trunk; its ViT head is not implemented yet")

    rep = run_schedule(_write(tmp_path), run_fn=refuse, echo=lambda s: None)
    assert {j.status for j in rep.jobs} == {"not_applicable"} and not rep.ok and rep.exit_code == 1
    assert "not_applicable" in rep.summary() and "convolutional trunk" in rep.jobs[0].message
