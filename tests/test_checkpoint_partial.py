"""--allow-partial leaves a trace: one warning line at load time and the missing keys in every record; broken
evalsuite metadata is one line, exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from evalsuite.checkpoints import load_checkpoint, read_metadata
from evalsuite.cli import main
from evalsuite.errors import BadCheckpoint
from tests.helpers import make_context


@pytest.fixture()
def no_res5(tmp_path: Path) -> tuple[Path, list[str]]:
    sd = torchvision.models.resnet18(weights=None).state_dict()
    path = tmp_path / "no_res5.pth"
    torch.save({k: v for k, v in sd.items() if not k.startswith("layer4.")}, path)
    missing = sorted(k for k in sd if k.startswith("layer4.") and not k.endswith("num_batches_tracked"))
    return path, missing


def test_partial_load_warns_once_with_count_and_names(no_res5, capsys) -> None:
    path, missing = no_res5
    ck = load_checkpoint(path, arch="resnet18", allow_partial=True)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("evalsuite: warning: --allow-partial:")
    assert f"{len(missing)} resnet18 trunk keys missing" in err[0] and ", ".join(missing[:3]) in err[0]
    assert ck.load_info == {"weights": "", "partial": True, "missing": len(missing), "missing_keys": missing[:50]}
    full = load_checkpoint("random:resnet18")
    assert full.load_info == {"weights": "", "partial": False, "missing": 0, "missing_keys": []}
    assert capsys.readouterr().err == ""


def test_every_record_carries_the_missing_keys(no_res5, tmp_path, tiny_imagefolder) -> None:
    path, missing = no_res5
    ck = load_checkpoint(path, arch="resnet18", allow_partial=True)
    ctx = make_context("centroid", tiny_imagefolder, tmp_path / "o", checkpoint=ck)
    r = ctx.result("imagefolder", "val", "res4", "top1", 12.5)
    assert r.checkpoint_name == "no_res5"
    assert r.checkpoint_load == {"weights": "", "partial": True, "missing": len(missing),
                                 "missing_keys": missing[:50]}
    assert json.loads(r.to_json())["checkpoint_load"]["missing"] == len(missing)


@pytest.mark.parametrize("value,why", [("[1, 2]", "not a JSON object"), ("{oops", "not valid JSON"),
                                       ('"resnet18"', "not a JSON object")])
def test_metadata_that_is_not_a_json_object(tmp_path: Path, capsys, value: str, why: str) -> None:
    weights = {k: v.contiguous() for k, v in torchvision.models.resnet18(weights=None).state_dict().items()}
    path = tmp_path / "bad_meta.safetensors"
    save_file(weights, str(path), metadata={"format": "evalsuite", "evalsuite": value})
    with pytest.raises(BadCheckpoint, match=why):
        load_checkpoint(path)
    with pytest.raises(BadCheckpoint, match=why):
        read_metadata(path)
    for cmd in (["inspect", str(path)], ["run", "--checkpoint", str(path), "--tasks", "centroid"]):
        assert main(cmd) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and why in err[0] and str(path) in err[0]
