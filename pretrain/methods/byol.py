"""BYOL (Grill et al., NeurIPS 2020): online network (trunk + projector 4096-256 + predictor), target network
= EMA of the online one with tau increased from 0.996 to 1 by a cosine schedule, symmetric normalised MSE
2 - 2 cos(p, z') without negatives. LARS, lr 0.2 x B/256, weight decay 1.5e-6, asymmetric augmentations."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..base import SHORT_SGD, Batch, Method, cifar_lars, ema_update, mlp, momentum_copy, optim_config, trunk_embedding
from ..losses import embedding_std


def byol_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ||p/|p| - z/|z|||^2 = 2 - 2 cos(p, z), gradient stopped through ``z``."""
    p = F.normalize(p.float(), dim=1)
    z = F.normalize(z.detach().float(), dim=1)
    return (2 - 2 * (p * z).sum(dim=1)).mean()


def cosine_momentum(base: float, progress: float, final: float = 1.0) -> float:
    """tau = final - (final - tau_base) (cos(pi k / K) + 1) / 2."""
    return final - (final - base) * (math.cos(math.pi * progress) + 1) / 2


class BYOL(Method):
    name = "byol"
    description = "BYOL: online/target networks, predictor, EMA target, normalised MSE, no negatives"
    defaults = {"proj_hidden": 4096, "proj_dim": 256, "pred_hidden": 4096, "tau_base": 0.996}
    optim = optim_config("lars", lr=0.2, weight_decay=1.5e-6, warmup_epochs=10)
    short = {"hp": {"proj_hidden": 1024, "pred_hidden": 1024, "tau_base": 0.99}, "optim": SHORT_SGD}
    #: solo-learn scripts/pretrain/cifar/byol.yaml (tau 0.99 -> 1.0)
    cifar = {"hp": {"proj_hidden": 4096, "proj_dim": 256, "pred_hidden": 4096, "tau_base": 0.99},
             "optim": cifar_lars(lr=1.0, weight_decay=1e-5), "views": "cifar_asymmetric"}
    augment = "byol"

    def __init__(self, arch, hp=None, **kw):
        super().__init__(arch, hp, **kw)
        self.projector = mlp([self.feat_dim, self.hp["proj_hidden"], self.hp["proj_dim"]])
        self.predictor = mlp([self.hp["proj_dim"], self.hp["pred_hidden"], self.hp["proj_dim"]])
        self.target_trunk = momentum_copy(self.trunk)
        self.target_projector = momentum_copy(self.projector)

    def _target(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.target_projector(trunk_embedding(self.target_trunk, x))

    def training_step(self, batch: Batch):
        v1, v2 = batch.views[0], batch.views[1]
        y1 = self.projector(self.embed(v1))
        p1, p2 = self.predictor(y1), self.predictor(self.projector(self.embed(v2)))
        z1, z2 = self._target(v1), self._target(v2)
        return byol_loss(p1, z2) + byol_loss(p2, z1), {"z_std": embedding_std(y1)}

    def on_after_step(self, trainer) -> None:
        tau = cosine_momentum(self.hp["tau_base"], trainer.progress)
        ema_update(self.target_trunk, self.trunk, tau)
        ema_update(self.target_projector, self.projector, tau)
