"""RegNetY trunks (torchvision's), their taps and pooling, torchvision and VISSL / ClassyVision RegNet checkpoints, and
SwAV's ``seer`` recipe.

The ClassyVision RegNet below is transcribed from facebookresearch/ClassyVision@08a82e8
(classy_vision/models/anynet.py, regnet.py, squeeze_and_excitation_layer.py) and wrapped as VISSL's RegNet trunk
does (facebookresearch/vissl@09270ed vissl/models/trunks/regnet.py: ``_feature_blocks`` = conv1 (the stem),
res2..res5 (trunk_output.block1..4)); the recipe's values are transcribed from the VISSL configs named at each.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from evalsuite.checkpoints import load_checkpoint
from evalsuite.errors import BadCheckpoint
from evalsuite.trunks import (
    ARCHS,
    REGNET_STAGES,
    build_trunk,
    is_regnet_key,
    pool_features,
    pool_spec,
    tap_shapes,
)

TAPS = ("conv1", "res2", "res3", "res4", "res5")


# ---------------------------------------------------------------- ClassyVision's RegNetY, as VISSL saves it


def classy_stages(depth: int, w_0: int, w_a: float, w_m: float, group_width: int) -> tuple[list, list, list]:
    """ClassyVision RegNetParams.get_expanded_params (bottleneck multiplier 1): stage widths, depths, group widths."""
    widths_cont = np.arange(depth) * w_a + w_0
    capacity = np.round(np.log(widths_cont / w_0) / np.log(w_m))
    block_widths = (np.round(np.divide(w_0 * np.power(w_m, capacity), 8)) * 8).astype(int).tolist()
    splits = [w != wp for w, wp in zip(block_widths + [0], [0] + block_widths)]
    widths = [w for w, t in zip(block_widths, splits[:-1]) if t]
    depths = np.diff([d for d, t in enumerate(splits) if t]).tolist()
    groups = [min(group_width, w) for w in widths]
    widths = [int(round(w / g) * g) for w, g in zip(widths, groups)]  # _quantize_float
    return widths, depths, groups


class ClassySE(nn.Module):
    def __init__(self, planes: int, reduced: int):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.excitation = nn.Sequential(nn.Conv2d(planes, reduced, 1, bias=True), nn.ReLU(),
                                        nn.Conv2d(reduced, planes, 1, bias=True), nn.Sigmoid())

    def forward(self, x):
        return x * self.excitation(self.avgpool(x))


class ClassyBlock(nn.Module):
    """ResBottleneckBlock: x (or bn(proj(x))) + f(x), f = a (1x1), b (3x3 grouped, stride), se, c (1x1), final_bn."""

    def __init__(self, w_in: int, w_out: int, stride: int, group_width: int):
        super().__init__()
        self.proj_block = w_in != w_out or stride != 1
        if self.proj_block:
            self.proj = nn.Conv2d(w_in, w_out, 1, stride=stride, bias=False)
            self.bn = nn.BatchNorm2d(w_out)
        f = nn.Sequential()
        f.a = nn.Sequential(nn.Conv2d(w_in, w_out, 1, bias=False), nn.BatchNorm2d(w_out), nn.ReLU())
        f.b = nn.Sequential(nn.Conv2d(w_out, w_out, 3, stride=stride, padding=1, groups=w_out // group_width,
                                      bias=False), nn.BatchNorm2d(w_out), nn.ReLU())
        f.se = ClassySE(w_out, int(round(0.25 * w_in)))
        f.c = nn.Conv2d(w_out, w_out, 1, bias=False)
        f.final_bn = nn.BatchNorm2d(w_out)
        self.f = f

    def forward(self, x):
        return F.relu((self.bn(self.proj(x)) if self.proj_block else x) + self.f(x))


class ClassyStem(nn.Sequential):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU())


class VisslRegNet(nn.Module):
    def __init__(self, widths, depths, groups):
        super().__init__()
        blocks, w_in = [("conv1", ClassyStem())], 32
        for s, (w, d, g) in enumerate(zip(widths, depths, groups), start=1):
            stage = nn.Sequential()
            for i in range(d):
                stage.add_module(f"block{s}-{i}", ClassyBlock(w_in if i == 0 else w, w, 2 if i == 0 else 1, g))
            blocks.append((f"res{s + 1}", stage))
            w_in = w
        self._feature_blocks = nn.ModuleDict(blocks)

    def forward(self, x):
        out = {}
        for name, block in self._feature_blocks.items():
            x = out[name] = block(x)
        return out


def randomize(module: nn.Module, seed: int) -> nn.Module:
    """Random weights and BN statistics, so that a BN or conv loaded into the wrong place changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if not t.is_floating_point():
                continue
            if t.ndim > 1:  # conv / linear weights, He-scaled so that activations stay O(1) through the depth
                t.copy_(torch.randn(t.shape, generator=g) * (2 / t[0].numel()) ** 0.5)
            elif name.endswith(("weight", "running_var")):  # BN scales and variances
                t.copy_(torch.rand(t.shape, generator=g) * 0.5 + 0.75)
            else:  # biases and means
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)
    return module.eval()


def vissl_file(path, model: nn.Module) -> None:
    """A VISSL checkpoint: classy_state_dict.base_model.model.{trunk, heads} (SwAV head and prototypes)."""
    heads = {"0.projection_head.0.weight": torch.randn(8, 440), "0.prototypes0.weight": torch.randn(5, 8)}
    torch.save({"phase_idx": 0, "classy_state_dict": {"base_model": {"model": {"trunk": model.state_dict(),
                                                                              "heads": heads}}}}, path)


# ---------------------------------------------------------------- archs, taps, pooling


def test_regnet_stages_are_torchvisions():
    for arch, (depths, widths) in REGNET_STAGES.items():
        net = getattr(torchvision.models, arch)
        with torch.device("meta"):
            trunk = build_trunk(arch)
        shapes = {k: tuple(v.shape) for k, v in trunk.state_dict().items()}
        assert ARCHS[arch]["channels"] == (32, *widths) and ARCHS[arch]["family"] == "regnet"
        assert all(is_regnet_key(k) for k in shapes)  # the pattern that finds RegNet weights in a file
        for s, (d, w) in enumerate(zip(depths, widths), start=1):
            assert f"trunk_output.block{s}.block{s}-{d - 1}.f.c.0.weight" in shapes
            assert f"trunk_output.block{s}.block{s}-{d}.f.c.0.weight" not in shapes
            assert shapes[f"trunk_output.block{s}.block{s}-0.f.c.0.weight"][0] == w
        if arch == "regnet_y_400mf":  # the whole state dict, built by torchvision itself (minus its classifier)
            ref = {k: tuple(v.shape) for k, v in net().state_dict().items() if not k.startswith("fc.")}
            assert shapes == ref


def test_regnet_y_400mf_taps_at_64px():
    # by hand: stem 3x3 stride 2 (pad 1) 64 -> 32, then every stage's first block halves it: 16, 8, 4, 2;
    # channels: stem 32, stage widths 48, 104, 208, 440 (torchvision's regnet_y_400mf)
    expected = {"conv1": (32, 32, 32), "res2": (48, 16, 16), "res3": (104, 8, 8), "res4": (208, 4, 4),
                "res5": (440, 2, 2)}
    assert tap_shapes("regnet_y_400mf", 64) == expected
    trunk = build_trunk("regnet_y_400mf", seed=0).eval()
    with torch.no_grad():
        out = trunk(torch.randn(2, 3, 64, 64))
    assert {k: tuple(v.shape[1:]) for k, v in out.items()} == expected
    assert list(trunk(torch.randn(1, 3, 64, 64), ["res3"])) == ["res3"]
    # the taps are the stem's and the stages' outputs, as torchvision's forward computes them
    tv = torchvision.models.regnet_y_400mf().eval()
    tv.load_state_dict({**trunk.state_dict(), "fc.weight": tv.fc.weight, "fc.bias": tv.fc.bias})
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(trunk(x)["res5"], tv.trunk_output(tv.stem(x.clone())))


def test_regnet_goyal_pooling_to_about_9k_dims():
    # C x g x g closest to 9216 with g <= the map's side, by hand at 64 px:
    # conv1 32 x 17^2 = 9248, res2 48 x 14^2 = 9408, res3 104 x 8^2 (9 > 8) = 6656, res4 208 x 4^2, res5 440 x 2^2
    expected = {"conv1": (32, 17), "res2": (48, 14), "res3": (104, 8), "res4": (208, 4), "res5": (440, 2)}
    x = {t: torch.randn(2, c, h, w) for t, (c, h, w) in tap_shapes("regnet_y_400mf", 64).items()}
    for tap, (c, g) in expected.items():
        spec = pool_spec("regnet_y_400mf", tap, c, x[tap].shape[-1], "goyal")
        assert (spec.op, spec.dim) == (f"adaptive_avg({g})", c * g * g)
        pooled = pool_features(x[tap], spec)
        assert pooled.shape == (2, c * g * g)
        torch.testing.assert_close(pooled, F.adaptive_avg_pool2d(x[tap], g).flatten(1))
    # 224 px: the same spatial sizes as a ResNet-50's taps, but ResNet-50's published kernels are not used
    spec = pool_spec("regnet_y_128gf", "res4", 2904, 14, "goyal")
    assert (spec.op, spec.dim) == ("adaptive_avg(2)", 2904 * 4)
    assert pool_spec("regnet_y_400mf", "res5", 440, 7, "avg").dim == 440


def test_random_regnet_and_the_arch_list(capsys):
    from evalsuite.cli import main

    ck = load_checkpoint("random:regnet_y_400mf", seed=3)
    assert (ck.arch, ck.format, ck.metadata["arch"]) == ("regnet_y_400mf", "random", "regnet_y_400mf")
    a, b = ck.build_trunk().state_dict(), load_checkpoint("random:regnet_y_400mf", seed=3).build_trunk().state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], v) for k, v in b.items())
    assert main(["list", "--archs"]) == 0
    out = capsys.readouterr().out
    for arch in REGNET_STAGES:
        assert f"  {arch} " in out


# ---------------------------------------------------------------- checkpoints


def test_torchvision_regnet_state_dict_loads_with_identical_features(tmp_path):
    tv = randomize(torchvision.models.regnet_y_400mf(), seed=1)
    path = tmp_path / "regnet_y_400mf.pth"
    torch.save(tv.state_dict(), path)
    ck = load_checkpoint(path)
    assert (ck.arch, ck.format) == ("regnet_y_400mf", "torchvision")
    assert sorted(ck.report.unexpected) == ["fc.bias", "fc.weight"] and not ck.report.missing
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = ck.build_trunk()(x)
        torch.testing.assert_close(out["conv1"], tv.stem(x))
        torch.testing.assert_close(out["res5"], tv.trunk_output(tv.stem(x)))


def test_vissl_classy_regnet_loads_with_the_classy_models_features(tmp_path, capsys):
    widths, depths, groups = classy_stages(16, 48, 27.89, 2.09, 8)  # ClassyVision's regnet_y_400mf
    assert (widths, depths) == ([48, 104, 208, 440], [1, 3, 6, 6])
    model = randomize(VisslRegNet(widths, depths, groups), seed=2)
    keys = set(model.state_dict())
    # the released SEER files' names (as timm's regnet.py _filter_fn reads them)
    assert {"_feature_blocks.conv1.stem.0.weight", "_feature_blocks.res2.block1-0.proj.weight",
            "_feature_blocks.res2.block1-0.bn.running_var", "_feature_blocks.res5.block4-5.f.se.excitation.2.bias",
            "_feature_blocks.res3.block2-0.f.final_bn.weight", "_feature_blocks.res4.block3-1.f.c.weight"} <= keys
    path = tmp_path / "model_final_checkpoint_phase0.torch"
    vissl_file(path, model)
    ck = load_checkpoint(path)
    assert (ck.arch, ck.format) == ("regnet_y_400mf", "vissl")
    assert ck.report.source == "classy_state_dict.base_model.model.trunk[_feature_blocks.]"
    assert not ck.report.missing and not ck.report.unexpected
    assert "ClassyVision RegNet" in ck.metadata["converted_from"]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ours, ref = ck.build_trunk()(x), model(x)
    for tap in TAPS:
        torch.testing.assert_close(ours[tap], ref[tap])
    # the same weights in torchvision's layout, loaded the plain way, give the same features
    plain = tmp_path / "plain.pth"
    torch.save(ck.state_dict, plain)
    with torch.no_grad():
        torch.testing.assert_close(load_checkpoint(plain).build_trunk()(x)["res5"], ref["res5"])
    from evalsuite.cli import main

    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "format:     vissl" in out and "arch:       regnet_y_400mf" in out and "converted_from" in out


def test_classy_regnets_torchvision_lacks_are_refused_in_one_line(tmp_path):
    # ClassyVision rounds regnet_y_800mf's widths with round(), torchvision with _make_divisible: they differ
    widths, depths, groups = classy_stages(14, 56, 38.84, 2.4, 16)
    assert (widths, depths) == ([64, 128, 320, 768], [1, 3, 8, 2])
    assert ARCHS["regnet_y_800mf"]["channels"][1:] == (64, 144, 320, 784)
    path = tmp_path / "classy_800mf.torch"
    vissl_file(path, VisslRegNet(widths, depths, groups))
    for arch in (None, "regnet_y_800mf"):
        with pytest.raises(BadCheckpoint, match=r"depths 1-3-8-2, widths 64-128-320-768: this is ClassyVision's "
                                                r"regnet_y_800mf \(torchvision's: widths 64-144-320-784\)") as e:
            load_checkpoint(path, arch=arch)
        assert "\n" not in str(e.value)
    # and ClassyVision's regnet_y_8gf (168-448-896-2016 against torchvision's 224-448-896-2016)
    assert classy_stages(17, 192, 76.82, 2.19, 56)[0] == [168, 448, 896, 2016]


def test_a_partial_regnet_keeps_the_stage_rule(tmp_path):
    tv = torchvision.models.regnet_y_400mf()
    state = {k: v for k, v in tv.state_dict().items() if not k.startswith("trunk_output.block4.")}
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(BadCheckpoint, match="keys are missing"):
        load_checkpoint(tmp_path / "partial.pth")
    ck = load_checkpoint(tmp_path / "partial.pth", allow_partial=True)
    assert ck.arch == "regnet_y_400mf" and ck.partial and ck.report.missing[0].startswith("trunk_output.block4.")


# ---------------------------------------------------------------- SwAV's seer recipe


# VISSL (facebookresearch/vissl@09270ed): configs/config/pretrain/seer/models/regnet10B.yaml swav_loss num_iters 10,
# epsilon 0.03, num_prototypes [16000], OPTIMIZER weight_decay 0.00001, base_value 0.3; heads/
# d7392_d8192_d8192_d256_proto16k.yaml dims [7392, 8192, 8192, 256], use_bn False; transforms/
# multicrop_6crop_2x224_4x96.yaml num_crops [2, 4]; swav_8node_resnet.yaml temperature 0.1, queue_length 0,
# prototypes0 frozen 313 iterations, use_larc True, clip False, trust_coefficient 0.001, momentum 0.9,
# regularize_bn True, regularize_bias True, base_lr_batch_size 256. projects/SEER/MODEL_DOCUMENTATION.md: batch 8192,
# 1 epoch; MODEL_ZOO.md file names: warmup8k.
SEER_HP = {"proj_hidden": 8192, "proj_layers": 3, "proj_dim": 256, "proj_bn": False, "n_prototypes": 16000,
           "temperature": 0.1, "epsilon": 0.03, "sinkhorn_iters": 10, "n_local": 4, "freeze_prototypes_steps": 313,
           "queue_length": 0}
SEER_OPTIM = {"optimizer": "lars", "lr": 0.3, "base_batch_size": 256, "weight_decay": 1e-5, "momentum": 0.9,
              "lars_eta": 0.001, "lars_clip": False, "lars_trust": "solo", "exclude_bias_norm": False}


def test_seer_recipe_is_vissls_config():
    from pretrain.registry import get_method

    swav = get_method("swav")
    hp = swav.resolve_hp({}, "seer")
    assert {k: hp[k] for k in SEER_HP} == SEER_HP
    optim = swav.optim_defaults("seer")
    assert {k: optim[k] for k in SEER_OPTIM} == SEER_OPTIM
    assert optim["warmup_epochs"] == pytest.approx(8000 / (1e9 / 8192))  # 8k of the ~122k steps of one epoch
    assert swav.recipe_overrides("seer")["train"] == {"arch": "regnet_y_128gf", "batch_size": 16, "epochs": 1,
                                                      "image_size": 224}
    assert swav.resolve_hp({}) == swav.defaults and swav.defaults["proj_layers"] == 2
    # the head: Linear-ReLU-Linear-ReLU-Linear with biases, no BN (VISSL SwAVPrototypesHead, use_bn False)
    m = swav("regnet_y_400mf", hp=swav.resolve_hp({"proj_hidden": 16, "n_prototypes": 10}, "seer"), recipe="seer")
    assert [type(x).__name__ for x in m.projector] == ["Linear", "ReLU", "Linear", "ReLU", "Linear"]
    assert [tuple(x.weight.shape) for x in m.projector if isinstance(x, nn.Linear)] == [(16, 440), (16, 16), (256, 16)]
    assert all(x.bias is not None for x in m.projector if isinstance(x, nn.Linear))
    assert m.views(224).name == "multicrop(2x224+4x96)"


def test_one_swav_step_on_regnet_with_the_seer_recipe(tiny_imagefolder, tmp_path):
    from evalsuite.checkpoints import read_metadata
    from pretrain import TrainConfig, Trainer

    out = tmp_path / "seer.safetensors"
    # the recipe with a narrow head (the step, not the width, is under test)
    cfg = TrainConfig(method="swav", arch="regnet_y_400mf", recipe="seer", data_root=str(tiny_imagefolder),
                      out=str(out), batch_size=4, image_size=32, epochs=1, max_steps_per_epoch=1,
                      hp={"proj_hidden": 32, "n_prototypes": 20}, progress=False)
    tr = Trainer(cfg)
    before = {k: v.clone() for k, v in tr.method.trunk.state_dict().items()}
    tr.fit()
    assert len(tr.losses) == 1 and np.isfinite(tr.losses[0])
    after = tr.method.trunk.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if k.endswith("weight"))
    meta = read_metadata(out)
    assert meta["arch"] == "regnet_y_400mf" and meta["recipe"] == "seer"
    hp = meta["hyperparameters"]
    assert (hp["epsilon"], hp["sinkhorn_iters"], hp["n_local"], hp["proj_layers"], hp["proj_bn"]) == (
        0.03, 10, 4, 3, False)
    opt = meta["optimizer"]
    assert (opt["optimizer"], opt["lars_trust"], opt["lars_clip"], opt["exclude_bias_norm"]) == (
        "lars", "solo", False, False)
    assert opt["lr"] == pytest.approx(0.3 * 4 / 256) and opt["weight_decay"] == 1e-5
    assert meta["augment"]["preset"] == "multicrop(2x32+4x14)"
    assert load_checkpoint(out).arch == "regnet_y_400mf"


def test_surface_normals_and_other_methods_refuse_what_they_cannot_do():
    from evalsuite.errors import NotApplicable, UserError
    from pretrain.registry import get_method
    from tasks.surface_normals.dense_heads import FrozenTrunkDenseModel

    # a RegNet has the ResNets' tap names but no layer3/layer4 to dilate: refused (skipped under --tasks all)
    with pytest.raises(NotApplicable, match="ResNet or ViT trunk"):
        FrozenTrunkDenseModel(build_trunk("regnet_y_400mf", seed=0), "res3", num_outputs=3)
    with pytest.raises(UserError, match="'simclr' has no seer recipe"):
        get_method("simclr").recipe_overrides("seer")
