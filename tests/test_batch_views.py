"""Batched colour-distortion views (pretrain.batch_views) against torchvision's per-image ops, and the trainer's
per-batch path (auto for small equal-size images, reproducible, refusals)."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF
from PIL import Image

from evalsuite.checkpoints import read_metadata
from evalsuite.errors import BadData, UserError
from pretrain.augment import preset
from pretrain.batch_views import (
    ColourViewSpec,
    adjust,
    apply_view,
    crop_boxes,
    gaussian_blur,
    grayscale,
    step_generator,
)
from pretrain.trainer import TrainConfig, Trainer


@pytest.fixture
def images() -> torch.Tensor:
    return torch.rand(6, 3, 12, 10, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("op, fn, factor", [(0, TF.adjust_brightness, 1.3), (1, TF.adjust_contrast, 0.6),
                                            (2, TF.adjust_saturation, 1.7), (3, TF.adjust_hue, 0.17),
                                            (3, TF.adjust_hue, -0.4)])
def test_jitter_ops_equal_torchvision(images, op, fn, factor):
    ours = adjust(images, op, torch.full((len(images),), factor))
    theirs = torch.stack([fn(im, factor) for im in images])
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_grayscale_and_blur_equal_torchvision(images):
    assert torch.allclose(grayscale(images), TF.rgb_to_grayscale(images), atol=1e-6)
    sigmas = torch.tensor([0.3, 0.8, 1.5, 0.5, 2.0, 1.0], dtype=torch.float64)
    ours = gaussian_blur(images, 5, sigmas)
    theirs = torch.stack([TF.gaussian_blur(im, [5, 5], [float(s), float(s)]) for im, s in zip(images, sigmas)])
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_crop_boxes_follow_random_resized_crop():
    h, w, n = 30, 40, 4000
    boxes = crop_boxes(n, h, w, (0.08, 1.0), (3 / 4, 4 / 3), torch.Generator().manual_seed(1))
    bw, bh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()
    assert (boxes == boxes.round()).all() and (bw > 0).all() and (bh > 0).all()
    # torchvision's own draws of the same distribution: mean area fraction and aspect agree
    torch.manual_seed(1)
    tv = torch.tensor([T.RandomResizedCrop.get_params(torch.zeros(3, h, w), [0.08, 1.0], [3 / 4, 4 / 3])
                       for _ in range(n)], dtype=torch.float64)  # (top, left, height, width)
    area, tv_area = (bw * bh / (h * w)).mean(), (tv[:, 2] * tv[:, 3] / (h * w)).mean()
    assert abs(area - tv_area) < 0.02
    assert abs((bw / bh).log().mean() - (tv[:, 3] / tv[:, 2]).log().mean()) < 0.03
    # a range no try can fit (areas of 2-3x the image) falls back to the whole image, centred
    full = crop_boxes(5, h, w, (2.0, 3.0), (1.0, 1.0), torch.Generator().manual_seed(0))
    assert full.tolist() == [[5.0, 0.0, 35.0, 30.0]] * 5


def test_plain_full_crop_is_the_image():
    x = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    spec = ColourViewSpec(size=16, scale=(1.0, 1.0), ratio=(1.0, 1.0), p_jitter=0.0, gray=0.0)
    out = apply_view(spec, x, torch.Generator().manual_seed(0))
    flipped = torch.stack([o if torch.allclose(o, xi.float() / 255, atol=1e-6) else o.flip(2)
                           for o, xi in zip(out, x)])
    assert torch.allclose(flipped, x.float() / 255, atol=1e-6)
    gray = apply_view(ColourViewSpec(size=8, p_jitter=0.0, gray=1.0), x, torch.Generator().manual_seed(0))
    assert gray.shape == (4, 3, 8, 8) and torch.equal(gray[:, 0], gray[:, 1]) and torch.equal(gray[:, 1], gray[:, 2])


def test_view_statistics_match_the_per_image_pipeline():
    """The same preset drawn per image (torchvision) and per batch: per-image mean and spread agree on average."""
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(256, 3, 1, 1, generator=g) * 200 + 20 + torch.rand(256, 3, 24, 24, generator=g) * 30).to(
        torch.uint8)
    views = preset("simclr", 24, n_views=1)
    batched = views.batched()(x, torch.Generator().manual_seed(1))[0]
    torch.manual_seed(1)
    single = torch.stack([views.pipelines[0](Image.fromarray(im.permute(1, 2, 0).numpy())) for im in x])
    for stat in (lambda v: v.mean(dim=(1, 2, 3)), lambda v: v.std(dim=(2, 3)).mean(1),
                 lambda v: (v[:, 0] - v[:, 1]).abs().mean(dim=(1, 2))):
        assert abs(stat(batched).mean() - stat(single).mean()) < 0.03


def test_presets_carry_their_spec():
    byol = preset("byol", 32).batched()
    assert [s.blur for s in byol.specs] == [1.0, 0.1] and [s.solarize for s in byol.specs] == [0.0, 0.2]
    assert byol.specs[0].jitter == (0.4, 0.4, 0.2, 0.1)
    half = preset("simclr", 32, jitter=0.5).batched().specs[0]
    assert half.jitter == (0.4, 0.4, 0.4, 0.1) and half.blur_kernel == 3
    assert preset("basic", 32).batched() is None
    assert len(preset("swav", 64).batched().specs) == 8


def _cfg(root, tmp_path, **kw) -> TrainConfig:
    base = dict(method="simclr", arch="resnet18_cifar_w16", data_root=str(root), image_size=16, batch_size=8,
                epochs=1, max_steps_per_epoch=2, recipe="short", resume=False, progress=False,
                out=str(tmp_path / "s.safetensors"))
    return TrainConfig(**{**base, **kw})


def test_trainer_draws_views_per_batch(tiny_imagefolder, tmp_path):
    one = Trainer(_cfg(tiny_imagefolder, tmp_path))
    assert one.batch_views is not None and one.images.shape == (48, 3, 32, 32)
    path = one.fit()
    assert read_metadata(path)["augment"]["batched"] is True
    again = Trainer(_cfg(tiny_imagefolder, tmp_path, out=str(tmp_path / "t.safetensors")))
    again.fit()
    assert one.losses == again.losses  # seeded per (seed, epoch, step, rank)
    off = Trainer(_cfg(tiny_imagefolder, tmp_path, batch_views="off"))
    assert off.batch_views is None and off.images is None
    views, index, _ = next(one._batched_loader(_sampler(one)))
    g = step_generator(0, 0, 0, 0)
    assert torch.equal(views[0], one.batch_views(one.images[index], g)[0])


def _sampler(trainer):
    from pretrain.trainer import EpochSampler

    s = EpochSampler(trainer.n_items, 0)
    trainer.epoch = trainer.step_in_epoch = 0
    return s


def test_trainer_refuses_what_it_cannot_batch(tiny_imagefolder, tmp_path):
    with pytest.raises(UserError, match="not colour-distortion views"):
        Trainer(_cfg(tiny_imagefolder, tmp_path, method="rotnet", batch_views="on"))
    with pytest.raises(UserError, match="auto, on or off"):
        Trainer(_cfg(tiny_imagefolder, tmp_path, batch_views="yes"))
    odd = tmp_path / "odd" / "imagefolder" / "train"
    for c in ("a", "b"):
        (odd / c).mkdir(parents=True)
        Image.new("RGB", (16, 16)).save(odd / c / "0.png")
        Image.new("RGB", (16, 16)).save(odd / c / "1.png")
    Image.new("RGB", (20, 16)).save(odd / "b" / "2.png")
    with pytest.raises(BadData, match="images of one size: 20x16") as e:
        Trainer(_cfg(tmp_path / "odd", tmp_path, batch_views="on", batch_size=2))
    assert "2.png" in str(e.value)
    assert Trainer(_cfg(tmp_path / "odd", tmp_path, batch_size=2)).batch_views is None  # auto: per image


def test_step_generators_differ_by_every_coordinate():
    draws = {tuple(torch.rand(3, generator=step_generator(*c)).tolist())
             for c in [(0, 0, 0, 0), (1, 0, 0, 0), (0, 1, 0, 0), (0, 0, 1, 0), (0, 0, 0, 1)]}
    assert len(draws) == 5 and not math.isnan(sum(sum(d) for d in draws))
