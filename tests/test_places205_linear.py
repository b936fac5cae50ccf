"""places205_linear end to end: presets, augmented training views against the reference code, cached features
(trunk never re-run), resume, CLI, bad data, the conformance table."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import tasks.linear.task as places
from evalsuite import registry
from evalsuite.checkpoints import load_checkpoint
from evalsuite.cli import main as cli_main
from evalsuite.colorspace import IMAGENET_MEAN, IMAGENET_STD
from evalsuite.errors import BadData, UserError
from evalsuite.features import FeatureExtractor, Transform
from evalsuite.protocols import field_paths
from evalsuite.task import TaskContext
from tasks.linear.augment import PCA_EIGVAL, PCA_EIGVEC, AugmentedTransform, goyal19_view
from tasks.linear.conformance import CONFORMANCE
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
        assert (p.bn, p.bn_eps, p.bn_momentum) == ("channel", 1e-5, 0.1)
        assert (p.resize_mode, p.resize, p.image_size) == ("center_crop", 256, 224)
        assert p.layers == ("conv1", "res2", "res3", "res4", "res5")
        # both references train on a fresh random view of every image each epoch
        assert (p.train_views, p.augmented_views) == ("augmented", 14)
    # fair_ssb resnet50_*_finetune_linear.yaml: BN_NO_SCALE_SHIFT, FC GaussianFill std 0.01, WEIGHT_DECAY 1e-4,
    # random_sized_crop + horizontal_flip + colour jitter + lighting
    assert (g.bn_affine, g.init, g.init_std, g.weight_decay, g.train_augmentation) == (
        False, "gaussian", 0.01, 1e-4, "goyal19")
    # VISSL eval_mlp: affine BatchNorm2d, nn.Linear's default init; its places205 yaml: weight_decay 5e-4,
    # RandomResizedCrop + RandomHorizontalFlip
    assert (v.bn_affine, v.init, v.weight_decay, v.train_augmentation) == (True, "pytorch_default", 5e-4, "vissl")
    # fair_ssb: cv2.resize and Caffe2's AveragePool (padding left out); VISSL: PIL and nn.AvgPool2d (counted)
    assert (g.interpolation, g.pooling, v.interpolation, v.pooling) == ("cv2_bilinear", "goyal", "bilinear", "vissl")
    assert q.epochs < g.epochs and q.image_size < g.image_size and q.train_views == "center"
    assert q.to_dict()["lr_milestones"] == [3] and q.to_dict()["resize"] is None


# ---------------------------------------------------------------------------- training views


def fair_ssb_view(rgb: np.ndarray, size: int, seed: int) -> np.ndarray:
    """fair_ssb's training pipeline, written out from its code (data_input.py: transform_train_image,
    preprocess_image; data_transformation.py: random_sized_crop, horizontal_flip, color_jitter, lighting,
    color_normalization) on cv2's BGR float32 image with np.random's global generator. Returns RGB CHW."""
    cv2 = pytest.importorskip("cv2")
    np.random.seed(seed)
    img = rgb[:, :, ::-1].astype(np.float32)
    for _ in range(10):  # random_sized_crop(img, size, 0.08, 1.0)
        height, width = img.shape[:2]
        target_area = np.random.uniform(0.08, 1.0) * height * width
        aspect_ratio = np.random.uniform(3.0 / 4.0, 4.0 / 3.0)
        w = int(round(math.sqrt(float(target_area) * aspect_ratio)))
        h = int(round(math.sqrt(float(target_area) / aspect_ratio)))
        if np.random.uniform() < 0.5:
            w, h = h, w
        if h <= height and w <= width:
            y0 = 0 if height == h else np.random.randint(0, height - h)
            x0 = 0 if width == w else np.random.randint(0, width - w)
            img = cv2.resize(img[y0:y0 + h, x0:x0 + w], (size, size))
            break
    else:  # center_crop(size, scale(size, img))
        height, width = img.shape[:2]
        nw, nh = (size, int(math.floor(height / width * size))) if width < height else \
            (int(math.floor(width / height * size)), size)
        img = cv2.resize(img, (nw, nh))
        y0, x0 = int(math.ceil((nh - size) / 2)), int(math.ceil((nw - size) / 2))
        img = img[y0:y0 + size, x0:x0 + size]
    if np.random.uniform() < 0.5:
        img = cv2.flip(img, 1)
    img = img.transpose(2, 0, 1) / 255.0

    def gray(im):
        return 0.299 * im[2] + 0.587 * im[1] + 0.114 * im[0]

    for op in np.random.permutation(np.arange(3)):  # color_jitter(0.4, 0.4, 0.4): brightness, contrast, saturation
        other = [np.zeros(img.shape), np.full(img.shape, gray(img).mean()), np.repeat(gray(img)[None], 3, 0)][op]
        alpha = 1.0 + np.random.uniform(-0.4, 0.4)
        img = img * alpha + other * (1 - alpha)
    alpha = np.random.normal(0, 0.1, size=(1, 3))  # lighting(alphastd=0.1)
    rgb_shift = np.sum(PCA_EIGVEC * np.repeat(alpha, 3, axis=0) * np.repeat(PCA_EIGVAL[None], 3, axis=0), axis=1)
    img = img + rgb_shift[::-1, None, None]  # BGR channel i gets rgb[2 - i]
    mean, std = np.array(IMAGENET_MEAN[::-1]), np.array(IMAGENET_STD[::-1])
    return ((img - mean[:, None, None]) / std[:, None, None])[::-1]


class LegacyDraws:
    """np.random.RandomState behind the Generator method names goyal19_view draws with."""

    def __init__(self, seed: int):
        self.rs = np.random.RandomState(seed)
        self.uniform, self.permutation, self.normal = self.rs.uniform, self.rs.permutation, self.rs.normal

    def integers(self, low, high):
        return self.rs.randint(low, high)


@pytest.mark.parametrize("shape", [(96, 128), (200, 150), (400, 10)])  # (400, 10): every try fails -> centre crop
def test_goyal19_views_match_the_fair_ssb_pipeline(shape):
    rgb = np.random.default_rng(shape[0]).integers(0, 256, (*shape, 3), dtype=np.uint8)
    for seed in range(6):
        ours = goyal19_view(Image.fromarray(rgb), 48, LegacyDraws(seed))
        ours = ((ours - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None])
        np.testing.assert_allclose(ours.numpy(), fair_ssb_view(rgb, 48, seed), atol=5e-4)


def test_vissl_views_are_torchvision_random_resized_crop_and_flip():
    from torchvision import transforms as T

    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (90, 120, 3), dtype=np.uint8))
    vissl_yaml = T.Compose([T.RandomResizedCrop(64), T.RandomHorizontalFlip(), T.ToTensor(),
                            T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    for view in range(8):
        aug = AugmentedTransform.of(Transform(size=64), "vissl", seed=3, view=view)
        torch.manual_seed(int(aug.rng(image).integers(2**63)))
        expected = vissl_yaml(image)
        before = torch.random.get_rng_state()
        got = aug(image)
        assert torch.equal(torch.random.get_rng_state(), before)  # the global generator is left alone
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_views_are_seeded_by_run_seed_view_and_pixels():
    rgb = np.random.default_rng(2).integers(0, 256, (70, 90, 3), dtype=np.uint8)
    base = Transform(size=56, mode="center_crop", resize=64)
    view = AugmentedTransform.of(base, "goyal19", seed=0, view=1)
    a = view(Image.fromarray(rgb))
    assert torch.equal(a, view(Image.fromarray(rgb.copy())))  # the same pixels: the same view
    for other in (AugmentedTransform.of(base, "goyal19", seed=0, view=2), AugmentedTransform.of(base, "goyal19", 1, 1)):
        assert not torch.allclose(a, other(Image.fromarray(rgb)))
    # cache keys: the base transform's fields plus recipe, seed and view
    assert view.to_dict() == {**base.to_dict(), "recipe": "goyal19", "seed": 0, "view": 1}
    with pytest.raises(UserError, match="unknown train augmentation"):
        AugmentedTransform.of(base, "simclr", 0, 0)


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
        # both taps' heads trained in one pass over the cached features
        assert p["solver"]["one_pass"] == {"heads": TAPS, "reads_per_epoch": 1, "world_size": 1, "batch_split": None}
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

    real_train = places.train_linear_probes

    class Interrupt(Exception):
        pass

    def interrupted(*args, **kwargs):
        def stop(epoch, records):
            if epoch == 2:
                raise Interrupt
        return real_train(*args, **kwargs, on_epoch_end=stop)

    monkeypatch.setattr(places, "train_linear_probes", interrupted)
    with pytest.raises(Interrupt):
        places.task.run(make_ctx(tiny_imagefolder, tmp_path / "run", CountingExtractor(ckpt, tmp_path / "c")))
    # both taps' heads train in one pass: each has its own state at the epoch reached
    for tap in TAPS:
        assert len(list((tmp_path / "run" / "probe_state").glob(f"{tap}-*.pt"))) == 1
    monkeypatch.setattr(places, "train_linear_probes", real_train)
    resumed = places.task.run(make_ctx(tiny_imagefolder, tmp_path / "run",
                                       CountingExtractor(ckpt, tmp_path / "c")))
    assert [r.params["resumed_from_epoch"] for r in resumed] == [2] * 4
    assert [r.value for r in resumed] == [r.value for r in reference]
    assert [r.params["train_curve"] for r in resumed] == [r.params["train_curve"] for r in reference]


def test_resume_under_other_settings_is_refused_naming_them(tiny_imagefolder, tmp_path, monkeypatch):
    ckpt = load_checkpoint("random:resnet18", seed=0)
    real_train = places.train_linear_probes

    def interrupted(*args, **kwargs):
        def stop(epoch, records):
            raise KeyboardInterrupt
        return real_train(*args, **kwargs, on_epoch_end=stop)

    monkeypatch.setattr(places, "train_linear_probes", interrupted)
    with pytest.raises(KeyboardInterrupt):
        places.task.run(make_ctx(tiny_imagefolder, tmp_path / "run", CountingExtractor(ckpt, tmp_path / "c"),
                                 layers=["res5"]))
    monkeypatch.setattr(places, "train_linear_probes", real_train)
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


def test_augmented_training_reads_a_new_cached_view_each_epoch(tiny_imagefolder, tmp_path, monkeypatch):
    ckpt = load_checkpoint("random:resnet18", seed=0)
    factory = CountingExtractor(ckpt, tmp_path / "cache")
    received = []
    real_train = places.train_linear_probes

    def spy(features, *args, **kwargs):
        fits = real_train(features, *args, **kwargs)
        received.append(([f() for f in features["res5"]], fits["res5"]))
        return fits

    monkeypatch.setattr(places, "train_linear_probes", spy)
    aug = ["places205_linear.train_views=augmented", "places205_linear.augmented_views=3"]
    ctx = make_ctx(tiny_imagefolder, tmp_path / "out", factory, overrides=aug, layers=["res5"])
    results = places.task.run(ctx)
    # 48 train images x 3 views + 24 val images at batch 16, all before training
    assert sorted(factory.batches) == [8] + [16] * 10
    [(views, fit)] = received
    center = ctx.features(ctx.open_dataset("imagefolder", "train"), ["res5"], transform=ctx.transform())["res5"]
    assert len(views) == 3 and all(v.shape == center.shape == (48, 2048) for v in views)
    for i, a in enumerate(views):  # every image's row differs between views and from its centre crop
        assert not np.isclose(a, center).all(axis=1).any()
        for b in views[i + 1:]:
            assert not np.isclose(a, b).all(axis=1).any()
    # 4 epochs over 3 views: epoch e read view e mod 3
    assert fit.views == 3 and [h["view"] for h in fit.history] == [0, 1, 2, 0]
    p = results[0].params
    assert (p["train_views"], p["augmented_views"], p["views_extracted"], p["views_read"]) == ("augmented", 3, 3, 3)
    assert p["train_augmentation"] == "goyal19" and p["augmentation"].startswith("goyal19: fair_ssb random_sized_crop")
    assert p["train_transform"]["recipe"] == "goyal19" and p["transform"]["mode"] == "center_crop"
    # every view came from the cache: a second run never runs the trunk and gives the same numbers
    again = CountingExtractor(ckpt, tmp_path / "cache")
    rerun = places.task.run(make_ctx(tiny_imagefolder, tmp_path / "out2", again, overrides=aug, layers=["res5"]))
    assert again.calls == 0 and [r.value for r in rerun] == [r.value for r in results]
    # views no epoch reads are not extracted: 4 epochs need at most 4
    more = places.task.run(make_ctx(tiny_imagefolder, tmp_path / "out3", CountingExtractor(ckpt, tmp_path / "cache"),
                                    overrides=[aug[0], "places205_linear.augmented_views=14"], layers=["res5"]))
    assert more[0].params["views_extracted"] == 4


def test_plan_counts_every_training_view(tiny_imagefolder, tmp_path):
    ckpt = load_checkpoint("random:resnet18", seed=0)
    aug = ["places205_linear.train_views=augmented", "places205_linear.augmented_views=2"]
    plan = places.task.plan(make_ctx(tiny_imagefolder, tmp_path, CountingExtractor(ckpt, tmp_path), overrides=aug))
    assert plan.images == {"train": 2 * 48, "val": 24}
    with pytest.raises(UserError, match="augmented_views must be >= 1"):
        places.task.run(make_ctx(tiny_imagefolder, tmp_path, CountingExtractor(ckpt, tmp_path),
                                 overrides=[aug[0], "places205_linear.augmented_views=0"]))


def test_conformance_covers_every_goyal19_field():
    fields = field_paths(places.task.default_protocol("goyal19"))
    assert sorted(CONFORMANCE) == sorted(fields)
    for name, (reference, source, status) in CONFORMANCE.items():
        assert reference and source.startswith("facebookresearch/fair_self_supervision_benchmark:"), name
        assert status == "same" or status.startswith(("deviation: ", "ours: ")), name


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
