"""CPC v2 (pretrain/methods/cpc_v2.py): the four-direction loss against a hand-written loop, each direction's
context blind to what lies ahead of it, the per-patch augmentation (independent per patch, seeded), the
paper's patch geometry, and a 2-step training run whose checkpoint loads as a trunk."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from evalsuite.checkpoints import load_checkpoint
from evalsuite.errors import UserError
from evalsuite.trunks import RESNET_TAPS
from pretrain import TrainConfig, Trainer
from pretrain.methods.cpc import patch_grid
from pretrain.methods.cpc_v2 import (
    CPCV2,
    DIRECTIONS,
    DirectionHead,
    PatchAugment,
    augment_patches,
    check_settings,
    direction_losses,
    grid_geometry,
    subcrop_pad,
)
from pretrain.registry import methods

#: each direction as the test understands it: the step (rows, columns) from a context to its target
STEP = {"top_down": (1, 0), "bottom_up": (-1, 0), "left_right": (0, 1), "right_left": (0, -1)}


def _context_in_place(head, z, name):
    """The head's context in the grid's own orientation."""
    k = DIRECTIONS[name]
    return torch.rot90(head.context(torch.rot90(z, k, dims=(2, 3))), -k, dims=(2, 3))


def _heads(dim=4, width=3, blocks=1, target_dim=5, n_offsets=2, seed=0):
    torch.manual_seed(seed)
    return torch.nn.ModuleList(DirectionHead(dim, width, blocks, target_dim, n_offsets) for _ in STEP)


def test_four_direction_loss_matches_a_loop():
    b, d, g, t, scale, offsets = 2, 4, 5, 5, 0.1, [2, 3]
    heads = _heads(d, target_dim=t)
    z = torch.randn(b, d, g, g, generator=torch.Generator().manual_seed(1))
    names = list(STEP)
    got = direction_losses(z, heads, names, offsets, scale)
    ref = []
    with torch.no_grad():
        for name, head in zip(names, heads):
            ctx, keys = _context_in_place(head, z, name), head.target(z).permute(0, 2, 3, 1).reshape(-1, t)
            dr, dc = STEP[name]
            total = 0.0
            for j, k in enumerate(offsets):
                pred = head.predictors[j](ctx) * scale
                terms = []
                for bi in range(b):
                    for r in range(g):
                        for c in range(g):
                            rr, cc = r + dr * k, c + dc * k
                            if 0 <= rr < g and 0 <= cc < g:  # the target k steps ahead is in the grid
                                logits = keys @ pred[bi, :, r, c]  # against every patch of every image
                                terms.append(-F.log_softmax(logits, 0)[(bi * g + rr) * g + cc])
                assert len(terms) == b * (g - k) * g
                total += float(torch.stack(terms).mean())
            ref.append(total)
    assert got.tolist() == pytest.approx(ref, rel=1e-5)
    assert list(DIRECTIONS) == names  # directions=1 is v1's top-down task, 2 adds bottom-up, 4 the horizontal ones


def test_each_direction_sees_only_what_lies_behind():
    g, r, c = 5, 2, 2
    heads = _heads(blocks=2)
    z = torch.randn(1, 4, g, g, generator=torch.Generator().manual_seed(2))
    rows, cols = torch.arange(g).view(g, 1), torch.arange(g).view(1, g)
    with torch.no_grad():
        for name, head in zip(STEP, heads):
            dr, dc = STEP[name]
            ahead = (rows - r) * dr + (cols - c) * dc > 0  # strictly further along the direction
            behind = (rows - r) * dr + (cols - c) * dc < 0
            base = _context_in_place(head, z, name)[0, :, r, c]
            moved = _context_in_place(head, z + 5.0 * ahead, name)[0, :, r, c]
            assert torch.allclose(moved, base, atol=1e-6), name
            assert not torch.allclose(_context_in_place(head, z + 5.0 * behind, name)[0, :, r, c], base), name


def _hp(**kw):
    return {**CPCV2.defaults, **kw}


def test_patch_augmentation_is_per_patch_and_seeded():
    aug = PatchAugment(12, _hp(elastic=1.0, colour_jitter=1.0))
    gen = torch.Generator().manual_seed(3)
    p = torch.rand(4, 3, 12, 12, generator=gen)
    q = p.clone()
    q[1] = torch.rand(3, 12, 12, generator=gen)

    def run(x, seed):
        torch.manual_seed(seed)
        return augment_patches(x, aug)

    a, again, other = run(p, 0), run(p, 0), run(p, 1)
    assert torch.equal(a, again) and not torch.equal(a, other)  # deterministic under a seed
    assert a.shape == p.shape and 0 <= float(a.min()) and float(a.max()) <= 1
    # another patch 1 changes patch 1's output only: every patch has its own transform, nothing mixes patches
    b = run(q, 0)
    assert torch.equal(a[[0, 2, 3]], b[[0, 2, 3]]) and not torch.equal(a[1], b[1])
    # the same patch 6 times: 6 different draws, so 6 different outputs
    same = run(p[:1].expand(6, -1, -1, -1).clone(), 0)
    assert len({tuple(x.flatten().tolist()) for x in same}) == 6


def test_colour_drop_keeps_one_channel_per_patch():
    aug = PatchAugment(8, _hp(autoaugment_ops=0, elastic=0.0, colour_jitter=0.0, gray=0.0, colour_drop=1.0))
    p = torch.rand(12, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    torch.manual_seed(0)
    out = augment_patches(p, aug)
    kept = []
    for x, y in zip(p, out):
        same = [ch for ch in range(3) if torch.equal(x[ch], y[ch])]
        assert len(same) == 1  # the kept channel; the other two are replaced by faint noise
        kept.append(same[0])
        assert all(float(y[ch].std()) < 0.05 * float(x[same[0]].std()) for ch in range(3) if ch != same[0])
    assert len(set(kept)) > 1  # drawn per patch


def test_subcrop_pad_is_a_shifted_window():
    x = torch.arange(3 * 8 * 8, dtype=torch.float32).view(3, 8, 8)
    torch.manual_seed(5)
    out = subcrop_pad(x, 6, fill=-1.0)
    assert (out[:, 0] == -1).all() and (out[:, 7] == -1).all() and (out[:, :, 0] == -1).all()
    windows = [(y, xx) for y in range(3) for xx in range(3) if torch.equal(out[:, 1:7, 1:7], x[:, y:y + 6, xx:xx + 6])]
    assert len(windows) == 1


def test_paper_geometry_and_loader_view():
    assert grid_geometry(260, 6, 80 / 260) == (80, 36)  # 6 x 6 patches of 80 px over a 260 px crop
    assert grid_geometry(64, 6, 80 / 260) == (20, 8)
    with pytest.raises(UserError):
        grid_geometry(5, 6, 80 / 260)  # 2 px patches at a stride of 0
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8))
    plain = CPCV2("resnet18", {"patch_aug": False, "context_width": 4, "context_blocks": 1}).views(32)
    torch.manual_seed(0)
    crop = plain.crop(img)
    torch.manual_seed(0)
    (grid,) = plain(img)
    assert crop.shape == (3, 32, 32) and grid.shape == (6, 6, 3, 10, 10)
    assert torch.equal(grid, patch_grid(crop[None], 10, 4)[0])
    torch.manual_seed(0)
    (augmented,) = CPCV2("resnet18", {"context_width": 4, "context_blocks": 1}).views(32)(img)
    assert augmented.shape == grid.shape and not torch.equal(augmented, grid)


def test_bad_settings_are_refused():
    check_settings(CPCV2.defaults)
    for hp in ({"directions": 5}, {"directions": 0}, {"steps_to_predict": 6}, {"steps_to_ignore": 3},
               {"subcrop": 0.0}):
        with pytest.raises(UserError):
            check_settings(_hp(**hp))


SMALL = {"context_width": 16, "context_blocks": 1, "target_dim": 8, "grid": 4}


def test_cpc_v2_trains_and_checkpoint_loads(tiny_imagefolder, tmp_path):
    assert "cpc_v2" in methods() and methods()["cpc_v2"] is CPCV2
    cfg = TrainConfig(method="cpc_v2", data_root=str(tiny_imagefolder), out=str(tmp_path / "cpc_v2.safetensors"),
                      batch_size=8, image_size=32, epochs=1, max_steps_per_epoch=2, hp=SMALL, progress=False)
    tr = Trainer(cfg)
    ck = load_checkpoint(tr.fit())
    assert ck.report.missing == [] and ck.report.unexpected == [] and ck.format == "evalsuite"
    meta = ck.metadata
    assert meta["method"] == "cpc_v2" and meta["arch"] == "resnet18" and meta["steps"] == 2
    assert meta["hyperparameters"] == {**CPCV2.defaults, **SMALL}
    assert math.isfinite(meta["final_loss"]) and set(meta["final_logs"]) == set(DIRECTIONS)
    assert meta["cpc_v2"]["offsets"] == [3] and meta["augment"]["patch"] == 10
    assert len(tr.method.heads) == 4
    taps = ck.build_trunk()(torch.zeros(1, 3, 32, 32))
    assert set(taps) == set(RESNET_TAPS) and all(torch.isfinite(v).all() for v in taps.values())
    init = load_checkpoint("random:resnet18").build_trunk().state_dict()
    assert any(not torch.equal(v, init[k]) for k, v in ck.state_dict.items() if v.is_floating_point())
