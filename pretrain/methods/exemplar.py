"""Exemplar CNN (Dosovitskiy et al., NIPS 2014 / TPAMI 2016): every training image is its own surrogate
class; heavy augmentation (crops, scale, rotation, colour and contrast) generates its samples, and the
network is trained by N-way cross-entropy with a linear classifier on the pooled trunk."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from ..base import Batch, Method, optim_config


class Exemplar(Method):
    name = "exemplar"
    description = "Exemplar CNN: each image its own class under heavy augmentation"
    defaults = {}
    optim = optim_config("sgd", lr=0.1, weight_decay=1e-4)
    augment = "exemplar"
    n_views = 1

    def __init__(self, arch, hp=None, **kw):
        super().__init__(arch, hp, **kw)
        self.fc = nn.Linear(self.feat_dim, max(1, self.num_samples))

    def training_step(self, batch: Batch):
        return F.cross_entropy(self.fc(self.embed(batch.views[0])).float(), batch.index)
