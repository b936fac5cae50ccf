"""Every task's plan(): the images it counts are the datasets run() opens, its training iterations are the ones the
training loop runs, a missing dataset raises DataMissing, and `evalsuite run --dry-run` prints it and writes
nothing. Also: each task's headline metrics are names the task really emits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from evalsuite import registry
from evalsuite.cli import main
from evalsuite.data import DATA_LAYOUT, open_dataset
from evalsuite.data.synthetic import write_nyuv2, write_places205
from evalsuite.plan import TaskPlan, describe
from evalsuite.task import DataMissing, TaskContext
from tests.helpers import make_context

FEATURE_TASKS = ["centroid", "knn", "places205_linear", "voc07_svm", "lowshot_svm"]
DATA_TASKS = [*FEATURE_TASKS, "detection", "surface_normals"]


class _Stop(Exception):
    """Raised where run() would start work: what it opened before is what it reads."""


def _stop(*_args, **_kwargs):
    raise _Stop


@pytest.fixture(scope="module")
def places_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("places")
    write_places205(root, seed=0, image_size=16, train_per_class=3, val_per_class=2, classes=4)
    return root


@pytest.fixture(scope="module")
def nyu_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("nyu")
    write_nyuv2(root, seed=0, n_train=6, n_test=2, height=24, width=32, fmt="dir")
    return root


@pytest.fixture()
def roots(tiny_imagefolder, synthetic_voc, places_root, nyu_root) -> dict[str, Path]:
    return {"centroid": tiny_imagefolder, "knn": tiny_imagefolder, "places205_linear": places_root,
            "voc07_svm": synthetic_voc, "lowshot_svm": synthetic_voc, "detection": synthetic_voc,
            "surface_normals": nyu_root}


def _counts(plan: TaskPlan) -> dict[str, int]:
    return {**plan.images, **plan.train_images}


def _opened_by_run(name: str, ctx: TaskContext, monkeypatch) -> dict[str, int]:
    """{split (detection: kind:split): len} of every dataset run() opens before it starts work."""
    import tasks.detection.task as det

    opened: dict[str, int] = {}
    real = TaskContext.open_dataset

    def spy(self, kind, split, path=None, **options):
        ds = real(self, kind, split, path, **options)
        opened[f"{kind}:{split}" if name == "detection" else split] = len(ds)
        return ds

    monkeypatch.setattr(TaskContext, "open_dataset", spy)
    monkeypatch.setattr(TaskContext, "trunk", property(_stop))
    monkeypatch.setattr(det, "build_records", _stop)
    ctx.extractor_factory = _stop
    with pytest.raises(_Stop):
        registry.get_task(name).run(ctx)
    return opened


@pytest.mark.parametrize("name", DATA_TASKS)
def test_plan_counts_the_datasets_run_reads(name, roots, tmp_path, monkeypatch) -> None:
    task = registry.get_task(name)
    plan = task.plan(make_context(name, roots[name], tmp_path / "plan"))
    assert isinstance(plan, TaskPlan) and plan.total_images > 0
    opened = _opened_by_run(name, make_context(name, roots[name], tmp_path / "run"), monkeypatch)
    assert _counts(plan) == opened


@pytest.mark.parametrize("name, kind, splits, expected", [
    ("centroid", "imagefolder", ("train", "val"), (48, 24)),  # 8 classes x 6 train / 3 val (tiny_imagefolder)
    ("knn", "imagefolder", ("train", "val"), (48, 24)),
    ("places205_linear", "places205", ("train", "val"), (12, 8)),  # 4 classes x 3 train / 2 val
    ("voc07_svm", "voc2007", ("trainval", "test"), (60, 40)),  # synthetic_voc
    ("lowshot_svm", "voc2007", ("trainval", "test"), (60, 40)),
])
def test_feature_task_plans_count_both_splits_at_the_protocol_size(name, kind, splits, expected, roots,
                                                                  tmp_path) -> None:
    root = roots[name]
    assert tuple(len(open_dataset(kind, root / DATA_LAYOUT[kind], s)) for s in splits) == expected
    plan = registry.get_task(name).plan(make_context(name, root, tmp_path))
    assert plan.images == dict(zip(splits, expected)) and plan.image_size == 64  # quick: 64 px
    assert plan.train_iterations == 0 and plan.total_images == sum(expected)
    big = registry.get_task(name).plan(make_context(name, root, tmp_path, preset="goyal19"))
    # goyal19's linear probe extracts 14 augmented views of every training image (one per epoch)
    views = 14 if name == "places205_linear" else 1
    assert big.image_size == 224 and big.images == {splits[0]: views * expected[0], splits[1]: expected[1]}


def test_linear_plan_names_the_probe_epochs(roots, tmp_path) -> None:
    plan = registry.get_task("places205_linear").plan(
        make_context("places205_linear", roots["places205_linear"], tmp_path, preset="goyal19"))
    assert "14 epochs" in plan.note and plan.train_iterations == 0  # the probe trains on cached features


def test_detection_plan_trains_max_iter_batches_at_the_train_scale(synthetic_voc, tmp_path) -> None:
    voc = synthetic_voc / "VOCdevkit" / "VOC2007"
    n_trainval, n_test = len(open_dataset("voc2007", voc, "trainval")), len(open_dataset("voc2007", voc, "test"))
    assert (n_trainval, n_test) == (60, 40)
    plan = registry.get_task("detection").plan(make_context("detection", synthetic_voc, tmp_path, preset="goyal19"))
    assert plan.images == {"voc2007:test": 40} and plan.train_images == {"voc2007:trainval": 60}
    # Detectron's VOC07 Fast R-CNN benchmark: 30k iterations of 2 GPUs x 2 images at scale 600, tested at 600
    assert (plan.train_iterations, plan.images_per_iteration, plan.train_image_size, plan.image_size) == (
        30000, 4, 600, 600)
    assert "100 images" in plan.note  # selective search runs on every train and test image first
    quick = registry.get_task("detection").plan(make_context(
        "detection", synthetic_voc, tmp_path, overrides=["detection.max_train_images=7", "detection.max_test_images=5",
                                                          "detection.train_scales=[96,128]"]))
    assert quick.images == {"voc2007:test": 5} and quick.train_images == {"voc2007:trainval": 7}
    assert (quick.train_iterations, quick.images_per_iteration, quick.train_image_size) == (300, 2, 128)


def test_surface_normals_plan_matches_the_iterations_training_runs(nyu_root, tmp_path) -> None:
    overrides = ["surface_normals.train_short_sides=[16]", "surface_normals.test_short_side=16",
                 "surface_normals.max_long_side=32", "surface_normals.epochs=2", "surface_normals.iters_per_epoch=3",
                 "surface_normals.batch_size=4", "surface_normals.head_channels=8", "surface_normals.codebook_size=8",
                 "surface_normals.codebook_samples=2000", "surface_normals.codebook_iters=3"]
    ctx = make_context("surface_normals", nyu_root, tmp_path / "out", overrides=overrides)
    task = registry.get_task("surface_normals")
    plan = task.plan(ctx)
    results = task.run(ctx)
    params = results[0].params
    assert plan.images == {"test": params["num_test"]} == {"test": 2}
    assert plan.train_images == {"train": params["num_train"]} == {"train": 6}
    assert plan.train_iterations == params["total_iterations"] == 6  # 2 epochs x 3 iterations
    assert plan.images_per_iteration == 4 and plan.image_size > 0 and plan.train_image_size > 0
    emitted = {r.metric for r in results}
    assert set(task.headline_metrics) <= emitted and "median_angle_error_deg" in task.lower_is_better
    assert set(task.lower_is_better) <= emitted and not {"pct_within_30deg", "pct_within_11.25deg"} & set(
        task.lower_is_better)


def test_navigation_plan_counts_the_frames_ppo_really_collects(tmp_path) -> None:
    import gymnasium as gym
    from stable_baselines3 import PPO
    from stable_baselines3.common.env_util import make_vec_env

    class Corridor(gym.Env):
        observation_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
        action_space = gym.spaces.Discrete(2)

        def reset(self, *, seed=None, options=None):
            super().reset(seed=seed)
            return np.zeros(2, np.float32), {}

        def step(self, action):
            return np.zeros(2, np.float32), 0.0, False, False, {}

    settings = {"n_envs": 3, "ppo.n_steps": 4, "frames": 25, "num_seeds": 2}
    ctx = make_context("navigation", tmp_path / "no-data", tmp_path / "out",
                       overrides=[f"navigation.{k}={v}" for k, v in settings.items()])
    plan = registry.get_task("navigation").plan(ctx)  # needs no data root
    from stable_baselines3.common.logger import Logger

    model = PPO("MlpPolicy", make_vec_env(Corridor, n_envs=3), n_steps=4, batch_size=6, n_epochs=1, verbose=0)
    model.set_logger(Logger(folder=None, output_formats=[]))  # SB3's default one leaves $TMPDIR/SB3-<time>
    model.learn(total_timesteps=25)
    assert model.num_timesteps == 36  # whole rollouts of 4 steps x 3 envs: 3 rollouts
    assert plan.images == {"ppo training frames": 2 * model.num_timesteps} and plan.image_size == 32  # quick
    goyal = registry.get_task("navigation").plan(make_context("navigation", tmp_path, tmp_path, preset="goyal19"))
    # 1M frames in rollouts of 256 steps x 8 envs: 489 rollouts per seed, 5 seeds, 128 px
    assert goyal.images == {"ppo training frames": 5 * 489 * 256 * 8} and goyal.image_size == 128
    from tasks.navigation.task import METRICS  # the metrics every agent's records carry

    assert registry.get_task("navigation").headline_metrics == ("success_rate", "spl")
    assert set(registry.get_task("navigation").headline_metrics) <= set(METRICS)


@pytest.mark.parametrize("name", DATA_TASKS)
def test_a_missing_dataset_raises_data_missing(name, tmp_path) -> None:
    empty = tmp_path / "data"
    empty.mkdir()
    with pytest.raises(DataMissing):
        registry.get_task(name).plan(make_context(name, empty, tmp_path / "out"))


def test_describe_says_what_detection_trains_on(synthetic_voc, tmp_path) -> None:
    plan = registry.get_task("detection").plan(make_context("detection", synthetic_voc, tmp_path, preset="goyal19"))
    assert "30000 training iterations x 4 images at 600 px from voc2007:trainval 60" in describe(plan)


@pytest.mark.parametrize("name, overrides, voc, headline", [
    ("centroid", [], False, "top1"),
    ("knn", [], False, "top1"),
    ("knn", ["knn.dataset=voc2007"], True, "mAP"),  # multi-label data: class-mean AP of the weighted vote
    ("places205_linear", ["places205_linear.epochs=1"], False, "top1"),
    ("voc07_svm", [], True, "mAP"),
    ("lowshot_svm", ["lowshot_svm.k_values=[1]", "lowshot_svm.num_samples=1"], True, "mAP"),
])
def test_headline_metrics_are_emitted(name, overrides, voc, headline, roots, synthetic_voc, tmp_path) -> None:
    task = registry.get_task(name)
    root = synthetic_voc if voc else roots[name]
    results = task.run(make_context(name, root, tmp_path, overrides=overrides, layers=["res5"]))
    emitted = {r.metric for r in results if r.value is not None}
    assert headline in task.headline_metrics and headline in emitted
    assert getattr(task, "lower_is_better", ()) == ()  # every metric of these tasks: higher is better


@pytest.mark.slow
def test_dry_run_of_goyal19_detection_prints_the_plan_warns_and_writes_nothing(synthetic_voc, tmp_path, cache_dir,
                                                                               capsys) -> None:
    before = sorted(p.relative_to(synthetic_voc) for p in synthetic_voc.rglob("*"))
    rc = main(["run", "--dry-run", "--protocol", "goyal19", "--tasks", "detection", "--checkpoint", "random:resnet18",
               "--data-root", str(synthetic_voc), "--out", str(tmp_path / "o")])
    cap = capsys.readouterr()
    line = next(x for x in cap.out.splitlines() if x.strip().startswith("detection "))
    assert rc == 0 and "30000 training iterations x 4 images at 600 px" in line and "voc2007:test 40" in line
    assert "--protocol quick" in cap.err
    assert not (tmp_path / "o").exists() and not cache_dir.exists()
    assert sorted(p.relative_to(synthetic_voc) for p in synthetic_voc.rglob("*")) == before


def test_dry_run_prints_cache_disk_and_peak_memory_from_the_tap_shapes(tiny_imagefolder, tmp_path, cache_dir,
                                                                       capsys) -> None:
    """centroid on 48 + 24 images at 32 px through a ResNet-18, taps res4 and res5 globally averaged: the cache, the
    peak memory and the time are printed before any work, and nothing is written."""
    import torchvision

    from evalsuite.plan import human_bytes

    rc = main(["run", "--dry-run", "--protocol", "quick", "--tasks", "centroid", "--checkpoint", "random:resnet18",
               "--set", "image_size=32", "--layers", "res4,res5", "--batch-size", "16",
               "--data-root", str(tiny_imagefolder), "--out", str(tmp_path / "o")])
    out = capsys.readouterr().out.splitlines()
    assert rc == 0 and not (tmp_path / "o").exists() and not cache_dir.exists()
    first = next(i for i, x in enumerate(out) if x.strip().startswith("centroid "))
    assert "72 images at 32 px (train 48, val 24): ~" in out[first]
    # by hand: ResNet-18 at 32 px has res4 = 256 x 2 x 2 and res5 = 512 x 1 x 1 (stride 16 and 32), averaged to
    # 256 and 512 dims; the cache is 72 rows x 768 dims x 2 bytes (float16)
    cache = 72 * (256 + 512) * 2
    assert f"cache 72 rows x 768 dims (res4 256, res5 512) x 2 B = {human_bytes(cache)}" in out[first + 1]
    # extraction: torchvision's ResNet-18 without its fc (weights, BatchNorm statistics) + 16 images x (input, the
    # largest map twice: conv1's 64 x 16 x 16, the two taps' maps), float32
    params = sum(v.numel() * v.element_size() for k, v in torchvision.models.resnet18().state_dict().items()
                 if not k.startswith("fc."))
    device = params + 16 * 4 * (3 * 32 * 32 + 2 * 64 * 16 * 16 + 256 * 2 * 2 + 512)
    assert f"peak memory ~{human_bytes(device)} device (batch 16)" in out[first + 1]
    host = cache + 48 * 512 * 4  # every feature in float16 and a float32 copy of the train split's res5
    assert f"~{human_bytes(host)} host (features)" in out[first + 1]
    assert out[-1].strip().startswith("total") and f"cache {human_bytes(cache)}" in out[-1]
    # under a launcher the plan says which splits an array job extracts, and a dry run submits nothing
    rc = main(["run", "--dry-run", "--protocol", "quick", "--tasks", "centroid", "--checkpoint", "random:resnet18",
               "--set", "image_size=32", "--layers", "res5", "--data-root", str(tiny_imagefolder),
               "--out", str(tmp_path / "o"), "--launcher", "slurm", "--array", "4", "--array-min-images", "40"])
    out = capsys.readouterr().out
    assert rc == 0 and "; train by an array job of 4 tasks" in out and "submitted" not in out
    assert not (tmp_path / "o").exists()
