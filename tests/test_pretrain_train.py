"""Every method trains on a tiny ImageFolder and writes a checkpoint evalsuite loads with every tap;
resume after an interruption gives the same losses; registry, CLI and bad input."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from evalsuite.checkpoints import load_checkpoint
from evalsuite.errors import UserError
from evalsuite.trunks import RESNET_TAPS
from pretrain import TrainConfig, Trainer, train
from pretrain.base import Batch, Method
from pretrain.registry import methods

# Tiny heads / banks so one step costs little; every other hyper-parameter is the method's default.
SMALL = {
    "simclr": {"proj_hidden": 32, "proj_dim": 16},
    "moco_v1": {"queue_size": 32, "dim": 16},
    "moco_v2": {"queue_size": 32, "mlp_hidden": 32, "dim": 16},
    "byol": {"proj_hidden": 32, "proj_dim": 16, "pred_hidden": 32},
    "simsiam": {"proj_dim": 32, "pred_hidden": 8},
    "barlow_twins": {"proj_dim": 32},
    "swav": {"proj_hidden": 32, "proj_dim": 16, "n_prototypes": 8, "n_local": 2, "freeze_prototypes_steps": 0},
    "npid": {"nce_k": 16, "dim": 16},
    "pirl": {"n_negatives": 16, "dim": 16},
    "cmc": {"nce_k": 16, "dim": 16},
    "deepcluster": {"n_clusters": 8, "pca_dim": 16, "kmeans_iters": 5},
    "sela": {"n_clusters": 8, "n_heads": 2},
    "nat": {"dim": 16, "reassign_every": 1},
    "cpc": {"dim": 16, "pred_steps": 2},
}
PART1 = ["simclr", "moco_v1", "moco_v2", "npid", "pirl", "cmc", "byol", "simsiam", "barlow_twins", "swav",
         "deepcluster", "sela", "nat", "exemplar", "cpc", "supervised", "random"]


def cfg(method: str, root: Path, out: Path, **kw) -> TrainConfig:
    base = dict(method=method, data_root=str(root), out=str(out), batch_size=8, image_size=32, epochs=1,
                max_steps_per_epoch=1, hp=SMALL.get(method, {}), progress=False)
    base.update(kw)
    return TrainConfig(**base)


#: methods whose training_step logs ``z_std`` (pretrain.losses.embedding_std)
MONITORED = {"simclr", "moco_v1", "moco_v2", "byol", "simsiam", "barlow_twins", "swav"}


def test_every_issue_method_is_registered():
    assert set(PART1) <= set(methods())


@pytest.mark.parametrize("method", PART1)
def test_method_trains_and_checkpoint_loads(method, tiny_imagefolder, tmp_path):
    out = train(cfg(method, tiny_imagefolder, tmp_path / f"{method}.safetensors"))
    ck = load_checkpoint(out)
    assert ck.report.missing == [] and ck.report.unexpected == [] and ck.format == "evalsuite"
    meta = ck.metadata
    assert meta["method"] == method and meta["arch"] == "resnet18" and meta["seed"] == 0
    assert meta["hyperparameters"] == {**methods()[method].defaults, **SMALL.get(method, {})}
    assert {"optimizer", "augment", "versions", "input_space", "image_size", "epochs"} <= set(meta)
    trunk = ck.build_trunk()
    taps = trunk(torch.zeros(1, 3, 32, 32))
    assert set(taps) == set(RESNET_TAPS) and all(torch.isfinite(v).all() for v in taps.values())
    if method != "random":
        assert math.isfinite(meta["final_loss"]) and meta["steps"] == 1
        # the joint-embedding methods log the collapse monitor; 0 <= std of unit vectors' coordinates <= 1
        if method in MONITORED:
            assert set(meta["final_logs"]) == {"z_std"} and 0.0 < meta["final_logs"]["z_std"] <= 1.0
        # the trunk was actually updated
        init = load_checkpoint("random:resnet18").build_trunk().state_dict()
        assert any(not torch.equal(v, init[k]) for k, v in ck.state_dict.items() if v.is_floating_point())


def test_random_baseline_is_the_seeded_init(tiny_imagefolder, tmp_path):
    out = train(cfg("random", tiny_imagefolder, tmp_path / "r.safetensors", seed=3))
    ours = load_checkpoint(out).build_trunk().state_dict()
    ref = load_checkpoint("random:resnet18", seed=3).build_trunk().state_dict()
    assert all(torch.equal(ours[k], ref[k]) for k in ref)


def interrupt_at(step: int):
    """An ``on_step`` hook that stops training (as Ctrl-C would) once ``step`` steps are done."""

    def hook(trainer: Trainer) -> None:
        if trainer.global_step >= step:
            raise KeyboardInterrupt

    return hook


def test_resume_after_interrupt_equals_uninterrupted(tiny_imagefolder, tmp_path):
    """MoCo v2 (queue, momentum encoder, RNG-dependent shuffled BN) killed mid-epoch 2 and restarted."""
    method = "moco_v2"
    kw = dict(epochs=2, max_steps_per_epoch=2, save_every=1)
    full = Trainer(cfg(method, tiny_imagefolder, tmp_path / "full.safetensors", **kw))
    full.fit()
    cut = cfg(method, tiny_imagefolder, tmp_path / "cut.safetensors", **kw)
    with pytest.raises(KeyboardInterrupt):  # "killed" after step 3, before saving it
        Trainer(cut, on_step=interrupt_at(3)).fit()
    assert not (tmp_path / "cut.safetensors").exists()
    # what the run trains must match the state: a changed lr or view setting is refused (naming each)
    other = dataclasses.replace(cut, lr=0.5, view_gray=1.0)
    with pytest.raises(UserError, match=r"lr=None \(now 0.5\), view_gray=None \(now 1.0\)"):
        Trainer(other).fit()
    cut.progress, cut.workers = True, 1  # how it runs may change
    resumed = Trainer(cut)
    resumed.fit()
    assert len(resumed.losses) == len(full.losses) == 4
    assert resumed.losses == pytest.approx(full.losses, rel=1e-5, abs=1e-6)
    # the last step's logs travel in the resume state, so a finished run restarted still reports them
    reread = Trainer(cut)
    assert reread.load_state() and reread.last_logs == resumed.last_logs and set(reread.last_logs) == {"z_std"}
    a = load_checkpoint(tmp_path / "full.safetensors").state_dict
    b = load_checkpoint(tmp_path / "cut.safetensors").state_dict
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-5) for k in a)


def test_unreadable_resume_state_is_reported_and_training_starts_over(tiny_imagefolder, tmp_path, capsys):
    clean = Trainer(cfg("simclr", tiny_imagefolder, tmp_path / "clean.safetensors", max_steps_per_epoch=2))
    clean.fit()
    out = tmp_path / "x.safetensors"
    state = Path(str(out) + ".state.pt")
    state.write_bytes(b"half a torch.save")  # e.g. a disk that filled up under an older writer
    capsys.readouterr()
    again = Trainer(cfg("simclr", tiny_imagefolder, out, max_steps_per_epoch=2))
    assert again.fit() == out
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "unreadable pretraining resume state" in err[0] and str(state) in err[0]
    assert again.global_step == 2 and again.losses == pytest.approx(clean.losses, rel=1e-5, abs=1e-6)
    assert again.load_state() and again.global_step == 2  # the restarted run saved a readable state


def test_loss_decreases_on_a_fixed_batch(tiny_imagefolder, tmp_path):
    """Optimising SimCLR on the same batch lowers its loss (the gradient path through the gather is live)."""
    tr = Trainer(cfg("simclr", tiny_imagefolder, tmp_path / "x.safetensors", optimizer="adam", lr=1e-3))
    views, index, target = next(iter(torch.utils.data.DataLoader(
        tr.dataset, batch_size=8, collate_fn=__import__("pretrain.trainer", fromlist=["_collate"])._collate)))
    batch = Batch([tr.to_input(v) for v in views], index, target)
    losses = []
    for _ in range(3):
        loss, _ = tr.method.training_step(batch)
        tr.optimizer.zero_grad()
        loss.backward()
        tr.optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_bf16_channels_last_runs(tiny_imagefolder, tmp_path):
    out = train(cfg("byol", tiny_imagefolder, tmp_path / "b.safetensors", precision="bf16", channels_last=True))
    meta = load_checkpoint(out).metadata
    assert meta["precision"] == "bf16" and meta["channels_last"] is True


def test_cli_pretrain_then_evalsuite_run(tiny_imagefolder, tmp_path, cache_dir, capsys):
    from evalsuite.cli import main

    out = tmp_path / "s.safetensors"
    rc = main(["pretrain", "--method", "simclr", "--data-root", str(tiny_imagefolder), "--epochs", "1",
               "--batch-size", "8", "--image-size", "32", "--max-steps-per-epoch", "1", "--out", str(out),
               "--set", "proj_hidden=32", "--set", "proj_dim=16", "--no-progress"])
    assert rc == 0 and out.is_file()
    meta = load_checkpoint(out).metadata
    assert meta["hyperparameters"]["proj_dim"] == 16 and meta["optimizer"]["optimizer"] == "lars"
    rc = main(["run", "--checkpoint", str(out), "--tasks", "centroid", "--protocol", "quick", "--data-root",
               str(tiny_imagefolder), "--out", str(tmp_path / "runs"), "--no-progress"])
    assert rc == 0
    records = [json.loads(line) for line in (tmp_path / "runs" / "results.jsonl").read_text().splitlines()]
    assert records and {r["layer"] for r in records} >= {"res5"}
    assert main(["pretrain", "--list"]) == 0
    assert "swav" in capsys.readouterr().out


def test_bad_input(tiny_imagefolder, tmp_path):
    with pytest.raises(UserError, match="unknown method"):
        train(cfg("nope", tiny_imagefolder, tmp_path / "a.safetensors"))
    with pytest.raises(UserError, match="no hyper-parameter"):
        train(cfg("simclr", tiny_imagefolder, tmp_path / "a.safetensors", hp={"tempreature": 0.1}))
    with pytest.raises(UserError, match="not found"):
        train(cfg("simclr", tmp_path / "missing", tmp_path / "a.safetensors"))
    with pytest.raises(UserError, match="fewer than one batch"):
        train(cfg("simclr", tiny_imagefolder, tmp_path / "a.safetensors", batch_size=1000))
    assert not (tmp_path / "a.safetensors").exists()


def test_third_party_method_plugs_in(tiny_imagefolder, tmp_path):
    from evalsuite import registry as core
    from pretrain import register_method

    class Mine(Method):
        name = "mine_test"
        description = "test plug-in"
        n_views = 1
        augment = "basic"

        def training_step(self, batch):
            return self.embed(batch.views[0]).pow(2).mean()

    register_method(Mine)
    try:
        assert "mine_test" in methods()
        out = train(cfg("mine_test", tiny_imagefolder, tmp_path / "m.safetensors"))
        assert load_checkpoint(out).metadata["method"] == "mine_test"
    finally:
        core.unregister(core.METHOD_GROUP, "mine_test")
