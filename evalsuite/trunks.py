"""Trunks with named taps, and the per-tap pooling of the Goyal et al. benchmark.

A trunk's ``state_dict()`` keys are exactly torchvision's (minus the classifier),
so every checkpoint format is converted to torchvision names once, in
``evalsuite.checkpoints``. ``Trunk.forward(x, taps)`` returns the requested
activations in one pass and stops after the deepest one.

Pooling (``pool_features``):
- ``goyal``: average pooling to ~9k dims per tap. For ResNet-50 at 224x224 this is
  the published table (conv1 9216, res2 9216, res3 8192, res4 9216, res5 8192) with
  fair_self_supervision_benchmark's Caffe2 AveragePool, whose average leaves the
  padding out (only conv1 is padded). Other arch/resolution pairs use adaptive
  average pooling to the grid whose C x g x g is closest to 9216.
- ``vissl``: the same kernels as VISSL's ``LINEAR_EVAL_FEAT_POOL_OPS_MAP`` runs them,
  ``nn.AvgPool2d`` counting the padding in the average.
- ``avg``: global average pooling (C dims), the usual kNN/linear representation.
- ``none``: the flattened map.

RegNetYs (``regnet_y_400mf`` .. ``regnet_y_128gf``, family ``regnet``) are torchvision's; their taps take the names
VISSL gives a RegNet's feature blocks (vissl/models/trunks/regnet.py): ``conv1`` the stem (3x3 stride-2 conv, BN,
ReLU), ``res2`` .. ``res5`` the four stages (``trunk_output.block1`` .. ``block4``). ``goyal`` pools them
adaptively like every arch other than ResNet-50 at 224 px.

Small-image ResNets (``resnet18_cifar``, ``resnet34_cifar``, ``resnet50_cifar``) are torchvision's with
solo-learn's CIFAR stem (:data:`CIFAR_CONV1`, no max-pool); their taps keep the ResNet names, and ``goyal`` pools
them adaptively like every other arch/resolution pair. ``resnet18_cifar_w16`` is the same at a quarter of the width
(16 channels after the stem, doubling per stage), torchvision's key names and init: a trunk that sees tens of
epochs of a small image set in minutes of CPU time.

Vision Transformers (family ``vit``: taps, token pooling, ``timm:<name>``) live in :mod:`evalsuite.vit`.

torchvision's AlexNet is not the benchmark's CaffeNet (other channels, padding, no LRN
or groups, 224 not 227 px), so AlexNet numbers are recorded as not comparable with the
published tables (:func:`published_comparability`).
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models.regnet import BlockParams, RegNet

from . import vit
from .errors import UserError
from .protocols import POOLINGS

RESNET_TAPS = ("conv1", "res2", "res3", "res4", "res5")
ALEXNET_TAPS = ("conv1", "conv2", "conv3", "conv4", "conv5")

# ResNets: "blocks" = residual blocks in layer1..layer4, "block" = torchvision's BasicBlock or Bottleneck;
# "stem": "cifar" = the small-image stem (CIFAR_CONV1, no max-pool) on torchvision's "base" ResNet.
ARCHS: dict[str, dict] = {
    "resnet18": {"family": "resnet", "taps": RESNET_TAPS, "channels": (64, 64, 128, 256, 512),
                 "blocks": (2, 2, 2, 2), "block": "basic"},
    "resnet34": {"family": "resnet", "taps": RESNET_TAPS, "channels": (64, 64, 128, 256, 512),
                 "blocks": (3, 4, 6, 3), "block": "basic"},
    "resnet50": {"family": "resnet", "taps": RESNET_TAPS, "channels": (64, 256, 512, 1024, 2048),
                 "blocks": (3, 4, 6, 3), "block": "bottleneck"},
    "resnet101": {"family": "resnet", "taps": RESNET_TAPS, "channels": (64, 256, 512, 1024, 2048),
                  "blocks": (3, 4, 23, 3), "block": "bottleneck"},
    "resnet18_cifar": {"family": "resnet", "taps": RESNET_TAPS, "channels": (64, 64, 128, 256, 512),
                       "blocks": (2, 2, 2, 2), "block": "basic", "stem": "cifar", "base": "resnet18"},
    "resnet34_cifar": {"family": "resnet", "taps": RESNET_TAPS, "channels": (64, 64, 128, 256, 512),
                       "blocks": (3, 4, 6, 3), "block": "basic", "stem": "cifar", "base": "resnet34"},
    "resnet50_cifar": {"family": "resnet", "taps": RESNET_TAPS, "channels": (64, 256, 512, 1024, 2048),
                       "blocks": (3, 4, 6, 3), "block": "bottleneck", "stem": "cifar", "base": "resnet50"},
    # a quarter of ResNet-18's width (16-16-32-64-128 channels): ~1/16 the compute, for minutes of CPU pretraining
    "resnet18_cifar_w16": {"family": "resnet", "taps": RESNET_TAPS, "channels": (16, 16, 32, 64, 128),
                           "blocks": (2, 2, 2, 2), "block": "basic", "stem": "cifar", "base": "resnet18",
                           "width": 16},
    "alexnet": {"family": "alexnet", "taps": ALEXNET_TAPS, "channels": (64, 192, 384, 256, 256)},
}
# torchvision's RegNetYs (torchvision/models/regnet.py, regnet_y_*: BlockParams.from_init_params with se_ratio 0.25,
# BatchNorm eps 1e-5): (depth, w_0, w_a, w_m, group_width), and the stage depths and widths they expand to.
# "channels": the stem's 32, then the four stage widths.
REGNET_PARAMS: dict[str, tuple[int, int, float, float, int]] = {
    "regnet_y_400mf": (16, 48, 27.89, 2.09, 8),
    "regnet_y_800mf": (14, 56, 38.84, 2.4, 16),
    "regnet_y_1_6gf": (27, 48, 20.71, 2.65, 24),
    "regnet_y_3_2gf": (21, 80, 42.63, 2.66, 24),
    "regnet_y_8gf": (17, 192, 76.82, 2.19, 56),
    "regnet_y_16gf": (18, 200, 106.23, 2.48, 112),
    "regnet_y_32gf": (20, 232, 115.89, 2.53, 232),
    "regnet_y_128gf": (27, 456, 160.83, 2.52, 264),
}
REGNET_STAGES: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {  # depths, widths
    "regnet_y_400mf": ((1, 3, 6, 6), (48, 104, 208, 440)),
    "regnet_y_800mf": ((1, 3, 8, 2), (64, 144, 320, 784)),
    "regnet_y_1_6gf": ((2, 6, 17, 2), (48, 120, 336, 888)),
    "regnet_y_3_2gf": ((2, 5, 13, 1), (72, 216, 576, 1512)),
    "regnet_y_8gf": ((2, 4, 10, 1), (224, 448, 896, 2016)),
    "regnet_y_16gf": ((2, 4, 11, 1), (224, 448, 1232, 3024)),
    "regnet_y_32gf": ((2, 5, 12, 1), (232, 696, 1392, 3712)),
    "regnet_y_128gf": ((2, 7, 17, 1), (528, 1056, 2904, 7392)),
}
REGNET_STEM_WIDTH = 32
# every parameter / buffer name of a torchvision RegNetY trunk (stem, proj shortcut, a / b / c convs and SE)
REGNET_KEY = re.compile(r"(stem\.[01]|trunk_output\.block([1-4])\.block\2-\d+\."
                        r"(proj\.[01]|f\.[abc]\.[01]|f\.se\.fc[12]))"
                        r"\.(weight|bias|running_mean|running_var|num_batches_tracked)$")
ARCHS.update({arch: {"family": "regnet", "taps": RESNET_TAPS, "channels": (REGNET_STEM_WIDTH, *widths),
                     "depths": depths} for arch, (depths, widths) in REGNET_STAGES.items()})
# solo-learn's CIFAR conv1 (kernel, stride, padding), bias-free, with the max-pool replaced by nn.Identity:
# solo/methods/base.py and main_linear.py, nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=2, bias=False).
# The padding of 2 makes a 32 px input a 34 x 34 conv1 map.
CIFAR_CONV1 = (3, 1, 2)
# Vision Transformers (evalsuite.vit); ``timm:<name>`` archs are added on first use (arch_info).
ARCHS.update(vit.VIT_ARCHS)

# (kernel, stride, padding) of the published ResNet-50 / 224px pooling: fair_self_supervision_benchmark
# self_supervision_benchmark/modeling/supervised/resnet_supervised_finetune_linear.py (res_conv1_bn_resize,
# res2_2_branch2c_bn_s8k16_resize, ...) and VISSL's LINEAR_EVAL_FEAT_POOL_OPS_MAP.
GOYAL_RESNET50_224 = {
    "conv1": (10, 10, 4),  # 64 x 112 x 112 -> 64 x 12 x 12 = 9216
    "res2": (16, 8, 0),  # 256 x 56 x 56 -> 256 x 6 x 6 = 9216
    "res3": (13, 5, 0),  # 512 x 28 x 28 -> 512 x 4 x 4 = 8192
    "res4": (8, 3, 0),  # 1024 x 14 x 14 -> 1024 x 3 x 3 = 9216
    "res5": (6, 1, 0),  # 2048 x 7 x 7 -> 2048 x 2 x 2 = 8192
}
GOYAL_TARGET_DIM = 9216
# Whether a padded window's average counts the padding: fair_ssb runs Caffe2's AveragePool on cuDNN
# (caffe2/operators/pool_op_cudnn.cc: CUDNN_POOLING_AVERAGE_COUNT_EXCLUDE_PADDING); VISSL builds
# nn.AvgPool2d (vissl/models/trunks/feature_extractor.py), whose count_include_pad defaults to True.
COUNT_INCLUDE_PAD = {"goyal": False, "vissl": True}

# Why a trunk's numbers cannot be set beside the published tables (an architecture missing here can).
NOT_COMPARABLE = {
    "alexnet": ("torchvision's AlexNet is not the benchmark's CaffeNet (96-256-384-384-256 channels, LRN, grouped "
                "convs, 227 px; fair_self_supervision_benchmark caffenet_bvlc_supervised_finetune_linear.py) and "
                "its taps are not pooled with conv1_s4k19 .. conv5_s1k8"),
}


def arch_info(arch: str) -> dict:
    if arch.startswith("timm:") and arch not in ARCHS:
        name, info = vit.timm_arch(arch[len("timm:"):])
        ARCHS.setdefault(name, info)
        return ARCHS[name]
    if arch not in ARCHS:
        raise UserError(f"unknown architecture {arch!r}; supported: {', '.join(ARCHS)}")
    return ARCHS[arch]


def published_comparability(arch: str) -> dict:
    """The params that mark every record of ``arch`` as not comparable with the published tables, and why
    (empty for an architecture that is)."""
    why = NOT_COMPARABLE.get(arch)
    return {} if why is None else {"comparable_to_published": False, "not_comparable_reason": why}


def _narrow(net: torchvision.models.ResNet, width: int) -> None:
    """Rebuild a torchvision ResNet's stem and stages at ``width`` channels after the stem (2x, 4x, 8x in
    res3..res5), initialised as torchvision initialises a ResNet (kaiming-normal fan-out convs, unit BN)."""
    block = type(net.layer1[0])
    net.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
    net.bn1 = nn.BatchNorm2d(width)
    net.inplanes = width
    for i, name in enumerate(("layer1", "layer2", "layer3", "layer4")):
        setattr(net, name, net._make_layer(block, width * 2**i, len(getattr(net, name)), stride=1 if i == 0 else 2))
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class ResNetTrunk(nn.Module):
    """torchvision ResNet without avgpool/fc; taps conv1 (after ReLU, before max-pool) and res2..res5.
    A CIFAR-stem arch swaps conv1 and the max-pool as solo-learn does (fresh nn.Conv2d, default init)."""

    def __init__(self, arch: str):
        super().__init__()
        info = arch_info(arch)
        net = getattr(torchvision.models, info.get("base", arch))(weights=None)
        if "width" in info:
            _narrow(net, info["width"])
        if info.get("stem") == "cifar":
            k, s, p = CIFAR_CONV1
            net.conv1 = nn.Conv2d(3, net.conv1.out_channels, kernel_size=k, stride=s, padding=p, bias=False)
            net.maxpool = nn.Identity()
        self.arch = arch
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.tap_names = RESNET_TAPS

    def stages(self):
        yield "conv1", lambda x: self.relu(self.bn1(self.conv1(x)))
        yield "res2", lambda x: self.layer1(self.maxpool(x))
        yield "res3", self.layer2
        yield "res4", self.layer3
        yield "res5", self.layer4

    def forward(self, x: torch.Tensor, taps: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        return _run_stages(self, x, taps)


class RegNetTrunk(nn.Module):
    """torchvision RegNetY without avgpool/fc: ``stem`` and ``trunk_output`` (torchvision's names); taps conv1 (the
    stem's output, after its ReLU) and res2..res5 (the stages' outputs)."""

    def __init__(self, arch: str):
        super().__init__()
        depth, w_0, w_a, w_m, group_width = REGNET_PARAMS[arch]
        with torch.device("cpu"):  # BlockParams computes the widths with tensors: never on the meta device
            params = BlockParams.from_init_params(depth=depth, w_0=w_0, w_a=w_a, w_m=w_m, group_width=group_width,
                                                  se_ratio=0.25)
        norm = functools.partial(nn.BatchNorm2d, eps=1e-05, momentum=0.1)
        net = RegNet(params, stem_width=REGNET_STEM_WIDTH, norm_layer=norm)
        self.arch = arch
        self.stem, self.trunk_output = net.stem, net.trunk_output
        self.tap_names = RESNET_TAPS

    def stages(self):
        yield "conv1", self.stem
        yield from zip(RESNET_TAPS[1:], self.trunk_output)

    def forward(self, x: torch.Tensor, taps: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        return _run_stages(self, x, taps)


class AlexNetTrunk(nn.Module):
    """torchvision AlexNet ``features``; taps conv1..conv5 after their ReLU."""

    _ends = {"conv1": 2, "conv2": 5, "conv3": 8, "conv4": 10, "conv5": 12}

    def __init__(self, arch: str = "alexnet"):
        super().__init__()
        self.arch = arch
        self.features = torchvision.models.alexnet(weights=None).features
        self.tap_names = ALEXNET_TAPS

    def stages(self):
        start = 0
        for name, end in self._ends.items():
            yield name, self.features[start:end]
            start = end

    def forward(self, x: torch.Tensor, taps: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        return _run_stages(self, x, taps)


def _run_stages(trunk: nn.Module, x: torch.Tensor, taps: Sequence[str] | None) -> dict[str, torch.Tensor]:
    wanted = list(trunk.tap_names if taps is None else taps)
    check_taps(trunk, wanted)
    out: dict[str, torch.Tensor] = {}
    for name, fn in trunk.stages():
        x = fn(x)
        if name in wanted:
            out[name] = x
            if len(out) == len(wanted):
                break
    return out


def check_taps(trunk: nn.Module, taps: Sequence[str]) -> None:
    unknown = [t for t in taps if t not in trunk.tap_names]
    if unknown:
        raise UserError(
            f"unknown layer(s) {', '.join(unknown)} for {trunk.arch}; available: {', '.join(trunk.tap_names)}"
        )


def build_trunk(arch: str, seed: int | None = None) -> nn.Module:
    """A randomly initialised trunk (seeded when ``seed`` is given)."""
    info = arch_info(arch)
    if seed is not None:
        devices = []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            return _construct(info, arch)
    return _construct(info, arch)


def _construct(info: dict, arch: str) -> nn.Module:
    if info["family"] == "vit":
        return vit.build_vit(arch, info)
    if info["family"] == "regnet":
        return RegNetTrunk(arch)
    return ResNetTrunk(arch) if info["family"] == "resnet" else AlexNetTrunk(arch)


def trunk_state_keys(arch: str) -> set[str]:
    return set(trunk_state_shapes(arch))


@functools.cache
def trunk_state_shapes(arch: str) -> dict[str, tuple[int, ...]]:
    """Every state-dict key of the trunk and its shape (built on the meta device: no memory, no init cost)."""
    with torch.device("meta"):
        trunk = _construct(arch_info(arch), arch)
    return {k: tuple(v.shape) for k, v in trunk.state_dict().items()}


def is_trunk_key(arch: str, name: str) -> bool:
    """Whether a torchvision-named key belongs to this architecture family's trunk (not its classifier)."""
    if arch_info(arch)["family"] == "alexnet":
        return name.startswith("features.")
    if arch_info(arch)["family"] == "vit":
        return vit.is_vit_key(name)
    if arch_info(arch)["family"] == "regnet":
        return name.startswith(("stem.", "trunk_output."))
    return re.match(r"(conv1|bn1|layer[1-4])\.", name) is not None


def is_regnet_key(name: str) -> bool:
    """Whether a torchvision-named key belongs to a RegNetY trunk (matched by pattern: no trunk is built)."""
    return REGNET_KEY.match(name) is not None


def resnet_layout(names: Iterable[str]) -> tuple[tuple[int | None, ...], str]:
    """Blocks per stage (None: stage absent) and the block type ("basic" / "bottleneck") of ResNet keys."""
    counts: list[int | None] = [None] * 4
    bottleneck = False
    for name in names:
        m = re.match(r"layer([1-4])\.(\d+)\.(\w+)", name)
        if m:
            stage, block = int(m.group(1)) - 1, int(m.group(2))
            counts[stage] = max(counts[stage] or 0, block + 1)
            bottleneck = bottleneck or m.group(3) in ("conv3", "bn3")
    return tuple(counts), "bottleneck" if bottleneck else "basic"


def regnet_layout(shapes: Mapping[str, Sequence[int]]) -> tuple[tuple[int | None, ...], tuple[int | None, ...]]:
    """Blocks and output width per stage (None: stage absent) of torchvision-named RegNet keys and their shapes
    (a stage's width: its blocks' last 1x1 conv, ``f.c.0.weight``)."""
    depths: list[int | None] = [None] * 4
    widths: list[int | None] = [None] * 4
    for name, shape in shapes.items():
        m = re.match(r"trunk_output\.block([1-4])\.block\1-(\d+)\.f\.c\.0\.weight$", name)
        if m:
            stage = int(m.group(1)) - 1
            depths[stage] = max(depths[stage] or 0, int(m.group(2)) + 1)
            widths[stage] = int(shape[0]) if len(shape) else None
    return tuple(depths), tuple(widths)


def regnet_fits(shapes: Mapping[str, Sequence[int]]) -> list[str]:
    """The RegNet archs whose stages agree with those of these torchvision-named keys (absent stages ignored);
    none when the keys hold no stage."""
    depths, widths = regnet_layout(shapes)
    if all(d is None for d in depths):
        return []
    return [arch for arch, info in ARCHS.items() if info["family"] == "regnet"
            and all(d is None or d == n for d, n in zip(depths, info["depths"]))
            and all(w is None or w == c for w, c in zip(widths, info["channels"][1:]))]


def describe_layout(names: Iterable[str], shapes: Mapping[str, Sequence[int]] | None = None) -> str:
    """ "blocks 3-4-6-3, bottleneck": the ResNet layout of the keys, for messages; for RegNet keys (with their
    ``shapes``) "RegNet stages: depths 1-3-6-6, widths 48-104-208-440"."""
    names = list(names)
    if shapes is not None and any(n.startswith("trunk_output.") for n in names):
        depths, widths = regnet_layout(shapes)
        return f"RegNet stages: depths {_dashed(depths)}, widths {_dashed(widths)}"
    counts, block = resnet_layout(names)
    return f"blocks {_dashed(counts)}, {block}"


def _dashed(values: Sequence[int | None]) -> str:
    return "-".join("?" if v is None else str(v) for v in values)


def infer_arch(names: Iterable[str], shapes: Mapping[str, Sequence[int]] | None = None) -> str | None:
    """The architecture whose trunk these torchvision-named keys show, or None.

    ResNets are told apart by their blocks per stage and block type; a stage missing altogether (a partial
    file) is ignored as long as the stages present fit exactly one architecture. ``shapes`` (name -> tensor
    shape) tells the stems apart: a 3x3 ``conv1.weight`` is the CIFAR stem, anything else (or no conv1) the
    ImageNet one, and its output channels the width (16: ``resnet18_cifar_w16``). RegNets are told apart by their
    blocks and width per stage (read from ``shapes``).
    """
    names = set(names)
    if "features.0.weight" in names and "features.10.weight" in names:
        return "alexnet"
    if any(n.startswith("trunk_output.") for n in names):
        fits = regnet_fits(shapes or {})
        return fits[0] if len(fits) == 1 else None
    counts, block = resnet_layout(names)
    if all(c is None for c in counts):
        return None
    conv1 = tuple((shapes or {}).get("conv1.weight", ()))
    stem = "cifar" if conv1[-2:] == (CIFAR_CONV1[0], CIFAR_CONV1[0]) else "imagenet"
    width = conv1[0] if conv1 else 64
    fits = [arch for arch, info in ARCHS.items() if info["family"] == "resnet" and info["block"] == block
            and info.get("stem", "imagenet") == stem and info.get("width", 64) == width
            and all(c is None or c == n for c, n in zip(counts, info["blocks"]))]
    return fits[0] if len(fits) == 1 else None


@dataclass(frozen=True)
class PoolSpec:
    """How one tap is pooled; recorded with every feature and result."""

    tap: str
    method: str
    op: str  # "avg_pool(k,s,p)" (padded: "...,p=4,pad=excluded|counted"), "adaptive_avg(g)", "global_avg", "flatten";
    # ViT token ops: "cls(skip=1)", "patch_mean(skip=1)", ... (evalsuite.vit.pool_op)
    out_shape: tuple[int, ...]

    @property
    def dim(self) -> int:
        return int(math.prod(self.out_shape))


def pool_spec(arch: str, tap: str, channels: int, spatial: int, method: str) -> PoolSpec:
    if method not in POOLINGS:
        raise UserError(f"unknown pooling {method!r}; choose one of {', '.join(POOLINGS)}")
    info = arch_info(arch)
    if info["family"] == "vit":
        return PoolSpec(tap, method, *vit.pool_op(info, tap, channels, spatial, method))
    if method in vit.TOKEN_METHODS:
        raise UserError(f"pooling {method!r} applies to ViT trunks; {arch} takes goyal, vissl, avg or none")
    if method == "avg":
        return PoolSpec(tap, method, "global_avg", (channels,))
    if method == "none":
        return PoolSpec(tap, method, "flatten", (channels, spatial, spatial))
    published = GOYAL_RESNET50_224.get(tap) if arch == "resnet50" else None
    expected_spatial = {"conv1": 112, "res2": 56, "res3": 28, "res4": 14, "res5": 7}
    if published and spatial == expected_spatial[tap]:
        k, s, p = published
        g = (spatial + 2 * p - k) // s + 1
        pad = f",pad={'counted' if COUNT_INCLUDE_PAD[method] else 'excluded'}" if p else ""
        return PoolSpec(tap, method, f"avg_pool(k={k},s={s},p={p}{pad})", (channels, g, g))
    g = goyal_grid(channels, spatial)
    return PoolSpec(tap, method, f"adaptive_avg({g})", (channels, g, g))


def goyal_grid(channels: int, spatial: int, target: int = GOYAL_TARGET_DIM) -> int:
    """Grid side g (<= spatial) whose channels*g*g is closest to the ~9k target."""
    best = min(range(1, spatial + 1), key=lambda g: (abs(channels * g * g - target), -g))
    return best


def pool_features(x: torch.Tensor, spec: PoolSpec) -> torch.Tensor:
    """Pool a (N, C, H, W) activation (ViTs: (N, tokens, C)) to (N, D) according to ``spec``."""
    if vit.is_token_op(spec.op):
        return vit.pool_tokens(x, spec.op)
    if spec.op == "global_avg":
        y = x.mean(dim=(2, 3))
    elif spec.op == "flatten":
        y = x
    elif spec.op.startswith("avg_pool("):
        args = dict(a.split("=") for a in spec.op[len("avg_pool(") : -1].split(","))
        y = F.avg_pool2d(x, kernel_size=int(args["k"]), stride=int(args["s"]), padding=int(args["p"]),
                         count_include_pad=args.get("pad") == "counted")
    else:
        g = spec.out_shape[-1]
        y = F.adaptive_avg_pool2d(x, g)
    return y.reshape(y.shape[0], -1)


def _conv_out(size: int, k: int, s: int, p: int) -> int:
    return (size + 2 * p - k) // s + 1


def tap_shapes(arch: str, image_size: int, taps: Sequence[str] | None = None) -> dict[str, tuple[int, int, int]]:
    """(C, H, W) of each tap for a square input, computed from the architecture (no forward pass)."""
    info = arch_info(arch)
    if info["family"] == "vit":
        return vit.tap_shapes(info, image_size, taps)
    sizes = []
    if info.get("stem") == "cifar":
        s = _conv_out(image_size, *CIFAR_CONV1)  # conv1
        sizes.extend([s, s])  # no max-pool: res2 keeps conv1's resolution
        for _ in range(3):  # res3..res5 halve it (3x3 stride-2 conv, padding 1)
            s = _conv_out(s, 3, 2, 1)
            sizes.append(s)
    elif info["family"] == "regnet":
        s = image_size
        for _ in range(5):  # the stem and every stage's first block halve it (3x3 stride-2 conv, padding 1)
            s = _conv_out(s, 3, 2, 1)
            sizes.append(s)
    elif info["family"] == "resnet":
        s = _conv_out(image_size, 7, 2, 3)  # conv1
        sizes.append(s)
        s = _conv_out(s, 3, 2, 1)  # max-pool
        sizes.append(s)  # res2 keeps the resolution
        for _ in range(3):  # res3..res5 halve it (3x3 stride-2 conv, padding 1)
            s = _conv_out(s, 3, 2, 1)
            sizes.append(s)
    else:
        s = _conv_out(image_size, 11, 4, 2)
        sizes.append(s)
        s = _conv_out(_conv_out(s, 3, 2, 0), 5, 1, 2)
        sizes.append(s)
        s = _conv_out(s, 3, 2, 0)
        sizes.extend([s, s, s])
    if min(sizes) < 1:
        raise UserError(f"image size {image_size} is too small for {arch}")
    shapes = {t: (c, h, h) for t, c, h in zip(info["taps"], info["channels"], sizes)}
    return {t: shapes[t] for t in (taps or info["taps"])}
