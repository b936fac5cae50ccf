"""`evalsuite run --seeds`: seeded tasks once per seed (records carrying it, each equal to a direct run at that seed),
seed-independent tasks once, the refused combinations, which built-in task is seeded, the plan and the summary."""

from __future__ import annotations

import statistics
from types import SimpleNamespace

import pytest

from evalsuite import registry
from evalsuite.checkpoints import load_checkpoint
from evalsuite.cli import main, print_results
from evalsuite.errors import UserError
from evalsuite.plan import TaskPlan, for_seeds
from evalsuite.runner import RunOptions, run_seeds, seeded_tasks
from evalsuite.task import task_seeded
from tests.helpers import make_context, read_records

LINEAR = ["--tasks", "places205_linear", "--set", "places205_linear.dataset=imagefolder", "--layers", "res5"]


def _run(tmp_path, data_root, *args) -> int:
    return main(["run", "--checkpoint", "random:resnet18", "--protocol", "quick", "--precision", "fp32",
                 "--batch-size", "16", "--ci-resamples", "0", "--data-root", str(data_root),
                 "--out", str(tmp_path / "out"), "--no-progress", *args])


def test_a_seeded_task_runs_once_per_seed_and_a_seed_independent_one_once(tmp_path, tiny_imagefolder, cache_dir,
                                                                           capsys) -> None:
    assert _run(tmp_path, tiny_imagefolder, *LINEAR[:1], "places205_linear,centroid", *LINEAR[2:],
                "--seeds", "0,1") == 0
    records = read_records(tmp_path / "out")
    linear = [r for r in records if r["task"] == "places205_linear"]
    # two records per (layer, metric), seeds 0 and 1, the trunk (a random init) built from the first seed
    assert sorted((r["layer"], r["metric"], r["seed"]) for r in linear) == [
        ("res5", "top1", 0), ("res5", "top1", 1), ("res5", "top5", 0), ("res5", "top5", 1)]
    assert {r["checkpoint_meta"]["init_seed"] for r in records} == {0}
    assert len({r["protocol_hash"] for r in linear}) == 1  # the leaderboard's mean over seeds groups them
    by_seed = {r["seed"]: r for r in linear if r["metric"] == "top1"}
    # another probe init and batch order: another probe (the held-out loss differs even where top-1 ties)
    assert by_seed[0]["params"]["val_loss"] != by_seed[1]["params"]["val_loss"]
    # each equals the task run directly at that seed over the same trunk
    trunk = load_checkpoint("random:resnet18", seed=0)
    for seed, rec in by_seed.items():
        ctx = make_context("places205_linear", tiny_imagefolder, tmp_path / f"direct{seed}", checkpoint=trunk,
                           overrides=["places205_linear.dataset=imagefolder"], layers=["res5"], seed=seed)
        direct = {r.metric: r for r in registry.get_task("places205_linear").run(ctx)}
        assert direct["top1"].value == pytest.approx(rec["value"], abs=1e-9)
        assert direct["top1"].params["val_loss"] == pytest.approx(rec["params"]["val_loss"], abs=1e-6)
    # centroid does not depend on the seed: once, at the first seed, one record per tap
    centroid = [r for r in records if r["task"] == "centroid"]
    assert [(r["layer"], r["seed"]) for r in centroid] == [("res5", 0)]
    out = capsys.readouterr().out
    assert "± " in out and "(n=2)" in out and "mean ± std over seeds" in out


def test_seed_and_seeds_together_are_refused_in_one_line(tmp_path, tiny_imagefolder, capsys) -> None:
    with pytest.raises(SystemExit) as e:
        _run(tmp_path, tiny_imagefolder, *LINEAR, "--seed", "1", "--seeds", "0,1")
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert e.value.code == 2 and len(err) == 1 and "--seeds" in err[0] and "--seed" in err[0]
    with pytest.raises(SystemExit) as e:
        _run(tmp_path, tiny_imagefolder, *LINEAR, "--seeds", "0,x")
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert e.value.code == 2 and len(err) == 1 and "comma-separated integers" in err[0]
    assert not (tmp_path / "out").exists()


def test_run_options_refuse_a_seed_beside_seeds_and_repeated_seeds() -> None:
    assert run_seeds(RunOptions("random:resnet18", seed=3)) == [3]
    assert run_seeds(RunOptions("random:resnet18", seeds=[2, 0, 1])) == [2, 0, 1]
    with pytest.raises(UserError, match="not both"):
        run_seeds(RunOptions("random:resnet18", seed=3, seeds=[0, 1]))
    with pytest.raises(UserError, match="1 more than once"):
        run_seeds(RunOptions("random:resnet18", seeds=[0, 1, 1]))


def test_which_built_in_tasks_are_seeded() -> None:
    """From how each task uses ctx.seed: the deterministic ones run once, navigation once while it averages
    seeds of its own, knn only with an approximate (seeded) index."""
    seeded = {n: task_seeded(registry.get_task(n), registry.get_task(n).default_protocol("quick"))
              for n in registry.task_names()}
    assert {n for n, s in seeded.items() if not s} == {"centroid", "knn", "voc07_svm"}
    assert seeded_tasks(["knn", "centroid"], "quick", ["knn.index=ivf"]) == {"knn": True, "centroid": False}
    nav = registry.get_task("navigation")
    assert nav.default_protocol("goyal19").num_seeds == 5 and not task_seeded(nav, nav.default_protocol("goyal19"))
    assert seeded_tasks(["navigation"], "goyal19", ["navigation.num_seeds=1"]) == {"navigation": True}
    # a task that does not say is seeded; a bool or a method of the protocol
    assert task_seeded(SimpleNamespace(), None) is True
    assert task_seeded(SimpleNamespace(seeded=False), None) is False
    assert task_seeded(SimpleNamespace(seeded=lambda p: p > 1), 2) is True


def test_the_plan_repeats_training_per_seed_and_extraction_once() -> None:
    cached = TaskPlan(images={"train": 100, "val": 20}, train_iterations=50, images_per_iteration=8,
                      feature_dims={"res5": 512})
    tripled = for_seeds(cached, 3)
    assert tripled.images == cached.images and tripled.train_iterations == 150 and tripled.cache_bytes == \
        cached.cache_bytes and tripled.note.startswith("x 3 seeds (features extracted once)")
    finetune = TaskPlan(images={"test": 10}, train_iterations=7, note="fine-tunes")
    assert for_seeds(finetune, 2).images == {"test": 20} and for_seeds(finetune, 2).note == "x 2 seeds; fine-tunes"
    assert for_seeds(finetune, 1) is finetune


def test_the_summary_is_the_mean_and_sample_std_over_seeds_at_the_best_mean_layer(capsys) -> None:
    def rec(layer, seed, value, note=""):
        return SimpleNamespace(task="nosuchtask", dataset="d", split="val", layer=layer, metric="top1", seed=seed,
                               value=value, note=note)

    # res4 has the best single value (seed 1), res5 the best mean
    results = [rec("res4", 0, 10.0), rec("res5", 0, 30.0), rec("res4", 1, 50.0), rec("res5", 1, 40.0)]
    print_results(results)
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("nosuchtask"))
    assert "res5" in row and f"{35:.4g} ± {statistics.stdev([30.0, 40.0]):.2g} (n=2)" in row
