"""Small-image ResNets (resnet18/34/50_cifar): solo-learn's CIFAR stem on torchvision's ResNets, their taps and
Goyal pooling at 32 px, random:/own-format checkpoints, solo-learn's Lightning .ckpt layouts, pretraining by name."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from evalsuite.cache import FeatureCache
from evalsuite.checkpoints import load_checkpoint, read_metadata, save_checkpoint
from evalsuite.cli import main
from evalsuite.errors import BadCheckpoint
from evalsuite.features import FeatureExtractor, Transform
from evalsuite.trunks import ARCHS, RESNET_TAPS, build_trunk, infer_arch, pool_features, pool_spec, tap_shapes

CIFAR_ARCHS = ("resnet18_cifar", "resnet34_cifar", "resnet50_cifar")


def solo_learn_resnet(name: str, device: str = "cpu") -> nn.Module:
    """The backbone as solo-learn's main_linear.py builds it for cifar10/cifar100, written out independently
    (``device="meta"``: the layout without weights, for a state dict loaded with ``assign=True``)."""
    with torch.device(device):
        net = getattr(torchvision.models, name)(weights=None)
        net.fc = nn.Identity()
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=2, bias=False)
    net.maxpool = nn.Identity()
    return net


def solo_learn_load(net: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """main_linear.py's loading of a current checkpoint: 'backbone.' stripped from every key holding 'backbone'
    (momentum_backbone.conv1.weight becomes momentum_conv1.weight, ignored), the rest dropped, strict=False."""
    state = dict(state)
    for k in list(state.keys()):
        if "backbone" in k:
            state[k.replace("backbone.", "")] = state[k]
        del state[k]
    net.load_state_dict(state, strict=False)


def randomised(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """The same keys with random values (BN statistics included), so that a wrong mapping shows."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in state.items():
        if k.endswith("running_var"):
            out[k] = 0.5 + torch.rand(v.shape, generator=g)
        elif v.is_floating_point():
            out[k] = 0.1 * torch.randn(v.shape, generator=g)
        else:
            out[k] = v.clone()
    return out


def mlp(prefix: str, dims: tuple[int, int, int]) -> dict[str, torch.Tensor]:
    """solo-learn's projector / predictor keys: Linear, BatchNorm1d, ReLU, Linear (byol.py)."""
    d_in, hidden, d_out = dims
    head = nn.Sequential(nn.Linear(d_in, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, d_out))
    return {f"{prefix}.{k}": v for k, v in head.state_dict().items()}


def solo_learn_ckpt(trunk: dict[str, torch.Tensor], prefix: str = "backbone", features: int = 512) -> dict:
    """A Lightning checkpoint of solo-learn's BYOL: backbone, momentum backbone, projectors, predictor, online
    classifiers, and Lightning's own entries."""
    momentum = "momentum_encoder" if prefix == "encoder" else "momentum_backbone"
    state = {f"{prefix}.{k}": v for k, v in trunk.items()}
    state.update({f"{momentum}.{k}": torch.zeros_like(v) for k, v in trunk.items()})
    state.update(mlp("projector", (features, 16, 8)))
    state.update(mlp("momentum_projector", (features, 16, 8)))
    state.update(mlp("predictor", (8, 16, 8)))
    state.update({"classifier.weight": torch.zeros(10, features), "classifier.bias": torch.zeros(10),
                  "momentum_classifier.weight": torch.zeros(10, features), "momentum_classifier.bias": torch.zeros(10)})
    return {"epoch": 999, "global_step": 195000, "pytorch-lightning_version": "1.9.0", "state_dict": state,
            "loops": {}, "callbacks": {}, "optimizer_states": [], "lr_schedulers": []}


# solo-learn's run arguments in its three generations of names (args.json or hyper_parameters)
ARGS_OMEGACONF = {"method": "byol", "backbone": {"name": "resnet18", "kwargs": {}},
                  "data": {"dataset": "cifar10", "num_classes": 10}, "max_epochs": 1000}
ARGS_ARGPARSE = {"method": "byol", "backbone": "resnet18", "dataset": "cifar100",
                 "backbone_args": {"cifar": True}}
ARGS_ENCODER = {"method": "byol", "encoder": "resnet18", "dataset": "cifar10", "encoder_args": {"cifar": True}}


@pytest.fixture(scope="module")
def cifar18() -> dict[str, torch.Tensor]:
    return randomised(build_trunk("resnet18_cifar", seed=0).state_dict(), seed=1)


@pytest.fixture(scope="module")
def imagenet18() -> dict[str, torch.Tensor]:
    """An ImageNet-stem ResNet-18 state dict with random values (built once per module)."""
    return randomised(build_trunk("resnet18", seed=0).state_dict(), seed=5)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))


def test_archs_are_registered_and_listed(capsys) -> None:
    for arch in CIFAR_ARCHS:
        assert ARCHS[arch]["taps"] == RESNET_TAPS and ARCHS[arch]["family"] == "resnet"
    assert main(["list", "--archs"]) == 0
    out = capsys.readouterr().out
    for arch in CIFAR_ARCHS:
        assert f"  {arch} " in out and "taps: conv1, res2, res3, res4, res5" in out


@pytest.mark.parametrize("arch", CIFAR_ARCHS)
def test_trunk_is_solo_learns_cifar_resnet(arch: str, images) -> None:
    trunk = build_trunk(arch, seed=0).eval()
    base = arch.removesuffix("_cifar")
    assert (trunk.conv1.kernel_size, trunk.conv1.stride, trunk.conv1.padding) == ((3, 3), (1, 1), (2, 2))
    assert trunk.conv1.bias is None and isinstance(trunk.maxpool, nn.Identity)
    with torch.device("meta"):  # names only
        tv = {k for k in getattr(torchvision.models, base)(weights=None).state_dict() if not k.startswith("fc.")}
    assert set(trunk.state_dict()) == tv  # torchvision's names, so every format converts to them
    ref = solo_learn_resnet(base, device="meta").eval()
    ref.load_state_dict(trunk.state_dict(), assign=True)  # every tensor of the reference is the trunk's
    with torch.no_grad():
        out = trunk(images)
        assert torch.allclose(out["conv1"], ref.relu(ref.bn1(ref.conv1(images))))
        assert torch.allclose(out["res5"].mean(dim=(2, 3)), ref(images), atol=1e-5)  # avgpool + fc=Identity


# (C, H, W) per tap at 32 px, by hand: conv1 3x3 s1 p2 gives 32 + 4 - 3 + 1 = 34; no max-pool; each later stage
# halves with a 3x3 s2 p1 conv: 34 -> 17 -> 9 -> 5.
SHAPES_32 = {
    "resnet18_cifar": {"conv1": (64, 34, 34), "res2": (64, 34, 34), "res3": (128, 17, 17), "res4": (256, 9, 9),
                       "res5": (512, 5, 5)},
    "resnet50_cifar": {"conv1": (64, 34, 34), "res2": (256, 34, 34), "res3": (512, 17, 17),
                       "res4": (1024, 9, 9), "res5": (2048, 5, 5)},
}
# Goyal pooling at 32 px: the grid g (<= map side) whose C*g*g is closest to 9216, by hand
GRIDS_32 = {"resnet18_cifar": {"conv1": 12, "res2": 12, "res3": 8, "res4": 6, "res5": 4},
            "resnet50_cifar": {"conv1": 12, "res2": 6, "res3": 4, "res4": 3, "res5": 2}}


@pytest.mark.parametrize("arch", ["resnet18_cifar", "resnet50_cifar"])
def test_tap_shapes_and_goyal_dims_at_32px(arch: str, images) -> None:
    assert tap_shapes(arch, 32) == SHAPES_32[arch]
    with torch.device("meta"):  # the shapes of the real forward, without weights or arithmetic
        trunk = build_trunk(arch)
    with torch.no_grad():
        out = trunk.eval()(images[:1].to("meta"))
    assert {t: tuple(v.shape[1:]) for t, v in out.items()} == SHAPES_32[arch]
    for tap, (c, h, _) in SHAPES_32[arch].items():
        g = GRIDS_32[arch][tap]
        spec = pool_spec(arch, tap, c, h, "goyal")
        assert spec.op == f"adaptive_avg({g})" and spec.out_shape == (c, g, g)
        assert pool_features(out[tap], spec).shape == (1, c * g * g)
    dims = [pool_spec(arch, t, c, h, "goyal").dim for t, (c, h, _) in SHAPES_32[arch].items()]
    assert dims == [9216, 9216, 8192, 9216, 8192]
    assert tap_shapes("resnet34_cifar", 32) == SHAPES_32["resnet18_cifar"]
    assert tap_shapes(arch, 64)["res5"][1:] == (9, 9)  # 64 + 1 = 66 -> 33 -> 17 -> 9


def test_res5_adaptive_pooling_of_a_5x5_map() -> None:
    """5 -> 4 adaptive windows overlap: rows [0,2), [1,3), [2,4), [3,5) (floor(i*5/4) .. ceil((i+1)*5/4))."""
    spec = pool_spec("resnet18_cifar", "res5", 512, 5, "goyal")
    x = torch.arange(512 * 25.0).reshape(1, 512, 5, 5)
    y = pool_features(x, spec).reshape(512, 4, 4)
    bounds = [(0, 2), (1, 3), (2, 4), (3, 5)]
    for i, (r0, r1) in enumerate(bounds):
        for j, (c0, c1) in enumerate(bounds):
            assert torch.allclose(y[:, i, j], x[0, :, r0:r1, c0:c1].mean(dim=(1, 2)))


def test_random_checkpoint() -> None:
    ck = load_checkpoint("random:resnet18_cifar", seed=3)
    assert ck.arch == "resnet18_cifar" and ck.metadata["arch"] == "resnet18_cifar" and ck.format == "random"
    a, b = ck.build_trunk().state_dict(), load_checkpoint("random:resnet18_cifar", seed=3).build_trunk().state_dict()
    assert a["conv1.weight"].shape == (64, 3, 3, 3) and all(torch.equal(v, b[k]) for k, v in a.items())
    other = load_checkpoint("random:resnet18_cifar", seed=4).build_trunk().state_dict()
    assert not torch.equal(a["conv1.weight"], other["conv1.weight"])
    assert load_checkpoint("random:resnet18", seed=3).id != ck.id


def test_own_format_records_and_reads_back_the_arch(tmp_path: Path, cifar18) -> None:
    path = save_checkpoint(tmp_path / "c.safetensors", cifar18, {"method": "simclr", "arch": "resnet18_cifar"})
    assert read_metadata(path)["arch"] == "resnet18_cifar"
    ck = load_checkpoint(path)
    assert ck.arch == "resnet18_cifar" and all(torch.equal(ck.state_dict[k], v) for k, v in cifar18.items())


def test_plain_state_dict_arch_comes_from_conv1s_shape(tmp_path: Path, cifar18) -> None:
    torch.save(cifar18, tmp_path / "cifar.pth")
    assert load_checkpoint(tmp_path / "cifar.pth").arch == "resnet18_cifar"
    shapes = {k: tuple(v.shape) for k, v in cifar18.items()}
    assert infer_arch(shapes, shapes) == "resnet18_cifar" and infer_arch(shapes) == "resnet18"
    with torch.device("meta"):
        r50 = {k: tuple(v.shape) for k, v in build_trunk("resnet50_cifar").state_dict().items()}
    assert infer_arch(r50, r50) == "resnet50_cifar"
    with pytest.raises(BadCheckpoint, match="keys look like resnet18_cifar"):
        load_checkpoint(tmp_path / "cifar.pth", arch="resnet18")
    with torch.device("meta"):  # torchvision's ImageNet ResNet-18 names and shapes (the values do not matter)
        imagenet = torchvision.models.resnet18(weights=None).state_dict()
    torch.save({k: torch.zeros(v.shape, dtype=v.dtype) for k, v in imagenet.items()}, tmp_path / "imagenet.pth")
    with pytest.raises(BadCheckpoint, match="keys look like resnet18 "):
        load_checkpoint(tmp_path / "imagenet.pth", arch="resnet18_cifar")


def _features(ck, tiny_imagefolder: Path, cache: Path) -> dict[str, np.ndarray]:
    from evalsuite.data import Subset, open_dataset

    # 4 validation images of 4 classes (3 a class): enough to tell the images apart
    ds = Subset(open_dataset("imagefolder", tiny_imagefolder / "imagefolder", "val"), [0, 3, 6, 9])
    ext = FeatureExtractor(ck.build_trunk(), ck.id, ck.arch, cache=FeatureCache(cache), precision="fp32",
                           batch_size=8, progress=False)
    return ext.features(ds, list(RESNET_TAPS), "goyal", Transform(size=32))


def write_solo_learn_run(tmp_path: Path, trunk: dict, generation: str) -> tuple[Path, dict]:
    """A solo-learn run folder (the .ckpt and, unless the arguments are inside it, args.json) of one generation."""
    run = tmp_path / "byol-cifar10-abc123"
    run.mkdir()
    prefix = "encoder" if generation == "encoder_args_json" else "backbone"
    ckpt = solo_learn_ckpt(trunk, prefix)
    args = {"omegaconf_args_json": ARGS_OMEGACONF, "argparse_hyper_parameters": ARGS_ARGPARSE,
            "encoder_args_json": ARGS_ENCODER}[generation]
    if generation == "argparse_hyper_parameters":
        ckpt["hyper_parameters"] = args
    else:
        (run / "args.json").write_text(json.dumps(args))
    path = run / "byol-cifar10-abc123-ep=999.ckpt"
    torch.save(ckpt, path)
    return path, ckpt


@pytest.mark.parametrize("generation", ["omegaconf_args_json", "argparse_hyper_parameters", "encoder_args_json"])
def test_solo_learn_layouts_are_detected(tmp_path: Path, cifar18, generation: str) -> None:
    prefix = "encoder" if generation == "encoder_args_json" else "backbone"
    ck = load_checkpoint(write_solo_learn_run(tmp_path, cifar18, generation)[0])
    assert ck.format == "lightning" and ck.arch == "resnet18_cifar" and ck.report.missing == []
    assert ck.report.source == f"state_dict[{prefix}.]" and ck.method == "byol"
    dataset = "cifar100" if generation == "argparse_hyper_parameters" else "cifar10"
    where = "hyper_parameters" if generation == "argparse_hyper_parameters" else "args.json"
    assert ck.pretrain_data == dataset
    assert ck.metadata["solo_learn"] == {"args": where, "backbone": "resnet18", "dataset": dataset}
    assert ck.report.unexpected == []  # heads and momentum weights sit outside the backbone prefix: ignored
    for k, v in cifar18.items():  # the online backbone, not the (zero) momentum one
        assert torch.equal(ck.state_dict[k], v), k


def test_solo_learn_ckpt_gives_the_features_of_the_plain_weights(tmp_path: Path, cifar18, images,
                                                                 tiny_imagefolder) -> None:
    path, ckpt = write_solo_learn_run(tmp_path, cifar18, "omegaconf_args_json")
    ck = load_checkpoint(path)
    # the same weights loaded the plain way (our format) give the same features, tap by tap
    plain = load_checkpoint(save_checkpoint(tmp_path / "plain.safetensors", cifar18,
                                            {"method": "byol", "arch": "resnet18_cifar"}))
    ours, theirs = _features(plain, tiny_imagefolder, tmp_path / "c1"), _features(ck, tiny_imagefolder,
                                                                                  tmp_path / "c2")
    for tap in RESNET_TAPS:
        assert ours[tap].shape[1] == {"res3": 8192, "res5": 8192}.get(tap, 9216)
        np.testing.assert_array_equal(ours[tap], theirs[tap])
        assert np.ptp(ours[tap].astype(np.float32), axis=0).max() > 0  # features that differ between images

    # and solo-learn's own main_linear.py loading gives the same representation
    ref = solo_learn_resnet("resnet18").eval()
    solo_learn_load(ref, ckpt["state_dict"])
    with torch.no_grad():
        assert torch.allclose(ck.build_trunk()(images, ["res5"])["res5"].mean(dim=(2, 3)), ref(images), atol=1e-5)


def test_solo_learn_imagenet_run_is_the_plain_resnet(tmp_path: Path, imagenet18) -> None:
    torch.save(solo_learn_ckpt(imagenet18), tmp_path / "run.ckpt")
    (tmp_path / "args.json").write_text(json.dumps({**ARGS_OMEGACONF, "data": {"dataset": "imagenet100"}}))
    ck = load_checkpoint(tmp_path / "run.ckpt")
    assert ck.arch == "resnet18" and ck.pretrain_data == "imagenet100"


def test_solo_learn_args_contradicting_the_weights_are_refused(tmp_path: Path, imagenet18) -> None:
    torch.save(solo_learn_ckpt(imagenet18), tmp_path / "run.ckpt")  # a 7x7 conv1
    (tmp_path / "args.json").write_text(json.dumps(ARGS_OMEGACONF))  # says cifar10
    with pytest.raises(BadCheckpoint, match="metadata says arch resnet18_cifar but the keys look like resnet18"):
        load_checkpoint(tmp_path / "run.ckpt")


def test_solo_learn_ckpt_without_args_and_a_broken_args_json(tmp_path: Path, cifar18, capsys) -> None:
    torch.save(solo_learn_ckpt(cifar18), tmp_path / "run.ckpt")
    ck = load_checkpoint(tmp_path / "run.ckpt")  # the 3x3 conv1 alone says CIFAR
    assert ck.arch == "resnet18_cifar" and "solo_learn" not in ck.metadata and ck.method == "unknown"
    (tmp_path / "args.json").write_text("{not json")
    assert load_checkpoint(tmp_path / "run.ckpt").arch == "resnet18_cifar"
    assert "ignoring" in capsys.readouterr().err
    (tmp_path / "args.json").write_text(json.dumps({"backbone": "resnet50", "dataset": "cifar10"}))  # no method
    assert "solo_learn" not in load_checkpoint(tmp_path / "run.ckpt").metadata  # another project's args.json


def test_inspect_shows_the_solo_learn_checkpoint(tmp_path: Path, cifar18, capsys) -> None:
    torch.save(solo_learn_ckpt(cifar18), tmp_path / "run.ckpt")
    (tmp_path / "args.json").write_text(json.dumps(ARGS_OMEGACONF))
    assert main(["inspect", str(tmp_path / "run.ckpt")]) == 0
    out = capsys.readouterr().out
    assert "format:     lightning" in out and "arch:       resnet18_cifar" in out
    assert "weights at: state_dict[backbone.]" in out
    assert '"solo_learn": {"args": "args.json", "backbone": "resnet18", "dataset": "cifar10"}' in out


def test_pretrain_builds_the_cifar_trunk_by_name(tiny_imagefolder: Path, tmp_path: Path) -> None:
    from pretrain import TrainConfig, train

    cfg = TrainConfig(method="simclr", arch="resnet18_cifar", data_root=str(tiny_imagefolder),
                      out=str(tmp_path / "s.safetensors"), batch_size=4, image_size=16, epochs=1,
                      max_steps_per_epoch=1, hp={"proj_hidden": 16, "proj_dim": 8}, progress=False)
    ck = load_checkpoint(train(cfg))
    assert ck.arch == "resnet18_cifar" and ck.metadata["arch"] == "resnet18_cifar" and ck.report.missing == []
    assert ck.state_dict["conv1.weight"].shape == (64, 3, 3, 3)


def test_quarter_width_trunk(tmp_path: Path, images) -> None:
    """resnet18_cifar_w16: resnet18_cifar's layout at 16-16-32-64-128 channels, torchvision's key names, told apart
    from the full width by conv1's output channels; goyal keeps res5's whole 5 x 5 grid (3200 dims: no grid of a
    5 x 5 map comes closer to 9216)."""
    arch = "resnet18_cifar_w16"
    widths = (16, 16, 32, 64, 128)
    assert tap_shapes(arch, 32) == {t: (w, *SHAPES_32["resnet18_cifar"][t][1:])
                                    for t, w in zip(SHAPES_32["resnet18_cifar"], widths)}
    trunk = build_trunk(arch, seed=0).eval()
    with torch.no_grad():
        out = trunk(images[:2])
    assert {t: tuple(v.shape[1:]) for t, v in out.items()} == tap_shapes(arch, 32)
    state = trunk.state_dict()
    assert set(state) == set(build_trunk("resnet18_cifar").state_dict())  # same names, narrower tensors
    assert state["layer4.1.conv2.weight"].shape == (128, 128, 3, 3) and state["conv1.weight"].shape == (16, 3, 3, 3)
    assert state["layer2.0.downsample.0.weight"].shape == (32, 16, 1, 1)
    # torchvision's init: kaiming-normal fan-out (std sqrt(2 / (out * k * k))), unit BN
    w = state["layer3.0.conv1.weight"]
    assert abs(float(w.std()) - (2 / (64 * 9)) ** 0.5) < 0.1 * (2 / (64 * 9)) ** 0.5
    assert torch.equal(state["bn1.weight"], torch.ones(16))
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    assert infer_arch(shapes, shapes) == arch
    spec = pool_spec(arch, "res5", 128, 5, "goyal")
    assert spec.op == "adaptive_avg(5)" and spec.dim == 128 * 25
    torch.save(state, tmp_path / "w16.pth")
    ck = load_checkpoint(tmp_path / "w16.pth")
    assert ck.arch == arch and ck.report.missing == []
