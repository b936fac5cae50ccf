"""surface_normals: frozen trunk, PSP head, training beats the mean normal, resume (and its refusals), bad data,
CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import tasks.surface_normals.task as sn
from evalsuite.checkpoints import load_checkpoint
from evalsuite.data import READERS
from evalsuite.errors import BadData, UserError
from evalsuite.task import TaskContext
from tasks.surface_normals.dense_heads import FrozenTrunkDenseModel, PSPHead
from tasks.surface_normals.metrics import angular_errors_deg, summarize_errors
from tests.helpers import make_context

WALL, FLOOR, SIDE = (0.0, 0.0, -1.0), (0.0, -1.0, 0.0), (1.0, 0.0, 0.0)


class PlanarScenes:
    """In-memory NYUv2-like split: a back wall, a floor below a random horizon, a left wall left of a
    random column; each plane has its own colour and texture, normals are exact, a random patch is invalid
    (NaN normals there, as in real data)."""

    kind = "nyuv2"

    def __init__(self, root, split, n=None, size=(48, 64), seed=None, **_):
        self.root, self.split = Path(root), split
        n = n or {"train": 16, "test": 6}[split]
        seed = seed if seed is not None else {"train": 0, "test": 1}[split]
        rng = np.random.default_rng(seed)
        h, w = size
        self.samples = []
        for _ in range(n):
            horizon, column = rng.integers(int(0.3 * h), int(0.7 * h)), rng.integers(int(0.2 * w), int(0.5 * w))
            yy, xx = np.mgrid[0:h, 0:w]
            label = np.where(yy >= horizon, 1, np.where(xx < column, 2, 0))
            normals = np.array([WALL, FLOOR, SIDE], np.float32)[label]
            colours = np.array([[200, 60, 50], [40, 170, 60], [50, 70, 200]], np.float64)[label]
            stripes = 25 * np.sin(xx / 2.0)[..., None] * (label == 1)[..., None]
            img = np.clip(colours + stripes + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
            mask = np.ones((h, w), bool)
            y0, x0 = rng.integers(0, h - 6), rng.integers(0, w - 6)
            mask[y0:y0 + 5, x0:x0 + 5] = False
            normals[~mask] = np.nan
            self.samples.append((Image.fromarray(img), normals, mask))

    def __len__(self):
        return len(self.samples)

    @property
    def ids(self):
        return [f"{self.split}{i:03d}" for i in range(len(self))]

    def load_image(self, i):
        return self.samples[i][0]

    def normals(self, i):
        return self.samples[i][1]

    def valid_mask(self, i):
        return self.samples[i][2]

    def fingerprint(self):
        return f"planar-{self.split}-{len(self)}"


@pytest.fixture()
def planar_root(tmp_path, monkeypatch):
    """A data root whose nyuv2 reader serves PlanarScenes."""
    (tmp_path / "data" / "nyuv2").mkdir(parents=True)
    monkeypatch.setitem(READERS, "nyuv2", PlanarScenes)
    return tmp_path / "data"


def make_ctx(data_root: Path, out: Path, overrides=()) -> TaskContext:
    return make_context("surface_normals", data_root, out, overrides=overrides)


def quick_config(**changes) -> sn.TrainConfig:
    return sn.TrainConfig.from_protocol(sn.task.default_protocol("quick").replace(**changes))


FAST = ["surface_normals.epochs=6", "surface_normals.batch_size=4", "surface_normals.codebook_size=12"]


def test_presets():
    g, v, q = (sn.task.default_protocol(p) for p in ("goyal19", "vissl", "quick"))
    assert g == v
    assert (g.dataset, g.train_split, g.test_split) == ("nyuv2", "train", "test")
    assert (g.freeze_through, g.output_stride, g.head, g.psp_bins) == ("res4", 8, "psp", (1, 2, 3, 6))
    assert (g.target, g.codebook_size, g.codebook_decode) == ("codebook", 40, "hard")
    assert (g.lr, g.momentum, g.weight_decay, g.batch_size, g.lr_power) == (0.01, 0.9, 1e-4, 16, 0.9)
    assert g.image_size == (480, 640)
    assert (q.image_size, q.head_channels, q.epochs, q.batch_size, q.lr) == ((48, 64), 64, 4, 4, 0.02)
    assert (q.codebook_samples, q.codebook_iters) == (20_000, 20)
    assert q.replace(image_size=g.image_size, head_channels=512, epochs=60, batch_size=16, lr=0.01,
                     codebook_samples=200_000, codebook_iters=50) == g      # quick changes nothing else
    recorded = g.to_dict()                                                   # the JSON form in every record
    assert recorded["psp_bins"] == [1, 2, 3, 6] and recorded["image_size"] == [480, 640]


def test_psp_head_and_dilated_trunk_shapes():
    trunk = load_checkpoint("random:resnet18", seed=0).build_trunk()
    model = FrozenTrunkDenseModel(trunk, "res4", num_outputs=7, output_stride=8, head_channels=16)
    out = model(torch.zeros(2, 3, 64, 96))
    assert out.shape == (2, 7, 8, 12)                                  # stride 8 kept by dilation
    assert model.layer_name == "res5_onwards"
    model16 = FrozenTrunkDenseModel(load_checkpoint("random:resnet18", seed=0).build_trunk(), "res5", 3,
                                    output_stride=16, head_channels=16)
    assert model16(torch.zeros(2, 3, 64, 96)).shape == (2, 3, 4, 6) and model16.layer_name == "res5"
    head = PSPHead(32, 5, channels=8, bins=(1, 2, 3, 6))
    assert head(torch.randn(2, 32, 7, 9)).shape == (2, 5, 7, 9)
    assert len(head.stages) == 4 and head.stages[0][1][0].out_channels == 8   # C/4 per pyramid level
    with pytest.raises(UserError, match="ResNet"):
        FrozenTrunkDenseModel(load_checkpoint("random:alexnet", seed=0).build_trunk(), "conv5", 3)


def test_trunk_stays_frozen_while_res5_and_head_train():
    trunk = load_checkpoint("random:resnet18", seed=0).build_trunk()
    model = FrozenTrunkDenseModel(trunk, "res4", num_outputs=3, output_stride=8, head_channels=16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ds = PlanarScenes("x", "train", n=4, size=(32, 48))
    data = sn.load_split(ds, (32, 48), 0.1, progress=False)
    cfg = quick_config(target="regression", epochs=2, batch_size=2, image_size=(32, 48))
    model.train()
    bns = [m for m in model.trunk.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(not m.training for m in bns)                 # BN of the trunk in eval mode
    assert all(m.training for m in model.head.modules() if isinstance(m, torch.nn.BatchNorm2d))
    sn.train_dense(model, data, cfg, sn._normalisation({}), progress=False)
    after = model.state_dict()
    for k, v in before.items():
        frozen_weight = k.startswith("trunk.") and not k.startswith("trunk.layer4.")
        bn_statistic = k.startswith("trunk.") and ("running_" in k or "num_batches" in k)
        if frozen_weight or bn_statistic:  # res1-res4 weights and every trunk BN statistic (res5's too)
            assert torch.equal(v, after[k]), f"{k} changed"
    assert torch.equal(before["trunk.layer4.0.bn1.running_var"], after["trunk.layer4.0.bn1.running_var"])
    assert not torch.equal(before["trunk.layer4.0.conv1.weight"], after["trunk.layer4.0.conv1.weight"])
    assert not torch.equal(before["head.classifier.weight"], after["head.classifier.weight"])
    assert all(not q.requires_grad for n, q in model.named_parameters() if n.startswith("trunk.layer3"))
    feats = model.frozen_features(torch.zeros(1, 3, 32, 48))
    assert not feats.requires_grad and feats.grad_fn is None


def test_cached_frozen_features_give_the_same_training():
    ds = PlanarScenes("x", "train", n=4, size=(32, 48))
    data = sn.load_split(ds, (32, 48), 0.1, progress=False)
    fits, states = [], []
    for max_gb in (1.0, 0.0):  # the frozen outputs (4 x 256 x 4 x 6 floats) fit in 1 GB, not in 0
        cfg = quick_config(epochs=2, batch_size=2, codebook_size=3, image_size=(32, 48), cache_frozen_max_gb=max_gb)
        torch.manual_seed(0)  # the same head initialisation for both
        model = FrozenTrunkDenseModel(load_checkpoint("random:resnet18", seed=0).build_trunk(), "res4", 3,
                                      head_channels=16)
        fits.append(sn.train_dense(model, data, cfg, sn._normalisation({}), progress=False))
        states.append(model.trainable_state())
    assert fits[0].cached and not fits[1].cached
    np.testing.assert_allclose(fits[0].losses, fits[1].losses, rtol=1e-5)
    for k in states[0]:
        torch.testing.assert_close(states[0][k], states[1][k], rtol=1e-4, atol=1e-5)


def mean_normal_baseline(train: PlanarScenes, test: PlanarScenes) -> dict[str, float]:
    all_n = np.concatenate([train.normals(i)[train.valid_mask(i)] for i in range(len(train))])
    mean = all_n.mean(axis=0)
    mean /= np.linalg.norm(mean)
    errs = np.concatenate([angular_errors_deg(np.broadcast_to(mean, test.normals(i).shape), test.normals(i),
                                              test.valid_mask(i)) for i in range(len(test))])
    return summarize_errors(errs)


@pytest.mark.parametrize("target,extra", [("codebook", []),  # the cosine loss learns more slowly
                                          ("regression", ["surface_normals.epochs=12", "surface_normals.lr=0.05"])])
def test_training_on_planar_scenes_beats_the_mean_normal(planar_root, tmp_path, target, extra):
    ctx = make_ctx(planar_root, tmp_path / "out",
                   [*FAST, f"surface_normals.target={target}", "surface_normals.freeze_through=res5", *extra])
    results = sn.task.run(ctx)
    by = {r.metric: r.value for r in results}
    assert list(by) == ["mean_angle_error_deg", "median_angle_error_deg", "rmse_angle_error_deg",
                        "pct_within_11.25deg", "pct_within_22.5deg", "pct_within_30deg"]
    base = mean_normal_baseline(PlanarScenes("x", "train"), PlanarScenes("x", "test"))
    assert base["mean_angle_error_deg"] > 45 and base["pct_within_30deg"] == 0.0     # no plane is near the mean
    if target == "codebook":
        assert by["mean_angle_error_deg"] < base["mean_angle_error_deg"] - 25, (by, base)
        assert by["pct_within_11.25deg"] > 75, (by, base)
    else:
        assert by["mean_angle_error_deg"] < base["mean_angle_error_deg"] - 8, (by, base)
        assert by["pct_within_30deg"] > 40, (by, base)
    r = results[0]
    assert r.layer == "res5" and r.task == "surface_normals" and r.split == "test"
    p = r.params
    assert p["valid_test_pixels"] == 6 * (48 * 64 - 25)               # invalid patches excluded
    epochs = p["epochs"]
    assert (p["num_train"], p["num_test"], p["epochs_run"]) == (16, 6, epochs)
    assert p["total_iterations"] == epochs * 4 and p["target"] == target
    assert p["train_curve"]["loss_per_epoch"][-1] < p["train_curve"]["loss_per_epoch"][0]
    assert p["train_curve"]["lr_per_epoch"][0] == pytest.approx(p["lr"])
    assert p["train_curve"]["lr_per_epoch"][-1] < p["lr"]                 # poly decay
    if target == "codebook":
        assert np.asarray(p["codebook"]).shape == (12, 3)
    else:
        assert p["codebook"] is None
    assert not list((tmp_path / "out" / "normals_state").glob("*.pt"))


RESUME = ["surface_normals.epochs=3", "surface_normals.batch_size=8", "surface_normals.codebook_size=6",
          "surface_normals.head_channels=16"]


def run_interrupted(ctx: TaskContext, monkeypatch, after_epoch: int) -> Path:
    """Run the task, stopped by Ctrl-C after ``after_epoch`` epochs; the one resume state it leaves."""
    real = sn.train_dense

    def interrupted(*args, **kwargs):
        def stop(epoch, record):
            if epoch == after_epoch:
                raise KeyboardInterrupt
        return real(*args, **kwargs, on_epoch_end=stop)

    with monkeypatch.context() as m:
        m.setattr(sn, "train_dense", interrupted)
        with pytest.raises(KeyboardInterrupt):
            sn.task.run(ctx)
    [state] = (Path(ctx.out_dir) / "normals_state").glob("*.pt")
    return state


def test_interrupted_training_resumes_to_the_same_numbers(planar_root, tmp_path, monkeypatch):
    reference = sn.task.run(make_ctx(planar_root, tmp_path / "ref", RESUME))
    state = run_interrupted(make_ctx(planar_root, tmp_path / "run", RESUME), monkeypatch, after_epoch=2)
    assert state.name.startswith("res5_onwards-")
    resumed = sn.task.run(make_ctx(planar_root, tmp_path / "run", RESUME))
    assert resumed[0].params["resumed_from_epoch"] == 2 and reference[0].params["resumed_from_epoch"] is None
    assert [r.value for r in resumed] == pytest.approx([r.value for r in reference], abs=1e-6)
    assert resumed[0].params["train_curve"] == reference[0].params["train_curve"]
    assert resumed[0].params["codebook"] == reference[0].params["codebook"]
    assert not state.exists()                                        # finished: nothing left to resume


class PlantedPickle:
    """Unpickling this opens (creates) ``marker``: what a malicious resume state would do."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_planted_pickle_in_the_resume_state_is_never_run(planar_root, tmp_path, monkeypatch, capsys):
    reference = sn.task.run(make_ctx(planar_root, tmp_path / "ref", RESUME))
    state = run_interrupted(make_ctx(planar_root, tmp_path / "run", RESUME), monkeypatch, after_epoch=2)
    marker = tmp_path / "planted-pickle-ran"
    torch.save({"format": 1, "what": "surface normals training", "settings": "{}",
                "payload": {"epoch": 2, "model": PlantedPickle(marker)}}, state)
    capsys.readouterr()
    results = sn.task.run(make_ctx(planar_root, tmp_path / "run", RESUME))
    assert not marker.exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ignoring unreadable surface normals training resume state" in err[0], err
    assert str(state) in err[0] and "starting over" in err[0]
    assert results[0].params["resumed_from_epoch"] is None                     # started over, and finished
    assert [r.value for r in results] == pytest.approx([r.value for r in reference], abs=1e-6)
    assert not state.exists()
    # the planted file is live: a full unpickling of the same bytes does run it
    live = tmp_path / "live.pt"
    torch.save({"payload": PlantedPickle(tmp_path / "live-marker")}, live)
    torch.load(live, weights_only=False)
    assert (tmp_path / "live-marker").exists()


def test_a_resume_state_with_other_settings_is_refused_in_one_line(planar_root, tmp_path, monkeypatch):
    state = run_interrupted(make_ctx(planar_root, tmp_path / "run", RESUME), monkeypatch, after_epoch=1)
    with pytest.raises(UserError) as e:
        sn.task.run(make_ctx(planar_root, tmp_path / "run", [*RESUME, "surface_normals.epochs=4"]))
    message = str(e.value)
    assert "\n" not in message and "resume state was written with other settings" in message
    assert "protocol.epochs=3 (now 4)" in message and message.count("(now ") == 1, message
    assert state.exists()                                             # refused, not deleted
    resumed = sn.task.run(make_ctx(planar_root, tmp_path / "run", RESUME))
    assert resumed[0].params["resumed_from_epoch"] == 1


class BrokenScenes(PlanarScenes):
    defect = ""

    def normals(self, i):
        n = super().normals(i).copy()
        if i == 3 and self.defect == "nan":
            n[self.valid_mask(i)] = np.nan
        if i == 3 and self.defect == "scale":
            n = n * 3
        return n

    def valid_mask(self, i):
        m = super().valid_mask(i)
        if i == 3 and self.defect == "empty":
            return np.zeros_like(m)
        if i == 3 and self.defect == "shape":
            return m[:-1]
        return m

    def load_image(self, i):
        im = super().load_image(i)
        return im.resize((im.width + 2, im.height)) if i == 3 and self.defect == "size" else im


@pytest.mark.parametrize("defect,message", [("nan", "NaN/Inf normals"), ("scale", "not unit length"),
                                            ("empty", "no valid pixel"), ("shape", "does not match"),
                                            ("size", "RGB image is 48x66")])
def test_bad_ground_truth_is_a_clear_error_naming_the_sample(planar_root, tmp_path, monkeypatch, defect, message):
    cls = type("B", (BrokenScenes,), {"defect": defect})
    monkeypatch.setitem(READERS, "nyuv2", cls)
    with pytest.raises(BadData, match=message) as e:
        sn.task.run(make_ctx(planar_root, tmp_path / "out", FAST))
    assert "train sample 3, id train003" in str(e.value)
    assert not (tmp_path / "out" / "normals_state").exists()


def test_bad_protocol_values(planar_root, tmp_path):
    with pytest.raises(UserError, match="target must be one of 'codebook', 'regression'"):
        make_ctx(planar_root, tmp_path / "o", ["surface_normals.target=depth"])
    with pytest.raises(UserError, match="freeze_through must be one of"):
        make_ctx(planar_root, tmp_path / "o", ["surface_normals.freeze_through=res9"])
    with pytest.raises(UserError, match=r"image_size must be \[height, width\]"):
        sn.task.run(make_ctx(planar_root, tmp_path / "o", ["surface_normals.image_size=[48,64,3]"]))


def test_cli_run_writes_records(planar_root, tmp_path, cache_dir):
    from evalsuite.cli import main as cli_main

    rc = cli_main(["run", "--checkpoint", "random:resnet18", "--tasks", "surface_normals", "--protocol", "quick",
                   "--set", "surface_normals.epochs=1", "--set", "surface_normals.codebook_size=6",
                   "--data-root", str(planar_root), "--out", str(tmp_path / "runs"), "--no-progress"])
    assert rc == 0
    rows = [json.loads(line) for line in (tmp_path / "runs" / "results.jsonl").read_text().splitlines()]
    assert {r["metric"] for r in rows} == {"mean_angle_error_deg", "median_angle_error_deg", "rmse_angle_error_deg",
                                           "pct_within_11.25deg", "pct_within_22.5deg", "pct_within_30deg"}
    assert all(r["task"] == "surface_normals" and r["layer"] == "res5_onwards" for r in rows)
    assert all(r["params"]["epochs"] == 1 and len(r["params"]["codebook"]) == 6 for r in rows)
