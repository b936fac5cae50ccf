"""The ``cifar`` recipe: solo-learn's CIFAR configs, the optimiser pieces they need, their views, the record in the
checkpoint, the real-folder mode of bench_pretrain_quality and the solo-learn reference rows.

Expected values are transcribed from vturrisi/solo-learn@9187ea3 (scripts/pretrain/cifar/<method>.yaml, the
augmentation YAMLs in scripts/pretrain/cifar/augmentations/, and the defaults in solo/methods/*.py, solo/args/
pretrain.py and solo/methods/base.py), not from pretrain/.
"""

from __future__ import annotations

import argparse
import json
import math
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms import v2 as T

from evalsuite.checkpoints import read_metadata
from evalsuite.errors import UserError
from pretrain import TrainConfig, Trainer
from pretrain.optim import LARS, build_optimizer, lr_factor
from pretrain.registry import get_method

# every CIFAR config: batch_size 256 (lr as given = lr at 256), scheduler warmup_cosine with solo's defaults
# (warmup_epochs 10, warmup_start_lr 3e-5, min_lr 0), momentum 0.9 (solo/args/pretrain.py), max_epochs 1000
SCHEDULE = {"warmup_epochs": 10, "warmup_start_lr": 3e-5, "base_batch_size": 256, "momentum": 0.9}
# optimizer.kwargs of the LARS configs: clip_lr True, eta 0.02, exclude_bias_n_norm True
LARS_KW = {"optimizer": "lars", "lars_eta": 0.02, "lars_clip": True, "lars_trust": "solo", "exclude_bias_norm": True}
# SGD configs set no exclude_bias_n_norm_wd: solo's default False decays biases and norms
SGD_KW = {"optimizer": "sgd", "exclude_bias_norm": False}

EXPECTED = {
    # simclr.yaml: proj 2048 -> 256, temperature 0.2, lars lr 0.4 wd 1e-4; symmetric.yaml; projector without BN
    "simclr": ({"proj_hidden": 2048, "proj_dim": 256, "temperature": 0.2, "proj_bn": False},
               {**LARS_KW, "lr": 0.4, "weight_decay": 1e-4}, "cifar_symmetric"),
    # mocov2plus.yaml: proj 2048 -> 256, queue 32768, T 0.2, tau 0.99 -> 0.999, sgd lr 0.3 wd 1e-4; symmetric_weak
    "moco_v2": ({"mlp_hidden": 2048, "dim": 256, "queue_size": 32768, "temperature": 0.2, "momentum_k": 0.99,
                 "momentum_k_end": 0.999, "symmetric": True, "bn_splits": 1},
                {**SGD_KW, "lr": 0.3, "weight_decay": 1e-4}, "cifar_symmetric_weak"),
    # byol.yaml: proj 4096 -> 256, pred 4096, tau 0.99 -> 1.0, lars lr 1.0 wd 1e-5; asymmetric.yaml
    "byol": ({"proj_hidden": 4096, "proj_dim": 256, "pred_hidden": 4096, "tau_base": 0.99},
             {**LARS_KW, "lr": 1.0, "weight_decay": 1e-5}, "cifar_asymmetric"),
    # swav.yaml: proj 2048 -> 128, queue 3840 from epoch 50, 3000 prototypes frozen 2 epochs, T 0.1; solo's
    # defaults sk_epsilon 0.05, sk_iters 3; lars lr 0.6 wd 1e-6; symmetric.yaml (2 crops: no local crops)
    "swav": ({"proj_hidden": 2048, "proj_dim": 128, "queue_length": 3840, "queue_start_epochs": 50,
              "n_prototypes": 3000, "freeze_prototypes_epochs": 2, "freeze_prototypes_steps": 0, "temperature": 0.1,
              "epsilon": 0.05, "sinkhorn_iters": 3, "n_local": 0, "proj_bn": True},
             {**LARS_KW, "lr": 0.6, "weight_decay": 1e-6}, "cifar_symmetric"),
    # barlow.yaml: proj 2048 -> 2048, scale_loss 0.1; solo's default lamb 0.0051; lars lr 0.3 wd 1e-4; asymmetric
    "barlow_twins": ({"proj_dim": 2048, "lambd": 0.0051, "scale_loss": 0.1},
                     {**LARS_KW, "lr": 0.3, "weight_decay": 1e-4}, "cifar_asymmetric"),
    # simsiam.yaml: proj 2048 -> 2048, pred 512, predictor at a static lr; sgd lr 0.5 wd 1e-5; symmetric_weak
    "simsiam": ({"proj_dim": 2048, "pred_hidden": 512, "fix_pred_lr": True},
                {**SGD_KW, "lr": 0.5, "weight_decay": 1e-5}, "cifar_symmetric_weak"),
    # dino.yaml: proj 2048 -> 256, 4096 prototypes, tau 0.9995 -> 1.0, lars lr 0.3 wd 1e-6; solo/methods/dino.py
    # defaults: clip_grad 0, freeze_last_layer 1, norm_last_layer, student T 0.1, teacher T 0.07 (warm-up from
    # 0.04 over 0 epochs); no weight-decay schedule; asymmetric.yaml; main_linear.py evaluates the "backbone."
    # weights, the student (the teacher is "momentum_backbone.")
    "dino": ({"hidden_dim": 2048, "bottleneck_dim": 256, "out_dim": 4096, "momentum_teacher": 0.9995,
              "clip_grad": 0.0, "freeze_last_layer": 1, "norm_last_layer": True, "student_temp": 0.1,
              "teacher_temp": 0.07, "warmup_teacher_temp": 0.04, "warmup_teacher_temp_epochs": 0,
              "center_momentum": 0.9, "n_local": 0, "weight_decay_end": 1e-6, "checkpoint_trunk": "student"},
             {**LARS_KW, "lr": 0.3, "weight_decay": 1e-6}, "cifar_asymmetric"),
}

# scripts/pretrain/cifar/augmentations/*.yaml, per view: (brightness, contrast, saturation, hue), blur p, solarize p;
# all: rrc scale (0.08, 1.0) bicubic, color_jitter p 0.8, grayscale p 0.2, horizontal_flip p 0.5
VIEWS = {
    "cifar_symmetric": [((0.8, 0.8, 0.8, 0.2), 0.5, 0.0)] * 2,
    "cifar_symmetric_weak": [((0.4, 0.4, 0.4, 0.1), 0.5, 0.0)] * 2,
    "cifar_asymmetric": [((0.4, 0.4, 0.2, 0.1), 0.0, 0.0), ((0.4, 0.4, 0.2, 0.1), 0.0, 0.2)],
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_cifar_recipe_is_solo_learns_config(name):
    hp, optim, views = EXPECTED[name]
    cls = get_method(name)
    resolved = cls.resolve_hp({}, "cifar")
    assert {k: resolved[k] for k in hp} == hp
    assert cls.optim_defaults("cifar") == {**cls.optim, **SCHEDULE, **optim}
    table = cls.recipe_overrides("cifar")
    assert table["views"] == views
    assert table["train"] == {"arch": "resnet18_cifar", "batch_size": 256, "epochs": 1000, "image_size": 32}
    # solo/data/pretrain_dataloader.py MEANS_N_STD["cifar10"]
    assert table["normalize"] == {"mean": [0.4914, 0.4822, 0.4465], "std": [0.2470, 0.2435, 0.2616]}
    # the paper recipe is untouched by the new knobs
    assert cls.resolve_hp({}) == cls.defaults and cls.optim_defaults() == cls.optim


def test_methods_without_a_solo_learn_config_refuse_the_recipe():
    for name in ("moco_v1", "npid", "rotnet", "supervised"):
        with pytest.raises(UserError, match="no cifar recipe"):
            get_method(name).resolve_hp({}, "cifar")


def _ops(pipeline, kind):
    found = []
    for op in getattr(pipeline, "transforms", []):
        found += [op] if isinstance(op, kind) else _ops(op, kind)
    return found


def _applied(pipeline, kind) -> list[float]:
    """The probabilities of the RandomApply wrappers holding a ``kind`` transform."""
    return [op.p for op in pipeline.transforms if isinstance(op, T.RandomApply) and _ops(op, kind)]


@pytest.mark.parametrize("name", sorted(VIEWS))
def test_cifar_views_are_the_yaml_files(name):
    from pretrain.augment import preset

    views = preset(name, 32)
    assert len(views) == 2
    for pipeline, (jitter, blur, solarize) in zip(views.pipelines, VIEWS[name]):
        (crop,) = _ops(pipeline, T.RandomResizedCrop)
        assert tuple(crop.size) == (32, 32) and tuple(crop.scale) == (0.08, 1.0)
        assert crop.interpolation == T.InterpolationMode.BICUBIC
        (cj,) = _ops(pipeline, T.ColorJitter)
        b, c, s, h = jitter
        assert cj.brightness == pytest.approx((1 - b, 1 + b)) and cj.contrast == pytest.approx((1 - c, 1 + c))
        assert cj.saturation == pytest.approx((1 - s, 1 + s)) and cj.hue == pytest.approx((-h, h))
        assert _applied(pipeline, T.ColorJitter) == [0.8]
        assert [g.p for g in _ops(pipeline, T.RandomGrayscale)] == [0.2]
        assert [f.p for f in _ops(pipeline, T.RandomHorizontalFlip)] == [0.5]
        assert _applied(pipeline, T.GaussianBlur) == ([blur] if blur else [])
        for g in _ops(pipeline, T.GaussianBlur):  # PIL's radius 0.1-2.0 px, not scaled to the size
            assert tuple(g.sigma) == pytest.approx((0.1, 2.0)) and g.kernel_size[0] >= 13
        assert [x.p for x in _ops(pipeline, T.RandomSolarize)] == ([solarize] if solarize else [])
    assert preset(name, 32, blur=0.0).name == name
    assert all(not _ops(v, T.GaussianBlur) for v in preset(name, 32, blur=0.0).pipelines)  # --view-blur 0


def test_recipe_views_replace_the_multi_crop_of_swav_and_dino():
    for name in ("swav", "dino"):
        cls = get_method(name)
        small = {"swav": {"proj_hidden": 16, "n_prototypes": 8, "queue_length": 0},
                 "dino": {"out_dim": 16, "hidden_dim": 16}}[name]
        m = cls("resnet18", hp=cls.resolve_hp(small, "cifar"), recipe="cifar")
        assert m.views(32).name == EXPECTED[name][2] and len(m.views(32)) == 2
        assert len(cls("resnet18", hp=small).views(64)) > 2  # the paper recipe keeps its local crops


def test_lars_solo_trust_ratio_and_clip_against_a_hand_computation():
    """solo-learn's LARS step (solo/utils/lars.py) written out in numpy: weights adapted by
    min(eta |w| / (|g| + wd |w| + 1e-8) / lr, 1) on g + wd w, biases plain SGD; momentum buffers seeded with d."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(4, 3))
    b = torch.nn.Parameter(torch.randn(4))
    lr, wd, eta, mom = 0.5, 1e-4, 0.02, 0.9
    opt = LARS([{"params": [w]}, {"params": [b], "weight_decay": 0.0, "lars_exclude": True}], lr=lr, momentum=mom,
               weight_decay=wd, eta=eta, clip=True, trust="solo")
    wn, bn = w.detach().numpy().astype(np.float64), b.detach().numpy().astype(np.float64)
    buf_w = buf_b = None
    for step in range(2):
        gw, gb = torch.randn(4, 3) * (10 if step else 1e-3), torch.randn(4)  # unclipped, then clipped
        w.grad, b.grad = gw.clone(), gb.clone()
        opt.step()
        g = gw.numpy().astype(np.float64)
        ratio = eta * np.linalg.norm(wn) / (np.linalg.norm(g) + wd * np.linalg.norm(wn) + 1e-8)
        ratio = min(ratio / lr, 1.0)
        d = (g + wd * wn) * ratio
        buf_w = d if buf_w is None else mom * buf_w + d
        wn = wn - lr * buf_w
        db = gb.numpy().astype(np.float64)
        buf_b = db if buf_b is None else mom * buf_b + db
        bn = bn - lr * buf_b
        np.testing.assert_allclose(w.detach().numpy(), wn, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(b.detach().numpy(), bn, rtol=1e-5, atol=1e-6)
    # a zero gradient leaves the weight unscaled and undecayed (solo: only when both norms are non-zero)
    z = torch.nn.Parameter(torch.ones(3))
    z.grad = torch.zeros(3)
    assert torch.equal(LARS.scaled_update(z, z.grad, {"weight_decay": 0.1, "eta": 0.02, "clip": True,
                                                      "trust": "solo", "lr": 1.0}), torch.zeros(3))


def test_the_default_lars_is_unchanged():
    """SimCLR's trust ratio eta |w| / |g + wd w| without clipping (the paper recipes)."""
    p = torch.nn.Parameter(torch.tensor([3.0, 4.0]))
    g = torch.tensor([0.0, 1.0])
    d = LARS.scaled_update(p, g, {"weight_decay": 0.5, "eta": 0.1, "clip": False, "trust": "simclr", "lr": 1.0})
    expected = (g + 0.5 * p) * 0.1 * 5.0 / math.hypot(1.5, 3.0)
    assert torch.allclose(d, expected)


def test_warmup_from_a_start_lr_is_solo_learns_schedule():
    """solo/utils/lr_scheduler.py LinearWarmupCosineAnnealingLR in its chainable form, stepped per batch."""
    base, start, warmup, total = 0.4, 3e-5, 5, 20
    lrs, lr = [], start
    for last_epoch in range(total):
        if last_epoch == 0:
            lr = start
        elif last_epoch < warmup:
            lr = lr + (base - start) / (warmup - 1)
        elif last_epoch == warmup:
            lr = base
        else:
            span = total - warmup
            t, t_prev = last_epoch - warmup, last_epoch - warmup - 1
            lr = (1 + math.cos(math.pi * t / span)) / (1 + math.cos(math.pi * t_prev / span)) * lr
        lrs.append(lr)
    ours = [base * lr_factor(s, total, warmup, 0.0, start / base) for s in range(total)]
    np.testing.assert_allclose(ours, lrs, rtol=1e-9)
    assert lr_factor(0, total, warmup) == 1 / warmup  # without a start lr: the existing warm-up


def test_sgd_recipes_decay_biases_and_norms():
    m = get_method("simsiam")("resnet18", hp={"proj_dim": 32, "pred_hidden": 8})
    groups = build_optimizer(m.param_groups(), "sgd", 0.5, 1e-5, 0.9, exclude_bias_norm=False).param_groups
    assert {g["weight_decay"] for g in groups} == {1e-5}
    assert sum(p.numel() for g in groups for p in g["params"]) == sum(p.numel() for p in m.parameters())
    assert [g.get("fixed_lr", False) for g in groups] == [False, False, True]  # the predictor at a static lr
    kept = build_optimizer(m.param_groups(), "sgd", 0.5, 1e-5, 0.9).param_groups  # the default excludes them
    assert sorted(g["weight_decay"] for g in kept) == [0.0, 1e-5, 1e-5]


def test_simsiam_predictor_lr_scale_with_and_without_the_fixed_lr():
    from pretrain.optim import set_lr

    for fixed in (True, False):
        m = get_method("simsiam")("resnet18", hp={"proj_dim": 32, "pred_hidden": 8, "fix_pred_lr": fixed,
                                                  "pred_lr_scale": 10.0})
        opt = build_optimizer(m.param_groups(), "sgd", 0.5, 1e-5, 0.9)
        pred = {id(p) for p in m.predictor.parameters()}
        set_lr(opt, 0.25)  # e.g. a step of the cosine schedule
        for g in opt.param_groups:
            is_pred = {id(p) in pred for p in g["params"]}
            assert len(is_pred) == 1  # the predictor has its own group
            want = 5.0 * (1 if fixed else 0.25) if is_pred == {True} else 0.5 * 0.25
            assert g["lr"] == pytest.approx(want)
    default = get_method("simsiam")("resnet18", hp={"proj_dim": 32, "pred_hidden": 8, "fix_pred_lr": False})
    assert len(default.param_groups()) == len(super(type(default), default).param_groups())  # no extra group


def test_moco_v2_plus_symmetric_loss_two_queues_and_cosine_momentum():
    """solo/methods/mocov2plus.py: (InfoNCE(q1, k2, queue[1]) + InfoNCE(q2, k1, queue[0])) / 2, each view's keys
    enqueued in its own queue; tau = 0.999 - (0.999 - 0.99) (cos(pi k / K) + 1) / 2 (solo/utils/momentum.py)."""
    cls = get_method("moco_v2")
    hp = cls.resolve_hp({"mlp_hidden": 16, "dim": 8, "queue_size": 12}, "cifar")
    torch.manual_seed(0)
    m = cls("resnet18", hp=hp, recipe="cifar")
    assert m.queue_v1 is not None and cls("resnet18", hp={"queue_size": 4}).queue_v1 is None
    v1, v2 = torch.rand(4, 3, 32, 32), torch.rand(4, 3, 32, 32)
    batch = types.SimpleNamespace(views=[v1, v2])
    queue2, queue1 = m.queue.items.clone(), m.queue_v1.items.clone()
    loss, _ = m.training_step(batch)
    with torch.no_grad():  # BN in train mode: batch statistics, the same outputs a second time
        q1, q2 = m.query(v1), m.query(v2)
        k1, k2 = m.key_embed(v1), m.key_embed(v2)

    def info_nce(q, k, neg):
        logits = torch.cat([(q * k).sum(1, keepdim=True), q @ neg.t()], 1).double().numpy() / 0.2
        logits -= logits.max(1, keepdims=True)
        return float(np.mean(np.log(np.exp(logits).sum(1)) - logits[:, 0]))

    expected = (info_nce(q1, k2, queue2) + info_nce(q2, k1, queue1)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-4)
    m.on_after_step(types.SimpleNamespace(progress=0.0))
    assert torch.allclose(m.queue.items[:4], k2, atol=1e-5) and torch.allclose(m.queue_v1.items[:4], k1, atol=1e-5)
    for progress in (0.0, 0.3, 1.0):
        tau = 0.999 - (0.999 - 0.99) * (math.cos(math.pi * progress) + 1) / 2
        assert m.key_momentum(progress) == pytest.approx(tau)
    assert cls("resnet18", hp={"queue_size": 4}).key_momentum(0.7) == 0.999  # paper: constant


def test_swav_epoch_counted_prototype_freeze_and_queue_start():
    from pretrain.losses import sinkhorn

    cls = get_method("swav")
    hp = cls.resolve_hp({"proj_hidden": 16, "proj_dim": 8, "n_prototypes": 6, "queue_length": 4}, "cifar")
    m = cls("resnet18", hp=hp, recipe="cifar")
    m.prototypes.weight.grad = torch.ones_like(m.prototypes.weight)
    m.on_after_backward(types.SimpleNamespace(global_step=500, epoch=1))  # epoch 1 < 2: frozen
    assert m.prototypes.weight.grad is None
    m.prototypes.weight.grad = torch.ones_like(m.prototypes.weight)
    m.on_after_backward(types.SimpleNamespace(global_step=500, epoch=2))
    assert m.prototypes.weight.grad is not None
    # a full queue is stacked under the batch's scores from epoch 50 on only
    z = F.normalize(torch.randn(3, 8), dim=1)
    m.queues[0].enqueue(F.normalize(torch.randn(4, 8), dim=1), gather=False)
    m.queued += 4
    scores = m.prototypes(z).detach()
    m.on_epoch_start(None, 49)
    assert torch.allclose(m.codes(scores, 0), sinkhorn(scores, 0.05, 3))
    m.on_epoch_start(None, 50)
    stacked = torch.cat([m.prototypes(m.queues[0].items), scores]).detach()
    assert torch.allclose(m.codes(scores, 0), sinkhorn(stacked, 0.05, 3)[-3:])
    assert not torch.allclose(m.codes(scores, 0), sinkhorn(scores, 0.05, 3))


def test_cifar_recipe_recorded_in_checkpoint_and_read_by_the_evaluation(tiny_imagefolder, tmp_path):
    from evalsuite.checkpoints import load_checkpoint
    from evalsuite.features import Transform

    out = tmp_path / "simclr_cifar.safetensors"
    cfg = TrainConfig(method="simclr", data_root=str(tiny_imagefolder), out=str(out), batch_size=8, image_size=32,
                      max_steps_per_epoch=1, hp={"proj_hidden": 32}, progress=False, recipe="cifar")
    tr = Trainer(cfg)
    assert not any(isinstance(x, torch.nn.BatchNorm1d) for x in tr.method.projector.modules())
    tr.fit()
    meta = read_metadata(out)
    assert meta["recipe"] == "cifar"
    hp = meta["hyperparameters"]
    assert (hp["temperature"], hp["proj_dim"], hp["proj_bn"], hp["proj_hidden"]) == (0.2, 256, False, 32)
    opt = meta["optimizer"]
    assert {k: opt[k] for k in ("optimizer", "weight_decay", "lars_eta", "lars_clip", "lars_trust",
                                "exclude_bias_norm", "warmup_start_lr", "warmup_epochs")} == {
        "optimizer": "lars", "weight_decay": 1e-4, "lars_eta": 0.02, "lars_clip": True, "lars_trust": "solo",
        "exclude_bias_norm": True, "warmup_start_lr": 3e-5, "warmup_epochs": 10}
    assert opt["lr"] == pytest.approx(0.4 * 8 / 256)
    assert meta["augment"]["preset"] == "cifar_symmetric" and "BICUBIC" in meta["augment"]["views"][0]
    cifar10 = {"mean": [0.4914, 0.4822, 0.4465], "std": [0.2470, 0.2435, 0.2616]}
    assert meta["normalize"] == cifar10
    ck = load_checkpoint(str(out))
    tf = Transform.from_protocol(types.SimpleNamespace(image_size=32), ck.metadata)
    assert list(tf.mean) == cifar10["mean"] and list(tf.std) == cifar10["std"]
    # the trainer fed the trunk the same normalisation
    x = torch.full((1, 3, 2, 2), 0.5)
    expected = (0.5 - torch.tensor(cifar10["mean"])) / torch.tensor(cifar10["std"])
    assert torch.allclose(tr.method.preprocess(x)[0, :, 0, 0], expected)


def test_cli_takes_the_recipes_run_settings_unless_given():
    from pretrain.cli import RUN_DEFAULTS, run_settings

    train = get_method("byol").recipe_overrides("cifar")["train"]
    none = argparse.Namespace(arch=None, batch_size=None, epochs=None, image_size=None)
    assert run_settings(train, none) == {"arch": "resnet18_cifar", "batch_size": 256, "epochs": 1000,
                                         "image_size": 32}
    given = argparse.Namespace(arch="resnet18", batch_size=8, epochs=2, image_size=None)
    assert run_settings(train, given) == {"arch": "resnet18", "batch_size": 8, "epochs": 2, "image_size": 32}
    assert run_settings(get_method("byol").recipe_overrides("paper")["train"], none) == RUN_DEFAULTS


def test_bench_real_folder_mode(tmp_path, monkeypatch, capsys):
    """A tiny ImageFolder with train/ and test/: random init and a 2-step SimCLR (cifar recipe) through kNN and
    the linear probe; the JSON holds both rows with per-tap top-1."""
    import benchmarks.common
    from benchmarks import bench_pretrain_quality as bench
    from evalsuite.data.synthetic import write_imagefolder

    folder = write_imagefolder(tmp_path / "photos", seed=0, per_class=6, size=32, classes=4,
                               splits={"train": 1.0, "test": 0.5})
    monkeypatch.setattr(benchmarks.common, "OUT_DIR", tmp_path / "out")
    bench.main(["--data-folder", str(folder), "--methods", "simclr", "--recipe", "cifar", "--arch", "resnet18",
                "--batch-size", "8", "--steps", "2", "--threads", "1", "--set", "proj_hidden=32", "--precision", "fp32",
                "--keep", str(tmp_path / "work")])
    data = json.loads((tmp_path / "out" / "bench_pretrain_quality_folder.json").read_text())
    assert data["data"]["n_train"] == 24 and data["data"]["n_test"] == 12 and data["data"]["test_split"] == "test"
    rand, simclr = data["rows"]
    assert rand["method"] == "random:resnet18" and simclr["method"] == "simclr"
    assert simclr["steps"] == 2 and simclr["recipe"] == "cifar" and simclr["image_size"] == 32
    for row in (rand, simclr):
        for key in ("knn", "linear"):
            per = row[f"{key}_top1_per_layer"]
            assert set(per) == {"conv1", "res2", "res3", "res4", "res5"}
            assert row[f"{key}_top1"] == max(per.values()) and all(0 <= v <= 100 for v in per.values())
    assert "knn.val_split=test" in simclr["eval_overrides"]
    assert "| simclr |" in capsys.readouterr().out


def test_bench_snapshots_evaluate_the_trunk_part_way_through_a_timed_run(tmp_path, monkeypatch, capsys):
    """``--snapshots`` saves the trunk when the run's wall clock passes each mark and evaluates it like the final
    one: a learning curve from one run."""
    import benchmarks.common
    from benchmarks import bench_pretrain_quality as bench
    from evalsuite.data.synthetic import write_imagefolder

    folder = write_imagefolder(tmp_path / "photos", seed=0, per_class=6, size=32, classes=4,
                               splits={"train": 1.0, "test": 0.5})
    monkeypatch.setattr(benchmarks.common, "OUT_DIR", tmp_path / "out")
    bench.main(["--data-folder", str(folder), "--methods", "rotnet", "--arch", "resnet18_cifar_w16", "--px", "32",
                "--batch-size", "8", "--minutes", "0.05", "--snapshots", "0.01,0.5", "--threads", "1",
                "--precision", "fp32", "--keep", str(tmp_path / "work")])
    _, row = json.loads((tmp_path / "out" / "bench_pretrain_quality_folder.json").read_text())["rows"]
    (snap,) = row["snapshots"]  # the 0.5-minute mark lies beyond the 0.05-minute run
    assert snap["at_minutes"] == 0.01 and 0.01 <= snap["minutes"] <= row["minutes"]
    assert 0 < snap["steps"] < row["steps"]
    assert snap["knn_top1"] == max(snap["knn_top1_per_layer"].values()) and "linear_top1" in snap
    assert (tmp_path / "work" / "rotnet_at0.01min.safetensors").is_file()
    assert f"after {snap['minutes']:5.2f} min" in capsys.readouterr().out


def test_solo_learn_reference_rows():
    """Every method's CIFAR-10 / CIFAR-100 top-1 of solo-learn's README (dc6e552, 'Acc@1 (online)')."""
    from leaderboard.references import load_references

    refs = load_references(["solo_learn_cifar.csv"])
    assert len(refs) == 56 and set(refs["source_key"]) == {"solo22"} and set(refs["variant"]) == {""}
    assert set(refs["arch"]) == {"resnet18_cifar"} and set(refs["suite_task"]) == {"places205_linear"}
    top1 = refs[refs["metric"] == "top1"].set_index(["method", "pretrain_data"])["value"]
    readme = {"simclr": ("90.74", "65.78"), "moco_v2": ("92.94", "69.89"), "byol": ("92.58", "70.46"),
              "swav": ("89.17", "64.88"), "barlow_twins": ("92.10", "70.90"), "simsiam": ("90.51", "66.04"),
              "dino": ("89.52", "66.76")}
    for method, (c10, c100) in readme.items():
        assert (top1[(method, "cifar10")], top1[(method, "cifar100")]) == (c10, c100)
    for _, r in refs.iterrows():
        snippet = r["quote"].split(" || ")[0]
        assert r["value"] in snippet and snippet.startswith("|")
