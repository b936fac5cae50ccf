"""Pretraining losses and building blocks against hand / naive reference implementations."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pretrain.base import ema_update, momentum_copy
from pretrain.losses import info_nce, nce_loss, nt_xent, sinkhorn, sinkhorn_log
from pretrain.memory import MemoryBank, Queue
from pretrain.methods.barlow_twins import barlow_twins_loss, cross_correlation
from pretrain.methods.byol import byol_loss, cosine_momentum
from pretrain.methods.cmc import first_conv_name
from pretrain.methods.cpc import CausalConv, cpc_loss, patch_grid
from pretrain.methods.deepcluster import fix_empty_clusters, pca_whiten
from pretrain.methods.nat import reassign
from pretrain.methods.pirl import contrast_with_bank, jigsaw_tiles
from pretrain.methods.simsiam import simsiam_loss
from pretrain.methods.swav import swapped_prediction_loss
from pretrain.optim import LARS, lr_factor


def test_nt_xent_matches_explicit_loop():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    t = 0.5
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n2 = z.shape[0]
    total = 0.0
    for i in range(n2):
        j = (i + 3) % n2  # positive: the other view of the same image
        den = sum(math.exp(float(z[i] @ z[k]) / t) for k in range(n2) if k != i)  # 2N-1 terms: 1 pos + 2N-2 neg
        total += -math.log(math.exp(float(z[i] @ z[j]) / t) / den)
    assert nt_xent(z1, z2, t).item() == pytest.approx(total / n2, rel=1e-5)


def test_nt_xent_2x2_by_hand():
    # two images, orthogonal embeddings, identical views: s(pos)=1, the two negatives have s=0
    z1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    t = 1.0
    expected = -math.log(math.e / (math.e + 2))
    assert nt_xent(z1, z1.clone(), t).item() == pytest.approx(expected, rel=1e-6)


def test_info_nce_matches_loop():
    g = torch.Generator().manual_seed(1)
    q, k = F.normalize(torch.randn(4, 5, generator=g), dim=1), F.normalize(torch.randn(4, 5, generator=g), dim=1)
    neg = F.normalize(torch.randn(6, 5, generator=g), dim=1)
    t = 0.2
    ref = np.mean([-math.log(math.exp(float(q[i] @ k[i]) / t)
                             / (math.exp(float(q[i] @ k[i]) / t) + sum(math.exp(float(q[i] @ n) / t) for n in neg)))
                   for i in range(4)])
    assert info_nce(q, k, neg, t).item() == pytest.approx(ref, rel=1e-5)


def test_nce_loss_matches_formula():
    pos = torch.tensor([2.0, -1.0])
    neg = torch.tensor([[0.5, 1.0, -0.3], [0.0, 0.2, 0.1]])
    log_z, n = 3.0, 100
    m, pn = 3, 1 / n
    ref = 0.0
    for b in range(2):
        p = math.exp(pos[b] - log_z)
        ref -= math.log(p / (p + m * pn))
        for v in neg[b]:
            pv = math.exp(float(v) - log_z)
            ref -= math.log(1 - pv / (pv + m * pn))
    assert nce_loss(pos, neg, log_z, n).item() == pytest.approx(ref / 2, rel=1e-5)


def test_sinkhorn_marginals_are_uniform():
    scores = F.normalize(torch.randn(12, 8, generator=torch.Generator().manual_seed(2)), dim=1)
    q = sinkhorn(scores, eps=0.5, iters=200)
    assert torch.allclose(q.sum(1), torch.ones(12), atol=1e-4)  # each sample's code is a distribution
    assert torch.allclose(q.sum(0), torch.full((8,), 12 / 8), atol=1e-3)  # equipartition over prototypes
    # after the final column step the row marginal is exact even with SwAV's 3 iterations
    assert torch.allclose(sinkhorn(scores, 0.05, 3).sum(1), torch.ones(12), atol=1e-4)


def test_sinkhorn_log_equipartition_and_lambda():
    log_p = F.log_softmax(torch.randn(20, 4, generator=torch.Generator().manual_seed(3)), dim=1)
    q = sinkhorn_log(log_p, lam=25.0, iters=500)
    assert torch.allclose(q.sum(1), torch.ones(20, dtype=q.dtype), atol=1e-4)
    assert torch.allclose(q.sum(0), torch.full((4,), 5.0, dtype=q.dtype), atol=1e-3)
    # lambda -> 0 gives the uniform plan (entropy dominates)
    q0 = sinkhorn_log(log_p, lam=1e-6, iters=50)
    assert torch.allclose(q0, torch.full_like(q0, 0.25), atol=1e-4)


def test_barlow_twins_loss_by_loops():
    g = torch.Generator().manual_seed(4)
    z1, z2 = torch.randn(6, 3, generator=g), torch.randn(6, 3, generator=g)
    c = cross_correlation(z1, z2)
    a = (z1 - z1.mean(0)) / z1.std(0, unbiased=False)
    b = (z2 - z2.mean(0)) / z2.std(0, unbiased=False)
    lam = 0.1
    ref = 0.0
    for i in range(3):
        for j in range(3):
            cij = float(sum(a[n, i] * b[n, j] for n in range(6)) / 6)
            assert float(c[i, j]) == pytest.approx(cij, abs=1e-4)
            ref += (1 - cij) ** 2 if i == j else lam * cij**2
    assert barlow_twins_loss(c, lam).item() == pytest.approx(ref, rel=1e-4)
    assert barlow_twins_loss(c, lam, scale=1 / 32).item() == pytest.approx(ref / 32, rel=1e-4)
    # identical standardised views -> diagonal of ones -> loss is the off-diagonal term only
    c_same = cross_correlation(z1, z1)
    assert torch.allclose(torch.diagonal(c_same), torch.ones(3), atol=1e-4)


def test_byol_loss_is_two_minus_two_cos_and_stops_gradient():
    p = torch.tensor([[3.0, 4.0], [1.0, 0.0]], requires_grad=True)
    z = torch.tensor([[4.0, 3.0], [0.0, 2.0]], requires_grad=True)
    cos = [24 / 25, 0.0]
    assert byol_loss(p, z).item() == pytest.approx(np.mean([2 - 2 * c for c in cos]), rel=1e-6)
    byol_loss(p, z).backward()
    assert z.grad is None and p.grad is not None
    assert cosine_momentum(0.996, 0.0) == pytest.approx(0.996) and cosine_momentum(0.996, 1.0) == pytest.approx(1.0)


def test_simsiam_loss_negative_cosine():
    p, z = torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 1.0]])
    assert simsiam_loss(p, z).item() == pytest.approx(-1 / math.sqrt(2), rel=1e-6)


def test_swapped_prediction_by_hand():
    s = [torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]), torch.tensor([[0.5, 0.5]])]
    q = [torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])]
    t = 1.0
    ls = lambda v: F.log_softmax(v / t, dim=1)
    terms = [-(q[0] * ls(s[1])).sum(), -(q[0] * ls(s[2])).sum(), -(q[1] * ls(s[0])).sum(), -(q[1] * ls(s[2])).sum()]
    assert swapped_prediction_loss(s, q, t).item() == pytest.approx(float(sum(terms) / 4), rel=1e-6)


def _sinkhorn_reference(scores: np.ndarray, eps: float, iters: int) -> np.ndarray:
    """SwAV's Algorithm 1 written out: rows (prototypes) to 1/K, columns (samples) to 1/B, alternately."""
    q = np.exp(scores.astype(np.float64) / eps).T
    q /= q.sum()
    k, b = q.shape
    for _ in range(iters):
        q /= q.sum(axis=1, keepdims=True) * k
        q /= q.sum(axis=0, keepdims=True) * b
    return (q * b).T


def test_swav_queue_fills_from_its_start_step_and_joins_sinkhorn_once_full():
    from types import SimpleNamespace

    from pretrain.methods.swav import SwAV

    torch.manual_seed(0)
    m = SwAV("resnet18", hp={"proj_hidden": 16, "proj_dim": 8, "n_prototypes": 5, "queue_length": 6,
                             "queue_start_steps": 1, "freeze_prototypes_steps": 0})
    hp = m.hp
    batches = [[F.normalize(torch.randn(3, 8), dim=1) for _ in range(2)] for _ in range(4)]
    scores = F.normalize(torch.randn(3, 8), dim=1) @ m.prototypes.weight.detach().t()
    batch_only = _sinkhorn_reference(scores.numpy(), hp["epsilon"], hp["sinkhorn_iters"])
    for step, pending in enumerate(batches[:3]):
        # not full yet (step 0 is before queue_start_steps, steps 1-2 write 3 + 3): codes are the batch's own
        np.testing.assert_allclose(m.codes(scores, 0).numpy(), batch_only, rtol=1e-4, atol=1e-6)
        m._pending = pending
        m.on_after_step(SimpleNamespace(global_step=step))
    assert int(m.queued) == 6
    for crop in range(2):  # each global crop has its own queue: the embeddings of steps 1 and 2
        assert torch.equal(torch.sort(m.queues[crop].items, 0)[0],
                           torch.sort(torch.cat([batches[1][crop], batches[2][crop]]), 0)[0])
        stacked = torch.cat([m.queues[crop].items @ m.prototypes.weight.detach().t(), scores])
        want = _sinkhorn_reference(stacked.numpy(), hp["epsilon"], hp["sinkhorn_iters"])[-3:]
        got = m.codes(scores, crop).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(got.sum(1), 1.0, rtol=1e-5)
        assert np.abs(got - batch_only).max() > 1e-3  # the queue changed the codes


def test_queue_enqueue_dequeue_wraps():
    q = Queue(5, 2)
    first = torch.arange(6.0).view(3, 2)
    q.enqueue(first, gather=False)
    assert torch.equal(q.items[:3], first) and int(q.ptr) == 3
    second = torch.arange(100.0, 106.0).view(3, 2)
    q.enqueue(second, gather=False)  # rows 3, 4 then wraps to row 0 (the oldest)
    assert torch.equal(q.items[3:5], second[:2]) and torch.equal(q.items[0], second[2])
    assert torch.equal(q.items[1:3], first[1:]) and int(q.ptr) == 1


def test_memory_bank_momentum_update():
    bank = MemoryBank(4, 2, momentum=0.5)
    old = bank.bank[1].clone()
    f = torch.tensor([[1.0, 0.0]])
    bank.update(torch.tensor([1]), f, gather=False)
    expected = F.normalize(0.5 * old + 0.5 * f[0], dim=0)
    assert torch.allclose(bank.bank[1], expected)
    assert bank.sample(3, 7).shape == (3, 7)


def test_ema_update():
    online = nn.Linear(2, 2)
    target = momentum_copy(online)
    assert not any(p.requires_grad for p in target.parameters())
    with torch.no_grad():
        online.weight.add_(1.0)
    before = target.weight.clone()
    ema_update(target, online, 0.9)
    assert torch.allclose(target.weight, 0.9 * before + 0.1 * online.weight)


def test_contrast_with_bank_matches_info_nce():
    g = torch.Generator().manual_seed(5)
    q, k = F.normalize(torch.randn(3, 4, generator=g), dim=1), F.normalize(torch.randn(3, 4, generator=g), dim=1)
    neg = F.normalize(torch.randn(5, 4, generator=g), dim=1)
    a = contrast_with_bank(q, k, neg.expand(3, 5, 4), 0.1)
    assert a.item() == pytest.approx(info_nce(q, k, neg, 0.1).item(), rel=1e-6)


def test_jigsaw_tiles_reassemble():
    x = torch.arange(3 * 9 * 9, dtype=torch.float32).view(3, 9, 9)
    tiles, perm = jigsaw_tiles(x, grid=3, tile_frac=1.0, generator=torch.Generator().manual_seed(0))
    unshuffled = torch.empty_like(tiles)
    unshuffled[perm] = tiles
    rebuilt = unshuffled.view(3, 3, 3, 3, 3).permute(2, 0, 3, 1, 4).reshape(3, 9, 9)
    assert torch.equal(rebuilt, x)
    assert sorted(perm.tolist()) == list(range(9))


def test_fix_empty_clusters_splits_a_cluster():
    x = np.array([[0.0, 0], [0.1, 0], [0.2, 0], [5, 5], [5.1, 5]], dtype=np.float32)
    centroids = np.array([[0.1, 0], [5.05, 5], [100, 100]], dtype=np.float32)
    assign = np.array([0, 0, 0, 1, 1])
    c, a = fix_empty_clusters(x, centroids, assign, np.random.default_rng(0))
    assert set(a.tolist()) == {0, 1, 2}
    assert np.bincount(a).min() >= 1 and len(a) == 5


def test_pca_whiten_is_white_and_unit_norm():
    x = np.random.default_rng(0).normal(size=(50, 6)) @ np.diag([5, 3, 1, 0.5, 0.2, 0.1])
    y = pca_whiten(x, 3)
    assert y.shape == (50, 3)
    assert np.allclose(np.linalg.norm(y, axis=1), 1, atol=1e-5)


def test_nat_reassign_is_optimal_permutation():
    g = torch.Generator().manual_seed(6)
    targets = F.normalize(torch.randn(10, 3, generator=g), dim=1)
    f = F.normalize(torch.randn(4, 3, generator=g), dim=1)
    assigned = torch.tensor([7, 2, 5, 0])
    new = reassign(f, assigned, targets)
    best = max(itertools.permutations(assigned.tolist()),
               key=lambda p: sum(float(f[i] @ targets[p[i]]) for i in range(4)))
    assert new.tolist() == list(best)


def test_cpc_causal_context_and_loss_loop():
    conv = CausalConv(2)
    x = torch.randn(1, 2, 5, 5)
    y1 = conv(x)
    x2 = x.clone()
    x2[:, :, 3:] += 10  # changing rows >= 3 cannot change outputs at rows < 3
    assert torch.allclose(conv(x2)[:, :, :3], y1[:, :, :3])
    g = torch.Generator().manual_seed(7)
    codes = torch.randn(2, 3, 3, 3, generator=g)
    ctx = torch.randn(2, 3, 3, 3, generator=g)
    preds = nn.ModuleList([nn.Conv2d(3, 3, 1)])
    loss = cpc_loss(ctx, codes, preds)
    keys = codes.permute(0, 2, 3, 1).reshape(-1, 3)
    ref = []
    with torch.no_grad():
        p = preds[0](ctx)
        for b in range(2):
            for r in range(2):
                for c in range(3):
                    logits = keys @ p[b, :, r, c]
                    ref.append(-F.log_softmax(logits, 0)[(b * 3 + r + 1) * 3 + c])
    assert loss.item() == pytest.approx(float(torch.stack(ref).mean()), rel=1e-5)
    grid = patch_grid(torch.arange(16.0).view(1, 1, 4, 4), 2, 2)
    assert grid.shape == (1, 2, 2, 1, 2, 2) and torch.equal(grid[0, 1, 0, 0], torch.tensor([[8.0, 9], [12, 13]]))


def test_cmc_gray_conversion_is_exact():
    from pretrain.methods.cmc import CMC

    m = CMC("resnet18", {"dim": 8, "nce_k": 2}, num_samples=4)
    state = m.trunk_state_dict()
    from evalsuite.trunks import build_trunk

    t3 = build_trunk("resnet18")
    t3.load_state_dict(state)
    m.eval(), t3.eval()
    L = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        a = m.trunk(L, ["res5"])["res5"]
        b = t3(L.expand(2, 3, 32, 32), ["res5"])["res5"]
    assert first_conv_name(m.trunk) == "conv1"
    assert torch.allclose(a, b, atol=1e-4)


def test_lars_step_and_schedule():
    w = nn.Parameter(torch.tensor([3.0, 4.0]))
    b = nn.Parameter(torch.tensor([1.0]))
    opt = LARS([{"params": [w]}, {"params": [b], "lars_exclude": True, "weight_decay": 0.0}], lr=0.1, momentum=0.0,
               weight_decay=0.0, eta=0.01)
    w.grad, b.grad = torch.tensor([0.0, 10.0]), torch.tensor([2.0])
    opt.step()
    trust = 0.01 * 5 / 10
    assert torch.allclose(w.data, torch.tensor([3.0, 4.0 - 0.1 * trust * 10]))
    assert torch.allclose(b.data, torch.tensor([1.0 - 0.1 * 2.0]))
    assert lr_factor(0, 100, 10) == pytest.approx(0.1) and lr_factor(9, 100, 10) == pytest.approx(1.0)
    assert lr_factor(55, 100, 10) == pytest.approx(0.5) and lr_factor(100, 100, 10) == pytest.approx(0.0)


def test_sinkhorn_small_epsilon_stays_finite_and_matches_reference():
    # cosine scores near 1 at eps = 0.01 put exp(scores / eps) past float32's range (exp(88.7))
    scores = torch.tensor([[0.95, 0.10, -0.40], [0.20, 0.97, 0.05], [-0.30, 0.15, 0.90], [0.93, 0.60, 0.0]])
    q = sinkhorn(scores, eps=0.01, iters=3)
    assert q.dtype == torch.float32 and torch.isfinite(q).all()
    assert np.allclose(q.numpy(), _sinkhorn_reference(scores.numpy(), 0.01, 3), atol=1e-5)
    # the paper's eps is unchanged by the shift
    assert np.allclose(sinkhorn(scores, 0.05, 3).numpy(), _sinkhorn_reference(scores.numpy(), 0.05, 3), atol=1e-5)
    # bf16 scores (autocast) still give float32 codes: bf16's 3 significant digits would round the targets
    q16 = sinkhorn(scores.bfloat16(), eps=0.01, iters=3)
    assert q16.dtype == torch.float32
    assert np.allclose(q16.numpy(), _sinkhorn_reference(scores.bfloat16().float().numpy(), 0.01, 3), atol=1e-5)


def test_embedding_std_is_zero_for_a_collapsed_batch_and_one_over_sqrt_d_when_spread():
    from pretrain.losses import embedding_std

    d = 64
    one = torch.randn(1, d)
    assert embedding_std(one.repeat(32, 1) * torch.rand(32, 1).add(0.5)) == pytest.approx(0.0, abs=1e-6)
    # the std of each coordinate of uniform unit vectors in R^d is 1 / sqrt(d)
    spread = torch.randn(20000, d, generator=torch.Generator().manual_seed(0))
    assert embedding_std(spread) == pytest.approx(1 / math.sqrt(d), rel=0.01)
    # two antipodal points: each coordinate is +-u_i, std (unbiased, n = 2) sqrt(2) |u_i|
    u = F.normalize(torch.tensor([[3.0, 4.0]]), dim=1)
    assert embedding_std(torch.cat([u, -u])) == pytest.approx(math.sqrt(2) * (0.6 + 0.8) / 2, rel=1e-6)
