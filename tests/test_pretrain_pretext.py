"""Pretext-task transforms and losses (pretrain.pretext, pretrain.methods.{rotnet, jigsaw, ...}) against
independent hand / brute-force computations."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist

from evalsuite.colorspace import rgb_to_lab
from pretrain.methods.colorization import colorization_loss
from pretrain.methods.jigsaw import jigsaw_puzzle
from pretrain.methods.relative_position import OFFSETS, patch_geometry, patch_pair, position_label
from pretrain.methods.rotnet import rotate_batch
from pretrain.pretext import (
    ab_gamut,
    color_drop,
    color_project,
    crop_jittered,
    decode_ab,
    grid_layout,
    hamming_permutations,
    min_pairwise_hamming,
    normalize_tiles,
    rebalance_weights,
    smooth_prior,
    soft_encode,
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------------ RotNet
def test_rotations_are_exact_quarter_turns_with_labels():
    x = torch.randn(3, 2, 5, 5, generator=_gen(0))
    rots, labels = rotate_batch(x)
    assert rots.shape == (12, 2, 5, 5) and labels.tolist() == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3
    xn = x.numpy()
    for i in range(12):
        r, b = divmod(i, 3)
        ref = np.rot90(xn[b], k=r, axes=(1, 2))  # r counter-clockwise quarter turns
        assert np.array_equal(rots[i].numpy(), ref)
    # by hand for one 2x2 image: [[1, 2], [3, 4]] turned 90 deg counter-clockwise is [[2, 4], [1, 3]]
    one = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    r, _ = rotate_batch(one)
    assert r[1, 0].tolist() == [[2.0, 4.0], [1.0, 3.0]] and r[2, 0].tolist() == [[4.0, 3.0], [2.0, 1.0]]
    with pytest.raises(ValueError):
        rotate_batch(torch.zeros(1, 3, 4, 5))


# ------------------------------------------------------------------------------------------------ Jigsaw
def test_hamming_set_is_unique_and_greedy_max_min():
    n = 100
    perms = hamming_permutations(n, 9, seed=0)
    assert perms.shape == (n, 9)
    assert all(sorted(p) == list(range(9)) for p in perms.tolist())
    assert len({tuple(p) for p in perms.tolist()}) == n
    everything = np.array(list(itertools.permutations(range(9))))
    # independent check with scipy: every chosen permutation has the largest possible minimum Hamming
    # distance to the ones chosen before it (checked for the first 12)
    for i in range(1, 10):
        d_all = (cdist(everything, perms[:i], metric="hamming") * 9).round().min(1)
        d_new = (cdist(perms[i : i + 1], perms[:i], metric="hamming") * 9).round().min()
        assert d_new == d_all.max()
    pair = np.round(cdist(perms, perms, metric="hamming") * 9) + np.eye(n) * 99
    assert min_pairwise_hamming(perms) == pair.min()
    # the max-min criterion beats the published average-distance sets (minimum distance 2 at N = 100)
    assert pair.min() >= 6
    assert min_pairwise_hamming(hamming_permutations(10, 9, seed=0)) >= 7
    assert np.array_equal(hamming_permutations(n, 9, seed=0), perms)
    assert not np.array_equal(hamming_permutations(n, 9, seed=1), perms)


def test_hamming_small_grid_by_hand():
    # 2x2 puzzles: 24 permutations; four of them can be pairwise at distance 4 (a Latin square)
    perms = hamming_permutations(4, 4, seed=0)
    assert min_pairwise_hamming(perms) == 4
    every = hamming_permutations(24, 4, seed=0)
    assert len({tuple(p) for p in every.tolist()}) == 24
    with pytest.raises(Exception, match="cannot choose"):
        hamming_permutations(25, 4)


def test_grid_layout_gaps_stay_inside_cells():
    size, grid, tile = 64, 3, 18
    cell = size // grid
    seen = set()
    for s in range(30):
        corners = grid_layout(size, grid, tile, _gen(s))
        for i, (y, x) in enumerate(corners):
            r, q = divmod(i, grid)
            assert r * cell <= y <= r * cell + cell - tile and q * cell <= x <= q * cell + cell - tile
            seen.add((y - r * cell, x - q * cell))
    assert len(seen) > 10  # the gaps are random
    with pytest.raises(ValueError):
        grid_layout(30, 3, 11)


def test_jigsaw_tiles_reassemble_to_the_crop():
    img = torch.rand(3, 48, 48, generator=_gen(1))
    perms = torch.as_tensor(hamming_permutations(10, 9, seed=0))
    tiles, label, corners = jigsaw_puzzle(img, perms, tile_frac=0.8, channel_jitter=0, gray_prob=0,
                                          normalize=False, generator=_gen(2))
    t = tiles.shape[-1]
    assert t == round(16 * 0.8) and tiles.shape == (9, 3, t, t) and 0 <= int(label) < 10
    canvas = torch.full_like(img, -1.0)
    for i, cell_idx in enumerate(perms[int(label)].tolist()):  # tiles[i] is the tile of cell perms[label][i]
        y, x = corners[cell_idx]
        canvas[:, y : y + t, x : x + t] = tiles[i]
    covered = canvas >= 0
    assert torch.equal(canvas[covered], img[covered])
    assert covered.float().mean() == pytest.approx(9 * t * t / 48**2)


def test_channel_jitter_bounds_and_tile_normalisation():
    img = torch.arange(3 * 20 * 20, dtype=torch.float32).view(3, 20, 20)
    for s in range(10):
        crop = crop_jittered(img, 6, 7, 8, max_shift=2, generator=_gen(s))
        for c in range(3):
            y0, x0 = divmod(int(crop[c, 0, 0] - c * 400), 20)  # unique values locate each channel's crop
            assert abs(y0 - 6) <= 2 and abs(x0 - 7) <= 2
            assert torch.equal(crop[c], img[c, y0 : y0 + 8, x0 : x0 + 8])
    tiles = torch.rand(9, 3, 7, 7, generator=_gen(3)) * 5 + 2
    n = normalize_tiles(tiles)
    assert torch.allclose(n.mean(dim=(-2, -1)), torch.zeros(9, 3), atol=1e-5)
    assert torch.allclose(n.std(dim=(-2, -1), unbiased=False), torch.ones(9, 3), atol=1e-4)


# ------------------------------------------------------------------------------------------------ relative position
def test_relative_position_labels_match_patch_geometry():
    size = 96
    p, g, j = patch_geometry(size)
    # by hand: 96 / (3 + 1 + 14/96) = 23.2 -> p 23, g 12, j 2 needs 97 px > 96, so p 22, g 11, j 2 (92 px)
    assert (p, g, j) == (22, 11, 2)
    img = torch.arange(size * size, dtype=torch.float32).view(1, size, size).repeat(3, 1, 1)
    for s in range(40):
        label = s % 8
        pair, c0, c1 = patch_pair(img, label, generator=_gen(s))
        assert pair.shape == (2, 3, p, p)
        # recover both corners from the pixel values, independently of the returned corners
        found = [divmod(int(pair[k, 0, 0, 0]), size) for k in range(2)]
        assert found == [c0, c1]
        assert position_label(*found) == label
        dy, dx = found[1][0] - found[0][0], found[1][1] - found[0][1]
        ey, ex = OFFSETS[label]
        for d, e in ((dy, ey), (dx, ex)):
            if e == 0:
                assert abs(d) <= 2 * j
            else:
                assert d * e >= p + g - 2 * j  # right direction, and a gap of at least g - 2j pixels
                assert abs(d) <= p + g + 2 * j
        assert all(0 <= v <= size - p for v in (*c0, *c1))


def test_chromatic_aberration_countermeasures():
    patch = torch.rand(3, 6, 6, generator=_gen(4))
    proj = color_project(patch)
    a = torch.tensor([-1.0, 2.0, -1.0])
    assert torch.allclose(torch.einsum("c,chw->hw", a, proj), torch.zeros(6, 6), atol=1e-5)
    assert torch.allclose(color_project(proj), proj, atol=1e-6)  # a projection
    gray = torch.full((3, 6, 6), 0.3)
    assert torch.allclose(color_project(gray), gray, atol=1e-6)  # gray is left alone
    dropped = color_drop(patch, generator=_gen(5))
    kept = [c for c in range(3) if torch.equal(dropped[c], patch[c])]
    assert len(kept) == 1
    for c in set(range(3)) - set(kept):
        assert dropped[c].std() < 0.05 * patch[kept[0]].std()


# ------------------------------------------------------------------------------------------------ colour
def test_ab_gamut_is_the_in_gamut_grid():
    c = ab_gamut()
    assert c.shape[1] == 2 and 250 <= c.shape[0] <= 320
    assert torch.equal(c % 10, torch.zeros_like(c))
    # every sRGB colour's nearest grid point is a bin (independent check on random colours and primaries)
    rgb = torch.cat([torch.rand(3, 2000, generator=_gen(6)), torch.eye(3), 1 - torch.eye(3)], 1).double()
    ab = rgb_to_lab(rgb.unsqueeze(-1)).squeeze(-1)[1:].t().float()
    grid = set(map(tuple, c.tolist()))
    assert all(tuple(v) in grid for v in (torch.round(ab / 10) * 10).tolist())


def test_ab_quantisation_round_trip_within_bin_width():
    c = ab_gamut()
    rgb = torch.rand(3, 500, generator=_gen(7)).double()
    ab = rgb_to_lab(rgb.unsqueeze(-1)).squeeze(-1)[1:].t().float()
    idx, w = soft_encode(ab, c, k=5, sigma=5.0)
    assert idx.shape == (500, 5) and torch.allclose(w.sum(1), torch.ones(500))
    # nearest bins by brute force; Gaussian weights by hand for the first point
    d2 = torch.cdist(ab.double(), c.double()) ** 2
    assert torch.equal(idx[:, 0], d2.argmin(1))
    ref = torch.exp(-d2[0, idx[0]] / 50)
    assert torch.allclose(w[0].double(), ref / ref.sum(), atol=1e-5)
    probs = torch.zeros(500, c.shape[0]).scatter_(1, idx, w)
    hard = decode_ab(probs, c, "argmax")
    assert (hard - ab).abs().max() <= 5 + 1e-4  # half a bin per axis
    soft = decode_ab(probs, c, "mean")
    assert (soft - ab).norm(dim=1).max() <= 10  # within one bin width


def test_rebalancing_weights_by_hand():
    prior = torch.tensor([0.7, 0.2, 0.1])
    w = rebalance_weights(prior, lam=0.5)
    raw = [1 / (0.5 * p + 0.5 / 3) for p in (0.7, 0.2, 0.1)]
    z = sum(p * r for p, r in zip((0.7, 0.2, 0.1), raw))
    assert w.tolist() == pytest.approx([r / z for r in raw], rel=1e-6)
    assert float((prior * w).sum()) == pytest.approx(1.0, rel=1e-6)
    assert w[2] > w[1] > w[0]  # rare colours weigh more
    assert rebalance_weights(prior, lam=1.0).tolist() == pytest.approx([1.0, 1.0, 1.0])
    # smoothing keeps a distribution and spreads mass to neighbouring bins only
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [100.0, 0.0]])
    sp = smooth_prior(torch.tensor([4.0, 0.0, 0.0]), centres, sigma=5.0)
    g = math.exp(-100 / 50)
    assert sp.tolist() == pytest.approx([1 / (1 + g), g / (1 + g), 0.0], abs=1e-6)


def test_colorization_loss_hand_value():
    logits = torch.tensor([1.0, 0.0, -1.0]).view(1, 3, 1, 1)
    idx = torch.tensor([[[[0, 1]]]])
    w = torch.tensor([[[[0.75, 0.25]]]])
    cw = torch.tensor([2.0, 1.0, 1.0])
    logp = torch.log_softmax(torch.tensor([1.0, 0.0, -1.0]), 0)
    ref = 2.0 * -(0.75 * logp[0] + 0.25 * logp[1])  # weight of the nearest bin (0) times the soft CE
    assert colorization_loss(logits, idx, w, idx[..., 0], cw).item() == pytest.approx(float(ref), rel=1e-6)
    assert colorization_loss(logits, idx, w, idx[..., 0], None).item() == pytest.approx(float(ref) / 2, rel=1e-6)


# ------------------------------------------------------------------------------------------------ split-brain
def test_split_brain_halves_never_mix():
    from pretrain.methods.split_brain import SplitBrain

    torch.manual_seed(0)
    m = SplitBrain("resnet18", {"head_hidden": 8})
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    lab = torch.rand(4, 3, 32, 32, generator=_gen(8)) * 2 - 1
    m.train()
    loss = m.training_step(type("B", (), {"views": [lab]})())
    loss.backward()
    m.on_after_backward(None)
    opt.step()
    m.on_after_step(None)
    m.eval()
    base = m.trunk(lab)
    other_ab = lab.clone()
    other_ab[:, 1:] = torch.rand(4, 2, 32, 32, generator=_gen(9))
    other_l = lab.clone()
    other_l[:, :1] = torch.rand(4, 1, 32, 32, generator=_gen(10))
    out_ab, out_l = m.trunk(other_ab), m.trunk(other_l)
    for tap, ref in base.items():
        h = ref.shape[1] // 2
        assert torch.equal(out_ab[tap][:, :h], ref[:, :h])  # the L half ignores ab
        assert torch.equal(out_l[tap][:, h:], ref[:, h:])  # the ab half ignores L
        assert not torch.equal(out_ab[tap][:, h:], ref[:, h:]) and not torch.equal(out_l[tap][:, :h], ref[:, :h])


def test_split_brain_targets_and_loss_by_hand():
    from pretrain.methods.split_brain import l_targets, split_brain_loss

    lab = torch.zeros(1, 3, 2, 2)
    lab[0, 0] = torch.tensor([[-1.0, -0.5], [0.0, 1.0]])  # L = 0, 25, 50, 100
    assert l_targets(lab, (2, 2), 50).tolist() == [[[0, 12], [25, 49]]]
    assert l_targets(lab, (1, 1), 4).tolist() == [[[1]]]  # mean L 43.75 -> bin 1 of [0, 25, 50, 75]
    logits_ab = torch.tensor([0.0, 0.0]).view(1, 2, 1, 1)
    logits_l = torch.tensor([2.0, 0.0]).view(1, 2, 1, 1)
    loss = split_brain_loss(logits_ab, torch.tensor([[[[0]]]]), torch.tensor([[[[1.0]]]]), logits_l,
                            torch.tensor([[[1]]]))
    assert loss.item() == pytest.approx(math.log(2) + math.log(1 + math.e**2), rel=1e-6)


# ------------------------------------------------------------------------------------------------ inpainting, DAE
def test_context_encoder_masks_and_loss():
    from pretrain.methods.inpainting import center_mask, context_encoder_loss, random_block_mask

    m = center_mask(8, 0.5)
    ref = torch.zeros(8, 8)
    ref[2:6, 2:6] = 1
    assert torch.equal(m[0, 0], ref)
    r = random_block_mask(5, 16, coverage=0.25, generator=_gen(11))
    assert r.shape == (5, 1, 16, 16) and all(0.25 <= float(v.mean()) < 1 for v in r)
    pred, target = torch.zeros(1, 1, 2, 2), torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    mask = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
    assert context_encoder_loss(pred, target, mask, None, 1.0, 0.0).item() == pytest.approx((1 + 16) / 2)
    d_fake = torch.tensor([0.0])
    full = context_encoder_loss(pred, target, mask, d_fake, 0.5, 0.25).item()
    assert full == pytest.approx(0.5 * 8.5 + 0.25 * math.log(2), rel=1e-6)


def test_denoising_corruptions():
    from pretrain.methods.denoising_ae import corrupt

    x = torch.rand(4, 3, 32, 32, generator=_gen(12)) + 1
    m = corrupt(x, "masking", 0.25, _gen(13))
    zero = m == 0
    assert torch.equal(zero[:, :1].expand_as(zero), zero)  # whole pixels, all channels together
    assert 0.2 < zero.float().mean() < 0.3 and torch.equal(m[~zero], x[~zero])
    g = corrupt(x, "gaussian", 0.1, _gen(14))
    assert (g - x).std().item() == pytest.approx(0.1, rel=0.05)
    sp = corrupt(x, "salt_pepper", 0.2, _gen(15))
    changed = (sp != x).any(1)
    assert 0.15 < changed.float().mean() < 0.25
    with pytest.raises(ValueError):
        corrupt(x, "nope")


# ------------------------------------------------------------------------------------------------ counting
def test_counting_tiles_and_loss_by_hand():
    from pretrain.methods.counting import counting_loss, downsample, tiles_2x2

    x = torch.arange(16.0).view(1, 1, 4, 4)
    t = tiles_2x2(x)
    assert t[0, :, 0].tolist() == [[[0, 1], [4, 5]], [[2, 3], [6, 7]], [[8, 9], [12, 13]], [[10, 11], [14, 15]]]
    assert downsample(x, "area")[0, 0].tolist() == [[2.5, 4.5], [10.5, 12.5]]
    c_down = torch.tensor([[1.0, 2.0]])
    tiles_sum = torch.tensor([[1.0, 0.0]])
    other = torch.tensor([[2.0, 0.0]])
    # |(0, 2)|^2 = 4; |(1, 0)|^2 = 1 < M = 3 -> hinge 2
    assert counting_loss(c_down, tiles_sum, other, margin=3.0).item() == pytest.approx(6.0)
    assert counting_loss(c_down, tiles_sum, other, margin=0.5).item() == pytest.approx(4.0)


# ------------------------------------------------------------------------------------------------ BiGAN
def test_bigan_losses_and_frozen_discriminator():
    from pretrain.methods.bigan import bigan_losses
    from pretrain.pretext import ConvDiscriminator, frozen_call

    d_enc, d_gen = torch.tensor([2.0]), torch.tensor([-1.0])
    sp = lambda v: math.log1p(math.exp(v))  # noqa: E731
    loss_d, loss_eg = bigan_losses(d_enc, d_gen, d_enc, d_gen)
    assert loss_d.item() == pytest.approx(sp(-2.0) + sp(-1.0), rel=1e-6)  # -log s(2) - log(1 - s(-1))
    assert loss_eg.item() == pytest.approx(sp(1.0) + sp(2.0), rel=1e-6)  # labels swapped
    disc = ConvDiscriminator(3, 4, z_dim=3, hidden=8)
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    z = torch.randn(2, 3, requires_grad=True)
    out = frozen_call(disc, x, z)
    assert torch.allclose(out, disc(x, z))
    out.sum().backward()
    assert x.grad is not None and z.grad is not None
    assert all(p.grad is None for p in disc.parameters())


# ------------------------------------------------------------------------------------------------ Selfie
def test_selfie_patches_masks_and_loss_by_hand():
    from pretrain.methods.selfie import choose_masked, image_patches, selfie_loss

    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    p = image_patches(x, 4)
    assert p.shape == (2, 16, 3, 2, 2)
    for i in range(16):
        r, q = divmod(i, 4)
        assert torch.equal(p[:, i], x[:, :, 2 * r : 2 * r + 2, 2 * q : 2 * q + 2])
    masked, visible = choose_masked(3, 16, 4, generator=_gen(16))
    for mi, vi in zip(masked.tolist(), visible.tolist()):
        assert sorted(mi + vi) == list(range(16)) and len(mi) == 4
    q = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])
    c = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]])
    # logits row 0: (1, 1) target 0 -> log 2; row 1: (0, 2) target 1 -> log(1 + e^-2)
    assert selfie_loss(q, c).item() == pytest.approx((math.log(2) + math.log(1 + math.exp(-2))) / 2, rel=1e-6)
