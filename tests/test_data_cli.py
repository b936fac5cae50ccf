"""``evalsuite data synth`` / ``evalsuite data check`` end to end."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from evalsuite.cli import main


def _tree_hash(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth") / "data"
    assert main(["data", "synth", "--out", str(root), "--seed", "5", "--size", "0.1", "--image-size", "32"]) == 0
    return root


def test_synth_all_writes_every_layout(data_root: Path):
    for sub in ("imagefolder/train", "VOCdevkit/VOC2007/ImageSets/Main/trainval.txt",
                "places205/trainvalsplit_places205/train_places205.csv", "nyuv2/nyu_depth_v2_labeled.mat",
                "nyuv2/splits.mat", "cifar-10-batches-py/test_batch", "dtd/dtd/labels/val1.txt", "eurosat/2750"):
        assert (data_root / sub).exists(), sub
    assert not [p for p in data_root.iterdir() if p.name.startswith(".")]  # no leftover temporaries


def test_synth_same_seed_byte_identical(tmp_path: Path, data_root: Path):
    again = tmp_path / "again"
    assert main(["data", "synth", "--out", str(again), "--seed", "5", "--size", "0.1", "--image-size", "32"]) == 0
    assert _tree_hash(again) == _tree_hash(data_root)


@pytest.mark.parametrize("kind", ["voc", "places", "nyuv2", "imagefolder", "cifar10"])
def test_check_generated(kind: str, data_root: Path, capsys):
    assert main(["data", "check", "--kind", kind, "--root", str(data_root)]) == 0
    out = capsys.readouterr().out
    assert out.rstrip().endswith("ok") and "n=" in out


def test_check_real_voc_fixture(fixtures_dir: Path, capsys):
    root = fixtures_dir / "voc2007_mini"
    assert main(["data", "check", "--kind", "voc", "--root", str(root / "VOCdevkit" / "VOC2007")]) == 0
    out = capsys.readouterr().out
    assert "trainval: " in out and "n=5" in out and "objects=15" in out and "difficult_objects=2" in out
    assert "difficult_only_labels=0" in out


def test_check_bad_data_exit_2_and_skip_corrupt(tmp_path: Path, capsys):
    root = tmp_path / "d"
    assert main(["data", "synth", "--kind", "places", "--out", str(root), "--size", "0.1", "--image-size",
                 "24"]) == 0
    victim = sorted((root / "places205" / "images256" / "b" / "beach").iterdir())[0]
    victim.write_bytes(victim.read_bytes()[:100])
    capsys.readouterr()
    assert main(["data", "check", "--kind", "places", "--root", str(root)]) == 2
    err = capsys.readouterr().err
    assert str(victim) in err and len(err.strip().splitlines()) == 1
    assert main(["data", "check", "--kind", "places", "--root", str(root), "--skip-corrupt"]) == 0
    assert "skipped 1 corrupt" in capsys.readouterr().out


def test_synth_nyu_dir_format_and_bad_size(tmp_path: Path, capsys):
    assert main(["data", "synth", "--kind", "nyuv2", "--nyu-format", "dir", "--out", str(tmp_path),
                 "--size", "0.05", "--image-size", "32"]) == 0
    assert (tmp_path / "nyuv2" / "normal" / "train").is_dir()
    assert main(["data", "check", "--kind", "nyuv2", "--root", str(tmp_path)]) == 0
    assert main(["data", "synth", "--out", str(tmp_path / "x"), "--size", "0"]) == 2
