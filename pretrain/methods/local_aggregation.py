"""Local Aggregation (Zhuang, Zhai & Yamins, ICCV 2019; neuroailab/LocalAggregation, its PyTorch port
LocalAggregation-Pytorch): a linear head to 128-d L2-normalised embeddings and NPID's memory bank (momentum 0.5,
``pretrain.memory.MemoryBank``). At the start of every epoch the bank is clustered ``n_kmeans`` times by k-means
(``kmeans_k`` clusters each, FAISS, 20 iterations, seeds 1234 + h (+ 100 x --seed): localagg.py Kmeans /
run_kmeans). The loss
(:func:`pretrain.losses.local_aggregation_loss`) raises the probability of the close neighbours C (bank entries that
share the sample's cluster in any clustering) among its background neighbours B (the ``k`` = 4096 most similar bank
entries), T = 0.07. SGD lr 0.03, momentum 0.9, weight decay 1e-4 at a batch of 128; moco_v1 views (crop 0.2-1,
grayscale 0.2, jitter 0.4, flip; the reference applies its jitter always, ours with p 0.8).

The reference warm-starts from 10 epochs of instance recognition (la_final.json ``load_exp``: 100090 steps of the IR
task); here the first ``ir_epochs`` epochs train that objective with the same head and bank (the reference's IR:
NCE over 4096 uniform noise samples with Z fixed at 2876934.2 / 1281167 x N, no proximal term), then LA takes over.
``ir_epochs = 0`` starts LA from scratch (k-means of the random bank, as the reference's first clustering). The
ResNet-18 config's 10 clusterings of 30000 clusters are the defaults (k is capped at the number of images)."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import distributed as D
from ..base import Batch, Method, optim_config
from ..losses import local_aggregation_loss, nce_loss
from ..memory import BANK_DEFAULTS, MemoryBank

#: the reference's fixed NCE normaliser per image: Z = 2876934.2 / 1281167 x N (instance.py _softmax)
IR_Z_PER_IMAGE = 2876934.2 / 1281167
KMEANS_SEED = 1234  # localagg.py DEFAULT_KMEANS_SEED


def cluster_bank(bank: np.ndarray, k: int, n_kmeans: int, seed: int = KMEANS_SEED, niter: int = 20) -> np.ndarray:
    """(n_kmeans, N) labels of ``n_kmeans`` FAISS k-means runs on the bank rows, run h seeded ``seed + h``."""
    import faiss

    x = np.ascontiguousarray(bank, dtype=np.float32)
    k = max(1, min(k, x.shape[0]))
    out = []
    for h in range(n_kmeans):
        km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed + h, verbose=False, min_points_per_centroid=1,
                          max_points_per_centroid=10_000_000)
        km.train(x)
        out.append(km.index.search(x, 1)[1][:, 0])
    return np.stack(out).astype(np.int64)


class LocalAggregation(Method):
    name = "local_aggregation"
    description = "Local Aggregation: memory bank, per-epoch k-means close neighbours among the k nearest (after IR)"
    defaults = {**BANK_DEFAULTS, "k": 4096, "bank_momentum": 0.5, "kmeans_k": 30000, "n_kmeans": 10,
                "kmeans_iters": 20, "ir_epochs": 10, "nce_k": 4096}
    optim = optim_config("sgd", lr=0.03, weight_decay=1e-4, base_batch_size=128)
    augment = "moco_v1"
    n_views = 1

    def __init__(self, arch, hp=None, **kw):
        super().__init__(arch, hp, **kw)
        n = max(1, self.num_samples)
        self.head = nn.Linear(self.feat_dim, self.hp["dim"])
        self.memory = MemoryBank(n, self.hp["dim"], self.hp["bank_momentum"], self.seed + 1)
        # every sample its own cluster until the first clustering (the reference's initial labels)
        self.register_buffer("cluster_labels", torch.arange(n).repeat(max(1, self.hp["n_kmeans"]), 1))
        self.register_buffer("phase_la", torch.zeros((), dtype=torch.bool))

    def on_train_start(self, trainer) -> None:
        if self.hp["ir_epochs"] >= trainer.cfg.epochs and D.rank() == 0:
            from evalsuite.console import warn

            warn(f"local_aggregation: all {trainer.cfg.epochs} epoch(s) are the instance-recognition warm-up "
                 f"(ir_epochs={self.hp['ir_epochs']}); no Local Aggregation step will run (--set ir_epochs=0 "
                 "starts LA at once)")

    def on_epoch_start(self, trainer, epoch: int) -> None:
        self.phase_la.fill_(epoch >= self.hp["ir_epochs"])
        if not self.phase_la:
            return
        labels = cluster_bank(self.memory.bank.cpu().numpy(), self.hp["kmeans_k"], self.hp["n_kmeans"],
                              KMEANS_SEED + 100 * self.seed, self.hp["kmeans_iters"])
        self.cluster_labels.copy_(D.broadcast(torch.from_numpy(labels).to(self.cluster_labels.device)))

    def training_step(self, batch: Batch):
        f = F.normalize(self.head(self.embed(batch.views[0])).float(), dim=1)
        idx = batch.index
        if self.phase_la:
            loss, close = local_aggregation_loss(f, self.memory.bank, self.cluster_labels, idx, self.hp["k"],
                                                 self.hp["temperature"])
            logs = {"close": float(close)}
        else:
            loss, logs = self.instance_recognition(f, idx), {}
        self._pending = (idx, f.detach())
        return loss, logs

    def instance_recognition(self, f: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """The reference's IR warm-up: NCE of the non-parametric softmax with a fixed Z (instance.py)."""
        t, n = self.hp["temperature"], len(self.memory)
        noise = self.memory.sample(f.shape[0], self.hp["nce_k"])
        pos = (f * self.memory.get(idx)).sum(1) / t
        neg = torch.einsum("bd,bkd->bk", f, self.memory.get(noise)) / t
        return nce_loss(pos, neg, math.log(IR_Z_PER_IMAGE * n), n)

    def on_after_step(self, trainer) -> None:
        self.memory.update(*self._pending)
