"""Trunks: tap shapes, the published Goyal et al. pooling dims, eval-mode BatchNorm."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision

from evalsuite.errors import UserError
from evalsuite.trunks import (
    PoolSpec,
    build_trunk,
    describe_layout,
    goyal_grid,
    infer_arch,
    pool_features,
    pool_spec,
    published_comparability,
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
    assert spec.op == "avg_pool(k=16,s=8,p=0)" == pool_spec("resnet50", "res2", 256, 56, "vissl").op


def test_padded_average_by_hand() -> None:
    """A 4x4 map, kernel 3, stride 1, padding 1: fair_ssb's Caffe2 AveragePool divides by the cells inside the
    map, VISSL's nn.AvgPool2d by 9."""
    x = torch.arange(16.0).view(1, 1, 4, 4)  # rows 0-3, 4-7, 8-11, 12-15
    excluded = pool_features(x, PoolSpec("t", "goyal", "avg_pool(k=3,s=1,p=1,pad=excluded)", (1, 4, 4)))
    counted = pool_features(x, PoolSpec("t", "vissl", "avg_pool(k=3,s=1,p=1,pad=counted)", (1, 4, 4)))
    excluded, counted = excluded.view(4, 4), counted.view(4, 4)
    # corner (0,0): 0+1+4+5 = 10 over 4 cells; edge (0,1): 0+1+2+4+5+6 = 18 over 6; inner (1,1): 45 over 9;
    # corner (3,3): 10+11+14+15 = 50 over 4
    assert excluded[0, 0] == 10 / 4 and excluded[0, 1] == 18 / 6 and excluded[1, 1] == 45 / 9
    assert excluded[3, 3] == 50 / 4
    assert torch.allclose(counted[0, 0], torch.tensor(10 / 9)) and counted[0, 1] == 18 / 9
    assert counted[1, 1] == 45 / 9 and torch.allclose(counted[3, 3], torch.tensor(50 / 9))


def test_conv1_padding_goyal19_leaves_out_vissl_counts() -> None:
    """ResNet-50 conv1 (kernel 10, stride 10, padding 4 on 112x112): the first window covers rows/cols 0..5 of
    the map and 4 rows/cols of padding."""
    goyal = pool_spec("resnet50", "conv1", 64, 112, "goyal")
    vissl = pool_spec("resnet50", "conv1", 64, 112, "vissl")
    assert goyal.op == "avg_pool(k=10,s=10,p=4,pad=excluded)" and vissl.op == "avg_pool(k=10,s=10,p=4,pad=counted)"
    assert goyal.out_shape == vissl.out_shape == (64, 12, 12)
    xc = torch.rand(1, 64, 112, 112)
    yg, yv = pool_features(xc, goyal).view(1, 64, 12, 12), pool_features(xc, vissl).view(1, 64, 12, 12)
    assert torch.allclose(yg[0, 5, 0, 0], xc[0, 5, :6, :6].sum() / 36, atol=1e-6)
    assert torch.allclose(yv[0, 5, 0, 0], xc[0, 5, :6, :6].sum() / 100, atol=1e-6)
    assert torch.allclose(yg[0, 5, 0, 1], xc[0, 5, :6, 6:16].sum() / 60, atol=1e-6)
    assert torch.allclose(yg[0, 5, 3, 3], yv[0, 5, 3, 3])  # an inner window has no padding


def test_alexnet_records_are_marked_not_comparable() -> None:
    flags = published_comparability("alexnet")
    assert flags["comparable_to_published"] is False and "CaffeNet" in flags["not_comparable_reason"]
    assert published_comparability("resnet50") == {} == published_comparability("resnet18")


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
