"""Checkpoint formats: every supported layout converts to torchvision trunk names exactly."""

from __future__ import annotations

import os
import pickle
import stat
from pathlib import Path

import pytest
import torch
import torchvision

from evalsuite.checkpoints import load_checkpoint, read_metadata, save_checkpoint
from evalsuite.errors import BadCheckpoint, UserError
from evalsuite.trunks import build_trunk


@pytest.fixture(scope="module")
def tv_resnet18() -> dict[str, torch.Tensor]:
    torch.manual_seed(123)
    model = torchvision.models.resnet18(weights=None)
    with torch.no_grad():  # make BN buffers non-default so a wrong mapping is visible
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    return model.state_dict()


def _trunk_part(sd: dict) -> dict:
    return {k: v for k, v in sd.items() if not k.startswith("fc.")}


def _wrap(fmt: str, sd: dict) -> object:
    trunk = _trunk_part(sd)
    if fmt == "torchvision":
        return sd
    if fmt == "vissl":
        blocks = {f"_feature_blocks.{k}": v for k, v in trunk.items()}
        heads = {"0.clf.0.weight": torch.zeros(10, 512)}
        return {"classy_state_dict": {"base_model": {"model": {"trunk": blocks, "heads": heads}}}, "iteration": 5}
    if fmt == "moco":
        q = {f"module.encoder_q.{k}": v for k, v in sd.items()}
        k_ = {f"module.encoder_k.{k}": torch.zeros_like(v) for k, v in sd.items()}
        return {"state_dict": {**q, **k_, "module.queue": torch.zeros(128, 16)}, "arch": "resnet18", "epoch": 3}
    if fmt == "lightning":
        bb = {f"backbone.{k}": v for k, v in trunk.items()}
        return {"state_dict": {**bb, "projector.0.weight": torch.zeros(8, 512)}, "epoch": 1, "global_step": 10}
    if fmt == "dino":
        teacher = {f"backbone.{k}": v for k, v in trunk.items()}
        student = {f"module.backbone.{k}": torch.zeros_like(v) for k, v in trunk.items()}
        return {"teacher": teacher, "student": student, "epoch": 100}
    if fmt == "byol":
        order = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]
        seq = {}
        for k, v in trunk.items():
            head, _, tail = k.partition(".")
            seq[f"online_network.encoder.{order.index(head)}.{tail}"] = v
        tgt = {k.replace("online_network", "target_network"): torch.zeros_like(v) for k, v in seq.items()}
        return {"online_network_state_dict": seq, "target": tgt, **seq}
    if fmt == "timm":
        return {"state_dict_ema": sd, "arch": "resnet18", "epoch": 2}
    raise ValueError(fmt)


@pytest.mark.parametrize("fmt", ["torchvision", "vissl", "moco", "lightning", "dino", "byol", "timm"])
def test_foreign_formats_convert_exactly(tmp_path: Path, tv_resnet18, fmt: str) -> None:
    path = tmp_path / f"{fmt}.pth"
    torch.save(_wrap(fmt, tv_resnet18), path)
    ck = load_checkpoint(path)
    assert ck.format == fmt
    assert ck.arch == "resnet18"
    assert ck.report.missing == [] and ck.report.shape_mismatch == []
    expected = _trunk_part(tv_resnet18)
    assert set(ck.state_dict) == set(expected)
    for k, v in expected.items():
        assert torch.equal(ck.state_dict[k], v), k
    trunk = ck.build_trunk()
    assert torch.equal(trunk.state_dict()["layer4.1.bn2.running_var"], expected["layer4.1.bn2.running_var"])


def test_moco_report_lists_unexpected_head_keys(tmp_path: Path, tv_resnet18) -> None:
    path = tmp_path / "moco.pth"
    torch.save(_wrap("moco", tv_resnet18), path)
    ck = load_checkpoint(path)
    assert "module.encoder_q.fc.weight" in ck.report.unexpected
    assert len(ck.report.matched) == len(_trunk_part(tv_resnet18))


def test_own_format_roundtrip_with_metadata(tmp_path: Path) -> None:
    trunk = build_trunk("resnet18", seed=7)
    meta = {"method": "simclr", "arch": "resnet18", "pretrain_data": "imagefolder:abc", "epochs": 3,
            "hparams": {"temperature": 0.2}}
    path = save_checkpoint(tmp_path / "c.safetensors", trunk.state_dict(), meta)
    assert read_metadata(path)["hparams"] == {"temperature": 0.2}
    ck = load_checkpoint(path)
    assert ck.format == "evalsuite" and ck.method == "simclr" and ck.metadata["epochs"] == 3
    for k, v in trunk.state_dict().items():
        assert torch.equal(ck.state_dict[k], v)
    assert not list(tmp_path.glob(".*tmp*")), "temporary file left behind"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask  # as open() makes it: others may load it


def test_plain_safetensors_without_metadata(tmp_path: Path, tv_resnet18) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "timm_like.safetensors"
    save_file({k: v.contiguous() for k, v in tv_resnet18.items()}, str(path))
    ck = load_checkpoint(path)
    assert ck.arch == "resnet18" and not ck.report.missing


def test_alexnet_and_resnet50_inferred(tmp_path: Path) -> None:
    for arch, ctor in (("alexnet", torchvision.models.alexnet), ("resnet50", torchvision.models.resnet50)):
        path = tmp_path / f"{arch}.pth"
        torch.save(ctor(weights=None).state_dict(), path)
        ck = load_checkpoint(path)
        assert ck.arch == arch and not ck.report.missing


def test_random_is_seeded_and_distinct() -> None:
    a, b, c = (load_checkpoint("random:resnet18", seed=s) for s in (0, 0, 1))
    wa, wb, wc = (x.build_trunk().conv1.weight for x in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    assert a.sha256 == b.sha256 != c.sha256


def test_wrong_architecture_is_refused(tmp_path: Path, tv_resnet18) -> None:
    path = tmp_path / "r18.pth"
    torch.save(tv_resnet18, path)
    with pytest.raises(BadCheckpoint) as e:
        load_checkpoint(path, arch="resnet50")
    assert "resnet18" in str(e.value) and str(path) in str(e.value)


def test_missing_keys_refused_unless_partial(tmp_path: Path, tv_resnet18) -> None:
    sd = {k: v for k, v in tv_resnet18.items() if not k.startswith("layer4.")}
    path = tmp_path / "partial.pth"
    torch.save(sd, path)
    with pytest.raises(BadCheckpoint, match="missing"):
        load_checkpoint(path, arch="resnet18")
    ck = load_checkpoint(path, arch="resnet18", allow_partial=True)
    assert ck.report.missing and all(k.startswith("layer4.") for k in ck.report.missing)


def test_truncated_and_empty_and_directory(tmp_path: Path, tv_resnet18) -> None:
    good = tmp_path / "good.pth"
    torch.save(tv_resnet18, good)
    data = good.read_bytes()
    bad = tmp_path / "trunc.pth"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(BadCheckpoint, match="truncated|corrupt"):
        load_checkpoint(bad)
    st = tmp_path / "trunc.safetensors"
    save_checkpoint(st, build_trunk("resnet18", seed=0).state_dict(), {"method": "x", "arch": "resnet18"})
    st.write_bytes(st.read_bytes()[:5000])
    with pytest.raises(BadCheckpoint, match="truncated|corrupt"):
        load_checkpoint(st)
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(BadCheckpoint, match="empty"):
        load_checkpoint(empty)
    with pytest.raises(UserError, match="directory"):
        load_checkpoint(tmp_path)
    with pytest.raises(UserError, match="not found"):
        load_checkpoint(tmp_path / "nope.pth")


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_pickle_with_code_is_refused(tmp_path: Path, tv_resnet18) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": tv_resnet18, "evil": _Evil()}, path)
    with pytest.raises(BadCheckpoint, match="--trust-pickle"):
        load_checkpoint(path)
    legacy = tmp_path / "evil.pkl"
    legacy.write_bytes(pickle.dumps({"evil": _Evil()}))
    with pytest.raises(BadCheckpoint):
        load_checkpoint(legacy)


def test_trust_pickle_loads_with_warning(tmp_path: Path, tv_resnet18, capsys) -> None:
    path = tmp_path / "obj.pth"
    torch.save({"state_dict": tv_resnet18, "args": _Args(3)}, path)
    ck = load_checkpoint(path, trust_pickle=True)
    err = capsys.readouterr().err.splitlines()
    assert ck.arch == "resnet18"
    assert len(err) == 1 and err[0].startswith("evalsuite: warning: --trust-pickle:") and "executes code" in err[0]


class _Args:  # a harmless custom class, as many training scripts pickle their argparse namespace
    def __init__(self, n: int):
        self.n = n
