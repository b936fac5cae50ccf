"""SeLA, self-labelling via simultaneous clustering and representation learning (Asano et al., ICLR 2020):
pseudo-labels are the optimal transport plan between the network's predictions and an equipartition of the
data over K clusters, maximising <Q, log P> + H(Q)/lambda (lambda = 25) solved by Sinkhorn-Knopp on the whole
training set, recomputed every ``update_every`` epochs; the network is trained by cross-entropy on them,
with several clustering heads (10 in the paper) sharing the trunk."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import distributed as D
from ..base import CLUSTERING_OPTIM, Batch, SingleViewMethod
from ..losses import sinkhorn_log


def self_label(log_p: torch.Tensor, lam: float = 25.0, iters: int = 100) -> torch.Tensor:
    """Equipartitioned hard labels (N,) from log-probabilities (N, K)."""
    return sinkhorn_log(log_p, lam=lam, iters=iters).argmax(1)


class SeLA(SingleViewMethod):
    name = "sela"
    description = "SeLA: self-labelling by optimal transport (Sinkhorn) equipartition, several heads"
    defaults = {"n_clusters": 3000, "n_heads": 1, "lam": 25.0, "sinkhorn_iters": 100, "update_every": 1}
    optim = CLUSTERING_OPTIM

    def __init__(self, arch, hp=None, **kw):
        super().__init__(arch, hp, **kw)
        n = max(1, self.num_samples)
        self.k = max(2, min(self.hp["n_clusters"], n))
        self.heads = nn.ModuleList(nn.Linear(self.feat_dim, self.k) for _ in range(self.hp["n_heads"]))
        g = torch.Generator().manual_seed(self.seed)
        init = torch.stack([torch.randperm(n, generator=g) % self.k for _ in range(self.hp["n_heads"])])
        self.register_buffer("pseudo_labels", init)  # (heads, N)

    def on_epoch_start(self, trainer, epoch: int) -> None:
        if epoch % self.hp["update_every"]:
            return
        logits = trainer.full_pass(lambda x, i: torch.stack([h(self.embed(x)) for h in self.heads], 1))
        for h in range(len(self.heads)):
            labels = self_label(F.log_softmax(logits[:, h].float(), 1), self.hp["lam"], self.hp["sinkhorn_iters"])
            self.pseudo_labels[h].copy_(D.broadcast(labels.to(self.pseudo_labels.device)))

    def training_step(self, batch: Batch):
        z = self.embed(batch.views[0])
        losses = [F.cross_entropy(h(z).float(), self.pseudo_labels[i][batch.index]) for i, h in enumerate(self.heads)]
        return torch.stack(losses).mean()
