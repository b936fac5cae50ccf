"""places205_linear end to end: presets, cached features (trunk never re-run), resume, CLI, bad data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import tasks.linear.task as places
from evalsuite import registry
from evalsuite.checkpoints import load_checkpoint
from evalsuite.cli import main as cli_main
from evalsuite.errors import BadData, UserError
from evalsuite.features import FeatureExtractor
from evalsuite.task import TaskContext
from tests.helpers import make_context, make_extractor

TAPS = ["conv1", "res5"]


class CountingExtractor:
    """Builds FeatureExtractors whose trunk records the batch size of every forward call on images.

    Shape probes (``evalsuite.trunks.tap_shapes``: one all-zero image) are not counted.
    """

    def __init__(self, ckpt, cache_dir: Path):
        self.ckpt, self.cache_dir, self.batches = ckpt, cache_dir, []

    @property
    def calls(self) -> int:
        return len(self.batches)

    def __call__(self) -> FeatureExtractor:
        extractor = make_extractor(self.ckpt, self.cache_dir)

        def count(module, args, output):
            x = args[0]
            if not (x.shape[0] == 1 and not x.any()):
                self.batches.append(int(x.shape[0]))

        extractor.trunk.register_forward_hook(count)
        return extractor


def make_ctx(data_root: Path, out: Path, factory, overrides=(), preset="quick", layers=TAPS) -> TaskContext:
    return make_context("places205_linear", data_root, out, preset=preset, checkpoint=factory.ckpt,
                        overrides=["places205_linear.dataset=imagefolder", *overrides], extractor_factory=factory,
                        layers=layers)


def test_presets_follow_the_benchmark():
    g, v, q = (places.task.default_protocol(p) for p in ("goyal19", "vissl", "quick"))
    for p in (g, v):
        assert (p.dataset, p.epochs, p.batch_size) == ("places205", 14, 256)
        assert p.lr_milestones == (4, 8, 12)
        assert (p.lr, p.lr_gamma, p.momentum, p.nesterov) == (0.01, 0.1, 0.9, True)
        assert (p.bn, p.init_std, p.pooling) == ("channel", 0.01, "goyal")
        assert (p.resize_mode, p.resize, p.image_size) == ("center_crop", 256, 224)
        assert p.layers == ("conv1", "res2", "res3", "res4", "res5")
    assert (g.weight_decay, v.weight_decay) == (1e-4, 5e-4)
    assert q.epochs < g.epochs and q.image_size < g.image_size
    assert q.to_dict()["lr_milestones"] == [3] and q.to_dict()["resize"] is None


def test_end_to_end_on_imagefolder_never_reruns_the_trunk(tiny_imagefolder, tmp_path):
    ckpt = load_checkpoint("random:resnet18", seed=0)
    factory = CountingExtractor(ckpt, tmp_path / "cache")
    results = places.task.run(make_ctx(tiny_imagefolder, tmp_path / "out", factory))
    # 48 train + 24 val images at batch 16: exactly 3 + 2 trunk passes, none while training 2 probes
    assert sorted(factory.batches) == [8, 16, 16, 16, 16]
    assert [(r.layer, r.metric) for r in results] == [(t, m) for t in TAPS for m in ("top1", "top5")]
    for r in results:
        assert 0.0 <= r.value <= 100.0
        p = r.params
        assert (p["num_train"], p["num_val"], p["num_classes"]) == (48, 24, 8)
        assert p["solver"]["weight_decay"] == 1e-4 and p["solver"]["nesterov"] is True
        assert len(p["train_curve"]["loss_per_epoch"]) == 4 == p["epochs_run"]
        assert p["train_curve"]["lr_per_epoch"] == pytest.approx([0.01, 0.01, 0.01, 0.001])
        assert p["total_iterations"] == 4 * 3
        assert p["bn_channels"] == {"conv1": 64, "res5": 512}[r.layer]
    top1 = {r.layer: r.value for r in results if r.metric == "top1"}
    top5 = {r.layer: r.value for r in results if r.metric == "top5"}
    assert all(top5[t] >= top1[t] for t in TAPS)
    assert not list((tmp_path / "out" / "probe_state").glob("*.pt"))  # finished fits leave no state behind

    # a second task on the same checkpoint and data: features come from the cache, the trunk never runs
    again = CountingExtractor(ckpt, tmp_path / "cache")
    results2 = places.task.run(make_ctx(tiny_imagefolder, tmp_path / "out2", again))
    assert again.calls == 0
    assert [r.value for r in results2] == [r.value for r in results]  # seeded: same numbers


def test_interrupted_task_resumes_to_the_same_numbers(tiny_imagefolder, tmp_path, monkeypatch):
    ckpt = load_checkpoint("random:resnet18", seed=0)
    reference = places.task.run(make_ctx(tiny_imagefolder, tmp_path / "ref",
                                         CountingExtractor(ckpt, tmp_path / "c")))

    real_train = places.train_linear_probe

    class Interrupt(Exception):
        pass

    def interrupted(*args, **kwargs):
        def stop(epoch, record):
            if epoch == 2:
                raise Interrupt
        return real_train(*args, **kwargs, on_epoch_end=stop)

    monkeypatch.setattr(places, "train_linear_probe", interrupted)
    with pytest.raises(Interrupt):
        places.task.run(make_ctx(tiny_imagefolder, tmp_path / "run", CountingExtractor(ckpt, tmp_path / "c")))
    assert len(list((tmp_path / "run" / "probe_state").glob("conv1-*.pt"))) == 1
    monkeypatch.setattr(places, "train_linear_probe", real_train)
    resumed = places.task.run(make_ctx(tiny_imagefolder, tmp_path / "run",
                                       CountingExtractor(ckpt, tmp_path / "c")))
    assert resumed[0].params["resumed_from_epoch"] == 2
    assert [r.value for r in resumed] == [r.value for r in reference]
    assert [r.params["train_curve"] for r in resumed] == [r.params["train_curve"] for r in reference]


def test_resume_under_other_settings_is_refused_naming_them(tiny_imagefolder, tmp_path, monkeypatch):
    ckpt = load_checkpoint("random:resnet18", seed=0)
    real_train = places.train_linear_probe

    def interrupted(*args, **kwargs):
        def stop(epoch, record):
            raise KeyboardInterrupt
        return real_train(*args, **kwargs, on_epoch_end=stop)

    monkeypatch.setattr(places, "train_linear_probe", interrupted)
    with pytest.raises(KeyboardInterrupt):
        places.task.run(make_ctx(tiny_imagefolder, tmp_path / "run", CountingExtractor(ckpt, tmp_path / "c"),
                                 layers=["res5"]))
    monkeypatch.setattr(places, "train_linear_probe", real_train)
    with pytest.raises(UserError, match=r"config\.lr=0\.01 \(now 0\.02\)") as e:
        places.task.run(make_ctx(tiny_imagefolder, tmp_path / "run", CountingExtractor(ckpt, tmp_path / "c"),
                                 overrides=["places205_linear.lr=0.02"], layers=["res5"]))
    assert "\n" not in str(e.value) and "config.epochs" not in str(e.value)  # one line, only what differs
    # another checkpoint evaluated into the same folder has a state of its own: not refused, not resumed
    other = load_checkpoint("random:resnet18", seed=1)
    assert other.sha256 != ckpt.sha256
    results = places.task.run(make_ctx(tiny_imagefolder, tmp_path / "run", CountingExtractor(other, tmp_path / "c"),
                                       layers=["res5"]))
    assert results[0].params["resumed_from_epoch"] == 0
    # the same settings resume where the interrupted run stopped
    resumed = places.task.run(make_ctx(tiny_imagefolder, tmp_path / "run", CountingExtractor(ckpt, tmp_path / "c"),
                                       layers=["res5"]))
    assert resumed[0].params["resumed_from_epoch"] == 1


def test_cli_run_with_imagefolder_override(tiny_imagefolder, tmp_path, cache_dir):
    registry.register_task(places.task)
    try:
        rc = cli_main(["run", "--checkpoint", "random:resnet18", "--tasks", "places205_linear",
                       "--protocol", "quick", "--set", "places205_linear.dataset=imagefolder",
                       "--set", "places205_linear.epochs=2", "--layers", "res5",
                       "--data-root", str(tiny_imagefolder), "--out", str(tmp_path / "runs"),
                       "--no-progress"])
    finally:
        registry.unregister(registry.TASK_GROUP, "places205_linear")
    assert rc == 0
    rows = [json.loads(line) for line in (tmp_path / "runs" / "results.jsonl").read_text().splitlines()]
    assert {(r["task"], r["layer"], r["metric"]) for r in rows} == {("places205_linear", "res5", "top1"),
                                                                    ("places205_linear", "res5", "top5")}
    assert all(r["params"]["epochs"] == 2 and r["params"]["train_curve"]["loss_final"] > 0 for r in rows)


def test_cli_missing_data_exits_2_naming_the_problem(tmp_path, cache_dir, capsys):
    registry.register_task(places.task)
    try:
        rc = cli_main(["run", "--checkpoint", "random:resnet18", "--tasks", "places205_linear",
                       "--protocol", "quick", "--data-root", str(tmp_path / "nowhere"),
                       "--out", str(tmp_path / "runs"), "--no-progress"])
    finally:
        registry.unregister(registry.TASK_GROUP, "places205_linear")
    assert rc == 2
    assert "places205 data not found" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "results.jsonl").exists()


def test_split_class_mismatch_is_a_clear_error(tmp_path, capsys):
    from evalsuite.data.synthetic import write_imagefolder

    root = tmp_path / "data"
    write_imagefolder(root / "imagefolder", seed=0, per_class=2, size=16, classes=3)
    write_imagefolder(tmp_path / "other", seed=1, per_class=2, size=16, classes=2)
    (root / "imagefolder" / "val").rename(tmp_path / "unused")
    (tmp_path / "other" / "val").rename(root / "imagefolder" / "val")
    ckpt = load_checkpoint("random:resnet18", seed=0)
    with pytest.raises(BadData, match="different class lists"):
        places.task.run(make_ctx(root, tmp_path / "out", CountingExtractor(ckpt, tmp_path / "cache")))


def test_missing_places205_data_names_the_override(tmp_path):
    ckpt = load_checkpoint("random:resnet18", seed=0)
    ctx = make_ctx(tmp_path, tmp_path / "out", CountingExtractor(ckpt, tmp_path / "cache"))
    ctx.protocol = ctx.protocol.replace(dataset="places205")
    from evalsuite.task import DataMissing

    with pytest.raises(DataMissing, match="places205_linear.data_path"):
        places.task.run(ctx)


def test_topk_not_reported_when_trivial(tmp_path):
    from evalsuite.data.synthetic import write_imagefolder

    root = tmp_path / "data"
    write_imagefolder(root / "imagefolder", seed=0, per_class=4, size=16, classes=4)
    ckpt = load_checkpoint("random:resnet18", seed=0)
    results = places.task.run(make_ctx(root, tmp_path / "out", CountingExtractor(ckpt, tmp_path / "cache"),
                                       overrides=["places205_linear.epochs=1"]))
    assert {r.metric for r in results} == {"top1"}  # 4 classes: top-5 would be 100% by construction
    assert np.isfinite([r.value for r in results]).all()


def test_alexnet_trunk_uses_its_own_five_taps(tiny_imagefolder, tmp_path):
    ckpt = load_checkpoint("random:alexnet", seed=0)
    ctx = make_ctx(tiny_imagefolder, tmp_path / "out", CountingExtractor(ckpt, tmp_path / "cache"),
                   overrides=["places205_linear.epochs=1", "places205_linear.image_size=96"], layers=None)
    results = places.task.run(ctx)
    assert sorted({r.layer for r in results}) == ["conv1", "conv2", "conv3", "conv4", "conv5"]
