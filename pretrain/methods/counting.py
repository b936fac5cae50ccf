"""Representation learning by learning to count (Noroozi, Pirsiavash & Favaro, ICCV 2017).

A feature phi (the pooled trunk, a linear layer and a ReLU: non-negative "counts" of visual primitives,
1000-d) must be equivariant to tiling: the counts of the 2x2 tiles of x must add up to the counts of the
x2-downsampled image, sum_j phi(T_j x) = phi(D x). A contrastive term keeps the trivial solution phi = 0
away: the downsampled version of another image y (the next image of the batch) must differ from the tile
sum by at least a margin M (eq. 4: |phi(Dx) - t|^2 + max(0, M - |phi(Dy) - t|^2), t = sum_j phi(T_j x),
M = 10). The downsampling filter is drawn per step among bilinear / bicubic / area / nearest so the
network cannot detect it (Sec. 4)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..base import Batch, SingleViewMethod, optim_config

DOWNSAMPLE_MODES = ("bilinear", "bicubic", "area", "nearest")


def tiles_2x2(x: torch.Tensor) -> torch.Tensor:
    """(B, C, S, S) -> (B, 4, C, S/2, S/2), row-major tiles."""
    b, c, h, w = x.shape
    h2, w2 = h // 2, w // 2
    t = x[:, :, : 2 * h2, : 2 * w2].reshape(b, c, 2, h2, 2, w2).permute(0, 2, 4, 1, 3, 5)
    return t.reshape(b, 4, c, h2, w2)


def downsample(x: torch.Tensor, mode: str = "area") -> torch.Tensor:
    """x2 downsampling with the given filter."""
    size = (x.shape[-2] // 2, x.shape[-1] // 2)
    if mode in ("bilinear", "bicubic"):
        return F.interpolate(x, size=size, mode=mode, align_corners=False, antialias=True)
    return F.interpolate(x, size=size, mode=mode)


def counting_loss(c_down: torch.Tensor, c_tiles_sum: torch.Tensor, c_other_down: torch.Tensor,
                  margin: float = 10.0) -> torch.Tensor:
    """Mean over the batch of |c_down - t|^2 + max(0, M - |c_other_down - t|^2), t = c_tiles_sum."""
    pos = (c_down.float() - c_tiles_sum.float()).pow(2).sum(1)
    neg = (c_other_down.float() - c_tiles_sum.float()).pow(2).sum(1)
    return (pos + F.relu(margin - neg)).mean()


class Counting(SingleViewMethod):
    name = "counting"
    description = "Counting: tile counts sum to the downsampled image's counts, contrastive margin vs another image"
    defaults = {"dim": 1000, "margin": 10.0, "random_downsample": True}
    optim = optim_config("sgd", lr=0.01, weight_decay=5e-4)

    def __init__(self, arch, hp=None, **kw):
        super().__init__(arch, hp, **kw)
        self.counter = nn.Sequential(nn.Linear(self.feat_dim, self.hp["dim"]), nn.ReLU(inplace=True))

    def counts(self, x: torch.Tensor) -> torch.Tensor:
        return self.counter(self.embed(x))

    def training_step(self, batch: Batch):
        x = batch.views[0]
        b = x.shape[0]
        mode = DOWNSAMPLE_MODES[int(torch.randint(0, 4, ()))] if self.hp["random_downsample"] else "area"
        down = downsample(x, mode)
        tiles = tiles_2x2(x)
        c = self.counts(torch.cat([down, tiles.flatten(0, 1)]))
        c_down, c_tiles = c[:b], c[b:].view(b, 4, -1).sum(1)
        c_other = c_down.roll(1, dims=0)  # D(y): the downsampled next image of the batch
        return counting_loss(c_down, c_tiles, c_other, self.hp["margin"])
