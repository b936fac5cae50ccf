"""Pickled checkpoints as the published trainers write them load without --trust-pickle; what is refused is
named in one readable line; a whole pickled model is recognised."""

from __future__ import annotations

import argparse
import os
import pickle
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torchvision

from evalsuite.checkpoints import load_checkpoint
from evalsuite.cli import main
from evalsuite.errors import BadCheckpoint

ANSI_ESCAPE = "\x1b"


def _resnet18(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return torchvision.models.resnet18(weights=None).state_dict()


def _trunk(sd: dict, prefix: str = "") -> dict:
    return {prefix + k: v for k, v in sd.items() if not k.startswith("fc.")}


def _optimizer_state() -> dict:
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([p], lr=0.1, momentum=0.9, weight_decay=1e-4)
    p.sum().backward()
    opt.step()
    return opt.state_dict()


def _args(**extra) -> argparse.Namespace:
    """A training script's parsed arguments, as DINO and timm pickle them under 'args'."""
    return argparse.Namespace(arch="resnet50", lr=0.03, epochs=100, local_crops_scale=[0.05, 0.4],
                              output_dir="/checkpoint/out", use_fp16=True, dist_url="env://", gpu=0, **extra)


def _layout(release: str, sd: dict) -> object:
    """The dict each release's save function writes (keys and value types as in their training scripts)."""
    if release == "dino":  # main_dino.py save_dict
        return {"student": _trunk(sd, "module.backbone."), "teacher": _trunk(sd, "backbone."),
                "optimizer": _optimizer_state(), "epoch": 101, "args": _args(),
                "dino_loss": OrderedDict(center=torch.zeros(1, 65536)),
                "fp16_scaler": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5,
                                "growth_interval": 2000, "_growth_tracker": 12}}
    if release == "timm":  # timm.utils.CheckpointSaver._save
        return {"epoch": 299, "arch": "resnet50", "optimizer": _optimizer_state(), "version": 2,
                "args": _args(model="resnet50", model_kwargs={}, mean=None, crop_pct=0.95),
                "amp_scaler": {"scale": 32768.0, "_growth_tracker": 7}, "state_dict": sd,
                "state_dict_ema": sd, "metric": 80.1}
    if release == "moco":  # main_moco.py save_checkpoint
        return {"epoch": 800, "arch": "resnet50", "optimizer": _optimizer_state(),
                "state_dict": {**_trunk(sd, "module.encoder_q."), **_trunk(sd, "module.encoder_k."),
                               "module.queue": torch.zeros(128, 16), "module.queue_ptr": torch.zeros(1)}}
    if release == "swav":  # main_swav.py save_dict (apex amp state with --use_fp16)
        return {"epoch": 800, "state_dict": _trunk(sd, "module."), "optimizer": _optimizer_state(),
                "amp": OrderedDict(loss_scaler0={"loss_scale": 65536.0, "unskipped": 17})}
    if release == "vissl":  # LogLossMetricsCheckpointHook checkpoint_content + ClassificationTask.get_classy_state
        classy = {"train": True, "base_model": {"model": {"trunk": _trunk(sd, "_feature_blocks."),
                                                          "heads": OrderedDict()}},
                  "meters": [], "optimizer": {"optim": _optimizer_state()}, "phase_idx": 199,
                  "train_phase_idx": 199, "num_updates": 1000, "losses": [6.1, 5.9], "hooks": {}, "loss": {}}
        return {"phase_idx": 199, "iteration": 1000, "loss": OrderedDict(), "iteration_num": 1000,
                "train_phase_idx": 199, "classy_state_dict": classy}
    raise ValueError(release)


# SwAV publishes a DataParallel state_dict ("module." prefix): read as a torchvision-named state dict
FORMAT = {"dino": "dino", "timm": "timm", "moco": "moco", "swav": "torchvision", "vissl": "vissl"}


@pytest.mark.parametrize("release", sorted(FORMAT))
def test_published_layouts_load_without_trust_pickle(tmp_path: Path, release: str, capsys) -> None:
    sd = _resnet18(5)
    path = tmp_path / f"{release}.pth"
    torch.save(_layout(release, sd), path)
    ck = load_checkpoint(path)
    assert ck.format == FORMAT[release] and ck.arch == "resnet18" and not ck.report.missing
    expected = _trunk(sd)
    assert ck.state_dict.keys() == expected.keys() and all(torch.equal(ck.state_dict[k], v)
                                                           for k, v in expected.items())
    assert capsys.readouterr().err == ""  # no --trust-pickle warning: nothing ran


class _Evil:
    def __reduce__(self):
        return (os.system, ("true",))


class _SettingsWithAVeryLongNameSoThatTheRefusedGlobalFallsBeyondTheOldHundredAndTwentyCharacterCut:
    pass


def test_refusal_names_the_refused_global_in_one_clean_line(tmp_path: Path, capsys) -> None:
    evil = tmp_path / "evil.pth"
    torch.save({"state_dict": _resnet18(0), "x": _Evil()}, evil)
    with pytest.raises(BadCheckpoint) as e:
        load_checkpoint(evil)
    msg = str(e.value)
    assert f"refusing global {os.system.__module__}.system" in msg and "--trust-pickle" in msg
    assert ANSI_ESCAPE not in msg and "\n" not in msg
    odd = tmp_path / "odd.pth"
    settings = _SettingsWithAVeryLongNameSoThatTheRefusedGlobalFallsBeyondTheOldHundredAndTwentyCharacterCut()
    torch.save({"state_dict": _resnet18(0), "cfg": settings}, odd)
    assert main(["inspect", str(odd)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    name = f"{__name__}.{type(settings).__name__}"
    assert len(err) == 1 and f"refusing global {name}" in err[0] and ANSI_ESCAPE not in err[0]
    legacy = tmp_path / "evil.pkl"
    legacy.write_bytes(pickle.dumps({"evil": _Evil()}))
    with pytest.raises(BadCheckpoint, match=f"refusing global {os.system.__module__}.system"):
        load_checkpoint(legacy)


def test_whole_pickled_model(tmp_path: Path, capsys) -> None:
    torch.manual_seed(3)
    model = torchvision.models.resnet18(weights=None)
    path = tmp_path / "model.pth"
    torch.save(model, path)
    with pytest.raises(BadCheckpoint) as e:
        load_checkpoint(path)
    msg = str(e.value)
    assert "a whole pickled nn.Module (torch.save(model))" in msg and "--trust-pickle" in msg
    assert "model.state_dict()" in msg and "not a model checkpoint" not in msg
    ck = load_checkpoint(path, trust_pickle=True)
    expected = _trunk(model.state_dict())
    assert ck.arch == "resnet18" and ck.state_dict.keys() == expected.keys()
    assert all(torch.equal(ck.state_dict[k], v) for k, v in expected.items())
    assert "--trust-pickle" in capsys.readouterr().err


def test_unpickling_failure_under_trust_pickle_is_not_cut(tmp_path: Path) -> None:
    module = "training_code_of_some_lab." + "very_long_package_name." * 5 + "configs"
    path = tmp_path / "gone.pkl"  # a pickle whose class lives in a module this machine does not have
    path.write_bytes(b"\x80\x02c" + module.encode() + b"\nSettings\n)\x81.")
    with pytest.raises(BadCheckpoint) as e:
        load_checkpoint(path, trust_pickle=True)
    assert "No module named 'training_code_of_some_lab'" in str(e.value)
    with pytest.raises(BadCheckpoint, match=f"refusing global {module}.Settings"):
        load_checkpoint(path)
