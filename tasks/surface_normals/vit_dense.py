"""Dense prediction on a frozen Vision Transformer: probe3d's DPT head over four evenly spaced blocks.

As in mbanani/probe3d (El Banani et al. 2024, "Probing the 3D Awareness of Visual Foundation Models"), run with
``train_snorm.py backbone=... +backbone.return_multilayer=True`` and ``configs/probe/snorm_dpt.yaml``:

- :func:`probe3d_blocks`: the blocks feeding the head, ``N//4 - 1, N//2 - 1, N//4*3 - 1, N - 1`` of N blocks
  (its backbones' ``multilayers``, evals/models/dino.py, clip.py, mae.py): 2, 5, 8, 11 of 12.
- Each block's tap (:mod:`evalsuite.vit`: its output with the final norm applied; probe3d reads it before the
  norm, a deviation: the task's SGD diverges on unnormalised block outputs), patch tokens only (CLS and register
  tokens left out) as a D x H/p x W/p map (:func:`evalsuite.vit.patch_grid`); position embeddings are resampled to
  the input's grid (timm's ``dynamic_img_size``, bicubic).
- :class:`DPTHead`: evals/models/probes.py ``DPT``: a 1x1 conv per block to ``hidden`` channels, each map upsampled
  x2 (bilinear, align_corners), fused deepest first by ``FeatureFusionBlock`` s of ``ResidualConvUnit`` s
  (conv-ReLU-conv-ReLU + input, ``kernel_size`` 3), upsampled x4, conv 3x3 - ReLU - conv 3x3 to the outputs,
  upsampled x2: 16 x 16 output pixels per grid cell. PyTorch's default initialisation, as the reference.
- :class:`FrozenViTDenseModel`: the trunk frozen (no gradients, eval mode), the head trained; the head's output is
  resized to the input (bicubic, align_corners, as train_snorm.py resizes it to the target) when the patch is not
  16. It has :class:`~tasks.surface_normals.dense_heads.FrozenTrunkDenseModel`'s interface, so the task's
  training loop, resume state and evaluation run it unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from evalsuite.errors import NotApplicable
from evalsuite.vit import patch_grid

REFERENCE = "mbanani/probe3d"
HEAD_FILE = f"{REFERENCE}:evals/models/probes.py"
HEAD_CONFIG = f"{REFERENCE}:configs/probe/snorm_dpt.yaml"
BLOCKS_FILE = f"{REFERENCE}:evals/models/dino.py"
#: configs/probe/snorm_dpt.yaml
KERNEL_SIZE = 3


def probe3d_blocks(depth: int) -> tuple[int, int, int, int]:
    """The four blocks (0-based) probe3d's backbones return with ``return_multilayer`` for ``depth`` blocks; a depth
    where the rule does not give four distinct blocks (below 4, and 6 or 7) is refused."""
    blocks = (depth // 4 - 1, depth // 2 - 1, depth // 4 * 3 - 1, depth - 1)
    if blocks[0] < 0 or len(set(blocks)) < 4:
        raise NotApplicable(f"surface_normals' DPT head reads 4 distinct blocks (probe3d's N//4-1, N//2-1, N//4*3-1, "
                            f"N-1); a ViT of {depth} blocks does not have them")
    return blocks


class ResidualConvUnit(nn.Module):
    """conv - ReLU - conv - ReLU, plus the input (probes.py ``ResidualConvUnit``)."""

    def __init__(self, channels: int, kernel_size: int):
        super().__init__()
        pad = kernel_size // 2
        self.conv = nn.Sequential(nn.Conv2d(channels, channels, kernel_size, padding=pad), nn.ReLU(),
                                  nn.Conv2d(channels, channels, kernel_size, padding=pad), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) + x


class FusionBlock(nn.Module):
    """probes.py ``FeatureFusionBlock``: ``unit(skip_unit(x) + deeper)``, or ``unit(x)`` for the deepest level."""

    def __init__(self, channels: int, kernel_size: int, with_skip: bool = True):
        super().__init__()
        self.skip_unit = ResidualConvUnit(channels, kernel_size) if with_skip else None
        self.unit = ResidualConvUnit(channels, kernel_size)

    def forward(self, x: torch.Tensor, deeper: torch.Tensor | None = None) -> torch.Tensor:
        if deeper is not None:
            x = self.skip_unit(x) + deeper
        return self.unit(x)


def _up(x: torch.Tensor, factor: int) -> torch.Tensor:
    return F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=True)


class DPTHead(nn.Module):
    """probe3d's DPT (probes.py): four same-resolution maps in, ``num_outputs`` channels at 16x their grid out."""

    def __init__(self, in_channels: Sequence[int], num_outputs: int, hidden: int = 512,
                 kernel_size: int = KERNEL_SIZE):
        super().__init__()
        if len(in_channels) != 4:
            raise ValueError(f"DPT takes 4 maps, got {len(in_channels)}")
        self.project = nn.ModuleList(nn.Conv2d(c, hidden, 1) for c in in_channels)
        self.fuse = nn.ModuleList(FusionBlock(hidden, kernel_size, with_skip=i < 3) for i in range(4))
        self.out_conv = nn.Sequential(nn.Conv2d(hidden, hidden, 3, padding=1), nn.ReLU(),
                                      nn.Conv2d(hidden, num_outputs, 3, padding=1))

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        x = [_up(proj(f), 2) for proj, f in zip(self.project, feats)]
        out = self.fuse[3](x[3])
        for i in (2, 1, 0):  # fused from the deepest block to the shallowest
            out = self.fuse[i](x[i], out)
        return _up(self.out_conv(_up(out, 4)), 2)


class FrozenViTDenseModel(nn.Module):
    """A frozen timm ViT trunk (:mod:`evalsuite.vit`) and a trained DPT head on four of its blocks."""

    output_stride = 1  # outputs at the input's resolution
    trainable_stages: tuple[str, ...] = ()

    def __init__(self, trunk: nn.Module, num_outputs: int, head_channels: int = 512,
                 kernel_size: int = KERNEL_SIZE):
        super().__init__()
        self.trunk = trunk.requires_grad_(False)
        self.blocks = probe3d_blocks(len(trunk.blocks))
        self.patch = tuple(int(s) for s in trunk.patch_embed.patch_size)
        self.frozen_stages = tuple(f"block{i}" for i in range(self.blocks[-1] + 1))
        self.head_channels, self.kernel_size = head_channels, kernel_size
        self.head = DPTHead([trunk.embed_dim] * 4, num_outputs, head_channels, kernel_size)
        self.train(False)

    @property
    def layer_name(self) -> str:
        """The result's layer: the blocks feeding the head, ``blocks2-5-8-11``."""
        return "blocks" + "-".join(str(b) for b in self.blocks)

    def description(self) -> dict[str, Any]:
        """What the records say about the head."""
        return {"type": "dpt", "reference": [HEAD_FILE, HEAD_CONFIG, BLOCKS_FILE],
                "blocks": list(self.blocks), "block_rule": "N//4-1, N//2-1, N//4*3-1, N-1 of N blocks",
                "tokens": "each block's tap (output with the final norm applied), patch tokens only (CLS and "
                          "registers left out), as a D x H/p x W/p map",
                "hidden_channels": self.head_channels, "kernel_size": self.kernel_size,
                "upsampling": "x2 before fusion, x4 and x2 after (bilinear, align_corners)",
                "output": "resized to the input (bicubic, align_corners) where 16 x grid is not the input size",
                "pos_embed": "resampled to the input's patch grid (timm dynamic_img_size, bicubic)",
                "trunk": "frozen, eval mode"}

    def train(self, mode: bool = True):
        super().train(mode)
        self.trunk.eval()  # the frozen trunk's dropout / drop-path stay off
        return self

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The head's weights (what a resume checkpoint stores)."""
        return {k: v.detach().clone() for k, v in self.state_dict().items() if k.startswith("head.")}

    @torch.no_grad()
    def frozen_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 4, D, H/p, W/p): the four blocks' patch-token maps, stacked so that caches and batches index one
        tensor. The input's sides must be multiples of the patch (the task pads to them)."""
        (h, w), (ph, pw) = x.shape[-2:], self.patch
        if h % ph or w % pw:
            raise ValueError(f"input {h}x{w} is not a multiple of the {ph}x{pw} patch")
        taps = [f"block{b}" for b in self.blocks]
        tokens = self.trunk(x, taps)
        grid = (h // ph, w // pw)
        return torch.stack([patch_grid(tokens[t], self.trunk.num_prefix_tokens, grid) for t in taps], dim=1)

    def forward_from(self, feats: torch.Tensor) -> torch.Tensor:
        """Head on :meth:`frozen_features` -> (B, num_outputs, H, W) at the input's resolution."""
        out = self.head(list(feats.unbind(1)))
        size = (feats.shape[-2] * self.patch[0], feats.shape[-1] * self.patch[1])
        if tuple(out.shape[-2:]) != size:
            out = F.interpolate(out, size=size, mode="bicubic", align_corners=True)
        return out

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_from(self.frozen_features(images))
