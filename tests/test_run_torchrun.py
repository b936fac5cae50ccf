"""`evalsuite run` under torchrun (2 gloo processes with torchrun's environment): the linear probe trains
data-parallel, knn runs on rank 0 alone, rank 0 alone writes one results file; each number against one process."""

from __future__ import annotations

import sys

import pytest

from evalsuite.cli import main
from tests.helpers import read_records, torchrun_processes

LINEAR = ["--set", "places205_linear.dataset=imagefolder", "--set", "places205_linear.epochs=2",
          "--set", "places205_linear.lr_milestones=[1]"]


def run_args(data_root, out, cache) -> list[str]:
    return ["run", "--checkpoint", "random:resnet18", "--tasks", "places205_linear,knn", "--layers", "res4,res5",
            "--protocol", "quick", *LINEAR, "--precision", "fp32", "--batch-size", "16", "--ci-resamples", "0",
            "--data-root", str(data_root), "--out", str(out), "--cache-dir", str(cache), "--no-progress"]


@pytest.mark.slow
def test_run_under_torchrun_trains_the_probe_data_parallel_and_knn_on_rank_0(tmp_path, tiny_imagefolder):
    ranks = torchrun_processes([sys.executable, "-m", "evalsuite", *run_args(tiny_imagefolder, tmp_path / "ddp",
                                                                             tmp_path / "cache_ddp")], cwd=tmp_path)
    assert main(run_args(tiny_imagefolder, tmp_path / "one", tmp_path / "cache_one")) == 0
    ddp, one = read_records(tmp_path / "ddp"), read_records(tmp_path / "one")
    # one results file, rank 0's: as many records as one process wrote, none twice
    assert sorted((r["task"], r["layer"], r["metric"]) for r in ddp) == sorted(
        (r["task"], r["layer"], r["metric"]) for r in one)
    assert "result records appended" in ranks[0][0] and ranks[1][0] == ""  # rank 1 prints nothing
    assert "knn: not data-parallel, run by rank 0 alone after places205_linear" in ranks[0][1]
    assert "note" not in ranks[1][1]
    reference = {(r["task"], r["layer"], r["metric"]): r for r in one}
    linear = [r for r in ddp if r["task"] == "places205_linear"]
    assert {r["layer"] for r in linear} == {"res4", "res5"}
    for r in linear:
        ref = reference[(r["task"], r["layer"], r["metric"])]
        one_pass = r["params"]["solver"]["one_pass"]
        assert (one_pass["world_size"], one_pass["heads"]) == (2, ["res4", "res5"])
        assert ref["params"]["solver"]["one_pass"]["world_size"] == 1
        # the step of one process on the global batch, within float rounding: the same held-out loss and accuracy
        assert r["params"]["val_loss"] == pytest.approx(ref["params"]["val_loss"], abs=1e-4)
        assert r["value"] == pytest.approx(ref["value"], abs=1e-6)
    knn = [r for r in ddp if r["task"] == "knn"]
    assert knn
    for r in knn:  # rank 0 alone, once the process group is gone: the single-process numbers
        assert r["value"] == reference[(r["task"], r["layer"], r["metric"])]["value"]


@pytest.mark.parametrize("extra", [["--launcher", "slurm"], ["--schedule", "jobs.toml"]])
def test_jobs_of_their_own_are_refused_under_torchrun_in_one_line(monkeypatch, capsys, extra):
    monkeypatch.setenv("WORLD_SIZE", "2")
    args = ["run", *extra] if extra[0] == "--schedule" else ["run", "--checkpoint", "random:resnet18", *extra]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"evalsuite: error: {extra[0]} runs its own jobs: run `evalsuite run` once, not under torchrun"


def test_a_numbered_gpu_is_refused_under_torchrun(monkeypatch):
    from evalsuite.distributed import process_group
    from evalsuite.errors import UserError

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="under torchrun give --device cuda, not cuda:1"), process_group("cuda:1"):
        pass
