"""VOC2007 reader against the real fixtures, and the synthetic VOC writer round-tripping through it."""

from __future__ import annotations

import hashlib
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from evalsuite.data import VOC_CLASSES, open_dataset
from evalsuite.data.synthetic import write_voc2007
from evalsuite.data.voc import read_id_list
from evalsuite.errors import BadData
from tests.helpers import open_dataset_error

STANDARD_ORDER = ["aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
                  "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
                  "tvmonitor"]


def xml_objects(path: Path) -> list[tuple[str, list[float], bool, bool]]:
    """Independent regex parse of a VOC XML: (name, [xmin, ymin, xmax, ymax], difficult, truncated)."""
    text = path.read_text()
    out = []
    for obj in re.findall(r"<object>(.*?)</object>", text, re.S):
        name = re.search(r"<name>(.*?)</name>", obj).group(1)
        box = [float(re.search(rf"<{k}>(.*?)</{k}>", obj).group(1)) for k in ("xmin", "ymin", "xmax", "ymax")]
        diff = re.search(r"<difficult>(\d)</difficult>", obj).group(1) == "1"
        trunc = re.search(r"<truncated>(\d)</truncated>", obj).group(1) == "1"
        out.append((name, box, diff, trunc))
    return out


def labels_from_xml(objs) -> np.ndarray:
    lab = np.full(20, -1, np.int8)
    for name, _, diff, _ in objs:
        c = STANDARD_ORDER.index(name)
        lab[c] = 1 if not diff else max(lab[c], 0)
    return lab


@pytest.fixture(scope="module")
def voc_fixture(fixtures_dir: Path) -> Path:
    return fixtures_dir / "voc2007_mini" / "VOCdevkit" / "VOC2007"


@pytest.fixture(scope="module")
def synth_voc(tmp_path_factory) -> Path:
    return write_voc2007(tmp_path_factory.mktemp("vocsyn"), seed=3, scale=0.1, image_size=64)


def test_classes_in_standard_order():
    assert list(VOC_CLASSES) == STANDARD_ORDER


def test_fixture_ids_and_labels_match_xml(voc_fixture: Path):
    tv = open_dataset("voc2007", voc_fixture, "trainval")
    te = open_dataset("voc2007", voc_fixture, "test")
    assert tv.ids == ["000005", "000032", "000033", "000039", "000042"]
    assert te.ids == ["000002", "000003", "000004"]
    for ds in (tv, te):
        assert ds.label_matrix.dtype == np.int8 and ds.label_matrix.shape == (len(ds), 20)
        for i, image_id in enumerate(ds.ids):
            expect = labels_from_xml(xml_objects(voc_fixture / "Annotations" / f"{image_id}.xml"))
            np.testing.assert_array_equal(ds.label_matrix[i], expect, err_msg=image_id)
    # hand-checked: 000005 holds chairs only (3 normal, 2 difficult) -> chair present
    assert tv.label_matrix[0, STANDARD_ORDER.index("chair")] == 1
    assert (tv.label_matrix[0] == 1).sum() == 1


def test_fixture_boxes_difficult_truncated(voc_fixture: Path):
    ds = open_dataset("voc2007", voc_fixture, "trainval")
    a = ds.annotations(0)  # 000005
    assert a["width"] == 500 and a["height"] == 375
    assert a["boxes"].dtype == np.float32 and a["boxes"].shape == (5, 4)
    np.testing.assert_array_equal(a["boxes"][0], [263, 211, 324, 339])
    np.testing.assert_array_equal(a["boxes"][2], [5, 244, 67, 374])
    assert a["labels"].dtype == np.int64 and set(a["labels"].tolist()) == {8}
    assert a["difficult"].tolist() == [False, False, True, False, True]
    assert a["truncated"].tolist() == [False, False, True, False, True]
    for i, image_id in enumerate(ds.ids):
        objs = xml_objects(voc_fixture / "Annotations" / f"{image_id}.xml")
        a = ds.annotations(i)
        np.testing.assert_array_equal(a["boxes"], np.array([o[1] for o in objs], np.float32))
        assert [VOC_CLASSES[k] for k in a["labels"]] == [o[0] for o in objs]
        assert a["difficult"].tolist() == [o[2] for o in objs]
        im = ds.load_image(i)
        assert im.mode == "RGB" and im.size == (a["width"], a["height"])
    total = sum(len(open_dataset("voc2007", voc_fixture, s).annotations(i)["labels"])
                for s in ("trainval", "test") for i in range(len(open_dataset("voc2007", voc_fixture, s))))
    assert total == 25  # PROVENANCE.md: 8 images, 25 objects


def test_official_id_lists(fixtures_dir: Path):
    tv = read_id_list(fixtures_dir / "voc2007_splits" / "trainval.txt")
    te = read_id_list(fixtures_dir / "voc2007_splits" / "test.txt")
    assert len(tv) == 5011 and len(te) == 4952
    assert (tv[0], tv[-1], te[0], te[-1]) == ("000005", "009961", "000001", "009963")
    assert not set(tv) & set(te)


def test_fingerprint_stable_and_split_specific(voc_fixture: Path):
    a = open_dataset("voc2007", voc_fixture, "trainval").fingerprint()
    assert a == open_dataset("voc2007", voc_fixture, "trainval").fingerprint()
    assert a != open_dataset("voc2007", voc_fixture, "test").fingerprint()


def test_synthetic_round_trip(synth_voc: Path):
    tv = open_dataset("voc2007", synth_voc, "trainval")
    te = open_dataset("voc2007", synth_voc, "test")
    tr, va = open_dataset("voc2007", synth_voc, "train"), open_dataset("voc2007", synth_voc, "val")
    assert len(tv) == 20 and len(te) == 20 and sorted(tr.ids + va.ids) == tv.ids
    assert not set(tv.ids) & set(te.ids)
    n_obj, n_diff, n_trunc = 0, 0, 0
    for ds in (tv, te):
        for i, image_id in enumerate(ds.ids):
            objs = xml_objects(synth_voc / "Annotations" / f"{image_id}.xml")
            assert 1 <= len(objs) <= 4
            np.testing.assert_array_equal(ds.label_matrix[i], labels_from_xml(objs))
            a = ds.annotations(i)
            im = ds.load_image(i)
            assert im.size == (a["width"], a["height"])
            b = a["boxes"]
            assert (b[:, 0] >= 1).all() and (b[:, 1] >= 1).all()
            assert (b[:, 2] <= a["width"]).all() and (b[:, 3] <= a["height"]).all()
            assert (b[:, 2] >= b[:, 0]).all() and (b[:, 3] >= b[:, 1]).all()
            n_obj += len(b)
            n_diff += int(a["difficult"].sum())
            n_trunc += int(a["truncated"].sum())
    assert n_obj > 40 and n_trunc > 0
    # every class has a positive in each split (the writer cycles the first object's class)
    assert ((tv.label_matrix == 1).sum(0) >= 1).all() and ((te.label_matrix == 1).sum(0) >= 1).all()
    # per-class files use the devkit's "%s %2d" format
    line = (synth_voc / "ImageSets" / "Main" / "aeroplane_test.txt").read_text().splitlines()[0]
    assert re.fullmatch(r"\d{6} (-1| 1| 0)", line)


def _tree_hash(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*"))
            if p.is_file()}


def test_same_seed_byte_identical(tmp_path: Path, synth_voc: Path):
    again = write_voc2007(tmp_path / "a", seed=3, scale=0.1, image_size=64)
    assert _tree_hash(again) == _tree_hash(synth_voc)
    other = write_voc2007(tmp_path / "b", seed=4, scale=0.1, image_size=64)
    assert _tree_hash(other) != _tree_hash(synth_voc)


def test_difficult_only_is_ignore_or_negative(tmp_path: Path, voc_fixture: Path):
    root = tmp_path / "VOC2007"
    shutil.copytree(voc_fixture, root)
    # make 000005's chairs all difficult (as the devkit would then write 0)
    f = root / "ImageSets" / "Main" / "chair_trainval.txt"
    f.write_text(f.read_text().replace("000005  1", "000005  0"))
    c = STANDARD_ORDER.index("chair")
    assert open_dataset("voc2007", root, "trainval").label_matrix[0, c] == 0
    neg = open_dataset("voc2007", root, "trainval", difficult_as_negative=True).label_matrix
    assert neg[0, c] == -1 and (neg != 0).all()


def test_missing_split_file(tmp_path: Path, voc_fixture: Path):
    assert open_dataset_error("voc2007", voc_fixture, "val").path.endswith("ImageSets/Main/val.txt")
    root = tmp_path / "VOC2007"
    shutil.copytree(voc_fixture, root)
    (root / "ImageSets" / "Main" / "dog_test.txt").unlink()
    assert open_dataset_error("voc2007", root, "test", match="not found").path.endswith("dog_test.txt")


def test_unknown_class_names_the_xml(tmp_path: Path, voc_fixture: Path):
    root = tmp_path / "VOC2007"
    shutil.copytree(voc_fixture, root)
    x = root / "Annotations" / "000003.xml"
    x.write_text(x.read_text().replace("<name>sofa</name>", "<name>unicorn</name>"))
    ds = open_dataset("voc2007", root, "test")
    with pytest.raises(BadData, match="unicorn") as e:
        ds.check_annotations()
    assert e.value.path == str(x)
    assert "000003.xml" in str(e.value)


def test_truncated_jpeg_and_skip_corrupt(tmp_path: Path, voc_fixture: Path, capsys):
    root = tmp_path / "VOC2007"
    shutil.copytree(voc_fixture, root)
    j = root / "JPEGImages" / "000033.jpg"
    j.write_bytes(j.read_bytes()[:4000])
    ds = open_dataset("voc2007", root, "trainval")
    with pytest.raises(BadData, match="truncated") as e:
        ds.load_image(ds.ids.index("000033"))
    assert e.value.path == str(j)
    sk = open_dataset("voc2007", root, "trainval", skip_corrupt=True)
    assert sk.ids == ["000005", "000032", "000039", "000042"]
    assert [p for p, _ in sk.skipped] == [str(j)]
    np.testing.assert_array_equal(sk.label_matrix, ds.label_matrix[[0, 1, 3, 4]])
    assert "skipped 1" in capsys.readouterr().err
    assert sk.fingerprint() != ds.fingerprint()


# ----------------------------------------------------------------------------- VOC2012


def voc2012_from(voc2007: Path, root: Path, rename, splits: dict[str, list[str]] | None = None,
                 split_of=None) -> Path:
    """Write ``root/VOCdevkit/VOC2012`` from a VOC2007-layout tree: image id ``i`` becomes ``rename(i)``
    (files copied, ``<folder>``/``<filename>`` rewritten as the VOC2012 devkit has them). ``splits``
    (default: train = the VOC2007 train ids, val = val, trainval = both) lists VOC2007 ids; per-class files
    are derived from the XMLs (1 / 0 difficult-only / -1), as the devkit's are."""
    src_main = voc2007 / "ImageSets" / "Main"
    if splits is None:
        splits = {s: (src_main / f"{s}.txt").read_text().split() for s in ("train", "val")}
        splits["trainval"] = sorted(splits["train"] + splits["val"])
    dst = root / "VOCdevkit" / "VOC2012"
    for d in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (dst / d).mkdir(parents=True, exist_ok=True)
    for i in sorted({i for ids in splits.values() for i in ids}):
        new = rename(i)
        shutil.copyfile(voc2007 / "JPEGImages" / f"{i}.jpg", dst / "JPEGImages" / f"{new}.jpg")
        xml = (voc2007 / "Annotations" / f"{i}.xml").read_text()
        xml = xml.replace("<folder>VOC2007</folder>", "<folder>VOC2012</folder>")
        xml = xml.replace(f"<filename>{i}.jpg</filename>", f"<filename>{new}.jpg</filename>")
        (dst / "Annotations" / f"{new}.xml").write_text(xml)
    for split, ids in splits.items():
        new_ids = [rename(i) for i in ids]
        (dst / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in new_ids))
        labs = [labels_from_xml(xml_objects(dst / "Annotations" / f"{i}.xml")) for i in new_ids]
        for c, name in enumerate(STANDARD_ORDER):
            (dst / "ImageSets" / "Main" / f"{name}_{split}.txt").write_text(
                "".join(f"{i} {lab[c]:2d}\n" for i, lab in zip(new_ids, labs)))
    return dst


def test_voc2012_reads_the_real_2007_prefixed_images(tmp_path: Path, voc_fixture: Path):
    """The fixture's 0000NN files are VOC2012's 2007_0000NN files (PROVENANCE.md): put them back."""
    ids = ["000032", "000033", "000039", "000042"]
    dst = voc2012_from(voc_fixture, tmp_path, lambda i: f"2007_{i}",
                       {"train": ids[:2], "val": ids[2:], "trainval": ids})
    for split, n in (("train", 2), ("val", 2), ("trainval", 4)):
        ds = open_dataset("voc2012", dst, split)
        assert len(ds) == n and ds.kind == "voc2012" and list(ds.classes) == STANDARD_ORDER
    tv = open_dataset("voc2012", dst, "trainval")
    v07 = open_dataset("voc2007", voc_fixture, "trainval")
    assert tv.ids == [f"2007_{i}" for i in ids]
    for k, i in enumerate(ids):
        a, b = tv.annotations(k), v07.annotations(v07.ids.index(i))
        objs = xml_objects(dst / "Annotations" / f"2007_{i}.xml")
        np.testing.assert_array_equal(a["boxes"], np.array([o[1] for o in objs], np.float32))
        assert [STANDARD_ORDER[c] for c in a["labels"]] == [o[0] for o in objs]
        for key in ("boxes", "labels", "difficult", "truncated"):
            np.testing.assert_array_equal(a[key], b[key])
        assert (a["width"], a["height"]) == tv.load_image(k).size
        np.testing.assert_array_equal(tv.label_matrix[k], labels_from_xml(objs))
    assert tv.fingerprint() != v07.fingerprint()


def test_voc2012_devkit_variants_and_refused_test_split(tmp_path: Path, synth_voc: Path):
    dst = voc2012_from(synth_voc, tmp_path, lambda i: f"2008_{i}")
    x = sorted((dst / "Annotations").glob("*.xml"))[0]
    text = x.read_text()
    # VOC2012 flavour: a person-layout <part> with its own box, no <difficult> tag, fractional coordinates
    first = text.index("<object>")
    obj_end = text.index("</object>", first)
    obj = text[first:obj_end]
    obj = obj.replace("\t\t<difficult>0</difficult>\n", "").replace("\t\t<difficult>1</difficult>\n", "")
    xmin = re.search(r"<xmin>(\d+)</xmin>", obj).group(1)
    obj = obj.replace(f"<xmin>{xmin}</xmin>", f"<xmin>{xmin}.5</xmin>", 1)
    part = "\t\t<part>\n\t\t\t<name>head</name>\n\t\t\t<bndbox>\n\t\t\t\t<xmin>1</xmin>\n\t\t\t\t<ymin>1</ymin>\n" \
           "\t\t\t\t<xmax>3</xmax>\n\t\t\t\t<ymax>3</ymax>\n\t\t\t</bndbox>\n\t\t</part>\n"
    x.write_text(text[:first] + obj + part + text[obj_end:])
    ds = open_dataset("voc2012", dst, "trainval")
    k = ds.ids.index(x.stem)
    a = ds.annotations(k)
    assert a["boxes"][0, 0] == float(xmin) + 0.5 and not a["difficult"][0]
    assert len(a["labels"]) == len(xml_objects(synth_voc / "Annotations" / f"{x.stem[5:]}.xml"))
    assert sorted(open_dataset("voc2012", dst, "train").ids + open_dataset("voc2012", dst, "val").ids) == ds.ids
    open_dataset_error("voc2012", dst, "test", match="never released")
    open_dataset_error("voc2012", tmp_path / "nowhere", "trainval", match="expected VOCdevkit/VOC2012")
