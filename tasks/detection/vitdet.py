"""Fast R-CNN on a plain ViT trunk, after ViTDet (Li et al. 2022, "Exploring Plain Vision Transformer Backbones for
Object Detection"): the simple feature pyramid built from the last block's patch-token grid, RoIAlign over the
pyramid levels with FPN's level assignment, and detectron2's conv/fc box head. The model offers the interface the
training loop of ``fast_rcnn.TorchvisionFastRCNN`` uses (``body``, ``head``, ``rois``, ``size_divisibility``,
``lr_scale``). Reference code: detectron2 ``detectron2/modeling/backbone/vit.py`` (SimpleFeaturePyramid,
get_vit_lr_decay_rate), ``detectron2/modeling/poolers.py`` (assign_boxes_to_levels, ROIAlignV2),
``detectron2/modeling/roi_heads/box_head.py`` (FastRCNNConvFCHead) and the config
``configs/common/models/mask_rcnn_vitdet.py``. What differs from ViTDet: docs/tasks/detection.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torchvision.ops import roi_align

from evalsuite.errors import UserError
from evalsuite.trunks import arch_info
from evalsuite.vit import ViTTaps, patch_grid

# mask_rcnn_vitdet.py: scale_factors (4.0, 2.0, 1.0, 0.5) of the stride-16 map, out_channels 256, norm "LN"
PYRAMID_SCALES = (4.0, 2.0, 1.0, 0.5)
PYRAMID_CHANNELS = 256
# the pyramid's levels p2..p5 (stride 2**k for a patch-16 grid); FPN's Eqn. 1 places a 224 px box on p4
LEVELS = (2, 3, 4, 5)
CANONICAL_BOX_SIZE, CANONICAL_LEVEL = 224, 4
# box heads: (conv dims, fc dims); ViTDet's 4conv1fc (mask_rcnn_vitdet.py) and detectron2's FPN default 2fc
BOX_HEADS = {"4conv1fc": ((256, 256, 256, 256), (1024,)), "2fc": ((), (1024, 1024))}


@dataclass
class ViTDetConfig:
    """The ViT detector's settings (values: the task's protocol, ``tasks.detection.task.vit_model_config``)."""

    backbone: str  # "frozen": the ViT's parameters never change; "finetune": trained with the head
    box_head: str  # a key of BOX_HEADS
    pool_size: int  # RoIAlign output (ViTDet: 7)
    lr_decay: float  # layer-wise lr decay while fine-tuning (1.0: none; ViTDet's ViT-B: 0.7)
    cls_agnostic_bbox_reg: bool
    tap: str = ""  # the block the pyramid reads ("": the trunk's last block)
    pyramid_channels: int = PYRAMID_CHANNELS
    pyramid_scales: tuple[float, ...] = PYRAMID_SCALES
    sampling_ratio: int = 0  # ROIAlignV2's sampling_ratio 0: adaptive
    canonical_box_size: int = CANONICAL_BOX_SIZE
    canonical_level: int = CANONICAL_LEVEL
    cls_init_std: float = 0.01  # FastRCNNOutputLayers: cls_score N(0, 0.01^2), bbox_pred N(0, 0.001^2)
    box_init_std: float = 0.001


def describe(cfg: ViTDetConfig, patch: int) -> str:
    """One line saying what was built on the ViT (recorded with every result)."""
    convs, fcs = BOX_HEADS[cfg.box_head]
    strides = ", ".join(f"{patch / s:g}" for s in cfg.pyramid_scales)
    head = (f"{len(convs)} x 3x3 conv {convs[0]} + LN + ReLU, " if convs else "") + \
        " + ".join(f"fc {d} + ReLU" for d in fcs)
    return (f"ViTDet simple feature pyramid on {cfg.tap or 'the last block'}'s patch grid (stride {patch}; scales "
            f"{', '.join(f'{s:g}' for s in cfg.pyramid_scales)}: strides {strides}; {cfg.pyramid_channels} channels, "
            f"1x1 and 3x3 convs with LayerNorm), RoIAlign (aligned) {cfg.pool_size}x{cfg.pool_size} on the level "
            f"floor({cfg.canonical_level} + log2(sqrt(area) / {cfg.canonical_box_size})) clamped to p2..p5, box head "
            f"{cfg.box_head} ({head}); ViT {cfg.backbone}")


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channels of an (N, C, H, W) map at each position (detectron2.layers.LayerNorm, eps 1e-6)."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


def conv_ln(cin: int, cout: int, kernel: int, relu: bool = False) -> nn.Sequential:
    """detectron2's ``Conv2d(norm=LN)``: a bias-free conv, LayerNorm over channels (then ReLU in the box head)."""
    layers = [nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False), ChannelLayerNorm(cout)]
    return nn.Sequential(*layers, nn.ReLU()) if relu else nn.Sequential(*layers)


class SimpleFeaturePyramid(nn.Module):
    """Maps at ``scales`` of a (N, dim, h, w) grid (detectron2 vit.py SimpleFeaturePyramid): 4 = two stride-2
    deconvs (LN and GELU between), 2 = one deconv, 1 = the grid, 0.5 = 2x2 max-pool; each then a 1x1 and a 3x3 conv
    with LayerNorm. PyTorch's default initialisation, as detectron2's (it initialises no pyramid layer)."""

    def __init__(self, dim: int, out_channels: int = PYRAMID_CHANNELS, scales: tuple[float, ...] = PYRAMID_SCALES):
        super().__init__()
        self.scales = tuple(scales)
        stages = []
        for scale in self.scales:
            if scale == 4.0:
                layers = [nn.ConvTranspose2d(dim, dim // 2, 2, stride=2), ChannelLayerNorm(dim // 2), nn.GELU(),
                          nn.ConvTranspose2d(dim // 2, dim // 4, 2, stride=2)]
                width = dim // 4
            elif scale == 2.0:
                layers, width = [nn.ConvTranspose2d(dim, dim // 2, 2, stride=2)], dim // 2
            elif scale == 1.0:
                layers, width = [], dim
            elif scale == 0.5:
                layers, width = [nn.MaxPool2d(2, stride=2)], dim
            else:
                raise UserError(f"the simple feature pyramid has scales 4, 2, 1 and 0.5, not {scale:g}")
            stages.append(nn.Sequential(*layers, *conv_ln(width, out_channels, 1), *conv_ln(out_channels, out_channels,
                                                                                            3)))
        self.stages = nn.ModuleList(stages)

    def forward(self, grid: torch.Tensor) -> list[torch.Tensor]:
        return [stage(grid) for stage in self.stages]


def assign_levels(boxes: torch.Tensor, min_level: int = LEVELS[0], max_level: int = LEVELS[-1],
                  canonical_box_size: int = CANONICAL_BOX_SIZE, canonical_level: int = CANONICAL_LEVEL
                  ) -> torch.Tensor:
    """Each (x1, y1, x2, y2) box's pyramid level as an index from ``min_level`` (detectron2 poolers.py
    assign_boxes_to_levels, FPN's Eqn. 1): floor(k0 + log2(sqrt(area) / 224 + eps)), clamped."""
    size = torch.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
    eps = torch.finfo(torch.float64).eps  # detectron2: sys.float_info.epsilon
    level = torch.floor(canonical_level + torch.log2(size / canonical_box_size + eps))
    return level.clamp(min_level, max_level).to(torch.int64) - min_level


class MultiLevelRoIAlign(nn.Module):
    """RoIAlign (aligned, detectron2's ROIAlignV2) of each RoI on its level's map (detectron2 poolers.py
    ROIPooler). ``strides`` are the levels' strides in input pixels, finest first."""

    def __init__(self, output_size: int, strides: tuple[float, ...], sampling_ratio: int = 0,
                 canonical_box_size: int = CANONICAL_BOX_SIZE, canonical_level: int = CANONICAL_LEVEL):
        super().__init__()
        self.output_size, self.strides, self.sampling_ratio = output_size, tuple(strides), sampling_ratio
        self.canonical = (canonical_box_size, canonical_level)

    def forward(self, feats: list[torch.Tensor], rois: torch.Tensor) -> torch.Tensor:
        """``rois`` (R, 5): batch index and continuous box in input pixels -> (R, C, size, size)."""
        levels = assign_levels(rois[:, 1:], LEVELS[0], LEVELS[0] + len(feats) - 1, *self.canonical)
        size = self.output_size
        out = feats[0].new_zeros((len(rois), feats[0].shape[1], size, size))
        for k, (feat, stride) in enumerate(zip(feats, self.strides)):
            idx = torch.nonzero(levels == k).flatten()
            if len(idx):
                out[idx] = roi_align(feat, rois[idx], (size, size), 1.0 / stride, self.sampling_ratio, aligned=True)
        return out


class BoxHead(nn.Module):
    """detectron2's FastRCNNConvFCHead: 3x3 convs (LayerNorm, no bias; ReLU) then fcs (ReLU) on (R, C, S, S) RoI
    features; convs MSRA-filled, fcs Xavier-filled (fvcore weight_init), biases 0."""

    def __init__(self, channels: int, size: int, conv_dims: tuple[int, ...], fc_dims: tuple[int, ...]):
        super().__init__()
        layers: list[nn.Module] = []
        for d in conv_dims:
            block = conv_ln(channels, d, 3, relu=True)
            nn.init.kaiming_normal_(block[0].weight, mode="fan_out", nonlinearity="relu")
            layers.append(block)
            channels = d
        width = channels * size * size
        layers.append(nn.Flatten())
        for d in fc_dims:
            fc = nn.Linear(width, d)
            nn.init.kaiming_uniform_(fc.weight, a=1)
            nn.init.zeros_(fc.bias)
            layers += [fc, nn.ReLU()]
            width = d
        self.layers = nn.Sequential(*layers)
        self.out_dim = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def check_vit_trunk(trunk: nn.Module) -> dict:
    if not isinstance(trunk, ViTTaps):
        arch = getattr(trunk, "arch", type(trunk).__name__)
        raise UserError(f"the ViTDet head needs a ViT trunk (evalsuite.vit); got {arch}")
    return arch_info(trunk.arch)


class ViTDetFastRCNN(nn.Module):
    """A ViT trunk, the simple feature pyramid on its last block's patch grid, multi-level RoIAlign and a box head
    with a (K+1)-way classifier and box regression (4(K+1) outputs, or 4 when class-agnostic)."""

    def __init__(self, trunk: nn.Module, num_classes: int, cfg: ViTDetConfig):
        super().__init__()
        info = check_vit_trunk(trunk)
        if cfg.backbone not in ("frozen", "finetune"):
            raise UserError(f"detection.vit.backbone must be frozen or finetune, got {cfg.backbone!r}")
        if cfg.box_head not in BOX_HEADS:
            raise UserError(f"detection.vit.box_head must be one of {', '.join(BOX_HEADS)}, got {cfg.box_head!r}")
        self.cfg, self.trunk, self.num_classes = cfg, trunk, num_classes
        self.patch, self.prefix, self.depth = info["patch"], info["prefix_tokens"], info["depth"]
        self.tap = cfg.tap or f"block{self.depth - 1}"
        self.frozen = cfg.backbone == "frozen"
        for p in self.trunk.parameters():
            p.requires_grad_(not self.frozen)
        self.pyramid = SimpleFeaturePyramid(info["embed_dim"], cfg.pyramid_channels, cfg.pyramid_scales)
        self.strides = tuple(self.patch / s for s in cfg.pyramid_scales)
        # detectron2 pads to the coarsest level's stride (SimpleFeaturePyramid size_divisibility), here 2 patches
        self.size_divisibility = int(round(max(self.strides)))
        self.pooler = MultiLevelRoIAlign(cfg.pool_size, self.strides, cfg.sampling_ratio, cfg.canonical_box_size,
                                         cfg.canonical_level)
        self.box_head = BoxHead(cfg.pyramid_channels, cfg.pool_size, *BOX_HEADS[cfg.box_head])
        self.cls_score = nn.Linear(self.box_head.out_dim, num_classes + 1)
        self.bbox_pred = nn.Linear(self.box_head.out_dim, 4 if cfg.cls_agnostic_bbox_reg else 4 * (num_classes + 1))
        nn.init.normal_(self.cls_score.weight, std=cfg.cls_init_std)
        nn.init.normal_(self.bbox_pred.weight, std=cfg.box_init_std)
        nn.init.zeros_(self.cls_score.bias)
        nn.init.zeros_(self.bbox_pred.bias)

    def train(self, mode: bool = True) -> ViTDetFastRCNN:
        super().train(mode)
        if self.frozen:
            self.trunk.eval()  # a frozen trunk computes its features as at test time (no dropout, no drop-path)
        return self

    def grid(self, images: torch.Tensor) -> torch.Tensor:
        """The tap's patch tokens as an (N, D, H/patch, W/patch) map (the sides are multiples of the patch)."""
        h, w = images.shape[-2] // self.patch, images.shape[-1] // self.patch
        tokens = self.trunk(images, [self.tap])[self.tap]
        return patch_grid(tokens, self.prefix, (h, w))

    def body(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The pyramid (strides patch/4, patch/2, patch, 2 patch); a frozen trunk runs without autograd."""
        if self.frozen:
            with torch.no_grad():
                grid = self.grid(images)
        else:
            grid = self.grid(images)
        return self.pyramid(grid)

    def rois(self, boxes: torch.Tensor, s: float, index: int = 0) -> torch.Tensor:
        """(R, 5) RoIs (batch ``index``, box) of continuous boxes already scaled by the image scale ``s``."""
        b = boxes.reshape(-1, 4)
        return torch.cat([b.new_full((len(b), 1), float(index)), b], 1)

    def head(self, feats: list[torch.Tensor], rois: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.box_head(self.pooler(feats, rois))
        return self.cls_score(x), self.bbox_pred(x)

    def forward(self, images: torch.Tensor, rois: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head(self.body(images), rois)

    def lr_scale(self, name: str) -> float:
        """The lr factor of a parameter (detectron2 vit.py get_vit_lr_decay_rate): decay ** (depth + 1 - layer),
        layer 0 for the embeddings (patch, position, CLS / register tokens, CLIP's pre-norm), block i + 1 for
        block i, depth + 1 (factor 1) for everything else."""
        if self.cfg.lr_decay == 1.0 or not name.startswith("trunk."):
            return 1.0
        key = name[len("trunk."):]
        layer = self.depth + 1
        if key.split(".")[0] in ("pos_embed", "patch_embed", "cls_token", "reg_token", "norm_pre"):
            layer = 0
        elif key.startswith("blocks."):
            layer = int(key.split(".")[1]) + 1
        return self.cfg.lr_decay ** (self.depth + 1 - layer)

