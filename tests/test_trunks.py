"""Trunks: tap shapes, the published Goyal et al. pooling dims, eval-mode BatchNorm."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision

from evalsuite.errors import UserError
from evalsuite.trunks import (
    build_trunk,
    describe_layout,
    goyal_grid,
    infer_arch,
    pool_features,
    pool_spec,
    resnet_layout,
    tap_shapes,
)


def test_resnet50_goyal_dims_match_the_benchmark() -> None:
    shapes = tap_shapes("resnet50", 224)
    assert shapes == {"conv1": (64, 112, 112), "res2": (256, 56, 56), "res3": (512, 28, 28),
                      "res4": (1024, 14, 14), "res5": (2048, 7, 7)}
    dims = {t: pool_spec("resnet50", t, c, h, "goyal").dim for t, (c, h, _) in shapes.items()}
    assert dims == {"conv1": 9216, "res2": 9216, "res3": 8192, "res4": 9216, "res5": 8192}


def test_goyal_pooling_equals_avgpool_by_hand() -> None:
    x = torch.randn(2, 256, 56, 56)
    spec = pool_spec("resnet50", "res2", 256, 56, "goyal")
    # res2: kernel 16, stride 8 -> 6x6 windows; check one window's mean by hand
    y = pool_features(x, spec).view(2, 256, 6, 6)
    assert torch.allclose(y[1, 3, 2, 4], x[1, 3, 16:32, 32:48].mean(), atol=1e-6)
    conv1 = pool_spec("resnet50", "conv1", 64, 112, "goyal")
    xc = torch.randn(1, 64, 112, 112)
    yc = pool_features(xc, conv1).view(1, 64, 12, 12)
    # padding 4 with count_include_pad: the first window covers rows/cols 0..5 plus 4 zero pads -> sum/100
    assert torch.allclose(yc[0, 5, 0, 0], xc[0, 5, :6, :6].sum() / 100, atol=1e-6)


def test_generic_pooling_targets_9k() -> None:
    assert goyal_grid(64, 56) == 12 and goyal_grid(512, 7) == 4 and goyal_grid(2048, 2) == 2
    spec = pool_spec("resnet18", "res5", 512, 7, "goyal")
    assert spec.out_shape == (512, 4, 4) and spec.dim == 8192
    x = torch.randn(3, 512, 7, 7)
    assert torch.allclose(pool_features(x, spec), F.adaptive_avg_pool2d(x, 4).flatten(1))
    assert pool_spec("resnet18", "res5", 512, 7, "avg").dim == 512


def test_taps_match_torchvision_forward() -> None:
    trunk = build_trunk("resnet18", seed=3).eval()
    ref = torchvision.models.resnet18(weights=None)
    ref.load_state_dict({**trunk.state_dict(), "fc.weight": ref.fc.weight, "fc.bias": ref.fc.bias})
    ref.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = trunk(x)
        h = ref.relu(ref.bn1(ref.conv1(x)))
        assert torch.allclose(out["conv1"], h)
        h = ref.layer4(ref.layer3(ref.layer2(ref.layer1(ref.maxpool(h)))))
        assert torch.allclose(out["res5"], h, atol=1e-5)
        assert set(trunk(x, ["res3"])) == {"res3"}


@pytest.mark.parametrize("arch,size", [("resnet50", 224), ("resnet18", 64), ("resnet18", 97), ("alexnet", 224),
                                       ("alexnet", 131)])
def test_analytic_tap_shapes_match_a_forward_pass(arch: str, size: int) -> None:
    trunk = build_trunk(arch, seed=0).eval()
    with torch.no_grad():
        out = trunk(torch.zeros(1, 3, size, size))
    assert tap_shapes(arch, size) == {k: tuple(v.shape[1:]) for k, v in out.items()}


def test_alexnet_taps() -> None:
    shapes = tap_shapes("alexnet", 224)
    assert list(shapes) == ["conv1", "conv2", "conv3", "conv4", "conv5"]
    assert shapes["conv1"] == (64, 55, 55) and shapes["conv5"] == (256, 13, 13)


def test_unknown_tap_and_arch() -> None:
    with pytest.raises(UserError, match="unknown layer"):
        build_trunk("resnet18", seed=0)(torch.zeros(1, 3, 32, 32), ["res6"])
    with pytest.raises(UserError, match="unknown architecture"):
        build_trunk("vgg11")


def test_train_mode_bn_would_change_features_but_extraction_uses_eval(tmp_path, tiny_imagefolder) -> None:
    from evalsuite.cache import FeatureCache
    from evalsuite.data import open_dataset
    from evalsuite.features import FeatureExtractor, Transform

    trunk = build_trunk("resnet18", seed=0)
    with torch.no_grad():
        for m in trunk.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    before = {k: v.clone() for k, v in trunk.state_dict().items()}
    ds = open_dataset("imagefolder", tiny_imagefolder / "imagefolder", "val")
    tf = Transform(size=32)
    x = torch.stack([tf(ds.load_image(i)) for i in range(8)])
    with torch.no_grad():
        eval_out = trunk.eval()(x, ["res5"])["res5"].mean(dim=(2, 3))
        train_out = trunk.train()(x, ["res5"])["res5"].mean(dim=(2, 3))
    trunk.load_state_dict(before)  # undo the running-stat update of the train-mode pass
    assert not torch.allclose(eval_out, train_out, atol=1e-3), "train-mode BN should differ"
    trunk.train()  # even if handed a trunk in train mode, extraction must use eval mode
    ext = FeatureExtractor(trunk, "t", "resnet18", cache=FeatureCache(tmp_path), precision="fp32",
                           batch_size=4, progress=False)
    feats = ext.features(ds, ["res5"], "avg", tf)["res5"]
    assert torch.allclose(torch.from_numpy(feats[:8]).float(), eval_out, atol=2e-3, rtol=1e-2)
    for k, v in trunk.state_dict().items():
        assert torch.equal(v, before[k]), f"extraction changed {k}"


@pytest.mark.parametrize("arch", ["resnet18", "resnet34", "resnet50", "resnet101", "alexnet"])
def test_infer_arch_from_torchvision_keys(arch: str) -> None:
    names = getattr(torchvision.models, arch)(weights=None).state_dict().keys()
    assert infer_arch(names) == arch


def test_infer_arch_reads_block_counts_and_block_type() -> None:
    r50 = set(torchvision.models.resnet50(weights=None).state_dict())
    assert resnet_layout(r50) == ((3, 4, 6, 3), "bottleneck")
    assert describe_layout(torchvision.models.resnet34(weights=None).state_dict()) == "blocks 3-4-6-3, basic"
    assert infer_arch(n for n in r50 if not n.startswith("layer4.")) == "resnet50"  # partial: stages present fit
    assert infer_arch(n for n in r50 if not n.startswith("layer3.")) is None  # resnet50 or resnet101
    odd = r50 | {"layer3.6.conv1.weight"}  # 7 res4 blocks: no supported architecture
    assert infer_arch(odd) is None
    assert infer_arch(["fc.weight", "conv1.weight"]) is None
