"""Every pretext-task method trains on the tiny ImageFolder, lowers its loss on a fixed batch, and writes a
checkpoint that evalsuite loads with every tap (in the input space the method recorded)."""

from __future__ import annotations

import math

import pytest
import torch

from evalsuite.checkpoints import load_checkpoint
from evalsuite.trunks import RESNET_TAPS
from pretrain import TrainConfig, Trainer
from pretrain.base import Batch
from pretrain.registry import methods  # `pretrain.methods` is also the subpackage
from pretrain.trainer import _collate

# tiny heads so a step costs little; every other hyper-parameter is the method's default
SMALL = {
    "rotnet": {},
    "jigsaw": {"n_permutations": 10, "tile_dim": 16, "hidden": 32},
    "relative_position": {"hidden": 32},
    "colorization": {"head_hidden": 16},
    "split_brain": {"head_hidden": 16},
    "inpainting": {"decoder_width": 32, "decoder_stages": 3, "disc_width": 8},
    "counting": {"dim": 32},
    "bigan": {"z_dim": 16, "gen_width": 32, "gen_stages": 3, "disc_width": 8, "disc_hidden": 32},
    "denoising_ae": {"decoder_width": 32, "decoder_stages": 3},
    "selfie": {"dim": 32, "heads": 2, "layers": 1},
}
INPUT_SPACE = {"colorization": "gray", "split_brain": "lab"}
LR = {"selfie": 1e-4}  # its candidate logits move fast at 1e-3 on a single batch
ADVERSARIAL = {"bigan"}  # a min-max game: its summed loss need not fall


def cfg(method, root, out, **kw) -> TrainConfig:
    base = dict(method=method, data_root=str(root), out=str(out), batch_size=8, image_size=32, epochs=1,
                max_steps_per_epoch=1, hp=SMALL[method], progress=False, optimizer="adam", lr=LR.get(method, 1e-3))
    base.update(kw)
    return TrainConfig(**base)


def test_every_pretext_method_is_registered():
    assert set(SMALL) <= set(methods())


@pytest.mark.parametrize("method", sorted(SMALL))
def test_pretext_method_trains_and_checkpoint_loads(method, tiny_imagefolder, tmp_path):
    torch.manual_seed(0)
    tr = Trainer(cfg(method, tiny_imagefolder, tmp_path / f"{method}.safetensors"))
    # a few steps on one fixed batch (same pretext randomness each step) lower the loss
    views, index, target = _collate([tr.dataset[i] for i in range(8)])
    batch = Batch([tr.to_input(v) for v in views], index, target)
    tr.method.train()
    tr.method.on_train_start(tr)
    losses = []
    for _ in range(4):
        torch.manual_seed(1)
        out = tr.method.training_step(batch)
        loss = out[0] if isinstance(out, tuple) else out
        logs = out[1] if isinstance(out, tuple) else {}
        tr.optimizer.zero_grad()
        loss.backward()
        tr.method.on_after_backward(tr)
        tr.optimizer.step()
        tr.method.on_after_step(tr)
        losses.append(logs.get("rec", loss.item()))  # context encoder: its reconstruction term
    assert all(math.isfinite(v) for v in losses)
    if method not in ADVERSARIAL:
        assert losses[-1] < losses[0], losses
    # one step of the real loop writes a checkpoint every tap can be read from
    out = tr.fit()
    ck = load_checkpoint(out)
    assert ck.report.missing == [] and ck.report.unexpected == [] and ck.format == "evalsuite"
    meta = ck.metadata
    assert meta["method"] == method and meta["input_space"] == INPUT_SPACE.get(method, "rgb")
    assert meta["hyperparameters"] == {**methods()[method].defaults, **SMALL[method]}
    assert math.isfinite(meta["final_loss"]) and meta["steps"] == 1
    assert set(meta["final_logs"]) == set(logs)  # the method's logs of the last step reach the metadata
    if method == "rotnet":
        assert 0.0 <= meta["final_logs"]["acc"] <= 1.0
    taps = ck.build_trunk()(torch.zeros(2, 3, 32, 32))
    assert set(taps) == set(RESNET_TAPS) and all(torch.isfinite(v).all() for v in taps.values())
    init = load_checkpoint("random:resnet18").build_trunk().state_dict()
    assert any(not torch.equal(v, init[k]) for k, v in ck.state_dict.items() if v.is_floating_point())


@pytest.mark.parametrize("method,space", [("colorization", "gray"), ("split_brain", "lab")])
def test_cli_colour_space_checkpoint_evaluates(method, space, tiny_imagefolder, tmp_path, cache_dir):
    """`evalsuite pretrain` then `evalsuite run`: the recorded input space reaches feature extraction."""
    import json

    from evalsuite.cli import main
    from evalsuite.features import Transform

    out = tmp_path / f"{method}.safetensors"
    rc = main(["pretrain", "--method", method, "--data-root", str(tiny_imagefolder), "--epochs", "1",
               "--batch-size", "8", "--image-size", "32", "--max-steps-per-epoch", "1", "--out", str(out),
               "--set", "head_hidden=8", "--no-progress"])
    assert rc == 0
    ck = load_checkpoint(out)
    assert ck.metadata["input_space"] == space and ck.metadata["hyperparameters"]["head_hidden"] == 8
    assert Transform.from_protocol({"image_size": 32}, ck.metadata).input_space == space
    rc = main(["run", "--checkpoint", str(out), "--tasks", "centroid", "--protocol", "quick", "--data-root",
               str(tiny_imagefolder), "--out", str(tmp_path / "runs"), "--no-progress"])
    assert rc == 0
    records = [json.loads(line) for line in (tmp_path / "runs" / "results.jsonl").read_text().splitlines()]
    assert {r["layer"] for r in records} >= {"res5"}
