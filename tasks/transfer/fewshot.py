"""n-way k-shot episodes on frozen features: the CD-FSL protocol (Guo et al. 2020, IBM/cdfsl-benchmark) as
Ericsson et al. 2021 (ssl-transfer ``few_shot.py``) run it.

- Episodes (:func:`sample_episodes`): 600 episodes, 5-way, k in {1, 5, 20, 50} support and 15 query images per
  class. Each episode draws ``n_way`` distinct classes uniformly (``torch.randperm(n_classes)[:n_way]`` in both
  references) and, per class, ``k + q`` distinct images uniformly (a shuffled DataLoader's first batch), the
  first k the support, the rest the queries. Seeded with numpy's ``default_rng(seed)``: the same episodes on
  every machine, not the references' (which follow torch's and numpy's global RNG).
- Classifiers on the frozen features, one per episode, all episodes batched:
  ``prototype`` (:func:`prototype_logits`) -- ssl-transfer ``few_shot.py``'s ProtoNet, the one Ericsson et al.
  report: class means of the support features, queries scored by minus the squared Euclidean distance;
  ``linear`` (:func:`linear_probe_logits`) -- CD-FSL ``finetune.py --freeze_backbone``: an ``nn.Linear``
  (default init) trained on the support features for 100 epochs of batch 4 (a fresh permutation each epoch),
  cross-entropy, SGD lr 0.01, momentum 0.9, dampening 0.9, weight decay 0.001.
- Accuracy per episode in percent; summary :func:`~tasks.transfer.metrics.mean_ci95` (mean, 1.96 std /
  sqrt(600)).

A class with fewer than k + q images cannot fill an episode (the references' batch would come out short and
fail to stack); such classes are left out of the draw (``Episodes.eligible`` says which remain).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from evalsuite.errors import UserError

from .metrics import mean_ci95


@dataclass(frozen=True)
class Episodes:
    """Row indices into the feature matrix: ``support`` (E, n_way, k), ``query`` (E, n_way, q); ``classes``
    (E, n_way) the label of each way; ``eligible`` the labels that had at least k + q rows."""

    classes: np.ndarray
    support: np.ndarray
    query: np.ndarray
    eligible: np.ndarray

    @property
    def n_way(self) -> int:
        return self.support.shape[1]

    @property
    def targets(self) -> np.ndarray:
        """The way of each query in ``query.reshape(E, -1)`` order (class-major, as the references)."""
        return np.repeat(np.arange(self.n_way), self.query.shape[2])


def sample_episodes(labels: np.ndarray, n_way: int = 5, k_shot: int = 5, n_query: int = 15, n_episodes: int = 600,
                    seed: int = 0) -> Episodes:
    """Seeded episodes over the rows of ``labels`` (n,); support and query rows of an episode are disjoint."""
    labels = np.asarray(labels)
    values, counts = np.unique(labels, return_counts=True)
    eligible = values[counts >= k_shot + n_query]
    if len(eligible) < n_way:
        raise UserError(f"{n_way}-way {k_shot}-shot episodes with {n_query} queries need {n_way} classes with "
                        f">= {k_shot + n_query} images; {len(eligible)} of {len(values)} have that many")
    rows = {c: np.nonzero(labels == c)[0] for c in eligible}
    rng = np.random.default_rng(seed)
    classes = np.empty((n_episodes, n_way), dtype=labels.dtype)
    picked = np.empty((n_episodes, n_way, k_shot + n_query), dtype=np.int64)
    for e in range(n_episodes):
        classes[e] = eligible[rng.permutation(len(eligible))[:n_way]]
        for j, c in enumerate(classes[e]):
            picked[e, j] = rng.permutation(rows[c])[:k_shot + n_query]
    return Episodes(classes, picked[:, :, :k_shot], picked[:, :, k_shot:], eligible)


def _gather(feats: torch.Tensor, idx: np.ndarray) -> torch.Tensor:
    return feats[torch.as_tensor(idx.reshape(-1), device=feats.device)].view(*idx.shape, feats.shape[1])


def prototype_logits(feats: torch.Tensor, episodes: Episodes, chunk: int = 100) -> torch.Tensor:
    """ProtoNet scores (E, n_way * q, n_way): minus the squared distance of each query to each class mean."""
    out = []
    for a in range(0, len(episodes.classes), chunk):
        sup = _gather(feats, episodes.support[a:a + chunk])  # (e, way, k, D)
        qry = _gather(feats, episodes.query[a:a + chunk]).flatten(1, 2)  # (e, way * q, D)
        proto = sup.mean(2)  # (e, way, D)
        d2 = (qry * qry).sum(-1, keepdim=True) - 2 * qry @ proto.transpose(1, 2) + (proto * proto).sum(-1)[:, None]
        out.append(-d2)
    return torch.cat(out)


def linear_probe_logits(feats: torch.Tensor, episodes: Episodes, seed: int = 0, epochs: int = 100,
                        batch_size: int = 4, lr: float = 0.01, momentum: float = 0.9, dampening: float = 0.9,
                        weight_decay: float = 1e-3, chunk: int = 100) -> torch.Tensor:
    """CD-FSL's frozen-backbone classifier per episode, all episodes of a chunk as one batched SGD: logits
    (E, n_way * q, n_way) of the queries. ``torch.optim.SGD``'s update, written out: ``d = g + wd p``; the first
    step's buffer is ``d``, later ``momentum * buf + (1 - dampening) * d``; ``p -= lr * buf``."""
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    way, k = episodes.support.shape[1:]
    dim = feats.shape[1]
    n_sup = way * k
    y_sup = torch.arange(way, device=feats.device).repeat_interleave(k)  # class-major, as np.repeat(range(way), k)
    out = []
    for a in range(0, len(episodes.classes), chunk):
        sup = _gather(feats, episodes.support[a:a + chunk]).flatten(1, 2)  # (e, way * k, D)
        e = sup.shape[0]
        bound = 1.0 / dim ** 0.5  # nn.Linear's default init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias
        w = ((torch.rand(e, dim, way, generator=gen, dtype=feats.dtype) * 2 - 1) * bound).to(feats.device)
        b = ((torch.rand(e, way, generator=gen, dtype=feats.dtype) * 2 - 1) * bound).to(feats.device)
        buf_w = buf_b = None
        ar = torch.arange(e, device=feats.device)[:, None]
        for _ in range(epochs):
            perm = torch.as_tensor(np.stack([rng.permutation(n_sup) for _ in range(e)]), device=feats.device)
            for j in range(0, n_sup, batch_size):
                idx = perm[:, j:j + batch_size]  # (e, B)
                xb, yb = sup[ar, idx], y_sup[idx]
                p = torch.softmax(torch.baddbmm(b[:, None], xb, w), dim=-1)
                p.scatter_add_(2, yb[..., None], torch.full_like(p[..., :1], -1.0))
                p /= idx.shape[1]  # CrossEntropyLoss's mean over the batch
                dw = xb.transpose(1, 2) @ p + weight_decay * w
                db = p.sum(1) + weight_decay * b
                if buf_w is None:
                    buf_w, buf_b = dw, db
                else:
                    buf_w = momentum * buf_w + (1 - dampening) * dw
                    buf_b = momentum * buf_b + (1 - dampening) * db
                w = w - lr * buf_w
                b = b - lr * buf_b
        qry = _gather(feats, episodes.query[a:a + chunk]).flatten(1, 2)
        out.append(torch.baddbmm(b[:, None], qry, w))
    return torch.cat(out)


def episode_accuracy(logits: torch.Tensor, episodes: Episodes) -> np.ndarray:
    """Percent of queries whose highest score is their own way, per episode (E,)."""
    target = torch.as_tensor(episodes.targets, device=logits.device)
    return (100.0 * (logits.argmax(-1) == target).double().mean(1)).cpu().numpy()


@dataclass
class FewShotResult:
    mean: float  # mean episode accuracy, percent
    ci95: float  # 1.96 * std / sqrt(episodes)
    accuracies: np.ndarray  # (E,)
    episodes: Episodes
    classifier: str


def evaluate(feats: np.ndarray, labels: np.ndarray, *, n_way: int = 5, k_shot: int = 5, n_query: int = 15,
             n_episodes: int = 600, classifier: str = "prototype", seed: int = 0, device: str = "cpu",
             **linear_kw) -> FewShotResult:
    """Sample the episodes, fit one classifier per episode (``prototype`` or ``linear``, whose settings
    ``linear_kw`` passes to :func:`linear_probe_logits`), summarise."""
    episodes = sample_episodes(labels, n_way, k_shot, n_query, n_episodes, seed)
    x = torch.as_tensor(np.asarray(feats, dtype=np.float32), device=device)
    if classifier == "prototype":
        logits = prototype_logits(x, episodes)
    elif classifier == "linear":
        logits = linear_probe_logits(x, episodes, seed=seed, **linear_kw)
    else:
        raise UserError(f"unknown few-shot classifier {classifier!r} (prototype, linear)")
    acc = episode_accuracy(logits, episodes)
    mean, ci = mean_ci95(acc)
    return FewShotResult(mean, ci, acc, episodes, classifier)
