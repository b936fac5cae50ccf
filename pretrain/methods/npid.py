"""Instance discrimination / NPID (Wu et al., CVPR 2018): every image is its own class through a memory bank
of L2-normalised 128-d features (momentum 0.5); the non-parametric softmax P(i|v) = exp(v_i.f/T)/Z (T = 0.07)
is estimated by NCE with m = 4096 uniformly drawn noise samples and Z fixed from the first batch
(Z ~ n E[exp(v.f/T)]); proximal regularisation lambda ||v_i^(t) - v_i^(t-1)||^2 (Sec. 3.3, lambda = 30)
stabilises training. SGD lr 0.03, wd 5e-4."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import distributed as D
from ..base import Batch, Method, optim_config
from ..losses import nce_loss
from ..memory import BANK_DEFAULTS, MemoryBank


def proximal_term(f: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ||f - v_prev||^2 (the memory entry of the same image from the last epoch)."""
    return (f.float() - previous.float().detach()).pow(2).sum(1).mean()


class NPID(Method):
    name = "npid"
    description = "NPID / instance discrimination: memory bank, NCE over sampled negatives, proximal term"
    defaults = {**BANK_DEFAULTS, "nce_k": 4096, "bank_momentum": 0.5, "proximal": 30.0}
    optim = optim_config("sgd", lr=0.03, weight_decay=5e-4)
    augment = "moco_v1"
    n_views = 1

    def __init__(self, arch, hp=None, **kw):
        super().__init__(arch, hp, **kw)
        self.head = nn.Linear(self.feat_dim, self.hp["dim"])
        self.memory = MemoryBank(max(1, self.num_samples), self.hp["dim"], self.hp["bank_momentum"], self.seed + 1)
        self.register_buffer("log_z", torch.tensor(float("nan")))

    def training_step(self, batch: Batch):
        f = F.normalize(self.head(self.embed(batch.views[0])).float(), dim=1)
        idx = batch.index
        t = self.hp["temperature"]
        noise = self.memory.sample(f.shape[0], self.hp["nce_k"])
        previous = self.memory.get(idx)
        pos = (f * previous).sum(1) / t
        neg = torch.einsum("bd,bkd->bk", f, self.memory.get(noise)) / t
        if torch.isnan(self.log_z):
            with torch.no_grad():  # Z = n * E[exp(logit)] over the noise of the first batch, then fixed
                z = neg.exp().mean()
                D.all_reduce_sum(z)
                self.log_z.fill_(math.log(float(z) / D.world_size() * len(self.memory)))
        loss = nce_loss(pos, neg, self.log_z, len(self.memory))
        if self.hp["proximal"] > 0:
            loss = loss + self.hp["proximal"] * proximal_term(f, previous)
        self._pending = (idx, f.detach())
        return loss

    def on_after_step(self, trainer) -> None:
        self.memory.update(*self._pending)
