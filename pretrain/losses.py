"""Loss functions shared by several methods (pure functions of tensors; method-specific ones live in
their method file). Everything is computed in float32 even under bf16 autocast."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import distributed as D


def embedding_std(z: torch.Tensor) -> float:
    """Collapse monitor (SimSiam, Chen & He 2021, sec. 4.1): the std over the batch of the L2-normalised
    embeddings, averaged over dimensions. About 1/sqrt(d) for embeddings spread over the sphere, 0 when every
    input maps to one point."""
    return float(F.normalize(z.detach().float(), dim=1).std(0).mean())


def classification_step(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """A pretext classifier's loss and log: cross-entropy on float32 logits, and the batch accuracy."""
    acc = (logits.argmax(1) == labels).float().mean()
    return F.cross_entropy(logits.float(), labels), {"acc": float(acc)}


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5, gather: bool = True) -> torch.Tensor:
    """SimCLR's NT-Xent (Chen et al. 2020, eq. 1) for the local rows of a (possibly distributed) batch.

    ``z1[i]``/``z2[i]`` are the two views of image i. Each of the 2N views has one positive (its pair) and
    2N-2 negatives (all other views, gathered from every process WITH gradient); the loss is the mean over
    this rank's 2n anchors, which equals the single-process loss on the concatenated batch averaged over ranks.
    """
    z1 = F.normalize(z1.float(), dim=1)
    z2 = F.normalize(z2.float(), dim=1)
    n = z1.shape[0]
    a1, a2 = (D.gather_with_grad(z1), D.gather_with_grad(z2)) if gather else (z1, z2)
    big_n = a1.shape[0]
    keys = torch.cat([a1, a2], 0)  # (2N, d): rows [0, N) view 1, [N, 2N) view 2
    anchors = torch.cat([z1, z2], 0)  # (2n, d)
    r = D.rank() if gather else 0
    own = torch.arange(n, device=z1.device) + r * n  # this rank's rows inside a1/a2
    self_idx = torch.cat([own, own + big_n])
    pos_idx = torch.cat([own + big_n, own])
    logits = anchors @ keys.t() / temperature
    logits = logits.masked_fill(F.one_hot(self_idx, 2 * big_n).bool(), float("-inf"))
    return F.cross_entropy(logits, pos_idx)


def info_nce(q: torch.Tensor, k: torch.Tensor, negatives: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE with one positive key per query and a shared bank of negatives (MoCo eq. 1, CMC, PIRL).

    q, k: (B, d) L2-normalised; negatives: (K, d). Logits [q.k, q.n_1..q.n_K] / T, label 0."""
    q, k, negatives = q.float(), k.float(), negatives.float()
    pos = (q * k).sum(1, keepdim=True)
    neg = q @ negatives.t()
    logits = torch.cat([pos, neg], 1) / temperature
    return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))


def nce_loss(pos_logit: torch.Tensor, neg_logits: torch.Tensor, log_z: torch.Tensor | float,
             n_data: int) -> torch.Tensor:
    """Noise-contrastive estimation of the non-parametric softmax (Wu et al. 2018, eqs. 4-6).

    ``pos_logit`` (B,) = v_i.f_i / T, ``neg_logits`` (B, m) for m noise samples drawn from the uniform noise
    P_n = 1/n. P(i|v) = exp(logit) / Z; h = P / (P + m P_n); loss = -log h(pos) - sum log(1 - h(neg)),
    averaged over the batch."""
    m = neg_logits.shape[1]
    log_pn = -math.log(n_data)
    log_mpn = math.log(m) + log_pn
    lp_pos = pos_logit.float() - log_z
    lp_neg = neg_logits.float() - log_z
    # log h = log P - log(P + m Pn) = -softplus(log(m Pn) - log P)
    log_h_pos = -F.softplus(log_mpn - lp_pos)
    log_1m_h_neg = -F.softplus(lp_neg - log_mpn)
    return -(log_h_pos + log_1m_h_neg.sum(1)).mean()


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, eps: float = 0.05, iters: int = 3, distributed: bool = True) -> torch.Tensor:
    """Sinkhorn-Knopp equipartition (SwAV Alg. 1 / SeLA): Q = diag(u) exp(scores/eps) diag(v) with uniform
    prototype marginal 1/K and uniform sample marginal 1/B (over all processes); returns (B, K) codes whose
    rows sum to 1, in float32 (float64 for float64 scores; bf16 scores under autocast still give float32
    codes).

    The exponent is shifted by its maximum over all processes (a constant factor that the first
    normalisation cancels) and the iterations run in float64, so small eps (the SwAV authors' advice against
    collapse) neither overflows (cosine scores / 0.01 reach 100 > float32's exp limit of 88) nor underflows."""
    logits = scores.double() / eps
    top = logits.max().reshape(1)
    if distributed:
        D.all_reduce_max(top)
    q = (logits - top).exp().t()  # (K, B)
    b = torch.tensor(float(q.shape[1]), dtype=q.dtype, device=q.device)
    k = q.shape[0]
    if distributed:
        D.all_reduce_sum(b)
    total = q.sum()
    if distributed:
        D.all_reduce_sum(total)
    q /= total
    for _ in range(iters):
        row = q.sum(1, keepdim=True)
        if distributed:
            D.all_reduce_sum(row)
        q /= row
        q /= k
        q /= q.sum(0, keepdim=True)
        q /= b
    return (q * b).t().to(torch.promote_types(scores.dtype, torch.float32))


def sinkhorn_log(log_p: torch.Tensor, lam: float = 25.0, iters: int = 100, tol: float = 1e-6) -> torch.Tensor:
    """SeLA's optimal-transport labels (Asano et al. 2020, eq. 6 solved by Sinkhorn in log space):
    maximise <Q, log P> + H(Q)/lam subject to equipartition; returns the (N, K) transport plan scaled so each
    row sums to 1 and each column to N/K."""
    n, k = log_p.shape
    lp = log_p.double() * lam
    log_r = torch.full((k,), -math.log(k), dtype=torch.float64, device=log_p.device)  # column marginal
    log_c = torch.full((n,), -math.log(n), dtype=torch.float64, device=log_p.device)  # row marginal
    u = torch.zeros(n, dtype=torch.float64, device=log_p.device)
    v = torch.zeros(k, dtype=torch.float64, device=log_p.device)
    for _ in range(iters):
        u_new = log_c - torch.logsumexp(lp + v[None, :], dim=1)
        v_new = log_r - torch.logsumexp(lp + u_new[:, None], dim=0)
        done = (u_new - u).abs().max() < tol and (v_new - v).abs().max() < tol
        u, v = u_new, v_new
        if done:
            break
    return (lp + u[:, None] + v[None, :]).exp() * n
