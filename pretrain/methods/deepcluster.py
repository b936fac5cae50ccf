"""DeepCluster (Caron et al., ECCV 2018): at the start of every epoch the trunk's features of the whole
training set (centre crops, eval mode) are PCA-whitened to 256 dims and L2-normalised, clustered by k-means
(FAISS; k = 10000 for ImageNet), empty clusters are fixed by splitting a non-empty one (its centroid
perturbed by +-eps, its points re-assigned between the two), and the cluster ids become pseudo-labels for a
classifier whose top layer is re-initialised (and its optimiser state dropped) every epoch. The paper samples
images uniformly over clusters; here the cross-entropy weights each cluster by 1/size, the same expectation.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import distributed as D
from ..base import CLUSTERING_OPTIM, Batch, SingleViewMethod


def pca_whiten(x: np.ndarray, dim: int, eps: float = 1e-5) -> np.ndarray:
    """Centre, project on the top ``dim`` principal axes, whiten (divide by sqrt eigenvalue), L2-normalise rows."""
    x = x.astype(np.float64) - x.mean(0)
    dim = max(1, min(dim, x.shape[1], x.shape[0] - 1))
    _, s, vt = np.linalg.svd(x, full_matrices=False)
    var = s[:dim] ** 2 / max(1, x.shape[0] - 1)
    y = x @ vt[:dim].T / np.sqrt(var + eps)
    y /= np.linalg.norm(y, axis=1, keepdims=True) + 1e-12
    return y.astype(np.float32)


def fix_empty_clusters(x: np.ndarray, centroids: np.ndarray, assign: np.ndarray, rng: np.random.Generator,
                       eps: float = 1e-4) -> tuple[np.ndarray, np.ndarray]:
    """DeepCluster's empty-cluster rule: for every empty cluster pick a non-empty one with probability
    proportional to its size, copy its centroid with a +-eps perturbation, and split its points between the
    two centroids by nearest distance. Returns (centroids, assignment) with no empty cluster when k <= n."""
    centroids, assign = centroids.copy(), assign.copy()
    k = centroids.shape[0]
    for empty in range(k):
        if (assign == empty).any():
            continue
        sizes = np.bincount(assign, minlength=k).astype(np.float64)
        sizes[sizes <= 1] = 0
        if sizes.sum() == 0:
            break
        donor = int(rng.choice(k, p=sizes / sizes.sum()))
        base = centroids[donor].copy()
        centroids[empty], centroids[donor] = base * (1 + eps), base * (1 - eps)
        members = np.flatnonzero(assign == donor)
        d_e = ((x[members] - centroids[empty]) ** 2).sum(1)
        d_d = ((x[members] - centroids[donor]) ** 2).sum(1)
        move = members[d_e < d_d]
        if len(move) == 0 or len(move) == len(members):  # degenerate tie: split by index
            move = members[: len(members) // 2]
        assign[move] = empty
    return centroids, assign


def kmeans(x: np.ndarray, k: int, seed: int, niter: int = 20) -> np.ndarray:
    """FAISS k-means followed by :func:`fix_empty_clusters`; returns the assignment (n,)."""
    import faiss

    k = min(k, x.shape[0])
    km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed, verbose=False, min_points_per_centroid=1,
                      max_points_per_centroid=1_000_000)
    km.train(np.ascontiguousarray(x))
    _, assign = km.index.search(np.ascontiguousarray(x), 1)
    _, assign = fix_empty_clusters(x, km.centroids, assign[:, 0].astype(np.int64), np.random.default_rng(seed))
    return assign


class DeepCluster(SingleViewMethod):
    name = "deepcluster"
    description = "DeepCluster: per-epoch PCA + k-means (FAISS) pseudo-labels, empty-cluster fix, head re-init"
    defaults = {"n_clusters": 10000, "pca_dim": 256, "kmeans_iters": 20}
    optim = CLUSTERING_OPTIM

    def __init__(self, arch, hp=None, **kw):
        super().__init__(arch, hp, **kw)
        n = max(1, self.num_samples)
        self.k = max(2, min(self.hp["n_clusters"], n))
        self.top = nn.Linear(self.feat_dim, self.k)
        self.register_buffer("pseudo_labels", torch.zeros(n, dtype=torch.long))
        self.register_buffer("class_weight", torch.ones(self.k))

    def on_epoch_start(self, trainer, epoch: int) -> None:
        feats = trainer.full_pass(lambda x, i: self.embed(x)).cpu().numpy()
        labels = torch.from_numpy(kmeans(pca_whiten(feats, self.hp["pca_dim"]), self.k,
                                         seed=self.seed * 1000 + epoch, niter=self.hp["kmeans_iters"]))
        labels = D.broadcast(labels.to(self.pseudo_labels.device))
        self.pseudo_labels.copy_(labels)
        counts = torch.bincount(labels, minlength=self.k).float()
        self.class_weight.copy_(torch.where(counts > 0, counts.sum() / (self.k * counts.clamp_min(1)), 0.0))
        g = torch.Generator().manual_seed(self.seed * 1000 + epoch)
        with torch.no_grad():  # re-initialise the top layer (seeded) and drop its optimiser state
            bound = 1 / self.feat_dim**0.5
            self.top.weight.copy_(torch.empty_like(self.top.weight, device="cpu").uniform_(-bound, bound,
                                                                                            generator=g))
            self.top.bias.zero_()
        for p in self.top.parameters():
            trainer.optimizer.state.pop(p, None)

    def training_step(self, batch: Batch):
        logits = self.top(self.embed(batch.views[0]))
        return F.cross_entropy(logits.float(), self.pseudo_labels[batch.index], weight=self.class_weight)
