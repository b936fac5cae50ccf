"""The demo plan: steps are evalsuite commands, finished ones are skipped, failures are reported, not hidden."""

from __future__ import annotations

from pathlib import Path

import pytest

from evalsuite.demo import (
    DATA_MARKER,
    DemoConfig,
    Step,
    build_plan,
    finished_pairs,
    logged_step,
    run_plan,
    summary_table,
)
from evalsuite.errors import UserError
from evalsuite.results import Result, append_results


def _rec(task, layer, metric, value, checkpoint="random:resnet18", method="random", protocol="quick", params=None):
    return Result(task=task, dataset="d", split="test", layer=layer, metric=metric, value=value,
                  checkpoint_id="x", checkpoint=checkpoint, checkpoint_format="random", method=method,
                  arch="resnet18", pretrain_data="", checkpoint_meta={}, protocol=protocol, params=params or {},
                  seed=0)


def test_plan_order_and_commands(tmp_path) -> None:
    cfg = DemoConfig(data_root=tmp_path / "d", out=tmp_path / "o", methods=["random", "simclr"])
    steps = build_plan(cfg, ["knn", "voc07_svm"])
    labels = [s.label for s in steps]
    assert labels == ["generate synthetic data", "pretrain simclr", "evaluate random on knn",
                      "evaluate random on voc07_svm", "evaluate simclr on knn", "evaluate simclr on voc07_svm",
                      "build leaderboard"]
    assert steps[1].argv[:3] == ["pretrain", "--method", "simclr"]
    ck = str(tmp_path / "o" / "checkpoints" / "simclr_resnet18.safetensors")
    assert steps[1].argv[steps[1].argv.index("--out") + 1] == ck
    assert steps[4].argv[steps[4].argv.index("--checkpoint") + 1] == ck
    assert steps[2].argv[steps[2].argv.index("--checkpoint") + 1] == "random:resnet18"
    assert all("--protocol" in s.argv and "quick" in s.argv for s in steps[2:6])


def test_task_scoped_overrides_go_to_their_task_only(tmp_path) -> None:
    cfg = DemoConfig(data_root=tmp_path / "d", out=tmp_path / "o", methods=["random"],
                     overrides=["knn.k=5", "image_size=32", "voc07_svm.folds=2"])
    steps = {s.label: s.argv for s in build_plan(cfg, ["knn", "voc07_svm"])}
    knn = steps["evaluate random on knn"]
    assert "knn.k=5" in knn and "image_size=32" in knn and "voc07_svm.folds=2" not in knn
    assert "voc07_svm.folds=2" in steps["evaluate random on voc07_svm"]
    # the demo's own items for tasks outside the selection (detection, the transfer tasks) are left out
    assert not [x for x in knn if x.startswith(("detection.", "navigation.", "linear_transfer.", "fewshot."))]


def test_navigation_baselines_run_once(tmp_path) -> None:
    cfg = DemoConfig(data_root=tmp_path / "d", out=tmp_path / "o", methods=["random", "simclr"])
    steps = {s.label: s.argv for s in build_plan(cfg, ["navigation"])}
    assert "navigation.baselines=[]" not in steps["evaluate random on navigation"]
    assert "navigation.baselines=[]" in steps["evaluate simclr on navigation"]


def test_resume_skips_finished_steps(tmp_path) -> None:
    cfg = DemoConfig(data_root=tmp_path / "d", out=tmp_path / "o", methods=["random", "simclr"])
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / DATA_MARKER).write_text("{}")
    ck = tmp_path / "o" / "checkpoints" / "simclr_resnet18.safetensors"
    ck.parent.mkdir(parents=True)
    ck.write_bytes(b"x")
    append_results(tmp_path / "o" / "results.jsonl", [_rec("knn", "res5", "top1", 50.0)])
    # a record under another preset does not count as done
    append_results(tmp_path / "o" / "results.jsonl", [_rec("voc07_svm", "res5", "mAP", 1.0, protocol="goyal19")])
    assert finished_pairs(tmp_path / "o", "quick") == {("random:resnet18", "knn")}
    ran = []
    outcomes = run_plan(build_plan(cfg, ["knn", "voc07_svm"]), lambda argv: ran.append(argv) or 0, progress=False,
                        echo=lambda s: None)
    status = {o.step.label: o.status for o in outcomes}
    assert status["generate synthetic data"] == "skipped" and status["pretrain simclr"] == "skipped"
    assert status["evaluate random on knn"] == "skipped"
    assert status["evaluate random on voc07_svm"] == "done" and status["build leaderboard"] == "done"
    assert len(ran) == 4


def test_failures_are_collected_and_the_plan_goes_on(tmp_path) -> None:
    marker = tmp_path / "m"
    steps = [Step("a", ["a"], 1.0), Step("b", ["b"], 1.0, on_done=lambda: marker.write_text("x")),
             Step("c", ["c"], 1.0)]

    def fake(argv):
        if argv == ["a"]:
            return 2
        if argv == ["c"]:
            raise RuntimeError("boom")
        return 0

    lines = []
    out = run_plan(steps, fake, progress=False, echo=lines.append)
    assert [(o.step.label, o.status) for o in out] == [("a", "failed"), ("b", "done"), ("c", "failed")]
    assert out[0].error == "exit code 2" and "boom" in out[2].error
    assert marker.exists() and len(lines) == 3 and lines[0].startswith("[1/3] a: FAILED")


def test_summary_table_takes_best_layer_per_task(tmp_path: Path) -> None:
    append_results(tmp_path / "results.jsonl", [
        _rec("knn", "res4", "top1", 40.0), _rec("knn", "res5", "top1", 55.0), _rec("knn", "res5", "top5", 90.0),
        _rec("surface_normals", "res5", "median_angle_error_deg", 30.0),
        _rec("surface_normals", "res4", "median_angle_error_deg", 25.0),
        _rec("navigation", "res3+res4+res5", "success_rate", 0.5, params={"agent": "ppo"}),
        _rec("navigation", "random", "success_rate", 0.7, params={"agent": "random"}),
        _rec("knn", "res5", "top1", 70.0, checkpoint="c.safetensors", method="simclr"),
    ])
    t = summary_table(tmp_path, "quick")
    assert t.loc["random", "knn"] == 55.0  # best layer, headline metric only (top5 ignored)
    assert t.loc["random", "surface_normals"] == 25.0  # lower is better for angles
    assert t.loc["simclr", "knn"] == 70.0
    assert t.loc["random", "navigation"] == 0.5  # the random-policy baseline is not the checkpoint's score


def test_logged_step_keeps_output_in_a_log_and_surfaces_the_error_line(tmp_path) -> None:
    def fake(argv):
        print("a results table")
        if argv[0] == "bad":
            import sys

            print("evalsuite: error: /x/y.xml: unknown class 'dragon'", file=sys.stderr)
            return 2
        return 0

    run = logged_step(tmp_path / "logs", fake)
    assert run(["run", "--checkpoint", "runs/ck/simclr_resnet18.safetensors", "--tasks", "knn"]) == 0
    with pytest.raises(UserError, match="unknown class 'dragon'"):
        run(["bad", "x"])
    logs = sorted((tmp_path / "logs").iterdir())
    assert [p.name for p in logs] == ["001-run-simclr_resnet18-knn.log", "002-bad-x.log"]
    assert "a results table" in logs[0].read_text() and logs[0].read_text().startswith("$ evalsuite run")


def test_demo_refuses_an_unknown_method_before_running_anything(tmp_path, capsys) -> None:
    from evalsuite.cli import main

    rc = main(["demo", "--methods", "random,simclrr", "--data-root", str(tmp_path / "d"), "--out", str(tmp_path / "o")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "unknown method 'simclrr'" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "d").exists() and not (tmp_path / "o").exists()


def test_default_plan_has_a_vit_pretrained_with_mae_and_evaluated_on_every_task(tmp_path) -> None:
    from evalsuite.demo import DEMO_METHODS

    tasks = ["knn", "navigation", "detection", "surface_normals"]
    cfg = DemoConfig(data_root=tmp_path / "d", out=tmp_path / "o", methods=list(DEMO_METHODS))
    steps = {s.label: s.argv for s in build_plan(cfg, tasks)}
    vit = str(tmp_path / "o" / "checkpoints" / "mae_vit_tiny_patch16.safetensors")
    pretrain = steps["pretrain mae on vit_tiny_patch16"]
    assert pretrain[pretrain.index("--arch") + 1] == "vit_tiny_patch16" and pretrain[-2:] == ["--recipe", "short"]
    assert pretrain[pretrain.index("--out") + 1] == vit
    evaluated = {argv[argv.index("--tasks") + 1] for argv in steps.values()
                 if argv[0] == "run" and argv[argv.index("--checkpoint") + 1] == vit}
    assert evaluated == set(tasks)
    assert steps["pretrain simclr"][steps["pretrain simclr"].index("--arch") + 1] == "resnet18"
    assert "evaluate simclr on detection" in steps
