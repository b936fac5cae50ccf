"""A wrong --arch never passes: the architecture the keys show (block counts per stage, basic or bottleneck
blocks) must agree with --arch and with the metadata; extra trunk blocks are refused like missing ones."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision

from evalsuite.checkpoints import load_checkpoint, save_checkpoint
from evalsuite.cli import main
from evalsuite.errors import BadCheckpoint


def _save(tmp_path: Path, arch: str) -> Path:
    path = tmp_path / f"{arch}.pth"
    torch.save(getattr(torchvision.models, arch)(weights=None).state_dict(), path)
    return path


@pytest.mark.parametrize("arch", ["resnet18", "resnet34", "resnet50", "resnet101", "alexnet"])
def test_architecture_inferred_from_the_keys(tmp_path: Path, arch: str) -> None:
    ck = load_checkpoint(_save(tmp_path, arch))
    assert ck.arch == arch and not ck.report.missing


@pytest.mark.parametrize("keys,given", [("resnet34", "resnet18"), ("resnet101", "resnet50"),
                                        ("resnet50", "resnet101"), ("resnet18", "resnet34")])
def test_arch_contradicting_the_keys_is_refused(tmp_path: Path, capsys, keys: str, given: str) -> None:
    path = _save(tmp_path, keys)
    for partial in (False, True):  # --allow-partial is no way around a wrong architecture
        with pytest.raises(BadCheckpoint) as e:
            load_checkpoint(path, arch=given, allow_partial=partial)
        msg = str(e.value)
        assert f"keys look like {keys}" in msg and f"--arch {given}" in msg and "--allow-partial" not in msg
    assert main(["inspect", str(path), "--arch", given]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"keys look like {keys}" in err[0]


def test_extra_trunk_blocks_are_refused_like_missing_ones(tmp_path: Path) -> None:
    sd = torchvision.models.resnet18(weights=None).state_dict()
    r34 = torchvision.models.resnet34(weights=None).state_dict()
    sd.update({k: v for k, v in r34.items() if k.startswith("layer3.2.")})  # a third res4 block: no known arch
    path = tmp_path / "odd.pth"
    torch.save(sd, path)
    for partial in (False, True):
        with pytest.raises(BadCheckpoint, match=r"unexpected resnet18 trunk keys.*layer3\.2\.bn1\.bias"):
            load_checkpoint(path, arch="resnet18", allow_partial=partial)


def test_head_keys_are_not_trunk_keys(tmp_path: Path) -> None:
    sd = torchvision.models.resnet18(weights=None).state_dict()
    sd["projector.0.weight"] = torch.zeros(4, 512)
    path = tmp_path / "with_head.pth"
    torch.save(sd, path)
    ck = load_checkpoint(path, arch="resnet18")
    assert set(ck.report.unexpected) == {"fc.weight", "fc.bias", "projector.0.weight"}


def test_metadata_contradictions_are_refused(tmp_path: Path) -> None:
    weights = {k: v for k, v in torchvision.models.resnet18(weights=None).state_dict().items() if "fc." not in k}
    ours = save_checkpoint(tmp_path / "r18.safetensors", weights, {"method": "simclr", "arch": "resnet18"})
    with pytest.raises(BadCheckpoint, match=r"--arch resnet34 contradicts the checkpoint's metadata \(arch "
                                            r"resnet18\)"):
        load_checkpoint(ours, arch="resnet34", allow_partial=True)
    lying = save_checkpoint(tmp_path / "lying.safetensors", weights, {"method": "simclr", "arch": "resnet34"})
    with pytest.raises(BadCheckpoint, match="metadata says arch resnet34 but the keys look like resnet18"):
        load_checkpoint(lying, allow_partial=True)


def test_partial_file_still_infers_its_architecture(tmp_path: Path) -> None:
    sd = {k: v for k, v in torchvision.models.resnet50(weights=None).state_dict().items()
          if not k.startswith("layer4.")}
    path = tmp_path / "no_res5.pth"
    torch.save(sd, path)
    ck = load_checkpoint(path, allow_partial=True)
    assert ck.arch == "resnet50" and ck.report.missing and all(k.startswith("layer4.") for k in ck.report.missing)
