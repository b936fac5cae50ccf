"""MoCo v1 (He et al., CVPR 2020) and v2 (Chen et al., 2020).

Query encoder f_q (trunk + head), key encoder f_k = momentum copy (m = 0.999) fed the other view with
shuffled BN (``pretrain.distributed.batch_shuffle``; in one process the shuffled keys are encoded in
``bn_splits`` groups, each with its own BN statistics, which is what shuffling across GPUs achieves), a
queue of K = 65536 past keys as negatives, InfoNCE with T = 0.07 (v1) / 0.2 (v2). v1: linear 128-d head,
moco_v1 augmentations; v2: 2-layer MLP head, SimCLR-style augmentations with blur, cosine schedule.

solo-learn's MoCo V2+ (solo/methods/mocov2plus.py, the ``cifar`` recipe): ``symmetric`` adds the mirrored
term, L = (InfoNCE(q1, k2, queue of view-2 keys) + InfoNCE(q2, k1, queue of view-1 keys)) / 2, with one queue
per view; ``momentum_k_end`` > 0 raises the key encoder's momentum from ``momentum_k`` to it by a cosine over
training (solo/utils/momentum.py); ``bn_splits`` = 1 encodes the keys with plain BN over the batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import distributed as D
from ..base import Batch, Method, cifar_sgd, ema_update, mlp, momentum_copy, optim_config, trunk_embedding
from ..losses import embedding_std, info_nce
from ..memory import Queue
from .byol import cosine_momentum


class MoCoV1(Method):
    name = "moco_v1"
    description = "MoCo v1: momentum key encoder, queue of negatives, shuffled BN, linear head, T=0.07"
    defaults = {"queue_size": 65536, "momentum_k": 0.999, "temperature": 0.07, "dim": 128, "bn_splits": 2,
                "mlp_hidden": 0, "symmetric": False, "momentum_k_end": 0.0}
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
        self.queue = Queue(self.hp["queue_size"], self.hp["dim"], seed=self.seed + 1)  # keys of view 2
        # keys of view 1, the negatives of view 2's queries in the symmetric loss
        self.queue_v1 = Queue(self.hp["queue_size"], self.hp["dim"], seed=self.seed + 2) if self.hp["symmetric"] \
            else None

    def key_embed(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head_k(trunk_embedding(self.trunk_k, x)), dim=1)

    @torch.no_grad()
    def keys(self, x: torch.Tensor) -> torch.Tensor:
        """Keys with shuffled BN: across processes when distributed, else in ``bn_splits`` shuffled groups."""
        shuffled, unshuffle = D.batch_shuffle(x)
        splits = self.hp["bn_splits"] if D.world_size() == 1 else 1
        k = torch.cat([self.key_embed(c) for c in shuffled.chunk(max(1, splits))])
        return D.batch_unshuffle(k, unshuffle)

    def query(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(self.embed(x)), dim=1)

    def training_step(self, batch: Batch):
        t = self.hp["temperature"]
        q = self.query(batch.views[0])
        k = self.keys(batch.views[1])
        loss = info_nce(q, k, self.queue.items.clone(), t)
        self._pending = [k]
        if self.queue_v1 is not None:
            k1 = self.keys(batch.views[0])
            loss = (loss + info_nce(self.query(batch.views[1]), k1, self.queue_v1.items.clone(), t)) / 2
            self._pending.append(k1)
        return loss, {"z_std": embedding_std(q)}

    def key_momentum(self, progress: float) -> float:
        """``momentum_k``, or with ``momentum_k_end`` the cosine from one to the other at ``progress``."""
        end = self.hp["momentum_k_end"]
        return cosine_momentum(self.hp["momentum_k"], progress, end) if end > 0 else self.hp["momentum_k"]

    def on_after_step(self, trainer) -> None:
        m = self.key_momentum(trainer.progress)
        ema_update(self.trunk_k, self.trunk, m)
        ema_update(self.head_k, self.head, m)
        self.queue.enqueue(self._pending[0])
        if self.queue_v1 is not None:
            self.queue_v1.enqueue(self._pending[1])


class MoCoV2(MoCoV1):
    name = "moco_v2"
    description = "MoCo v2: MoCo v1 + MLP head, blur augmentation, T=0.2, cosine schedule"
    defaults = {**MoCoV1.defaults, "temperature": 0.2, "mlp_hidden": 2048}
    short = {"hp": {**MoCoV1.short["hp"], "mlp_hidden": 512}, "optim": MoCoV1.short["optim"]}
    #: solo-learn's MoCo V2+, scripts/pretrain/cifar/mocov2plus.yaml (solo/methods/mocov2plus.py: no shuffled BN)
    cifar = {"hp": {"mlp_hidden": 2048, "dim": 256, "queue_size": 32768, "temperature": 0.2, "momentum_k": 0.99,
                    "momentum_k_end": 0.999, "symmetric": True, "bn_splits": 1},
             "optim": cifar_sgd(lr=0.3, weight_decay=1e-4), "views": "cifar_symmetric_weak"}
    augment = "moco_v2"
