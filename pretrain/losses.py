"""Loss functions shared by several methods, SimCLR's loss ablations and the contrastive objectives of AMDIM and
Local Aggregation (pure functions of tensors; other method-specific ones live in their method file). Everything is
computed in float32 even under bf16 autocast."""

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


# ------------------------------------------------------------------ SimCLR's loss ablations (Chen et al. 2020)


def _cross_view_scores(z1: torch.Tensor, z2: torch.Tensor, gather: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine scores of every anchor against the OTHER view's keys (SimCLR App. B.10: "we only consider the
    negatives from one augmentation view"): anchors are this rank's rows of z1 then z2, keys the gathered z2
    (for z1's anchors) or z1 (for z2's). Returns (scores (2n, N), column of each anchor's positive (2n,))."""
    z1 = F.normalize(z1.float(), dim=1)
    z2 = F.normalize(z2.float(), dim=1)
    n = z1.shape[0]
    k1, k2 = (D.gather_with_grad(z1), D.gather_with_grad(z2)) if gather else (z1, z2)
    own = torch.arange(n, device=z1.device) + (D.rank() if gather else 0) * n
    scores = torch.cat([z1 @ k2.t(), z2 @ k1.t()], 0)
    return scores, torch.cat([own, own])


def semi_hard_negatives(scores: torch.Tensor, pos_idx: torch.Tensor) -> torch.Tensor:
    """FaceNet's semi-hard negative of each anchor (Schroff et al. 2015; TensorFlow's triplet_semihard_loss, in
    similarity instead of distance): the most similar negative that is still less similar than the positive;
    an anchor without one gets its least similar negative. Returns the chosen (2n,) scores (with gradient)."""
    rows = torch.arange(scores.shape[0], device=scores.device)
    pos = scores[rows, pos_idx]
    with torch.no_grad():
        is_neg = torch.ones_like(scores, dtype=torch.bool)
        is_neg[rows, pos_idx] = False
        semi = is_neg & (scores < pos[:, None])
        hardest_semi = scores.masked_fill(~semi, float("-inf")).argmax(1)
        easiest = scores.masked_fill(~is_neg, float("inf")).argmin(1)
        pick = torch.where(semi.any(1), hardest_semi, easiest)
    return scores[rows, pick]


def _negative_terms(scores: torch.Tensor, pos_idx: torch.Tensor, semi_hard: bool,
                    term) -> torch.Tensor:
    """Mean over anchors of ``term(s+, s-)``, averaged over every negative or taken at the semi-hard one."""
    rows = torch.arange(scores.shape[0], device=scores.device)
    pos = scores[rows, pos_idx]
    if semi_hard:
        return term(pos, semi_hard_negatives(scores, pos_idx)).mean()
    neg_mask = torch.ones_like(scores, dtype=torch.bool)
    neg_mask[rows, pos_idx] = False
    terms = term(pos[:, None], scores)
    return (terms * neg_mask).sum(1).div(neg_mask.sum(1)).mean()


def nt_logistic(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5, semi_hard: bool = False,
                gather: bool = True) -> torch.Tensor:
    """SimCLR's NT-Logistic (Table 2): the negative of log sigma(u.v+/T) + log sigma(-u.v-/T) for L2-normalised
    u, v, averaged over every (anchor, negative) term, or over the anchors' semi-hard negatives."""
    scores, pos_idx = _cross_view_scores(z1, z2, gather)
    return _negative_terms(scores, pos_idx, semi_hard,
                           lambda p, n: F.softplus(-p / temperature) + F.softplus(n / temperature))


def margin_triplet(z1: torch.Tensor, z2: torch.Tensor, margin: float = 0.4, semi_hard: bool = False,
                   gather: bool = True) -> torch.Tensor:
    """SimCLR's margin triplet (Table 2): max(u.v- - u.v+ + m, 0) for L2-normalised u, v, averaged over every
    (anchor, negative) term, or over the anchors' semi-hard negatives."""
    scores, pos_idx = _cross_view_scores(z1, z2, gather)
    return _negative_terms(scores, pos_idx, semi_hard, lambda p, n: F.relu(n - p + margin))


# ------------------------------------------------------------------ AMDIM (Bachman et al. 2019)


def tanh_clip(x: torch.Tensor, clip: float | None = 10.0) -> torch.Tensor:
    """Soft clipping to [-clip, clip]: clip * tanh(x / clip) (amdim-public costs.py tanh_clip)."""
    return x if clip is None else clip * torch.tanh(x / clip)


def amdim_nce(src: torch.Tensor, trg: torch.Tensor, pos_idx: torch.Tensor,
              tclip: float = 20.0) -> tuple[torch.Tensor, torch.Tensor]:
    """AMDIM's global/local NCE (amdim-public costs.py NCE_MI_MULTI._model_scores and _loss_g2l).

    ``src`` (n, d): one source vector per anchor; ``trg`` (N, d, L): every image's L local target vectors;
    ``pos_idx`` (n,): the row of ``trg`` holding each anchor's other view. Scores are src.trg / sqrt(d), softly
    clipped by :func:`tanh_clip`; each of the anchor's L positive locations is classified against all locations
    of all the other images (its own image's other locations are not negatives). Returns (loss = -mean log
    softmax of the positives, mean squared raw score: the reference adds 4e-2 x it as a regulariser)."""
    src, trg = src.float(), trg.float()
    raw = torch.einsum("nd,mdl->nml", src, trg) / src.shape[1] ** 0.5  # (n, N, L)
    reg = raw.pow(2).mean()
    scores = tanh_clip(raw, tclip)
    rows = torch.arange(src.shape[0], device=src.device)
    pos = scores[rows, pos_idx]  # (n, L)
    neg = scores.masked_fill(F.one_hot(pos_idx, trg.shape[0]).bool()[:, :, None], float("-inf"))
    neg_lse = torch.logsumexp(neg.flatten(1), dim=1, keepdim=True)  # (n, 1): the negatives every positive shares
    return -(pos - torch.logaddexp(pos, neg_lse)).mean(), reg


# ------------------------------------------------------------------ Local Aggregation (Zhuang et al. 2019)


def local_aggregation_loss(f: torch.Tensor, bank: torch.Tensor, cluster_labels: torch.Tensor, index: torch.Tensor,
                           k: int = 4096, temperature: float = 0.07) -> tuple[torch.Tensor, torch.Tensor]:
    """-log P(C n B | v) / P(B | v) (neuroailab/LocalAggregation-Pytorch src/objectives/localagg.py).

    ``f`` (B, d) L2-normalised embeddings, ``bank`` (N, d) the memory bank, ``cluster_labels`` (H, N) the labels
    of H k-means clusterings of the bank, ``index`` (B,) the samples' rows. Background neighbours B: the k bank
    entries most similar to f; close neighbours C: the entries sharing f's cluster in at least one clustering.
    P(i | v) ~ exp(v_i.f / T): the reference's constant Z cancels in the ratio, and so does the row maximum
    subtracted here against overflow at small T. Returns (mean loss, fraction of B in C)."""
    k = min(k, bank.shape[0])
    dots = f.float() @ bank.float().t()
    back_dots, back_idx = dots.topk(k, dim=1, sorted=False)
    with torch.no_grad():
        own = cluster_labels[:, index]  # (H, B)
        close = (cluster_labels[:, back_idx] == own[:, :, None]).any(0)  # (B, k)
    probs = torch.exp((back_dots - back_dots.max(1, keepdim=True).values.detach()) / temperature)
    rel = (probs * close).sum(1) / probs.sum(1)
    return -torch.log(rel + 1e-7).mean(), close.float().mean()


def contrastive_loss(a: torch.Tensor, b: torch.Tensor, similar: torch.Tensor, margin: float = 1.0,
                     legacy: bool = False, weight: torch.Tensor | None = None) -> torch.Tensor:
    """The contrastive loss of pairs of embeddings (Hadsell, Chopra & LeCun 2006, eq. 4; Caffe's
    ContrastiveLossLayer): with d = ||a - b||_2, a similar pair costs d^2 / 2 and a dissimilar one
    max(margin - d, 0)^2 / 2, or with ``legacy`` max(margin - d^2, 0) / 2 (Caffe's original layer, the one of
    Jayaraman & Grauman's fork, dineshj1/caffe src/caffe/layers/contrastive_loss_layer.cpp). Averaged over the
    pairs, weighted by ``weight`` when given (0 leaves a pair out)."""
    d2 = (a.float() - b.float()).pow(2).sum(1)
    if legacy:
        apart = (margin - d2).clamp_min(0)
    else:
        apart = (margin - d2.clamp_min(1e-12).sqrt()).clamp_min(0).pow(2)
    per_pair = torch.where(similar.bool(), d2, apart) / 2
    if weight is None:
        return per_pair.mean()
    weight = weight.float()
    return (per_pair * weight).sum() / weight.sum().clamp_min(1e-12)


def slow_steady_loss(za: torch.Tensor, zb: torch.Tensor, zc: torch.Tensor, zr: torch.Tensor,
                     margin_slow: float = 1.0, margin_steady: float = 1.0
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Slow and steady feature analysis (Jayaraman & Grauman 2016), for embeddings of frames a, b, c equally
    spaced in time and a frame r of the same video far from all three, each (B, d). Returns (slow, steady):

    - slow: the legacy :func:`contrastive_loss` of the neighbour pairs (a, b), (b, c) against the far pairs
      (a, r), (c, r), margin ``margin_slow``;
    - steady: the same loss on the first differences: (b - a, c - b) similar (a constant change, the second
      difference small), (b - a, r - b) dissimilar, margin ``margin_steady``."""
    n = za.shape[0]
    ones, zeros = torch.ones(2 * n, device=za.device), torch.zeros(2 * n, device=za.device)
    slow = contrastive_loss(torch.cat([za, zb, za, zc]), torch.cat([zb, zc, zr, zr]), torch.cat([ones, zeros]),
                            margin_slow, legacy=True)
    step = zb - za
    steady = contrastive_loss(torch.cat([step, step]), torch.cat([zc - zb, zr - zb]), torch.cat([ones[:n], zeros[:n]]),
                              margin_steady, legacy=True)
    return slow, steady


def bit_prediction_loss(logits: torch.Tensor, bits: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """Binary codes predicted bit by bit (Ambient Sound's binary-coding variant): the mean over examples and bits
    of the logistic loss of ``logits`` (B, K) against ``bits`` (B, K) in {0, 1}, and the bit accuracy."""
    acc = ((logits > 0) == bits.bool()).float().mean()
    return F.binary_cross_entropy_with_logits(logits.float(), bits.float()), {"bit_acc": float(acc)}


def binned_motion_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Learning to See by Moving's loss: one softmax cross-entropy per motion dimension, summed (the reference's
    SoftmaxWithLoss per dimension, weight 1 each), for ``logits`` (B, D, C) and bin ``labels`` (B, D)."""
    return sum(F.cross_entropy(logits[:, d].float(), labels[:, d]) for d in range(logits.shape[1]))


def equivariance_loss(z_src: torch.Tensor, z_dst: torch.Tensor, maps: torch.Tensor, motion: torch.Tensor,
                      similar: torch.Tensor, margin: float = 1.0, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Ego-motion equivariance (Jayaraman & Grauman 2015): for pairs (x, y) scored under motion class g, the
    map M_g (``maps[g]``, (D, D)) should carry z(x) onto z(y) when y = g x: :func:`contrastive_loss` between
    M_g z(x) and z(y), pulled together for ``similar`` pairs (||M_g z(x) - z(y)||^2 / 2) and pushed beyond
    ``margin`` for pairs that motion g does not relate. ``motion`` (B,) indexes ``maps`` (G, D, D)."""
    pred = torch.einsum("bij,bj->bi", maps[motion].float(), z_src.float())
    return contrastive_loss(pred, z_dst, similar, margin, weight=weight)


# ------------------------------------------------------------------ image trunks from video: tracking, motion masks,
# colour copying (Wang & Gupta 2015, Pathak et al. 2017, Vondrick et al. 2018)


def rank_hard_negatives(violation: torch.Tensor, similarity: torch.Tensor, allowed: torch.Tensor, neg_num: int = 4,
                        hard_ratio: float = 0.5, rand_ratio: float = 0.5,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """The negatives of each pair that Wang & Gupta's ranking loss uses (xiaolonw/caffe-video_triplet
    src/caffe/layers/rank_hard_loss_layer.cpp, ``set_mask``): among the ``allowed`` candidates whose hinge
    ``violation`` is positive, all when there are at most ``neg_num``; otherwise ``int(neg_num * hard_ratio)`` drawn
    from the ``neg_num`` most ``similar`` (hard negatives) and ``int(neg_num * rand_ratio)`` drawn from the rest.
    Inputs (P, N); returns a bool (P, N) mask. The draws use ``generator`` (torch's global one when None)."""
    hard_num, rand_num = int(neg_num * hard_ratio), int(neg_num * rand_ratio)
    violation, similarity, allowed = violation.detach().cpu(), similarity.detach().float().cpu(), allowed.cpu()
    mask = torch.zeros(violation.shape, dtype=torch.bool)
    for i in range(violation.shape[0]):
        cand = torch.nonzero(allowed[i] & (violation[i] > 0)).flatten()
        if cand.numel() <= neg_num:
            mask[i, cand] = True
            continue
        order = cand[torch.argsort(-similarity[i, cand], stable=True)]  # hardest (most similar) first
        hard, rest = order[:neg_num], order[neg_num:]
        hard = hard[torch.randperm(hard.numel(), generator=generator)]
        mask[i, hard[:hard_num]] = True
        rest = torch.cat([rest, hard[hard_num:]])
        mask[i, rest[torch.randperm(rest.numel(), generator=generator)[:rand_num]]] = True
    return mask


def triplet_ranking_loss(anchor: torch.Tensor, positive: torch.Tensor, labels: torch.Tensor, margin: float = 0.5,
                         neg_num: int = 4, hard_ratio: float = 0.5, rand_ratio: float = 0.5,
                         generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Wang & Gupta 2015's ranking loss (eq. 3; their RankHardLoss layer) for P tracked pairs (anchor, positive),
    each (P, d), with ``labels`` (P,) their video.

    The 2P patches are L2-normalised (their Norm layer) and interleaved as the layer's batch (anchor i at row 2i,
    its positive at 2i + 1); with the cosine distance D = -x.y (the paper's 1 - cos, up to a constant), every
    patch of another video is a candidate negative n, :func:`rank_hard_negatives` picks up to ``neg_num`` per pair
    among those with max(0, D(a, p) - D(a, n) + margin) > 0, and the pair costs
    max(0, D(a, p) - D(a, n) + m) + max(0, D(a, p) - D(p, n) + m) per chosen n. The sum is divided by
    neg_num x P x 2, as the layer's ``cnt``. Returns (loss, the chosen negatives as a bool (P, 2P) mask)."""
    p = anchor.shape[0]
    z = F.normalize(torch.stack([anchor.float(), positive.float()], 1).flatten(0, 1), dim=1)
    sim = z @ z.t()
    s_ap = sim[0::2, 1::2].diagonal()  # (P,): anchor i against its own positive
    s_an, s_pn = sim[0::2], sim[1::2]  # (P, 2P): anchor / positive i against every patch
    hinge_a = F.relu(s_an - s_ap[:, None] + margin)
    hinge_p = F.relu(s_pn - s_ap[:, None] + margin)
    other = labels[:, None] != labels.repeat_interleave(2)[None, :]
    mask = rank_hard_negatives(hinge_a, s_an, other, neg_num, hard_ratio, rand_ratio, generator).to(z.device)
    loss = ((hinge_a + hinge_p) * mask).sum() / (neg_num * p * 2)
    return loss, mask


def mask_loss(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Per-pixel sigmoid cross-entropy of mask logits (B, H, W) against a binary (or soft) mask (B, H, W) in
    [0, 1]: the mean over pixels per example (DeepMask's SoftMarginCriterion with labels 2 m - 1, the loss of
    Pathak et al. 2017), then the ``weight``ed (B,) mean over examples (0 leaves an example out)."""
    per_pixel = F.binary_cross_entropy_with_logits(logits.float(), target.float(), reduction="none")
    per_example = per_pixel.flatten(1).mean(1)
    if weight is None:
        return per_example.mean()
    weight = weight.float()
    return (per_example * weight).sum() / weight.sum().clamp_min(1e-12)


def colour_copy_loss(target: torch.Tensor, reference: torch.Tensor, target_colours: torch.Tensor,
                     reference_colours: torch.Tensor, temperature: float = 1.0
                     ) -> tuple[torch.Tensor, dict[str, float]]:
    """Colouring by pointing (Vondrick et al. 2018, eqs. 1-3): each target pixel j attends over the reference
    pixels i with A_ij = softmax_i(f_i . f_j / T), its predicted colour distribution is sum_i A_ij onehot(c_i),
    and the loss is the cross-entropy -log P(y_j) of its true colour class.

    ``target`` (B, N, d) and ``reference`` (B, M, d) embeddings (M: every pixel of every reference frame);
    ``target_colours`` (B, N) and ``reference_colours`` (B, M) quantised colour indices. Computed as
    logsumexp over the references of colour y_j minus logsumexp over all; a target pixel whose colour no
    reference pixel has (P(y_j) = 0, no gradient) is left out of the mean. Returns (loss, logs: ``acc``, the
    fraction of pixels whose most probable colour is right, and ``reachable``, the fraction kept)."""
    scores = torch.einsum("bnd,bmd->bnm", target.float(), reference.float()) / temperature
    log_attn = scores.log_softmax(-1)
    same = target_colours[:, :, None] == reference_colours[:, None, :]  # (B, N, M)
    log_p = torch.logsumexp(log_attn.masked_fill(~same, float("-inf")), -1)  # (B, N): log P(y_j)
    reachable = same.any(-1)
    loss = -(log_p[reachable]).sum() / reachable.sum().clamp_min(1)
    with torch.no_grad():
        k = int(max(target_colours.max(), reference_colours.max())) + 1
        probs = torch.einsum("bnm,bmk->bnk", log_attn.exp(), F.one_hot(reference_colours, k).float())
        acc = (probs.argmax(-1) == target_colours).float().mean()
    return loss, {"acc": float(acc), "reachable": float(reachable.float().mean())}
