"""Dense prediction on a partly frozen ResNet trunk: dilation, the PSPNet head, and the frozen/trainable split.

As in imisra/semantic-segmentation-pytorch (models/models.py, the code of Goyal et al. 2019's normals):

- :func:`set_output_stride` turns the last ResNet stages' strides into dilations (``ResnetDilated``):
  output stride 8 dilates res4 by 2 and res5 by 4, output stride 16 dilates res5 by 2.
  The weights are unchanged; only the sampling grid of the 3x3 convolutions changes.
- :class:`PSPHead`: the pyramid pooling module (``PPM``: average pooling to 1x1, 2x2, 3x3, 6x6 bins, a 1x1
  conv-BN-ReLU reducing each to C/4 channels, upsampled and concatenated with the input), then a 3x3
  conv-BN-ReLU, dropout 0.1 and a 1x1 classifier, initialised as ``ModelBuilder.weights_init``.
- :class:`FrozenTrunkDenseModel`: the stages up to and including ``freeze_through`` run without gradients
  and with BatchNorm in eval mode (:meth:`frozen_features`); the later stages and the head train, their
  BatchNorm too (batch statistics; ``ResnetDilated.train`` puts only the frozen stages' BN in eval mode).
- :class:`AveragedBatchNorm2d`: the running statistics of the trained BatchNorm layers are those of the
  reference's synchronised BatchNorm (lib/nn/modules/batchnorm.py): a bias-corrected moving average.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from evalsuite.errors import NotApplicable, UserError
from evalsuite.trunks import ResNetTrunk

RESNET_STAGES = ("conv1", "res2", "res3", "res4", "res5")
# which trunk attributes hold each stage's weights (evalsuite.trunks.ResNetTrunk)
STAGE_MODULES = {"conv1": ("conv1", "bn1"), "res2": ("layer1",), "res3": ("layer2",), "res4": ("layer3",),
                 "res5": ("layer4",)}
OUTPUT_STRIDES = {32: {}, 16: {"layer4": 2}, 8: {"layer3": 2, "layer4": 4}}


def set_output_stride(trunk: nn.Module, output_stride: int) -> nn.Module:
    """Replace strides by dilation in res4/res5 so the deepest map has stride ``output_stride`` (in place)."""
    if output_stride not in OUTPUT_STRIDES:
        raise UserError(f"output_stride must be one of {sorted(OUTPUT_STRIDES)}, got {output_stride}")
    previous = 1
    for name in ("layer3", "layer4"):
        dilation = OUTPUT_STRIDES[output_stride].get(name)
        if dilation is None:
            continue
        for bi, block in enumerate(getattr(trunk, name)):
            d = previous if bi == 0 else dilation  # torchvision's replace_stride_with_dilation semantics
            for m in block.modules():
                if isinstance(m, nn.Conv2d):
                    if m.kernel_size == (3, 3):
                        m.stride, m.dilation, m.padding = (1, 1), (d, d), (d, d)
                    elif m.stride != (1, 1):  # the 1x1 projection of the downsample branch
                        m.stride = (1, 1)
        previous = dilation
    return trunk


def _conv_bn_relu(cin: int, cout: int, k: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class PSPHead(nn.Module):
    """Pyramid pooling module + 3x3 conv + dropout + 1x1 classifier (Zhao et al. 2017)."""

    def __init__(self, in_channels: int, num_outputs: int, channels: int = 512,
                 bins: Sequence[int] = (1, 2, 3, 6), dropout: float = 0.1):
        super().__init__()
        self.bins = tuple(int(b) for b in bins)
        reduced = max(1, in_channels // max(1, len(self.bins)))
        self.stages = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(b), _conv_bn_relu(in_channels, reduced, 1)) for b in self.bins)
        self.bottleneck = _conv_bn_relu(in_channels + reduced * len(self.bins), channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_outputs, 1)
        for m in self.modules():  # ModelBuilder.weights_init (models/models.py); biases keep torch's default
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.constant_(m.bias, 1e-4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        pyramid = [x] + [F.interpolate(s(x), size=(h, w), mode="bilinear", align_corners=False)
                         for s in self.stages]
        return self.classifier(self.dropout(self.bottleneck(torch.cat(pyramid, dim=1))))


class AveragedBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm whose running statistics follow the reference's synchronised BatchNorm.

    ``_SynchronizedBatchNorm._compute_mean_std``: sums ``S <- f S + batch``, ``W <- f W + 1`` with
    ``f = 1 - momentum`` and ``running = S / W``, the sums starting at mean 0 / variance 1 with weight 1
    (set when the layer is built, so pretrained statistics are replaced from the first training step); the
    variance averaged is the unbiased one. Normalisation and evaluation are torch's.
    """

    def __init__(self, num_features: int, momentum: float = 0.001, eps: float = 1e-5):
        super().__init__(num_features, eps=eps, momentum=momentum)
        self.register_buffer("sum_mean", torch.zeros(num_features))
        self.register_buffer("sum_var", torch.ones(num_features))
        self.register_buffer("sum_weight", torch.ones(1))

    @classmethod
    def replacing(cls, bn: nn.BatchNorm2d, momentum: float) -> AveragedBatchNorm2d:
        new = cls(bn.num_features, momentum=momentum, eps=bn.eps).to(bn.weight.device)
        with torch.no_grad():
            for name in ("weight", "bias", "running_mean", "running_var"):
                getattr(new, name).copy_(getattr(bn, name))
        new.weight.requires_grad_(bn.weight.requires_grad)
        new.bias.requires_grad_(bn.bias.requires_grad)
        new.train(bn.training)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        with torch.no_grad():
            f = 1.0 - self.momentum
            dims = [0, *range(2, x.dim())]
            self.sum_mean.mul_(f).add_(x.mean(dim=dims).to(self.sum_mean.dtype))
            self.sum_var.mul_(f).add_(x.var(dim=dims, unbiased=True).to(self.sum_var.dtype))
            self.sum_weight.mul_(f).add_(1.0)
            self.running_mean.copy_(self.sum_mean / self.sum_weight)
            self.running_var.copy_(self.sum_var / self.sum_weight)
        return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)


def use_averaged_batchnorm(module: nn.Module, momentum: float) -> nn.Module:
    """Replace every BatchNorm2d inside ``module`` by an :class:`AveragedBatchNorm2d` (in place)."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d) and not isinstance(child, AveragedBatchNorm2d):
            setattr(module, name, AveragedBatchNorm2d.replacing(child, momentum))
        else:
            use_averaged_batchnorm(child, momentum)
    return module


def weight_decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """The reference's ``group_weight`` (train_generic.py): decay on conv / linear weights only, none on biases
    and BatchNorm parameters; frozen parameters are left out."""
    decay, no_decay = [], []
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            if m.weight.requires_grad:
                decay.append(m.weight)
                if m.bias is not None:
                    no_decay.append(m.bias)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None and m.weight.requires_grad:
            no_decay += [m.weight, m.bias]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def stage_channels(trunk: nn.Module, stage: str) -> int:
    """Output channels of a ResNet stage, read from its weights."""
    if stage == "conv1":
        return trunk.conv1.out_channels
    last = getattr(trunk, STAGE_MODULES[stage][0])[-1]
    return (last.bn3 if hasattr(last, "bn3") else last.bn2).num_features


class FrozenTrunkDenseModel(nn.Module):
    """Trunk frozen through ``freeze_through``; stages after it and a PSP head are trained."""

    def __init__(self, trunk: nn.Module, freeze_through: str, num_outputs: int, output_stride: int = 8,
                 head_channels: int = 512, bins: Sequence[int] = (1, 2, 3, 6), dropout: float = 0.1,
                 bn_momentum: float = 0.001):
        super().__init__()
        if not isinstance(trunk, ResNetTrunk):  # a RegNet shares the tap names, not the layers dilated below
            raise NotApplicable(f"surface normals need a ResNet or ViT trunk (the reference dilates a ResNet's "
                                f"layer3/layer4); got {getattr(trunk, 'arch', type(trunk).__name__)}")
        if freeze_through not in RESNET_STAGES:
            raise UserError(f"freeze_through must be one of {', '.join(RESNET_STAGES)}, got {freeze_through!r}")
        self.trunk = set_output_stride(trunk, output_stride)
        self.freeze_through = freeze_through
        self.output_stride = output_stride
        cut = RESNET_STAGES.index(freeze_through) + 1
        self.frozen_stages, self.trainable_stages = RESNET_STAGES[:cut], RESNET_STAGES[cut:]
        for p in self.trunk.parameters():
            p.requires_grad_(False)
        for stage in self.trainable_stages:  # conv1 is always frozen, so these are whole ResNet layers
            for attr in STAGE_MODULES[stage]:
                for p in getattr(self.trunk, attr).parameters():
                    p.requires_grad_(True)
                use_averaged_batchnorm(getattr(self.trunk, attr), bn_momentum)
        head = PSPHead(stage_channels(trunk, RESNET_STAGES[-1]), num_outputs, head_channels, bins, dropout)
        self.head = use_averaged_batchnorm(head, bn_momentum)
        self.train(False)

    @property
    def layer_name(self) -> str:
        """The result's layer: ``res5`` for a fully frozen trunk, else ``<first trained stage>_onwards``."""
        return self.freeze_through if not self.trainable_stages else f"{self.trainable_stages[0]}_onwards"

    def train(self, mode: bool = True):
        super().train(mode)
        for stage in self.frozen_stages:  # the frozen stages' BatchNorm statistics never change
            for attr in STAGE_MODULES[stage]:
                for m in getattr(self.trunk, attr).modules():
                    if isinstance(m, nn.modules.batchnorm._BatchNorm):
                        m.eval()
        return self

    def trainable_prefixes(self) -> list[str]:
        return [f"trunk.{a}." for s in self.trainable_stages for a in STAGE_MODULES[s]] + ["head."]

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Weights and buffers of the trained part only (what a resume checkpoint stores)."""
        prefixes = tuple(self.trainable_prefixes())
        return {k: v.detach().clone() for k, v in self.state_dict().items() if k.startswith(prefixes)}

    @torch.no_grad()
    def frozen_features(self, x: torch.Tensor) -> torch.Tensor:
        """Output of the frozen stages (no graph is built)."""
        for name, fn in self.trunk.stages():
            x = fn(x)
            if name == self.freeze_through:
                return x
        raise AssertionError("unreachable")

    def forward_from(self, feats: torch.Tensor) -> torch.Tensor:
        """Trainable stages + head on the frozen stages' output -> (B, num_outputs, h, w) at the output stride."""
        x = feats
        started = False
        for name, fn in self.trunk.stages():
            if started:
                x = fn(x)
            started = started or name == self.freeze_through
        return self.head(x)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_from(self.frozen_features(images))
