"""Noise As Targets (Bojanowski & Joulin, ICML 2017): every image is assigned one of N fixed targets drawn
uniformly on the unit sphere; the network maps the image to the sphere (linear head, L2 normalisation) and
minimises the squared distance to its target; every ``reassign_every`` epochs the assignment is refined per
batch by the Hungarian algorithm (the batch's images permute their targets to maximise sum f.c)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn

from .. import distributed as D
from ..base import CLUSTERING_OPTIM, Batch, SingleViewMethod


def nat_loss(f: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ||f - c||^2 (both on the unit sphere)."""
    return (f.float() - targets.float()).pow(2).sum(1).mean()


def reassign(f: torch.Tensor, assigned: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Hungarian re-assignment inside a batch: the batch's target ids ``assigned`` (B,) permuted so that
    sum_i f_i . c_{new_i} is maximal. Returns the new ids (B,)."""
    cost = -(f.detach().float() @ targets[assigned].float().t()).cpu().numpy()
    rows, cols = linear_sum_assignment(cost)
    new = assigned.clone()
    new[torch.as_tensor(rows)] = assigned[torch.as_tensor(cols)]
    return new


class NAT(SingleViewMethod):
    name = "nat"
    description = "Noise As Targets: fixed random targets on the sphere, Hungarian batch re-assignment"
    defaults = {"dim": 128, "reassign_every": 3}
    optim = CLUSTERING_OPTIM

    def __init__(self, arch, hp=None, **kw):
        super().__init__(arch, hp, **kw)
        n = max(1, self.num_samples)
        self.head = nn.Linear(self.feat_dim, self.hp["dim"])
        g = torch.Generator().manual_seed(self.seed + 1)
        self.register_buffer("targets", F.normalize(torch.randn(n, self.hp["dim"], generator=g), dim=1))
        self.register_buffer("assignment", torch.randperm(n, generator=g))  # image i -> target id
        self._epoch = 0

    def on_epoch_start(self, trainer, epoch: int) -> None:
        self._epoch = epoch

    def training_step(self, batch: Batch):
        f = F.normalize(self.head(self.embed(batch.views[0])).float(), dim=1)
        if self._epoch % self.hp["reassign_every"] == 0:
            with torch.no_grad():
                idx, feats = D.concat_all_gather(batch.index), D.concat_all_gather(f.detach())
                self.assignment[idx] = reassign(feats, self.assignment[idx], self.targets)
        return nat_loss(f, self.targets[self.assignment[batch.index]])
