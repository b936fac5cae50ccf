"""Scale-out through submitit: one job per task, results in the same results directory.

The local executor path runs each job as a real subprocess (what a Slurm node would run);
the debug executor runs in this process. Resources come from the preset and the task.
"""

from __future__ import annotations

import json
import os

import pytest

from evalsuite import registry
from evalsuite.cli import main
from evalsuite.errors import UserError
from evalsuite.launch import launch, make_executor, split_by_task, task_resources
from evalsuite.runner import RunOptions

ARGS = ["--protocol", "quick", "--no-progress", "--set", "image_size=32", "--layers", "res5"]


def _records(out):
    return [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("launcher", ["local", "debug"])
def test_launcher_runs_one_job_per_task_into_one_results_file(launcher, tmp_path, tiny_imagefolder, cache_dir,
                                                              capsys) -> None:
    out = tmp_path / "runs"
    rc = main(["run", "--checkpoint", "random:resnet18", "--tasks", "centroid", "--data-root", str(tiny_imagefolder),
               "--out", str(out), "--launcher", launcher, *ARGS])
    assert rc == 0
    text = capsys.readouterr().out
    assert "submitted centroid" in text and "1 result records appended" in text
    recs = _records(out)
    assert [(r["task"], r["layer"]) for r in recs] == [("centroid", "res5")]
    # the job ran the same computation as an in-process run: same value
    assert main(["run", "--checkpoint", "random:resnet18", "--tasks", "centroid", "--data-root",
                 str(tiny_imagefolder), "--out", str(tmp_path / "direct"), *ARGS]) == 0
    assert _records(tmp_path / "direct")[0]["value"] == pytest.approx(recs[0]["value"])
    if launcher == "local":
        logs = list((out / "submitit").rglob("*_log.out"))
        assert logs, "submitit keeps each job's log under OUT/submitit"


def test_failed_job_is_one_clear_error(tmp_path, tiny_imagefolder, cache_dir, capsys) -> None:
    rc = main(["run", "--checkpoint", "random:resnet18", "--tasks", "centroid", "--data-root",
               str(tmp_path / "nowhere"), "--out", str(tmp_path / "o"), "--launcher", "debug", *ARGS])
    assert rc == 2
    err = capsys.readouterr().err
    assert "job(s) failed" in err and "centroid" in err and len(err.strip().splitlines()) == 1


def test_split_by_task_and_resources(monkeypatch) -> None:
    class Heavy:
        name = "heavy_fake"
        description = "test task"

        def default_protocol(self, preset):
            return {}

        def run(self, ctx):
            return []

        def resources(self, preset):
            return {"gpus": 8, "timeout_min": 5}

    registry.register_task(Heavy())
    try:
        jobs, all_mode = split_by_task(RunOptions(checkpoint="random:resnet18", tasks=["centroid,heavy_fake"]))
        assert [j.tasks for j in jobs] == [["centroid"], ["heavy_fake"]] and not all_mode
        assert task_resources("heavy_fake", "goyal19") == {"gpus": 8, "cpus": 10, "mem_gb": 64, "timeout_min": 5}
        assert task_resources("centroid", "quick")["gpus"] == 0
    finally:
        registry.unregister(registry.TASK_GROUP, "heavy_fake")


def test_slurm_submission_script(tmp_path, monkeypatch) -> None:
    """The Slurm path writes a real sbatch script with the task's resources and calls sbatch (faked here)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\necho srun 23.02\n")
    (bin_dir / "sbatch").write_text(f"#!/bin/sh\ncp \"$1\" {tmp_path}/submitted.sh\necho Submitted batch job 4242\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setattr("evalsuite.launch.task_resources",
                        lambda task, preset: {"gpus": 2, "cpus": 8, "mem_gb": 32, "timeout_min": 90})
    opts = RunOptions(checkpoint="random:resnet18", tasks=["centroid"], preset="goyal19")
    launch([opts], "slurm", tmp_path / "sub", slurm_partition="gpu", wait=False, echo=lambda s: None)
    script = (tmp_path / "submitted.sh").read_text()
    for line in ("#SBATCH --gpus-per-node=2", "#SBATCH --cpus-per-task=8", "#SBATCH --mem=32GB",
                 "#SBATCH --time=90", "#SBATCH --partition=gpu", "#SBATCH --job-name=evalsuite-centroid"):
        assert line in script, line
    with pytest.raises(UserError):
        make_executor("pbs", tmp_path, {"gpus": 0, "cpus": 1, "mem_gb": 1, "timeout_min": 1}, "x")


def test_run_schedule_from_the_cli_resumes(tmp_path, tiny_imagefolder, cache_dir, capsys) -> None:
    sched = tmp_path / "board.toml"
    sched.write_text('[[run]]\ncheckpoint = "random:resnet18"\ntasks = ["centroid"]\nprotocol = "quick"\n'
                     'set = ["image_size=32"]\nlayers = ["res5"]\n')
    out = tmp_path / "runs"
    args = ["run", "--schedule", str(sched), "--data-root", str(tiny_imagefolder), "--out", str(out), "--no-progress"]
    assert main(args) == 0
    assert len(_records(out)) == 1
    assert main(args) == 0  # finished jobs are not recomputed
    assert "1 already done, 0 to run" in capsys.readouterr().out and len(_records(out)) == 1
    assert main([*args, "--force"]) == 0
    assert len(_records(out)) == 2
    assert main(["run", "--schedule", str(sched), "--checkpoint", "random:resnet18"]) == 2
    assert "exactly one of --checkpoint or --schedule" in capsys.readouterr().err
