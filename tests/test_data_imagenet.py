"""ImageNet (ILSVRC2012) in both layouts: the official flat val folder labelled by the devkit, checked against
torchvision.datasets.ImageNet's own parsing of the same archives, and class folders; the synthetic writer; bad input;
`evalsuite data check --kind imagenet`."""

from __future__ import annotations

import hashlib
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest

from evalsuite.cli import main
from evalsuite.data import open_dataset
from evalsuite.data.imagenet import DEVKIT
from evalsuite.data.synthetic import write_imagenet
from evalsuite.errors import BadData
from tests.helpers import open_dataset_error

SMALL = {"image_size": 24, "train_per_class": 3, "val_per_class": 2}


@pytest.fixture(scope="module")
def official(tmp_path_factory) -> Path:
    return write_imagenet(tmp_path_factory.mktemp("in"), seed=3, layout="official", **SMALL)


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _by_name(ds) -> dict[str, int]:
    return {Path(p).name: int(c) for p, c in ds.samples}


def test_official_layout_labels_are_torchvisions(official, tmp_path, monkeypatch):
    """torchvision.datasets.ImageNet parses the same devkit archive and sorts the same val archive into class
    folders (the md5 of the official archives patched to ours): its labels, wnids and class names are ours."""
    import torchvision.datasets.imagenet as tvi

    root = tmp_path / "tv"
    root.mkdir()
    shutil.copy(official / f"{DEVKIT}.tar.gz", root)
    with tarfile.open(root / "ILSVRC2012_img_val.tar", "w") as tar:
        for f in sorted((official / "val").iterdir()):
            tar.add(f, arcname=f.name)
    monkeypatch.setitem(tvi.ARCHIVE_META, "devkit", (f"{DEVKIT}.tar.gz", _md5(root / f"{DEVKIT}.tar.gz")))
    monkeypatch.setitem(tvi.ARCHIVE_META, "val", ("ILSVRC2012_img_val.tar", _md5(root / "ILSVRC2012_img_val.tar")))
    ref = tvi.ImageNet(str(root), split="val")

    ours = open_dataset("imagenet", official, "val")
    assert ours.layout == "official" and len(ours) == len(ref) == 8 * 2
    assert ours.classes == ref.wnids
    assert _by_name(ours) == {Path(p).name: t for p, t in ref.samples}
    assert ours.class_names == [", ".join(words) for words in ref.classes]
    # the synthetic devkit numbers its classes in another order than the sorted wnids, as the real one does
    assert sorted(set(ours.labels.tolist())) == list(range(8))

    # the devkit as torchvision left it parsed (meta.bin) labels a flat val folder the same way
    flat = tmp_path / "flat"
    shutil.copytree(official / "val", flat / "val")
    shutil.copy(root / "meta.bin", flat)
    assert _by_name(open_dataset("imagenet", flat, "val")) == _by_name(ours)
    # and torchvision's prepared root (val/<wnid>/ + meta.bin) is the folder layout, with the same labels
    prepared = open_dataset("imagenet", root, "val")
    assert prepared.layout == "folder" and _by_name(prepared) == _by_name(ours)
    assert prepared.class_names == ours.class_names


def test_folder_layout_and_an_extracted_devkit_give_the_same_labels(official, tmp_path):
    folder = write_imagenet(tmp_path / "f", seed=3, layout="folder", **SMALL)
    va = open_dataset("imagenet", folder, "val")
    assert va.layout == "folder" and va.class_names == va.classes  # no devkit: the wnids name the classes
    assert _by_name(va) == _by_name(open_dataset("imagenet", official, "val"))
    tr = open_dataset("imagenet", folder, "train")
    assert tr.layout == "folder" and tr.classes == va.classes and len(tr) == 8 * 3
    assert [(p.name, c) for p, c in tr.samples] == [(p.name, c) for p, c in
                                                    open_dataset("imagenet", official, "train").samples]
    # the devkit archive extracted (the folder ILSVRC2012_devkit_t12/) is read as well as the archive
    ex = tmp_path / "ex"
    shutil.copytree(official / "val", ex / "val")
    with tarfile.open(official / f"{DEVKIT}.tar.gz") as tar:
        tar.extractall(ex, filter="data")
    assert _by_name(open_dataset("imagenet", ex, "val")) == _by_name(va)
    # every image decodes to RGB, the greyscale and CMYK ones too
    modes = {tr.load_image(i).mode for i in range(len(tr))}
    assert modes == {"RGB"}


def test_same_seed_same_bytes(official, tmp_path):
    again = write_imagenet(tmp_path, seed=3, layout="official", **SMALL)

    def tree(d):
        return {str(p.relative_to(d)): _md5(p) for p in sorted(d.rglob("*")) if p.is_file()}

    assert tree(again) == tree(official)
    sizes = {open_dataset("imagenet", official, "train").load_image(i).size for i in range(24)}
    assert len(sizes) > 3  # ImageNet-like varied aspect ratios


def test_bad_official_layouts_are_refused_naming_the_file(official, tmp_path):
    root = tmp_path / "r"
    shutil.copytree(official / "val", root / "val")
    e = open_dataset_error("imagenet", root, "val", match="no devkit is here")
    assert Path(e.path) == root
    shutil.copy(official / f"{DEVKIT}.tar.gz", root)
    (root / "val" / "ILSVRC2012_val_00000099.JPEG").write_bytes((root / "val" / "ILSVRC2012_val_00000001.JPEG")
                                                                .read_bytes())
    e = open_dataset_error("imagenet", root, "val", match="is not ILSVRC2012_val_<n> with n in 1..16")
    assert e.path.endswith("ILSVRC2012_val_00000099.JPEG")
    (root / "val" / "ILSVRC2012_val_00000099.JPEG").unlink()
    # a ground truth naming an ILSVRC2012_ID that is no class
    with tarfile.open(official / f"{DEVKIT}.tar.gz") as tar:
        tar.extractall(root, filter="data")
    (root / f"{DEVKIT}.tar.gz").unlink()
    truth = root / DEVKIT / "data" / "ILSVRC2012_validation_ground_truth.txt"
    truth.write_text(truth.read_text().replace("1\n", "9\n", 1))  # 9 is the parent synset
    e = open_dataset_error("imagenet", root, "val", match="is not the ILSVRC2012_ID of a class")
    assert Path(e.path) == truth
    (root / DEVKIT / "data" / "meta.mat").write_bytes(b"not a mat file")
    open_dataset_error("imagenet", root, "val", match="meta.mat")
    (root / DEVKIT / "data" / "meta.mat").unlink()
    open_dataset_error("imagenet", root, "val", match="devkit file missing")
    open_dataset_error("imagenet", root, "test", match="split directory 'test' not found")


def test_data_check_and_synth_cli(tmp_path, capsys):
    assert main(["data", "synth", "--kind", "imagenet", "--imagenet-layout", "folder", "--out", str(tmp_path),
                 "--size", "0.25"]) == 0
    assert main(["data", "check", "--kind", "imagenet", "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "imagenet train: " in out and "layout=folder" in out and "classes=8" in out and out.rstrip().endswith("ok")
    shutil.rmtree(tmp_path / "imagenet" / "val")
    assert main(["data", "check", "--kind", "imagenet", "--root", str(tmp_path)]) == 2
    assert "split directory 'val' not found" in capsys.readouterr().err


def test_labels_are_int64_indices_into_sorted_wnids(official):
    va = open_dataset("imagenet", official, "val")
    assert va.labels.dtype == np.int64 and va.classes == sorted(va.classes)
    with pytest.raises(BadData, match="unknown ImageNet layout"):
        open_dataset("imagenet", official, "val", layout="flat")
