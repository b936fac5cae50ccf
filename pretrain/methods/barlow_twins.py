"""Barlow Twins (Zbontar et al., ICML 2021): projector 8192-8192-8192 (BN+ReLU), each embedding dimension
standardised over the batch, cross-correlation C = z1n^T z2n / N driven to the identity:
L = sum_i (1 - C_ii)^2 + lambda sum_{i != j} C_ij^2, lambda = 5e-3. LARS, lr 0.2 x B/256 (weights), wd 1.5e-6.
Under DDP the correlation is summed over processes (the paper's all_reduce), so it is the global batch's.
``scale_loss`` multiplies the loss (solo-learn's knob, 0.1 in its CIFAR recipes; 1 here by default: under LARS
the update does not depend on the loss scale, under SGD it acts like a smaller learning rate)."""

from __future__ import annotations

import torch

from .. import distributed as D
from ..base import SHORT_SGD, Batch, Method, cifar_lars, mlp, optim_config
from ..losses import embedding_std


def cross_correlation(z1: torch.Tensor, z2: torch.Tensor, eps: float = 1e-5, total: int | None = None,
                      distributed: bool = False) -> torch.Tensor:
    """Batch-standardised cross-correlation (D, D); with ``distributed`` the per-rank sums are all-reduced
    (statistics then should be global: pass BN'd inputs as the paper does)."""
    z1, z2 = z1.float(), z2.float()
    z1 = (z1 - z1.mean(0)) / (z1.std(0, unbiased=False) + eps)
    z2 = (z2 - z2.mean(0)) / (z2.std(0, unbiased=False) + eps)
    c = z1.t() @ z2
    if distributed:
        c = _AllReduce.apply(c)
    return c / (total or z1.shape[0])


class _AllReduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        return D.all_reduce_sum(x)

    @staticmethod
    def backward(ctx, g):
        g = g.clone()
        return D.all_reduce_sum(g)


def barlow_twins_loss(c: torch.Tensor, lambd: float = 5e-3, scale: float = 1.0) -> torch.Tensor:
    """``scale`` * (sum_i (1 - C_ii)^2 + lambd * sum_{i != j} C_ij^2)."""
    on = (torch.diagonal(c) - 1).pow(2).sum()
    off = c.pow(2).sum() - torch.diagonal(c).pow(2).sum()
    return scale * (on + lambd * off)


class BarlowTwins(Method):
    name = "barlow_twins"
    description = "Barlow Twins: cross-correlation of the two views' embeddings driven to the identity"
    defaults = {"proj_dim": 8192, "lambd": 5e-3, "scale_loss": 1.0}
    optim = optim_config("lars", lr=0.2, weight_decay=1.5e-6, warmup_epochs=10)
    #: short: lambda keeps the paper's balance of the D^2 off-diagonal terms (each ~1/N at random) against the D
    #: diagonal ones, lambda * D / N = 5e-3 * 8192 / 2048, at D = 1024 and a batch of N = 32: 6.25e-4 (with 5e-3
    #: the off-diagonal term is 8x heavier and 3 CPU minutes leave kNN at random init, 8.5 vs 13.2 with 6e-4)
    short = {"hp": {"proj_dim": 1024, "lambd": 6.25e-4}, "optim": SHORT_SGD}
    #: solo-learn scripts/pretrain/cifar/barlow.yaml: projector 2048-2048-2048, scale_loss 0.1 (lamb 0.0051 is
    #: solo/methods/barlow_twins.py's default)
    cifar = {"hp": {"proj_dim": 2048, "lambd": 0.0051, "scale_loss": 0.1},
             "optim": cifar_lars(lr=0.3, weight_decay=1e-4), "views": "cifar_asymmetric"}
    augment = "byol"

    def __init__(self, arch, hp=None, **kw):
        super().__init__(arch, hp, **kw)
        d = self.hp["proj_dim"]
        self.projector = mlp([self.feat_dim, d, d, d])

    def training_step(self, batch: Batch):
        z1 = self.projector(self.embed(batch.views[0]))
        z2 = self.projector(self.embed(batch.views[1]))
        world = D.world_size()
        c = cross_correlation(z1, z2, total=z1.shape[0] * world, distributed=world > 1)
        return barlow_twins_loss(c, self.hp["lambd"], self.hp["scale_loss"]), {"z_std": embedding_std(z1)}
