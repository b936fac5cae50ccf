"""View pipelines: the blur is the papers' relative to the image size."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.transforms import v2 as T

from pretrain.augment import blur_sigma, preset


def _blurs(pipeline) -> list[T.GaussianBlur]:
    found = []
    for op in getattr(pipeline, "transforms", []):
        if isinstance(op, T.GaussianBlur):
            found.append(op)
        found += _blurs(op)
    return found


def test_blur_sigma_is_the_papers_at_224_and_scales_with_the_side():
    assert blur_sigma(224) == pytest.approx((0.1, 2.0))
    assert blur_sigma(64) == pytest.approx((0.1 * 64 / 224, 2.0 * 64 / 224))


@pytest.mark.parametrize("name", ["simclr", "moco_v2", "byol"])
def test_views_blur_in_proportion_to_their_size(name):
    for size in (64, 224):
        blurs = [b for view in preset(name, size).pipelines for b in _blurs(view)]
        assert blurs, name
        for b in blurs:
            assert tuple(b.sigma) == pytest.approx(blur_sigma(size))
            assert b.kernel_size[0] % 2 == 1 and abs(b.kernel_size[0] - 0.1 * size) <= 2


def test_strongest_blur_at_64px_keeps_a_6px_texture():
    """A sinusoid of period 6 px loses exp(-2 pi^2 sigma^2 / 36) of its amplitude under a Gaussian of sigma px:
    ~84% survives the scaled maximum (0.57 px), ~11% the unscaled paper value (2 px) at 64 px."""
    x = torch.arange(64, dtype=torch.float32)
    img = (0.5 + 0.4 * torch.sin(2 * math.pi * x / 6)).expand(3, 64, 64).clone()
    k = _blurs(preset("simclr", 64).pipelines[0])[0].kernel_size[0]

    def amplitude(sigma):  # of the sinusoid's frequency, over 8 whole periods away from the borders
        out = T.GaussianBlur(k, sigma=(sigma, sigma))(img)[0, 32, 8:56]
        phase = 2 * math.pi * x[8:56] / 6
        return float(torch.hypot(2 * (out * phase.sin()).mean(), 2 * (out * phase.cos()).mean()))

    hi = blur_sigma(64)[1]
    assert amplitude(hi) == pytest.approx(0.4 * math.exp(-2 * math.pi**2 * hi**2 / 36), abs=0.02)
    assert amplitude(hi) > 0.3 > 0.1 > amplitude(2.0)


def _grays(pipeline) -> list[float]:
    found = []
    for op in getattr(pipeline, "transforms", []):
        if isinstance(op, T.RandomGrayscale):
            found.append(op.p)
        found += _grays(op)
    return found


@pytest.mark.parametrize("name", ["simclr", "moco_v1", "moco_v2", "byol", "swav"])
def test_view_gray_sets_every_views_grayscale_probability(name):
    assert all(p == 0.2 for v in preset(name, 64).pipelines for p in _grays(v))  # the papers' value
    views = preset(name, 64, gray=1.0)
    assert all(_grays(v) == [1.0] for v in views.pipelines)
    torch.manual_seed(0)
    img = torch.rand(3, 64, 64)
    img[0] = 1.0  # strongly coloured: red everywhere
    for out in views(img):  # every view is colour-free: three equal channels
        assert torch.allclose(out[0], out[1]) and torch.allclose(out[1], out[2])


def _jitters(pipeline) -> list[T.ColorJitter]:
    found = []
    for op in getattr(pipeline, "transforms", []):
        found += [op] if isinstance(op, T.ColorJitter) else _jitters(op)
    return found


#: the papers' colour-jitter amplitudes (brightness, contrast, saturation, hue) of each preset's views
PAPER_JITTER = {"simclr": (0.8, 0.8, 0.8, 0.2), "moco_v1": (0.4, 0.4, 0.4, 0.4), "moco_v2": (0.4, 0.4, 0.4, 0.1),
                "byol": (0.4, 0.4, 0.2, 0.1), "swav": (0.8, 0.8, 0.8, 0.2)}


@pytest.mark.parametrize("name", sorted(PAPER_JITTER))
@pytest.mark.parametrize("s", [None, 0.5, 2.0])
def test_view_jitter_scales_every_views_jitter_amplitudes(name, s):
    found = [j for v in preset(name, 64, jitter=s).pipelines for j in _jitters(v)]
    assert len(found) == len(preset(name, 64).pipelines)  # one jitter per view
    b, c, sat, hue = ((s or 1.0) * a for a in PAPER_JITTER[name])
    hue = min(hue, 0.5)  # torchvision's limit
    for j in found:
        assert j.brightness == pytest.approx((max(0.0, 1 - b), 1 + b))  # torchvision clips the low end at 0
        assert j.contrast[1] == pytest.approx(1 + c) and j.saturation[1] == pytest.approx(1 + sat)
        assert j.hue == pytest.approx((-hue, hue))


@pytest.mark.parametrize("method", ["simclr", "moco_v2", "byol", "swav"])
def test_methods_views_take_the_view_options(method):
    """What the trainer sets (``view_options``) reaches every view, SwAV's own multi-crop views included."""
    from pretrain.registry import get_method

    m = get_method(method)("resnet18")  # the paper recipe: SwAV's 2 global + 6 local crops
    m.view_options = {"gray": 1.0, "jitter": 0.5}
    views = m.views(64)
    b = 0.5 * PAPER_JITTER[method][0]
    assert all(_grays(v) == [1.0] for v in views.pipelines)
    assert all(j.brightness == pytest.approx((1 - b, 1 + b)) for v in views.pipelines for j in _jitters(v))
    assert len(views.pipelines) == (8 if method == "swav" else 2)


def test_view_gray_refused_where_views_have_no_colour_step(tiny_imagefolder, tmp_path):
    from evalsuite.errors import UserError
    from pretrain import TrainConfig, Trainer
    from pretrain.registry import get_method

    with pytest.raises(UserError, match="no colour step; view gray"):
        preset("basic", 64, gray=1.0)
    with pytest.raises(UserError, match="no colour step; view jitter"):
        preset("exemplar", 64, jitter=0.5)
    assert get_method("simclr").has_colour_views() and get_method("swav").has_colour_views()
    assert not get_method("rotnet").has_colour_views() and not get_method("jigsaw").has_colour_views()
    cfg = dict(data_root=str(tiny_imagefolder), batch_size=8, image_size=32, epochs=1, max_steps_per_epoch=1,
               progress=False, view_gray=1.0)
    with pytest.raises(UserError, match="--view-gray: the views of rotnet have no colour-distortion step"):
        Trainer(TrainConfig(method="rotnet", out=str(tmp_path / "r.safetensors"), **cfg))
    with pytest.raises(UserError, match="--view-jitter: the views of jigsaw have no colour-distortion step"):
        Trainer(TrainConfig(method="jigsaw", out=str(tmp_path / "j.safetensors"), **{**cfg, "view_gray": None,
                                                                                    "view_jitter": 0.5}))
    with pytest.raises(UserError, match=r"--view-gray must be in \[0, 1\], got 2.0"):
        Trainer(TrainConfig(method="simclr", out=str(tmp_path / "x.safetensors"), **{**cfg, "view_gray": 2.0}))
    with pytest.raises(UserError, match=r"--view-jitter must be in \[0, 2\], got -1"):
        Trainer(TrainConfig(method="simclr", out=str(tmp_path / "x.safetensors"), **{**cfg, "view_jitter": -1}))
    from evalsuite.checkpoints import read_metadata

    out = tmp_path / "s.safetensors"
    Trainer(TrainConfig(method="simclr", out=str(out), hp={"proj_hidden": 32, "proj_dim": 16}, view_jitter=0.5,
                        **cfg)).fit()
    meta = read_metadata(out)
    assert meta["view_options"] == {"gray": 1.0, "jitter": 0.5}
    assert len(meta["augment"]["views"]) == 2
    assert all("RandomGrayscale(p=1.0)" in v for v in meta["augment"]["views"])


def _crops(pipeline) -> list[tuple[float, float]]:
    return [tuple(op.scale) for op in getattr(pipeline, "transforms", []) if isinstance(op, T.RandomResizedCrop)]


def test_view_scale_sets_the_global_crops_smallest_area():
    """``scale`` replaces the crop's lower bound of every two-view preset (MoCo's 0.2, SimCLR's 0.08 alike) and
    of the multi-crop presets' global crops; their local crops keep their own range."""
    assert [_crops(v) for v in preset("moco_v2", 32).pipelines] == [[(0.2, 1.0)]] * 2
    for name in ("simclr", "moco_v1", "moco_v2", "byol", "cifar_asymmetric"):
        assert [_crops(v) for v in preset(name, 32, scale=0.35).pipelines] == [[(0.35, 1.0)]] * 2, name
    swav = preset("swav", 32, scale=0.35).pipelines
    assert [_crops(v) for v in swav] == [[(0.35, 1.0)]] * 2 + [[(0.05, 0.14)]] * 6
    from pretrain.augment import dino_crops

    dino = dino_crops(32, n_local=2, scale=0.5).pipelines
    assert [_crops(v) for v in dino] == [[(0.5, 1.0)]] * 2 + [[(0.05, 0.4)]] * 2
    from evalsuite.errors import UserError

    # the basic crop + flip view (supervised, the pretext tasks) takes the crop's bound, not the colour options
    assert [_crops(v) for v in preset("basic", 32).pipelines] == [[(0.08, 1.0)]] * 2
    assert [_crops(v) for v in preset("basic", 32, n_views=1, scale=1.0).pipelines] == [[(1.0, 1.0)]]
    with pytest.raises(UserError, match="no colour step; view scale applies to .* and basic"):
        preset("exemplar", 32, scale=0.2)
    from pretrain.registry import get_method

    assert get_method("supervised").view_option_names() == get_method("rotnet").view_option_names() == ("scale",)
    assert get_method("simclr").view_option_names() == ("gray", "jitter", "blur", "scale")
    assert get_method("jigsaw").view_option_names() == ()


def test_view_scale_of_a_basic_view_method_reaches_its_views_and_is_refused_without_one(tiny_imagefolder, tmp_path):
    from evalsuite.errors import UserError
    from pretrain import TrainConfig, Trainer

    cfg = dict(data_root=str(tiny_imagefolder), batch_size=8, image_size=32, epochs=1, max_steps_per_epoch=1,
               progress=False, view_scale=1.0)
    tr = Trainer(TrainConfig(method="supervised", out=str(tmp_path / "s.safetensors"), **cfg))
    assert tr.method.view_options == {"scale": 1.0}
    assert [_crops(v) for v in tr.method.views(32).pipelines] == [[(1.0, 1.0)]]
    with pytest.raises(UserError, match="--view-scale: the views of jigsaw have no colour-distortion step and no "
                                        "basic crop"):
        Trainer(TrainConfig(method="jigsaw", out=str(tmp_path / "j.safetensors"), **cfg))


@pytest.mark.parametrize("method", ["simclr", "byol", "swav", "dino"])
def test_short_recipe_views_at_32px_have_no_blur(method):
    """The short recipe's small-image views (``SHORT_SMALL_VIEWS``) at 32 px and below, not at 64 px nor under the
    paper recipe; the pipelines carry them, SwAV's and DINO's own multi-crop views included."""
    from pretrain.base import SHORT_SMALL_PX, SHORT_SMALL_VIEWS
    from pretrain.registry import get_method

    assert SHORT_SMALL_PX == 32 and SHORT_SMALL_VIEWS == {"blur": 0.0}
    cls = get_method(method)
    short, paper = cls("resnet18", recipe="short"), cls("resnet18")
    assert short.recipe_view_options(32) == short.recipe_view_options(16) == {"blur": 0.0}
    assert short.recipe_view_options(33) == paper.recipe_view_options(32) == {}
    short.view_options = short.recipe_view_options(32)
    assert not any(_blurs(v) for v in short.views(32).pipelines)
    short.view_options = short.recipe_view_options(64)
    assert any(_blurs(v) for v in short.views(64).pipelines)
    assert get_method("rotnet")("resnet18", recipe="short").recipe_view_options(32) == {}


def test_trainer_records_the_recipe_views_and_flags_override_them(tiny_imagefolder, tmp_path):
    from evalsuite.checkpoints import read_metadata
    from pretrain import TrainConfig, Trainer

    cfg = dict(method="simclr", data_root=str(tiny_imagefolder), batch_size=8, image_size=32, epochs=1,
               max_steps_per_epoch=1, hp={"proj_hidden": 32, "proj_dim": 16}, progress=False, recipe="short")
    tr = Trainer(TrainConfig(out=str(tmp_path / "a.safetensors"), **cfg))
    assert tr.method.view_options == {"blur": 0.0} and not any(_blurs(v) for v in tr.views.pipelines)
    out = tmp_path / "b.safetensors"
    tr = Trainer(TrainConfig(out=str(out), view_blur=0.5, view_scale=0.35, **cfg))
    tr.fit()
    assert read_metadata(out)["view_options"] == {"blur": 0.5, "scale": 0.35}
    assert [_crops(v) for v in tr.views.pipelines] == [[(0.35, 1.0)]] * 2
    assert all(_blurs(v) for v in tr.views.pipelines)
