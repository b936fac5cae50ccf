"""surface_normals: the goyal19 preset against the reference code (imisra/semantic-segmentation-pytorch), frozen
trunk and trained res5 BatchNorm, multi-scale inputs and labels, PSP head, training beats the mean normal, a codebook
file, resume (and its refusals), bad data, CLI."""

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
from tasks.surface_normals import codebook as codebook_lib
from tasks.surface_normals.conformance import CONFORMANCE
from tasks.surface_normals.dense_heads import AveragedBatchNorm2d, FrozenTrunkDenseModel, PSPHead
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


def test_goyal19_is_the_reference_setting():
    """scripts/train_finetune_models.sh + train_generic.py / eval_generic.py argparse defaults of the reference."""
    g, v, q = (sn.task.default_protocol(p) for p in ("goyal19", "vissl", "quick"))
    assert g == v
    assert (g.dataset, g.train_split, g.test_split) == ("nyuv2", "train", "test")
    # --freeze_until layer3 (res4), ptresnet50dilated (stride 8), ppm decoder
    assert (g.freeze_through, g.output_stride, g.head, g.psp_bins, g.dropout) == ("res4", 8, "psp", (1, 2, 3, 6), 0.1)
    assert (g.target, g.codebook_size, g.codebook_decode, g.codebook_file) == ("codebook", 40, "soft", None)
    # --epoch_iters 50 --num_epoch 400 on 8 GPUs x batch_size_per_gpu 2; lr_encoder = lr_decoder 2e-2, lr_pow 0.9
    assert (g.epochs * g.iters_per_epoch, g.iters_per_epoch, g.batch_size) == (20_000, 50, 16)
    assert (g.lr, g.lr_policy, g.lr_power, g.momentum, g.weight_decay) == (0.02, "poly", 0.9, 0.9, 1e-4)
    # --imgSize 300..600 (train), 450 (test), --imgMaxSize 1000, --padding_constant 8; SyncBN momentum 0.001
    assert (g.train_short_sides, g.test_short_side, g.max_long_side, g.size_multiple) == (
        (300, 375, 450, 525, 600), 450, 1000, 8)
    assert g.bn_momentum == 0.001
    assert (q.train_short_sides, q.test_short_side, q.max_long_side) == ((30, 38, 45, 52, 60), 45, 100)
    assert (q.head_channels, q.epochs, q.iters_per_epoch, q.batch_size, q.bn_momentum) == (64, 4, 4, 4, 0.3)
    assert (q.codebook_samples, q.codebook_iters) == (20_000, 20)
    assert q.replace(train_short_sides=g.train_short_sides, test_short_side=450, max_long_side=1000, head_channels=512,
                     epochs=400, iters_per_epoch=50, batch_size=16, bn_momentum=0.001, codebook_samples=200_000,
                     codebook_iters=50) == g                                 # quick changes nothing else
    recorded = g.to_dict()                                                   # the JSON form in every record
    assert recorded["psp_bins"] == [1, 2, 3, 6] and recorded["train_short_sides"] == [300, 375, 450, 525, 600]


def test_every_goyal19_field_has_a_conformance_entry():
    fields = set(sn.task.default_protocol("goyal19").to_dict())
    assert set(CONFORMANCE) == fields
    for name, (reference, source, status) in CONFORMANCE.items():
        assert reference and source.startswith("imisra/semantic-segmentation-pytorch:"), name
        assert status == "same" or status.startswith(("deviation: ", "ours: ")), (name, status)


def test_learning_rate_lags_one_iteration_as_the_reference():
    """train_generic.py sets the rate after each step from cur_iter, so step t runs at poly(t - 1)."""
    cfg = sn.TrainConfig.from_protocol(sn.task.default_protocol("goyal19"))
    total = cfg.total_iterations
    assert total == 20_000
    reference = [0.02] + [0.02 * (1 - t / total) ** 0.9 for t in range(0, 5)]          # after steps 0, 1, ...
    assert [sn.lr_at(cfg, t, total) for t in range(6)] == pytest.approx(reference, rel=1e-12)
    assert sn.lr_at(cfg, total - 1, total) == pytest.approx(0.02 * (2 / total) ** 0.9)


def test_weight_decay_only_on_conv_weights():
    """train_generic.py group_weight: biases and BatchNorm weights get no weight decay; frozen weights are left out."""
    model = FrozenTrunkDenseModel(load_checkpoint("random:resnet18", seed=0).build_trunk(), "res4", 5, head_channels=8)
    decay, no_decay = sn.weight_decay_groups(model, 1e-4)
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0.0
    named = {id(q): n for n, q in model.named_parameters()}
    decayed = {named[id(q)] for q in decay["params"]}
    plain = {named[id(q)] for q in no_decay["params"]}
    assert "head.classifier.weight" in decayed and "trunk.layer4.0.conv1.weight" in decayed
    assert {"head.classifier.bias", "trunk.layer4.0.bn1.weight", "trunk.layer4.0.bn1.bias"} <= plain
    assert not any(".bn" in n or n.endswith("bias") for n in decayed)
    assert decayed | plain == {n for n, q in model.named_parameters() if q.requires_grad}


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
    bn = head.bottleneck[1]                                                    # models.py weights_init
    assert torch.all(bn.weight == 1) and torch.all(bn.bias == 1e-4)
    with pytest.raises(UserError, match="ResNet"):
        FrozenTrunkDenseModel(load_checkpoint("random:alexnet", seed=0).build_trunk(), "conv5", 3)


def test_res5_batchnorm_trains_while_res4_and_below_stay_in_eval_mode():
    """models.py ResnetDilated.train: BatchNorm of the frozen stages (stem..layer3) in eval mode, layer4's trains."""
    trunk = load_checkpoint("random:resnet18", seed=0).build_trunk()
    model = FrozenTrunkDenseModel(trunk, "res4", num_outputs=3, output_stride=8, head_channels=16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ds = PlanarScenes("x", "train", n=4, size=(32, 48))
    data = sn.load_split(ds, 0.1, progress=False)
    cfg = quick_config(target="regression", epochs=2, iters_per_epoch=2, batch_size=2)
    model.train()
    bn = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    frozen = [m for n, m in bn.items() if n.startswith("trunk.") and not n.startswith("trunk.layer4.")]
    trained = [m for n, m in bn.items() if n.startswith(("trunk.layer4.", "head."))]
    assert frozen and all(not m.training for m in frozen)
    assert trained and all(m.training and isinstance(m, AveragedBatchNorm2d) for m in trained)
    assert not any(isinstance(m, AveragedBatchNorm2d) for m in frozen)
    sn.train_dense(model, data, cfg, sn._normalisation({}), progress=False)
    after = model.state_dict()
    for k, v in before.items():
        if k.startswith("trunk.") and not k.startswith("trunk.layer4."):  # stem..res4: weights and statistics
            assert torch.equal(v, after[k]), f"{k} changed"
    assert not torch.equal(before["trunk.layer4.0.bn1.running_var"], after["trunk.layer4.0.bn1.running_var"])
    assert not torch.equal(before["trunk.layer4.0.bn1.weight"], after["trunk.layer4.0.bn1.weight"])
    assert not torch.equal(before["trunk.layer4.0.conv1.weight"], after["trunk.layer4.0.conv1.weight"])
    assert not torch.equal(before["head.classifier.weight"], after["head.classifier.weight"])
    assert all(not q.requires_grad for n, q in model.named_parameters() if n.startswith("trunk.layer3"))
    feats = model.frozen_features(torch.zeros(1, 3, 32, 48))
    assert not feats.requires_grad and feats.grad_fn is None


def test_averaged_batchnorm_statistics_follow_the_synchronised_batchnorm():
    """lib/nn/modules/batchnorm.py _compute_mean_std, written out: S <- f S + batch, W <- f W + 1, running = S / W,
    starting from mean 0 / variance 1 with weight 1 (the pretrained statistics are replaced)."""
    old = torch.nn.BatchNorm2d(3)
    old.running_mean.fill_(5.0)                                       # pretrained statistics
    bn = AveragedBatchNorm2d.replacing(old, momentum=0.1)
    torch.manual_seed(0)
    batches = [torch.randn(4, 3, 5, 6) * (i + 1) + i for i in range(3)]
    bn.train()
    for x in batches:
        y = bn(x)
    f = 0.9
    means = [x.double().mean(dim=(0, 2, 3)) for x in batches]
    vars_ = [x.double().var(dim=(0, 2, 3), unbiased=True) for x in batches]
    weight = f**3 + f**2 + f + 1
    expect_mean = (f**2 * means[0] + f * means[1] + means[2]) / weight
    expect_var = (f**3 + f**2 * vars_[0] + f * vars_[1] + vars_[2]) / weight
    torch.testing.assert_close(bn.running_mean.double(), expect_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var.double(), expect_var, rtol=1e-5, atol=1e-6)
    x = batches[-1]                                                    # training output: batch statistics
    ref = (x - x.mean(dim=(0, 2, 3), keepdim=True)) / torch.sqrt(x.var(dim=(0, 2, 3), unbiased=False,
                                                                          keepdim=True) + 1e-5)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-5)
    bn.eval()                                                          # evaluation: the averaged statistics
    ref = (x - bn.running_mean[None, :, None, None]) / torch.sqrt(bn.running_var[None, :, None, None] + 1e-5)
    torch.testing.assert_close(bn(x), ref, rtol=1e-4, atol=1e-5)


def reference_label_map(labels: np.ndarray, short_side: int, stride: int = 8) -> np.ndarray:
    """dataset_generic.py _get_item_train with PIL: the label image resized (nearest) to the scaled image, padded to
    a multiple of 8, subsampled by 8 (nearest); padding is 255 here (the reference writes 0)."""
    h0, w0 = labels.shape
    scale = min(short_side / min(h0, w0), 1000 / max(h0, w0))
    h, w = int(h0 * scale), int(w0 * scale)
    resized = np.asarray(Image.fromarray(labels).resize((w, h), Image.NEAREST))
    hp, wp = ((h - 1) // 8 + 1) * 8, ((w - 1) // 8 + 1) * 8
    padded = np.full((hp, wp), 255, np.uint8)
    padded[:h, :w] = resized
    return np.asarray(Image.fromarray(padded).resize((wp // stride, hp // stride), Image.NEAREST))


@pytest.mark.parametrize("short_side", [300, 375, 450, 525, 600])
def test_multiscale_inputs_and_labels_match_the_reference_pipeline(short_side):
    h0, w0 = 480, 640
    rng = np.random.default_rng(short_side)
    labels = rng.integers(0, 40, (h0, w0)).astype(np.uint8)              # the label of each pixel, as its normal
    codebook = codebook_lib.fit_codebook(rng.normal(size=(4000, 3)), 40, seed=0, iters=5)
    normals = codebook[labels].astype(np.float16)
    mask = np.ones((h0, w0), bool)
    data = sn.SplitData([np.zeros((h0, w0, 3), np.uint8)], [normals], [mask], "x")
    cfg = sn.TrainConfig.from_protocol(sn.task.default_protocol("goyal19"))
    x = sn.train_inputs(data, [0], short_side, cfg, sn._normalisation({}))
    expected_hw = {300: (304, 400), 375: (376, 504), 450: (456, 600), 525: (528, 704), 600: (600, 800)}[short_side]
    assert tuple(x.shape[-2:]) == expected_hw
    got_n, got_m = sn.train_targets(data, [0], short_side, cfg, stride=8)
    got = np.where(got_m[0].numpy(), codebook_lib.assign(got_n[0].numpy(), codebook), 255)
    np.testing.assert_array_equal(got, reference_label_map(labels, short_side))


def test_test_input_is_the_reference_resize():
    """eval_generic.py --imgSize 450: shorter side 450, sides rounded up to 8, cv2.resize (bilinear, no antialias)."""
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (480, 640, 3)).astype(np.uint8)
    cfg = sn.TrainConfig.from_protocol(sn.task.default_protocol("goyal19"))
    x = sn.test_input(Image.fromarray(img), cfg).permute(1, 2, 0).numpy()
    ref = cv2.resize(img.copy(), (600, 456))
    assert x.shape == ref.shape == (456, 600, 3)
    assert np.abs(x.astype(int) - ref.astype(int)).max() <= 1                 # fixed-point rounding in OpenCV


def test_batches_walk_an_endless_reshuffled_list():
    n, bs = 10, 4
    stream = np.concatenate([sn.batch_indices(it, n, bs, seed=3) for it in range(5)])     # 20 = two passes
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:]) == list(range(10))
    assert list(stream[:10]) != list(stream[10:])                                         # reshuffled
    scales = [sn.batch_scale(it, 3, 5) for it in range(200)]
    assert set(scales) == {0, 1, 2, 3, 4}


def test_cached_frozen_features_give_the_same_training():
    ds = PlanarScenes("x", "train", n=4, size=(32, 48))
    data = sn.load_split(ds, 0.1, progress=False)
    fits, states = [], []
    for max_gb in (1.0, 0.0):  # the frozen outputs of 4 images at 5 scales fit in 1 GB, not in 0
        cfg = quick_config(epochs=2, iters_per_epoch=3, batch_size=2, codebook_size=3, cache_frozen_max_gb=max_gb)
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
    assert p["total_iterations"] == epochs * 4 and p["target"] == target                # quick: 4 per epoch
    assert p["train_curve"]["loss_per_epoch"][-1] < p["train_curve"]["loss_per_epoch"][0]
    assert p["train_curve"]["lr_per_epoch"][0] == pytest.approx(p["lr"])
    assert p["train_curve"]["lr_per_epoch"][-1] < p["lr"]                 # poly decay
    if target == "codebook":
        assert np.asarray(p["codebook"]).shape == (12, 3) and p["codebook_source"] == "kmeans"
        assert p["codebook_quantisation_deg"] < 1                           # three exact planes, 12 entries
    else:
        assert p["codebook"] is None and p["codebook_source"] is None
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


@pytest.mark.slow
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


@pytest.mark.slow
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
    with pytest.raises(UserError, match="train_short_sides, test_short_side, max_long_side and size_multiple"):
        sn.task.run(make_ctx(planar_root, tmp_path / "o", ["surface_normals.train_short_sides=[0,48]"]))
    with pytest.raises(UserError, match="no such file"):
        sn.task.run(make_ctx(planar_root, tmp_path / "o", [f"surface_normals.codebook_file={tmp_path / 'no.mat'}"]))


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


def write_vocab_mat(path: Path, codebook: np.ndarray) -> Path:
    """The reference's vocab40.mat layout: a cell holding a struct whose field ``normals`` is K x 3
    (normals_evaluation_utils.py reads loadmat(f)['vocabs'][0][0]['normals'][0][0])."""
    import scipy.io

    cell = np.empty((1, 1), dtype=object)
    cell[0, 0] = {"normals": codebook}
    scipy.io.savemat(path, {"vocabs": cell})
    return path


def test_a_codebook_file_in_the_reference_format_is_used_and_recorded(planar_root, tmp_path):
    import hashlib

    rng = np.random.default_rng(7)
    entries = rng.normal(size=(40, 3))
    entries[:3] = [WALL, FLOOR, SIDE]                                     # the scenes' planes are entries 0..2
    entries[3:] /= np.linalg.norm(entries[3:], axis=1, keepdims=True) * 1.5  # not unit: stored as is
    vocab = write_vocab_mat(tmp_path / "vocab40.mat", entries)
    np.testing.assert_array_equal(codebook_lib.load_codebook_file(vocab), entries)
    np.save(tmp_path / "vocab.npy", entries)
    np.savetxt(tmp_path / "vocab.txt", entries)
    np.testing.assert_array_equal(codebook_lib.load_codebook_file(tmp_path / "vocab.npy"), entries)
    np.testing.assert_allclose(codebook_lib.load_codebook_file(tmp_path / "vocab.txt"), entries, rtol=1e-15)

    results = sn.task.run(make_ctx(planar_root, tmp_path / "out", [
        "surface_normals.epochs=1", "surface_normals.freeze_through=res5", "surface_normals.head_channels=16",
        f"surface_normals.codebook_file={vocab}"]))
    p = results[0].params
    assert p["codebook_source"] == "file:" + hashlib.sha256(vocab.read_bytes()).hexdigest()
    np.testing.assert_allclose(p["codebook"], entries, atol=1e-6)
    assert p["codebook_quantisation_deg"] == pytest.approx(0.0, abs=1e-3)  # every normal is an entry
    with pytest.raises(UserError, match="has 40 entries but codebook_size is 12"):
        sn.task.run(make_ctx(planar_root, tmp_path / "out2", [*FAST, f"surface_normals.codebook_file={vocab}"]))


def test_goyal19_predictions_are_the_soft_decoding_of_upsampled_logits():
    """eval_generic.py: logits upsampled (bilinear) to the ground truth, softmax, then the codebook conversion."""
    from tests.test_normals_metrics import reference_soft_decode

    torch.manual_seed(0)
    model = FrozenTrunkDenseModel(load_checkpoint("random:resnet18", seed=0).build_trunk(), "res4", 6, head_channels=8)
    codebook = np.random.default_rng(0).normal(size=(6, 3))
    cfg = sn.TrainConfig.from_protocol(sn.task.default_protocol("goyal19").replace(codebook_size=6))
    images = torch.randint(0, 256, (1, 3, 32, 48), dtype=torch.uint8)
    norm = sn._normalisation({})
    [pred] = sn.predict_normals(model, images, [(30, 45)], cfg, norm, codebook)
    with torch.no_grad():
        logits = torch.nn.functional.interpolate(model(sn.to_input(images, norm)), size=(30, 45), mode="bilinear",
                                                 align_corners=False)
    np.testing.assert_allclose(pred, reference_soft_decode(logits[0].double().numpy(), codebook), atol=1e-5)
