"""Which weights of a checkpoint are evaluated: chosen by name, never by key order; said by `inspect`, chosen
with --weights, recorded in every result record with the checkpoint's name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torchvision

from evalsuite.checkpoints import file_sha256, load_checkpoint
from evalsuite.cli import main
from evalsuite.errors import BadCheckpoint, UserError


def _resnet18(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return torchvision.models.resnet18(weights=None).state_dict()


def _trunk(sd: dict) -> dict:
    return {k: v for k, v in sd.items() if not k.startswith("fc.")}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def raw_and_ema() -> tuple[dict, dict]:
    return _resnet18(1), _resnet18(2)


@pytest.mark.parametrize("ema_first", [False, True])
def test_timm_ema_is_evaluated_whatever_the_key_order(tmp_path: Path, raw_and_ema, ema_first: bool) -> None:
    raw, ema = raw_and_ema
    layout = {"state_dict_ema": ema, "state_dict": raw} if ema_first else {"state_dict": raw, "state_dict_ema": ema}
    path = tmp_path / "timm.pth.tar"
    torch.save({"epoch": 3, **layout}, path)
    ck = load_checkpoint(path)
    assert ck.weights == "state_dict_ema" and _same(ck.state_dict, _trunk(ema))
    raw_ck = load_checkpoint(path, weights="state_dict")
    assert raw_ck.weights == "state_dict" and _same(raw_ck.state_dict, _trunk(raw))
    # Different weights of one file must never share a checkpoint id (it keys the feature cache).
    assert ck.sha256 != raw_ck.sha256 and ck.file_sha256 == raw_ck.file_sha256 == file_sha256(path)


def test_dino_teacher_by_default_student_on_request(tmp_path: Path, raw_and_ema) -> None:
    student, teacher = raw_and_ema
    path = tmp_path / "dino.pth"
    torch.save({"student": {f"module.backbone.{k}": v for k, v in _trunk(student).items()},
                "teacher": {f"backbone.{k}": v for k, v in _trunk(teacher).items()}, "epoch": 100}, path)
    ck = load_checkpoint(path)
    assert ck.weights == "teacher" and ck.format == "dino" and _same(ck.state_dict, _trunk(teacher))
    st = load_checkpoint(path, weights="student")
    assert st.weights == "student" and _same(st.state_dict, _trunk(student))


def test_single_set_of_weights_keeps_the_file_hash_as_id(tmp_path: Path, raw_and_ema) -> None:
    path = tmp_path / "plain.pth"
    torch.save(raw_and_ema[0], path)
    ck = load_checkpoint(path)
    assert ck.weights == "" and ck.sha256 == file_sha256(path) and ck.alternatives == []


def test_unknown_weights_key_names_the_available_ones(tmp_path: Path, raw_and_ema, capsys) -> None:
    raw, ema = raw_and_ema
    path = tmp_path / "timm.pth.tar"
    torch.save({"state_dict": raw, "state_dict_ema": ema, "epoch": 1}, path)
    with pytest.raises(BadCheckpoint, match="state_dict, state_dict_ema"):
        load_checkpoint(path, weights="ema")
    assert main(["inspect", str(path), "--weights", "ema"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'ema'" in err[0] and "state_dict, state_dict_ema" in err[0]
    with pytest.raises(UserError, match="random:resnet18 has none"):
        load_checkpoint("random:resnet18", weights="state_dict")


def test_inspect_says_which_weights_are_evaluated(tmp_path: Path, raw_and_ema, capsys) -> None:
    raw, ema = raw_and_ema
    path = tmp_path / "timm.pth.tar"
    torch.save({"state_dict": raw, "state_dict_ema": ema}, path)
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "weights at: state_dict_ema (EMA; --weights state_dict for the raw weights)" in out
    assert main(["inspect", str(path), "--weights", "state_dict"]) == 0
    assert "weights at: state_dict (--weights state_dict_ema for the EMA weights)" in capsys.readouterr().out


def _run(args: list[str], data: Path, out: Path) -> list[dict]:
    rc = main(["run", *args, "--tasks", "centroid", "--protocol", "quick", "--data-root", str(data),
               "--out", str(out), "--no-progress", "--set", "image_size=32", "--layers", "res5"])
    assert rc == 0
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def test_records_carry_the_name_and_which_weights(tmp_path, tiny_imagefolder, cache_dir, raw_and_ema) -> None:
    raw, ema = raw_and_ema
    path = tmp_path / "moco_v2_800ep.pth.tar"
    torch.save({"state_dict": raw, "state_dict_ema": ema}, path)
    (rec,) = _run(["--checkpoint", str(path)], tiny_imagefolder, tmp_path / "a")
    cached = len(list(cache_dir.rglob("manifest.json")))
    assert rec["checkpoint_name"] == "moco_v2_800ep"
    assert rec["checkpoint_load"] == {"weights": "state_dict_ema", "partial": False, "missing": 0,
                                      "missing_keys": []}
    (named,) = _run(["--checkpoint", str(path), "--weights", "state_dict", "--name", "mine"], tiny_imagefolder,
                    tmp_path / "b")
    assert named["checkpoint_name"] == "mine" and named["checkpoint_load"]["weights"] == "state_dict"
    assert named["checkpoint_id"] != rec["checkpoint_id"]
    # the raw weights' features are extracted anew, not read back from the EMA's cache entries
    assert len(list(cache_dir.rglob("manifest.json"))) == 2 * cached > 0
    (rnd,) = _run(["--checkpoint", "random:resnet18"], tiny_imagefolder, tmp_path / "c")
    assert rnd["checkpoint_name"] == "random:resnet18" and rnd["checkpoint_load"]["weights"] == ""
