"""The ``short`` recipe (hyper-parameters for minutes of CPU training) and the wall-clock budget."""

from __future__ import annotations

import types

import pytest

import pretrain.trainer as trainer_mod
from evalsuite.checkpoints import read_metadata
from evalsuite.errors import UserError
from pretrain import TrainConfig, Trainer
from pretrain.base import SHORT_OPTIM, SHORT_SGD
from pretrain.registry import get_method

BENCH_METHODS = ["simclr", "moco_v2", "byol", "swav", "barlow_twins", "rotnet", "jigsaw", "colorization",
                 "supervised"]


@pytest.mark.parametrize("name", BENCH_METHODS)
def test_short_recipe_resolves_over_defaults(name):
    cls = get_method(name)
    assert cls.resolve_hp({}) == cls.defaults  # paper: the published values untouched
    assert cls.optim_defaults() == cls.optim
    short_hp = cls.resolve_hp({}, "short")
    assert short_hp == {**cls.defaults, **cls.short.get("hp", {})}
    assert cls.optim_defaults("short") == {**cls.optim, **SHORT_OPTIM, **cls.short.get("optim", {})}
    assert cls.optim_defaults("short")["warmup_epochs"] < 1  # never the papers' multi-epoch warm-ups


def test_short_recipe_replaces_small_batch_lars():
    for name in ("simclr", "byol", "swav", "barlow_twins"):
        cls = get_method(name)
        assert cls.optim["optimizer"] == "lars"
        assert cls.optim_defaults("short")["optimizer"] == SHORT_SGD["optimizer"] == "sgd"
    moco = get_method("moco_v2").resolve_hp({}, "short")
    assert moco["queue_size"] < 65536 and moco["momentum_k"] < 0.999


def test_swav_short_prototypes_leave_no_direction_that_scores_them_all_alike():
    """With K prototypes spanning fewer than d dimensions, an embedding orthogonal to all of them scores every
    prototype 0: its Sinkhorn codes are uniform, its prediction uniform, the loss exactly ln K, and nothing
    pushes it out (K = 100 < d = 128 ended 10 minutes at loss 4.61 = ln 100). The recipe's prototypes must
    leave no such direction: their pairwise differences span the whole embedding space."""
    import math

    import torch
    import torch.nn.functional as F

    from pretrain.losses import sinkhorn
    from pretrain.methods.swav import SwAV, swapped_prediction_loss

    torch.manual_seed(0)
    small = SwAV("resnet18", hp={"proj_hidden": 16, "proj_dim": 12, "n_prototypes": 8})
    c = small.prototypes.weight.detach()
    basis = torch.linalg.svd(c, full_matrices=True).Vh  # rows 8..11: directions orthogonal to every prototype
    z = F.normalize(basis[8:].t() @ torch.randn(4, 4), dim=0).t()  # 4 unit embeddings in that complement
    scores = [small.prototypes(z)] * 2
    codes = [sinkhorn(s, 0.05, 3) for s in scores]
    assert swapped_prediction_loss(scores, codes, 0.1).item() == pytest.approx(math.log(8), abs=1e-5)

    hp = SwAV.resolve_hp({}, "short")
    protos = SwAV("resnet18", hp=hp, recipe="short").prototypes.weight.detach()
    assert torch.linalg.matrix_rank(protos[1:] - protos[0]) == hp["proj_dim"]


def test_swav_short_recipe_takes_the_authors_collapse_workarounds():
    """Sharper codes (eps below the paper's 0.05), a projection head without BN, the two global crops only,
    no queue; the paper recipe keeps the BN head and the 6 local crops."""
    from torch import nn

    from pretrain.methods.swav import SwAV

    def bns(m):
        return sum(isinstance(x, nn.BatchNorm1d) for x in m.projector.modules())

    short = SwAV("resnet18", hp=SwAV.resolve_hp({}, "short"), recipe="short")
    paper = SwAV("resnet18")
    assert short.hp["epsilon"] < paper.hp["epsilon"] == 0.05
    assert (bns(short), bns(paper)) == (0, 1)
    assert (len(short.views(64).pipelines), len(paper.views(64).pipelines)) == (2, 8)
    assert short.queues is None


def test_simsiam_projector_depth_and_its_output_bn():
    """ImageNet's projector is three Linear+BN layers, the paper's CIFAR one two (``proj_layers``); both end in a BN
    without affine parameters, as the official code."""
    from torch import nn

    from pretrain.methods.simsiam import SimSiam

    for layers in (3, 2):
        m = SimSiam("resnet18", hp=SimSiam.resolve_hp({"proj_dim": 16, "proj_layers": str(layers)}))
        linears = [x for x in m.projector if isinstance(x, nn.Linear)]
        assert [x.out_features for x in linears] == [16] * layers and linears[0].in_features == m.feat_dim
        assert isinstance(m.projector[-1], nn.BatchNorm1d) and not m.projector[-1].affine


def test_override_beats_recipe_and_unknown_recipe_refused():
    cls = get_method("simclr")
    assert cls.resolve_hp({"temperature": "0.3"}, "short")["temperature"] == 0.3
    swav = get_method("swav")
    assert swav.resolve_hp({"proj_bn": "false"})["proj_bn"] is False
    assert swav.resolve_hp({"proj_bn": "1"})["proj_bn"] is True
    for bad, kind in (("proj_bn=maybe", "bool"), ("n_local=two", "int"), ("epsilon=small", "float")):
        k, v = bad.split("=")
        with pytest.raises(UserError, match=rf"--set {k}={v} is not a {kind}"):
            swav.resolve_hp({k: v})
    with pytest.raises(UserError, match="unknown recipe"):
        cls.resolve_hp({}, "fast")


def _cfg(root, out, **kw):
    base = dict(method="simclr", data_root=str(root), out=str(out), batch_size=8, image_size=32, epochs=1,
                max_steps_per_epoch=1, hp={"proj_hidden": 32, "proj_dim": 16}, progress=False)
    base.update(kw)
    return TrainConfig(**base)


def test_short_recipe_recorded_in_checkpoint(tiny_imagefolder, tmp_path):
    out = tmp_path / "s.safetensors"
    tr = Trainer(_cfg(tiny_imagefolder, out, recipe="short"))
    tr.fit()
    meta = read_metadata(out)
    assert meta["recipe"] == "short"
    assert meta["hyperparameters"]["temperature"] == 0.2 and meta["hyperparameters"]["proj_hidden"] == 32
    opt = meta["optimizer"]
    assert opt["optimizer"] == "sgd" and opt["weight_decay"] == SHORT_SGD["weight_decay"]
    assert opt["lr"] == pytest.approx(SHORT_SGD["lr"] * 8 / 64)  # linear scaling from a base batch of 64
    assert opt["warmup_steps"] == round(SHORT_OPTIM["warmup_epochs"] * tr.steps_per_epoch)


def test_time_budget_shrinks_schedule_and_stops(tiny_imagefolder, tmp_path, monkeypatch):
    clock = {"t": 1000.0}

    def perf_counter():  # every trainer clock read is one second later: one second per step
        clock["t"] += 1.0
        return clock["t"]

    monkeypatch.setattr(trainer_mod, "time", types.SimpleNamespace(perf_counter=perf_counter,
                                                                   time=trainer_mod.time.time))
    out = tmp_path / "b.safetensors"
    tr = Trainer(_cfg(tiny_imagefolder, out, epochs=50, max_steps_per_epoch=2, time_budget_s=6.0,
                      budget_check=2))
    assert tr.planned_steps == 100
    assert tr.fit() == out
    # fit start at t+1; step s ends at t+1+s: 1 s/step measured from step 1, so 6 steps fit the budget
    assert tr.global_step == 6 and tr.total_steps == 6
    meta = read_metadata(out)
    assert meta["steps"] == 6 and meta["schedule_steps"] == 6 and meta["planned_steps"] == 100
    assert meta["time_budget_s"] == 6.0


def test_lars_trust_coefficient_reaches_the_optimizer_and_the_metadata(tiny_imagefolder, tmp_path):
    out = tmp_path / "l.safetensors"
    tr = Trainer(_cfg(tiny_imagefolder, out, optimizer="lars", lars_eta=0.02))
    assert {g["eta"] for g in tr.optimizer.param_groups} == {0.02}
    tr.fit()
    assert read_metadata(out)["optimizer"]["lars_eta"] == 0.02
    default = Trainer(_cfg(tiny_imagefolder, tmp_path / "d.safetensors"))  # simclr's paper LARS: eta 0.001
    assert {g["eta"] for g in default.optimizer.param_groups} == {0.001}
