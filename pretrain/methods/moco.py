"""MoCo v1 (He et al., CVPR 2020) and v2 (Chen et al., 2020).

Query encoder f_q (trunk + head), key encoder f_k = momentum copy (m = 0.999) fed the other view with
shuffled BN (``pretrain.distributed.batch_shuffle``; in one process the shuffled keys are encoded in
``bn_splits`` groups, each with its own BN statistics, which is what shuffling across GPUs achieves), a
queue of K = 65536 past keys as negatives, InfoNCE with T = 0.07 (v1) / 0.2 (v2). v1: linear 128-d head,
moco_v1 augmentations; v2: 2-layer MLP head, SimCLR-style augmentations with blur, cosine schedule.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import distributed as D
from ..base import Batch, Method, ema_update, mlp, momentum_copy, optim_config, trunk_embedding
from ..losses import embedding_std, info_nce
from ..memory import Queue


class MoCoV1(Method):
    name = "moco_v1"
    description = "MoCo v1: momentum key encoder, queue of negatives, shuffled BN, linear head, T=0.07"
    defaults = {"queue_size": 65536, "momentum_k": 0.999, "temperature": 0.07, "dim": 128, "bn_splits": 2,
                "mlp_hidden": 0}
    optim = optim_config("sgd", lr=0.03, weight_decay=1e-4)
    short = {"hp": {"queue_size": 1024, "momentum_k": 0.99}, "optim": {"lr": 0.06, "weight_decay": 5e-4}}
    augment = "moco_v1"

    def __init__(self, arch, hp=None, **kw):
        super().__init__(arch, hp, **kw)
        h = self.hp["mlp_hidden"]
        self.head = mlp([self.feat_dim, h, self.hp["dim"]], bn=False) if h else nn.Linear(self.feat_dim,
                                                                                           self.hp["dim"])
        self.trunk_k = momentum_copy(self.trunk)
        self.head_k = momentum_copy(self.head)
        self.queue = Queue(self.hp["queue_size"], self.hp["dim"], seed=self.seed + 1)

    def key_embed(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head_k(trunk_embedding(self.trunk_k, x)), dim=1)

    @torch.no_grad()
    def keys(self, x: torch.Tensor) -> torch.Tensor:
        """Keys with shuffled BN: across processes when distributed, else in ``bn_splits`` shuffled groups."""
        shuffled, unshuffle = D.batch_shuffle(x)
        splits = self.hp["bn_splits"] if D.world_size() == 1 else 1
        k = torch.cat([self.key_embed(c) for c in shuffled.chunk(max(1, splits))])
        return D.batch_unshuffle(k, unshuffle)

    def training_step(self, batch: Batch):
        q = F.normalize(self.head(self.embed(batch.views[0])), dim=1)
        k = self.keys(batch.views[1])
        loss = info_nce(q, k, self.queue.items.clone(), self.hp["temperature"])
        self._pending = k
        return loss, {"z_std": embedding_std(q)}

    def on_after_step(self, trainer) -> None:
        m = self.hp["momentum_k"]
        ema_update(self.trunk_k, self.trunk, m)
        ema_update(self.head_k, self.head, m)
        self.queue.enqueue(self._pending)


class MoCoV2(MoCoV1):
    name = "moco_v2"
    description = "MoCo v2: MoCo v1 + MLP head, blur augmentation, T=0.2, cosine schedule"
    defaults = {**MoCoV1.defaults, "temperature": 0.2, "mlp_hidden": 2048}
    short = {"hp": {**MoCoV1.short["hp"], "mlp_hidden": 512}, "optim": MoCoV1.short["optim"]}
    augment = "moco_v2"
