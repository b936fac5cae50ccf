"""DINO and MAE pretraining (ViT trunks; DINO also on ResNets): the losses against independent computations,
the EMA teacher, MAE's masking, training through the trainer and the checkpoints evaluated as ViTs."""

from __future__ import annotations

import math
import types

import numpy as np
import pytest
import torch

from evalsuite.checkpoints import load_checkpoint
from evalsuite.errors import UserError
from pretrain import TrainConfig, Trainer
from pretrain.base import trunk_embedding
from pretrain.methods.byol import cosine_momentum
from pretrain.methods.dino import DINO, dino_loss, entropy_monitors, local_crop_size, teacher_temperature
from pretrain.methods.mae import MAE, mae_loss, patchify, random_masking
from pretrain.registry import get_method
from tests.helpers import make_context

VIT = "vit_tiny_patch16"
SMALL = {"dino": {"out_dim": 64, "hidden_dim": 32, "bottleneck_dim": 16, "n_local": 2},
         "mae": {"decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 2}}


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


# ---------------------------------------------------------------- DINO


def reference_dino_loss(student, teacher, center, t_teacher, t_student) -> float:
    """The 6 pairs (teacher crop i, student crop v) of 2 global + 2 local crops with v != i, each the batch
    mean of -sum softmax((t_i - c) / T_t) log softmax(s_v / T_s), averaged."""
    pairs = [(0, 1), (0, 2), (0, 3), (1, 0), (1, 2), (1, 3)]
    return float(np.mean([np.mean(-(softmax((teacher[i] - center) / t_teacher)
                                    * np.log(softmax(student[v] / t_student))).sum(axis=1)) for i, v in pairs]))


def test_dino_loss_against_an_independent_computation():
    rng = np.random.default_rng(0)
    student = [rng.normal(size=(3, 5)) * 3 for _ in range(4)]
    teacher = [rng.normal(size=(3, 5)) * 3 for _ in range(2)]
    center = rng.normal(size=(1, 5))

    def ours(c, t_teacher=0.04, t_student=0.1):
        return dino_loss([torch.tensor(x) for x in student], [torch.tensor(x) for x in teacher], torch.tensor(c),
                         t_teacher, t_student).item()

    for t_teacher, t_student in ((0.04, 0.1), (0.07, 0.2)):
        expected = reference_dino_loss(student, teacher, center, t_teacher, t_student)
        assert ours(center, t_teacher, t_student) == pytest.approx(expected, rel=1e-5)
    zero = np.zeros((1, 5))
    assert ours(zero) == pytest.approx(reference_dino_loss(student, teacher, zero, 0.04, 0.1), rel=1e-5)
    assert ours(zero) != pytest.approx(ours(center), rel=1e-3)  # the centre matters
    # a student crop equal to its own teacher crop: that pair would score low, but it is not counted
    student[0] = teacher[0] / 0.4 * 0.1
    assert ours(center) == pytest.approx(reference_dino_loss(student, teacher, center, 0.04, 0.1), rel=1e-5)


def test_dino_teacher_temperature_warm_up_and_centre_update():
    linspace = np.linspace(0.04, 0.07, 30)
    for epoch in (0, 1, 15, 29):
        assert teacher_temperature(epoch, 0.04, 0.07, 30) == pytest.approx(linspace[epoch])
    assert teacher_temperature(30, 0.04, 0.07, 30) == teacher_temperature(100, 0.04, 0.07, 30) == 0.07
    assert teacher_temperature(0, 0.04, 0.04, 0) == 0.04
    torch.manual_seed(0)
    m = DINO("resnet18", hp=SMALL["dino"])
    c0 = torch.randn(1, 64)
    m.center.copy_(c0)
    out = torch.randn(10, 64)
    m.update_center(out)
    torch.testing.assert_close(m.center, 0.9 * c0 + 0.1 * out.mean(0, keepdim=True))


def test_dino_entropy_monitors_against_hand_computed_values():
    k = 8
    uniform = torch.full((4, k), 1 / k)
    assert entropy_monitors(uniform) == pytest.approx({"t_entropy": math.log(k), "t_marginal": math.log(k)})
    same = torch.zeros(4, k)
    same[:, 3] = 1  # one prototype for every image: the collapse sharpening leads to
    assert entropy_monitors(same) == pytest.approx({"t_entropy": 0.0, "t_marginal": 0.0}, abs=1e-6)
    spread = torch.eye(k)[:4]  # a different one-hot per image: healthy
    assert entropy_monitors(spread) == pytest.approx({"t_entropy": 0.0, "t_marginal": math.log(4)}, abs=1e-6)
    p = torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]])
    h = [-(0.5 * math.log(0.5) + 0.5 * math.log(0.25)), -(0.2 * math.log(0.1) + 0.8 * math.log(0.8))]
    mean = [0.3, 0.175, 0.525]
    assert entropy_monitors(p) == pytest.approx({"t_entropy": sum(h) / 2,
                                                 "t_marginal": -sum(m * math.log(m) for m in mean)})


def test_dino_local_crops_are_whole_patches_of_a_vit():
    """96/224 of the size, rounded to whole patches on a ViT (DINO: 96 = 6 x 16; DINOv2: 98 = 7 x 14): at 64 px the
    local crops were 27 px, zero-padded by the trunk to a 2 x 2 grid of 16 px patches."""
    assert [local_crop_size(224, 16), local_crop_size(224, 14), local_crop_size(224, None)] == [96, 98, 96]
    assert [local_crop_size(64, 16), local_crop_size(64, 8), local_crop_size(64, None)] == [32, 24, 27]
    assert local_crop_size(16, 16) == 16  # at least one patch
    from PIL import Image

    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 80, 3), dtype=np.uint8))
    for arch, local in ((VIT, 32), ("vit_tiny_patch8", 24), ("resnet18", 27)):
        views = DINO(arch, hp=SMALL["dino"]).views(64)(img)
        assert [tuple(v.shape[-2:]) for v in views] == [(64, 64)] * 2 + [(local, local)] * 2, arch


def _dino_views(batch=4, size=32, local=16, n_local=2):
    return [torch.randn(batch, 3, size, size) for _ in range(2)] + [torch.randn(batch, 3, local, local)
                                                                     for _ in range(n_local)]


def test_dino_teacher_gets_no_gradients_and_follows_the_student_by_ema():
    torch.manual_seed(0)
    m = DINO(VIT, hp={**SMALL["dino"], "drop_path_rate": 0.1})
    from pretrain.base import Batch

    loss, logs = m.training_step(Batch(_dino_views(), torch.arange(4), torch.zeros(4, dtype=torch.long)))
    loss.backward()
    teacher = list(m.teacher_trunk.parameters()) + list(m.teacher_head.parameters())
    assert all(p.grad is None and not p.requires_grad for p in teacher)
    assert m.trunk.blocks[0].attn.qkv.weight.grad is not None and m.head.last_v.grad is not None
    assert not m.head.last_g.requires_grad  # norm_last_layer: the last layer's norm stays 1
    # stochastic depth in the student only (rates 0 .. 0.1 over the blocks)
    assert m.trunk.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)
    assert type(m.teacher_trunk.blocks[-1].drop_path1).__name__ == "Identity"
    before = [p.detach().clone() for p in teacher]
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(0.01)
    m.on_after_step(types.SimpleNamespace(progress=0.5))
    mom = cosine_momentum(0.996, 0.5)
    online = list(m.trunk.parameters()) + list(m.head.parameters())
    for b, p, o in zip(before, teacher, online):
        torch.testing.assert_close(p, mom * b + (1 - mom) * o.detach())


def test_dino_center_init_batch_centres_the_first_step_on_its_own_teacher_mean():
    """center_init=batch: the first step's targets are centred on that batch's teacher mean (DINOLoss's zero centre
    leaves them uncentred, and at a short run's lr the student collapses onto their shared part within a few
    steps); a resumed run keeps its saved centre; zero is DINOLoss's."""
    from pretrain.base import Batch

    views = _dino_views()
    batch = Batch(views, torch.arange(4), torch.zeros(4, dtype=torch.long))
    for init in ("zero", "batch"):
        torch.manual_seed(0)
        m = DINO(VIT, hp={**SMALL["dino"], "center_init": init, "drop_path_rate": 0.0})
        m.on_train_start(types.SimpleNamespace(epoch=0, global_step=0))
        with torch.no_grad():  # teacher = student at init (no stochastic depth)
            outs = [m.head(m.embed(v)) for v in views]
        mean = torch.cat(outs[:2]).mean(0, keepdim=True)
        loss, _ = m.training_step(batch)
        centre = mean if init == "batch" else torch.zeros_like(mean)
        assert loss.item() == pytest.approx(dino_loss(outs, outs[:2], centre, 0.04, 0.1).item(), rel=1e-5)
        # then the EMA update with the same batch: c <- 0.9 c + 0.1 mean
        torch.testing.assert_close(m.center, 0.9 * centre + 0.1 * mean)
    m.center.fill_(0.5)
    m.on_train_start(types.SimpleNamespace(epoch=0, global_step=7))  # resumed: the centre came with the state
    m.training_step(batch)
    torch.testing.assert_close(m.center, 0.9 * torch.full_like(mean, 0.5) + 0.1 * mean)
    with pytest.raises(UserError, match="center_init must be one of zero, batch"):
        DINO(VIT, hp={**SMALL["dino"], "center_init": "mean"})


def test_dino_after_backward_clips_each_gradient_freezes_the_last_layer_and_schedules_weight_decay():
    torch.manual_seed(0)
    m = DINO("resnet18", hp=SMALL["dino"])
    for p in m.parameters():
        p.grad = torch.full_like(p, 10.0) if p.requires_grad else None
    opt = torch.optim.AdamW([{"params": [m.head.last_v]}, {"params": [m.head.mlp[0].bias], "weight_decay": 0.0}])
    trainer = types.SimpleNamespace(epoch=0, progress=0.25, optimizer=opt, optim_cfg={"weight_decay": 0.04})
    m.on_after_backward(trainer)
    assert m.head.last_v.grad is None  # frozen in the first epoch
    norms = [p.grad.norm().item() for p in m.parameters() if p.grad is not None]
    assert norms and max(norms) == pytest.approx(3.0, rel=1e-5)
    assert opt.param_groups[0]["weight_decay"] == pytest.approx(0.4 + (0.04 - 0.4) * (1 + math.cos(math.pi / 4)) / 2)
    assert opt.param_groups[1]["weight_decay"] == 0.0
    m.head.last_v.grad = torch.ones_like(m.head.last_v)
    m.on_after_backward(types.SimpleNamespace(**{**vars(trainer), "epoch": 1}))
    assert m.head.last_v.grad is not None


# ---------------------------------------------------------------- MAE


def test_mae_masking_keeps_a_quarter_of_the_patches_of_each_sample():
    torch.manual_seed(0)
    x = torch.randn(5, 16, 3)
    kept, mask, restore = random_masking(x, 0.75)
    assert kept.shape == (5, 4, 3) and mask.shape == (5, 16)
    assert torch.equal(mask.sum(1), torch.full((5,), 12.0))
    for i in range(5):  # the kept tokens are exactly the unmasked ones
        visible = x[i][mask[i] == 0]
        assert sorted(map(tuple, kept[i].tolist())) == sorted(map(tuple, visible.tolist()))
        assert torch.equal(restore[i].sort().values, torch.arange(16))
    assert len({tuple(mask[i].tolist()) for i in range(5)}) > 1  # per-sample masks


def test_mae_loss_counts_only_masked_patches_with_normalised_pixels():
    rng = np.random.default_rng(0)
    pred, target = rng.normal(size=(2, 6, 12)), rng.normal(size=(2, 6, 12)) * 2 + 1
    mask = np.array([[1, 0, 1, 1, 0, 0], [0, 1, 1, 1, 1, 0]], dtype=np.float64)
    errors = []
    for i in range(2):
        for j in range(6):
            if mask[i, j]:
                t = target[i, j]
                t = (t - t.mean()) / np.sqrt(t.var(ddof=1) + 1e-6)
                errors.append(np.mean((pred[i, j] - t) ** 2))
    got = mae_loss(torch.tensor(pred), torch.tensor(target), torch.tensor(mask))
    assert got.item() == pytest.approx(np.mean(errors), rel=1e-5)
    raw = np.mean([np.mean((pred[i, j] - target[i, j]) ** 2) for i in range(2) for j in range(6) if mask[i, j]])
    assert mae_loss(torch.tensor(pred), torch.tensor(target), torch.tensor(mask), norm_pix=False).item() == (
        pytest.approx(raw, rel=1e-5))
    pred[mask == 0] += 50  # visible patches do not count
    assert mae_loss(torch.tensor(pred), torch.tensor(target), torch.tensor(mask)).item() == pytest.approx(
        np.mean(errors), rel=1e-5)


def test_patchify_follows_the_trunks_token_order_and_padding():
    img = torch.zeros(1, 3, 40, 40)  # 3 x 3 patches of 16 px once padded to 48
    for r in range(3):
        for c in range(3):
            img[:, :, 16 * r:16 * r + 16, 16 * c:16 * c + 16] = 3 * r + c
    img[:, 1] += 0.5
    p = patchify(img, 16)
    assert p.shape == (1, 9, 16 * 16 * 3)
    assert torch.equal(p[0, 0, :3], torch.tensor([0.0, 0.5, 0.0]))  # pixels, then channels inside a patch
    assert p[0, 4, 0] == 4 and p[0, 8, 0] == 8 and p[0, 8, -3] == 0  # last patch: its bottom-right is padding


def test_mae_encoder_sees_the_visible_quarter_and_refuses_resnets():
    torch.manual_seed(0)
    m = MAE(VIT, hp=SMALL["mae"])
    latent, mask, restore, grid = m.forward_encoder(torch.randn(2, 3, 64, 64))
    assert grid == (4, 4) and latent.shape == (2, 1 + 4, 192) and mask.sum().item() == 2 * 12
    assert not m.trunk.pos_embed.requires_grad  # fixed sin-cos, as the paper
    pred = m.forward_decoder(latent, restore, grid)
    assert pred.shape == (2, 16, 16 * 16 * 3)
    with pytest.raises(UserError, match="mae needs a Vision Transformer trunk"):
        MAE("resnet18")


# ---------------------------------------------------------------- through the trainer


def test_embedding_of_a_vit_is_the_last_blocks_cls_token():
    m = get_method("simclr")(VIT, hp={"proj_hidden": 16, "proj_dim": 8})
    x = torch.randn(2, 3, 32, 32)
    assert m.feat_dim == 192
    torch.testing.assert_close(m.embed(x), m.trunk(x, ["block11"])["block11"][:, 0])


@pytest.mark.parametrize("method,arch", [("dino", VIT), ("mae", VIT), ("dino", "resnet18")])
def test_trains_and_the_checkpoint_evaluates(method, arch, tiny_imagefolder, tmp_path):
    cfg = TrainConfig(method=method, arch=arch, data_root=str(tiny_imagefolder), out=str(tmp_path / "m.safetensors"),
                      batch_size=8, image_size=32, epochs=1, max_steps_per_epoch=2, hp=SMALL[method], progress=False)
    trainer = Trainer(cfg)
    init = {k: v.clone() for k, v in trainer.method.trunk_state_dict().items()}
    out = trainer.fit()
    ck = load_checkpoint(out)
    assert ck.arch == arch and ck.format == "evalsuite" and ck.report.missing == ck.report.unexpected == []
    meta = ck.metadata
    assert meta["method"] == method and meta["steps"] == 2 and math.isfinite(meta["final_loss"])
    assert meta["hyperparameters"] == {**get_method(method).defaults, **SMALL[method]}
    assert set(ck.state_dict) == set(init)  # the trunk only: no teacher, head or decoder
    assert any(not torch.equal(v, init[k]) for k, v in ck.state_dict.items() if v.is_floating_point())
    if method == "dino":  # the teacher, as DINO evaluates and releases it (eval_knn.py --checkpoint_key teacher)
        assert meta["hyperparameters"]["checkpoint_trunk"] == "teacher"
        teacher, student = trainer.method.teacher_trunk.state_dict(), trainer.method.trunk.state_dict()
        assert all(torch.equal(ck.state_dict[k], v) for k, v in teacher.items())
        assert any(not torch.equal(ck.state_dict[k], v) for k, v in student.items() if v.is_floating_point())
    if arch != VIT:
        return
    # the evaluation's feature of the last block is the method's embedding (the normed CLS token)
    ctx = make_context("knn", tiny_imagefolder, tmp_path / "out", checkpoint=ck, layers=["block11"],
                       overrides=["knn.image_size=32", "knn.resize_mode=square"])
    train = ctx.open_dataset("imagefolder", "train")
    feats = ctx.features(train, ["block11"])["block11"]
    assert feats.shape == (len(train), 192) and np.isfinite(feats).all()
    tf = ctx.transform()
    with torch.no_grad():
        ours = trunk_embedding(ck.build_trunk(), torch.stack([tf(train.load_image(i)) for i in range(4)]))
    np.testing.assert_allclose(feats[:4], ours.numpy(), rtol=2e-3, atol=2e-3)  # features stored as float16


def test_short_recipes_resolve_over_the_paper_values():
    for name in ("dino", "mae"):
        cls = get_method(name)
        assert cls.resolve_hp({}) == cls.defaults
        assert cls.resolve_hp({}, "short") == {**cls.defaults, **cls.short["hp"]}
    assert get_method("mae").optim_defaults("short")["warmup_epochs"] < 1
    # DINO keeps the paper's lr scaling (5e-4 x B/256: 1.25e-4 at a batch of 64; SHORT_OPTIM's 4x lr collapses the
    # ViT's embedding within 20 steps) and warms up over an epoch (~5 % of a 10-minute run)
    d = get_method("dino").optim_defaults("short")
    assert d["lr"] * 64 / d["base_batch_size"] == pytest.approx(1.25e-4) and d["warmup_epochs"] == 1
    hp = get_method("dino").resolve_hp({}, "short")
    assert (hp["n_local"], hp["teacher_temp"], hp["center_init"]) == (0, 0.02, "batch")
    assert hp["momentum_teacher"] == 0.996  # the paper's
    assert get_method("dino").defaults["out_dim"] == 65536 and get_method("mae").defaults["mask_ratio"] == 0.75
