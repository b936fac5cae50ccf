"""Pretraining part 3 (image methods): AMDIM, Local Aggregation, multi-task, k-means init and SimCLR's loss
ablations; each loss against a hand-written version, each method trained a few steps into a checkpoint that loads."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from evalsuite.checkpoints import load_checkpoint
from evalsuite.errors import UserError
from evalsuite.trunks import RESNET_TAPS
from pretrain import TrainConfig, Trainer, train
from pretrain.base import Batch
from pretrain.losses import (
    amdim_nce,
    local_aggregation_loss,
    margin_triplet,
    nt_logistic,
    nt_xent,
    semi_hard_negatives,
    tanh_clip,
)
from pretrain.methods.kmeans_init import KMeansInit, conv_bn_pairs, kmeans_filters
from pretrain.methods.simclr import SimCLR
from pretrain.registry import methods

NEW = ("amdim", "local_aggregation", "multitask", "kmeans_init")


def _unit(g, n, d):
    return F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)


# ------------------------------------------------------------------ SimCLR's loss ablations


def _cross_view_terms(z1, z2):
    """Per anchor (both views): (s+, [s- over the other view's other images]), by loops."""
    z1, z2 = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    out = []
    for a, b in ((z1, z2), (z2, z1)):
        for i in range(len(a)):
            out.append((float(a[i] @ b[i]), [float(a[i] @ b[j]) for j in range(len(b)) if j != i]))
    return out


def _semi_hard(pos, negs):
    inside = [s for s in negs if s < pos]
    return max(inside) if inside else min(negs)


def _log_sigmoid(x):
    return -math.log1p(math.exp(-x))


@pytest.mark.parametrize("semi", [False, True])
def test_nt_logistic_matches_table_2_by_loops(semi):
    g = torch.Generator().manual_seed(0)
    z1, z2, t = torch.randn(5, 6, generator=g), torch.randn(5, 6, generator=g), 0.3
    per_anchor = []
    for pos, negs in _cross_view_terms(z1, z2):
        chosen = [_semi_hard(pos, negs)] if semi else negs
        per_anchor.append(np.mean([-(_log_sigmoid(pos / t) + _log_sigmoid(-s / t)) for s in chosen]))
    assert nt_logistic(z1, z2, t, semi_hard=semi).item() == pytest.approx(np.mean(per_anchor), rel=1e-5)


@pytest.mark.parametrize("semi", [False, True])
def test_margin_triplet_matches_table_2_by_loops(semi):
    g = torch.Generator().manual_seed(1)
    z1, z2, m = torch.randn(5, 6, generator=g), torch.randn(5, 6, generator=g), 0.4
    per_anchor = []
    for pos, negs in _cross_view_terms(z1, z2):
        chosen = [_semi_hard(pos, negs)] if semi else negs
        per_anchor.append(np.mean([max(s - pos + m, 0.0) for s in chosen]))
    assert margin_triplet(z1, z2, m, semi_hard=semi).item() == pytest.approx(np.mean(per_anchor), rel=1e-5, abs=1e-7)


def test_semi_hard_negative_by_hand():
    # anchor 0: positive 0.5 (column 0); negatives 0.9 (harder than the positive), 0.4 and 0.1 -> 0.4
    # anchor 1: positive 0.2 (column 1); every negative is more similar -> the least similar one, 0.3
    scores = torch.tensor([[0.5, 0.9, 0.4, 0.1], [0.6, 0.2, 0.3, 0.8]])
    picked = semi_hard_negatives(scores, torch.tensor([0, 1]))
    assert picked.tolist() == pytest.approx([0.4, 0.3])


def test_simclr_default_loss_is_nt_xent_unchanged():
    torch.manual_seed(0)
    m = SimCLR("resnet18", {"proj_hidden": 16, "proj_dim": 8})
    assert m.hp["loss"] == "nt_xent" and m.hp["semi_hard"] is False
    x = torch.randn(2, 4, 3, 32, 32)
    batch = Batch([x[0], x[1]], torch.arange(4), torch.zeros(4, dtype=torch.long))
    torch.manual_seed(1)
    loss, logs = m.training_step(batch)
    torch.manual_seed(1)
    expected = nt_xent(m.projector(m.embed(x[0])), m.projector(m.embed(x[1])), 0.5)  # the pre-ablation step
    assert torch.equal(loss, expected) and set(logs) == {"z_std"}
    for name, extra in (("nt_logistic", {"semi_hard": True}), ("margin_triplet", {})):
        other = SimCLR("resnet18", {"proj_hidden": 16, "proj_dim": 8, "loss": name, **extra})
        other.load_state_dict(m.state_dict())
        value, _ = other.training_step(batch)
        assert math.isfinite(value.item()) and value.item() != pytest.approx(loss.item())
    with torch.device("meta"):  # refused after the trunk is built: no weights needed
        with pytest.raises(UserError, match="semi_hard"):
            SimCLR("resnet18", {"semi_hard": True})
        with pytest.raises(UserError, match="loss must be one of"):
            SimCLR("resnet18", {"loss": "infonce"})


# ------------------------------------------------------------------ AMDIM


def test_amdim_nce_matches_loop():
    g = torch.Generator().manual_seed(2)
    n, d, L, clip = 3, 5, 4, 2.0
    src, trg = torch.randn(n, d, generator=g) * 3, torch.randn(n, d, L, generator=g) * 3
    loss, reg = amdim_nce(src, trg, torch.arange(n), clip)
    raw = [[[float(src[i] @ trg[j, :, loc]) / math.sqrt(d) for loc in range(L)] for j in range(n)] for i in range(n)]
    clipped = [[[clip * math.tanh(v / clip) for v in row] for row in mat] for mat in raw]
    terms = []
    for i in range(n):
        negs = [clipped[i][j][loc] for j in range(n) if j != i for loc in range(L)]
        for loc in range(L):
            pos = clipped[i][i][loc]
            terms.append(-(pos - math.log(math.exp(pos) + sum(math.exp(s) for s in negs))))
    assert loss.item() == pytest.approx(np.mean(terms), rel=1e-5)
    assert reg.item() == pytest.approx(np.mean(np.square(raw)), rel=1e-5)
    assert tanh_clip(torch.tensor([100.0]), 10.0).item() == pytest.approx(10.0, rel=1e-6)


# ------------------------------------------------------------------ Local Aggregation


def test_local_aggregation_loss_matches_loop():
    g = torch.Generator().manual_seed(3)
    n_bank, d, k, t = 12, 4, 5, 0.5
    bank, f = _unit(g, n_bank, d), _unit(g, 3, d)
    labels = torch.randint(0, 3, (2, n_bank), generator=g)
    index = torch.tensor([0, 4, 7])
    loss, close_frac = local_aggregation_loss(f, bank, labels, index, k, t)
    losses, fracs = [], []
    for b in range(3):
        dots = (bank @ f[b]).numpy()
        nbrs = np.argsort(-dots)[:k]
        probs = np.exp(dots[nbrs] / t)
        close = np.array([any(labels[h, j] == labels[h, index[b]] for h in range(2)) for j in nbrs])
        losses.append(-math.log(probs[close].sum() / probs.sum() + 1e-7))
        fracs.append(close.mean())
    assert loss.item() == pytest.approx(np.mean(losses), rel=1e-5)
    assert close_frac.item() == pytest.approx(np.mean(fracs))


# ------------------------------------------------------------------ k-means init


def test_kmeans_filters_are_centroids_of_whitened_patches():
    """magic_init.py initializeWeight('kmeans') by hand with numpy and scikit-learn's KMeans (Lloyd from the same
    initial patches): centre, whiten by the top eigenpairs of D^T D, L2-normalise, cluster, map back, unit std."""
    from sklearn.cluster import KMeans

    g = torch.Generator().manual_seed(4)
    centres = torch.randn(4, 6, generator=g, dtype=torch.float64) * 4
    patches = (centres.repeat(30, 1) + 0.3 * torch.randn(120, 6, generator=g, dtype=torch.float64))
    n_out, iters = 4, 10
    filters, how = kmeans_filters(patches, n_out, iters, torch.Generator().manual_seed(7))
    assert how == "kmeans" and filters.shape == (n_out, 6)

    x = patches.numpy() - patches.numpy().mean(0)
    s, v = np.linalg.eigh(x.T @ x)
    s, v = s[-n_out:], v[:, -n_out:]
    scale = 1 / np.sqrt(s + 1e-3)
    w = x @ v * scale
    w /= np.linalg.norm(w, axis=1, keepdims=True)
    init_rows = torch.randperm(len(x), generator=torch.Generator().manual_seed(7))[:n_out].numpy()
    km = KMeans(n_clusters=n_out, init=w[init_rows], n_init=1, max_iter=iters, tol=0.0, algorithm="lloyd").fit(w)
    ref = km.cluster_centers_ * scale @ v.T
    ref /= (x @ ref.T).std(0)[:, None]
    order = [int(np.argmin(np.linalg.norm(ref - f, axis=1))) for f in filters.numpy()]
    assert sorted(order) == list(range(n_out))
    assert np.allclose(filters.numpy(), ref[order], atol=1e-6)
    # fewer patches than filters: the reference's Gaussian fallback
    assert kmeans_filters(patches[:3], n_out)[1] == "random"


def _tiny_images(tiny_imagefolder, n=16, size=16):
    from evalsuite.data import open_dataset
    from pretrain.augment import center_view

    ds = open_dataset("imagefolder", tiny_imagefolder / "imagefolder", "train")
    view = center_view(size)
    return torch.stack([view(ds.load_image(i)) for i in range(n)])


def test_kmeans_init_layers_have_unit_variance_and_kmeans_filters(tiny_imagefolder):
    # 16 px images: conv1 and layer1 (16 x 4 x 4 = 256 positions >= 64 filters) get k-means filters, every later
    # conv the random fallback (whitening their 1152- to 4608-dim patches would only cost time)
    hp = {"images": 16, "max_patches": 5000, "kmeans_iters": 5}
    m = KMeansInit("resnet18", hp, seed=0)
    x = m.preprocess(_tiny_images(tiny_imagefolder))
    conv1_patches = F.unfold(x, 7, padding=3, stride=2).transpose(1, 2).reshape(-1, 147)  # 16 x 8 x 8 <= 5000
    m.initialise(x, torch.Generator().manual_seed(0))
    assert m.report["conv1"] == m.report["layer1.1.conv2"] == "kmeans"
    assert m.report["layer2.0.conv1"] == "random" and m.report["layer4.1.conv2"] == "random"  # 16 x 2 x 2 < 128
    # conv1: the k-means filters of its input patches, rescaled per filter
    expected, _ = kmeans_filters(conv1_patches, 64, 5, torch.Generator().manual_seed(0))
    got = m.trunk.conv1.weight.detach().reshape(64, -1).double()
    ratio = (got * expected).sum(1) / expected.pow(2).sum(1)
    assert torch.allclose(got, ratio[:, None] * expected, atol=1e-5) and (ratio > 0).all()
    # every BN output (eval mode, these images): per-channel mean = bias 0.1, variance 1 / (1 + eps)
    outs = {}
    hooks = [bn.register_forward_hook(lambda mod, i, o, name=name: outs.__setitem__(name, o.detach().double()))
             for name, _, bn in conv_bn_pairs(m.trunk)]
    m.trunk.eval()
    with torch.no_grad():
        m.trunk(x)
    for h in hooks:
        h.remove()
    assert len(outs) == 20
    for name, o in outs.items():
        var = o.var(dim=(0, 2, 3), unbiased=False)
        mean = o.mean(dim=(0, 2, 3))
        assert torch.allclose(var, torch.full_like(var, 1 / (1 + 1e-5)), atol=1e-3), name
        assert torch.allclose(mean, torch.full_like(mean, 0.1), atol=1e-3), name


def test_kmeans_init_writes_checkpoint_without_steps(tiny_imagefolder, tmp_path):
    out = train(TrainConfig(method="kmeans_init", data_root=str(tiny_imagefolder), out=str(tmp_path / "k.safetensors"),
                            batch_size=8, image_size=16, hp={"images": 16, "max_patches": 2000, "kmeans_iters": 3},
                            progress=False))
    ck = load_checkpoint(out)
    assert ck.report.missing == [] and ck.report.unexpected == []
    meta = ck.metadata
    assert meta["steps"] == 0 and meta["final_loss"] is None and meta["kmeans_init"]["layers"]["conv1"] == "kmeans"
    sd = ck.state_dict
    assert torch.equal(sd["bn1.running_var"], torch.ones(64)) and torch.allclose(sd["bn1.bias"], torch.full((64,), 0.1))
    taps = ck.build_trunk().eval()(torch.zeros(1, 3, 32, 32))
    assert set(taps) == set(RESNET_TAPS) and all(torch.isfinite(v).all() for v in taps.values())


# ------------------------------------------------------------------ the trained methods

SMALL = {
    "amdim": {"n_rkhs": 16},
    "local_aggregation": {"dim": 16, "k": 8, "kmeans_k": 4, "n_kmeans": 2, "kmeans_iters": 5, "ir_epochs": 1,
                          "nce_k": 8},
    "multitask": {"relative_position.hidden": 32, "colorization.head_hidden": 16, "colorization.prior_images": 16},
}


def test_every_part3_method_is_registered():
    assert set(NEW) <= set(methods())


@pytest.mark.parametrize("method", sorted(SMALL))
def test_method_trains_and_checkpoint_loads(method, tiny_imagefolder, random_init, tmp_path):
    epochs = 2 if method == "local_aggregation" else 1  # LA: one instance-recognition epoch, then LA
    cfg = TrainConfig(method=method, data_root=str(tiny_imagefolder), out=str(tmp_path / f"{method}.safetensors"),
                      batch_size=8, image_size=32, epochs=epochs, max_steps_per_epoch=1, hp=SMALL[method],
                      progress=False, optimizer="adam", lr=1e-3)
    tr = Trainer(cfg)
    out = tr.fit()
    ck = load_checkpoint(out)
    assert ck.report.missing == [] and ck.report.unexpected == [] and ck.format == "evalsuite"
    meta = ck.metadata
    assert meta["method"] == method and meta["input_space"] == "rgb" and meta["steps"] == epochs
    assert meta["hyperparameters"] == {**methods()[method].defaults, **SMALL[method]}
    assert math.isfinite(meta["final_loss"])
    taps = ck.build_trunk()(torch.zeros(1, 3, 32, 32))
    assert set(taps) == set(RESNET_TAPS) and all(torch.isfinite(v).all() for v in taps.values())
    init = random_init("resnet18")
    assert any(not torch.equal(v, init[k]) for k, v in ck.state_dict.items() if v.is_floating_point())
    m = tr.method
    if method == "amdim":
        assert set(meta["final_logs"]) == {"g2l_1t5", "g2l_1t7", "g2l_5t5", "lgt_reg"}
    elif method == "local_aggregation":
        # the LA phase ran on k-means labels of the bank: 2 clusterings of at most 4 clusters each
        assert bool(m.phase_la) and 0.0 <= meta["final_logs"]["close"] <= 1.0
        assert m.cluster_labels.shape == (2, m.num_samples) and int(m.cluster_labels.max()) < 4
    else:
        assert meta["multitask"]["lasso"] is False
        assert set(meta["final_logs"]) == {"relative_position_loss", "relative_position_acc", "colorization_loss"}
        assert m.tasks["colorization"].trunk is m.trunk is m.tasks["relative_position"].trunk
        weights = m.tasks["colorization"].class_weights
        assert not torch.equal(weights, torch.ones_like(weights))  # the ab prior was estimated
