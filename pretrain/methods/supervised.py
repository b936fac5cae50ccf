"""Supervised baseline: cross-entropy on the dataset labels with a linear classifier on the pooled trunk
(the reference every self-supervised leaderboard row is compared with)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from ..base import Batch, SingleViewMethod, optim_config


class Supervised(SingleViewMethod):
    name = "supervised"
    description = "supervised baseline: cross-entropy on the dataset labels"
    defaults = {"label_smoothing": 0.0}
    optim = optim_config("sgd", lr=0.1, weight_decay=1e-4)
    short = {"optim": {"lr": 0.05}}
    uses_labels = True

    def __init__(self, arch, hp=None, **kw):
        super().__init__(arch, hp, **kw)
        self.fc = nn.Linear(self.feat_dim, max(1, self.num_classes))

    def training_step(self, batch: Batch):
        logits = self.fc(self.embed(batch.views[0]))
        return F.cross_entropy(logits.float(), batch.target, label_smoothing=self.hp["label_smoothing"])
