"""Places205 list files, CIFAR pickles (safe unpickling) and folders, sklearn digits, ImageFolder bad input."""

from __future__ import annotations

import hashlib
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

from evalsuite.data import open_dataset
from evalsuite.data.synthetic import write_cifar10, write_imagefolder, write_places205
from evalsuite.errors import BadData, UserError


def _tree_hash(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="module")
def places(tmp_path_factory) -> Path:
    return write_places205(tmp_path_factory.mktemp("pl"), seed=1, scale=0.1, image_size=48, classes=4)


# ------------------------------------------------------------------ Places205

def test_places_round_trip(places: Path):
    tr = open_dataset("places205", places, "train")
    va = open_dataset("places205", places, "val")
    assert tr.classes == ["beach", "corridor", "forest_path", "skyscraper"]
    lines = (places / "trainvalsplit_places205" / "train_places205.csv").read_text().splitlines()
    assert len(tr) == len(lines) == 4 * 3 and len(va) == 4 * 1
    assert tr.ids == [ln.split()[0] for ln in lines]
    np.testing.assert_array_equal(tr.labels, [int(ln.split()[1]) for ln in lines])
    assert tr.labels.dtype == np.int64
    assert tr.image_path(0) == places / "images256" / lines[0].split()[0]
    im = tr.load_image(0)
    assert im.size == (48, 48) and im.mode == "RGB"
    assert tr.fingerprint() != va.fingerprint()


def test_places_same_seed_byte_identical(tmp_path: Path, places: Path):
    again = write_places205(tmp_path / "a", seed=1, scale=0.1, image_size=48, classes=4)
    assert _tree_hash(again) == _tree_hash(places)


def test_places_not_separable_by_mean_colour(tmp_path: Path):
    """Colours are random per image: a nearest-class-mean rule on mean RGB is near chance."""
    root = write_places205(tmp_path, seed=0, scale=0.4, image_size=32)
    tr, va = open_dataset("places205", root, "train"), open_dataset("places205", root, "val")

    def feats(ds):
        return np.stack([np.asarray(ds.load_image(i), np.float32).mean((0, 1)) for i in range(len(ds))])

    xtr, xva = feats(tr), feats(va)
    means = np.stack([xtr[tr.labels == c].mean(0) for c in range(10)])
    pred = np.argmin(((xva[:, None] - means[None]) ** 2).sum(-1), 1)
    assert (pred == va.labels).mean() < 0.35  # chance is 0.1


def test_places_official_prefix_and_no_category_index(tmp_path: Path, places: Path):
    root = tmp_path / "places205"
    (root / "data/vision/torralba/deeplearning").mkdir(parents=True)
    shutil.copytree(places / "images256", root / "data/vision/torralba/deeplearning/images256")
    shutil.copytree(places / "trainvalsplit_places205", root / "trainvalsplit_places205")
    ds = open_dataset("places205", root, "val")
    assert ds.classes == ["beach", "corridor", "forest_path", "skyscraper"]  # from folder names
    ds.load_image(len(ds) - 1)


def test_places_bad_inputs(tmp_path: Path, places: Path, capsys):
    with pytest.raises(BadData, match="list file for split 'test' not found") as e:
        open_dataset("places205", places, "test")
    assert "test_places205.csv" in e.value.path
    root = tmp_path / "places205"
    shutil.copytree(places, root)
    lf = root / "trainvalsplit_places205" / "val_places205.csv"
    good = lf.read_text()
    lf.write_text(good + "b/beach/extra.jpg notanumber\n")
    with pytest.raises(BadData, match="line 5") as e:
        open_dataset("places205", root, "val")
    assert e.value.path == str(lf)
    lf.write_text(good)
    victim = root / "images256" / good.splitlines()[2].split()[0]
    victim.write_bytes(victim.read_bytes()[:300])
    ds = open_dataset("places205", root, "val")
    with pytest.raises(BadData) as e:
        ds.load_image(2)
    assert e.value.path == str(victim)
    sk = open_dataset("places205", root, "val", skip_corrupt=True)
    assert len(sk) == 3 and sk.skipped[0][0] == str(victim)
    assert "skipped 1" in capsys.readouterr().err
    lf.write_text("")
    with pytest.raises(BadData, match="empty"):
        open_dataset("places205", root, "val")


# ------------------------------------------------------------------ CIFAR

def test_cifar10_pickles_round_trip(tmp_path: Path):
    root = write_cifar10(tmp_path, seed=0, scale=0.1)
    assert sorted(p.name for p in root.iterdir()) == ["batches.meta", "data_batch_1", "data_batch_2", "data_batch_3",
                                                      "data_batch_4", "data_batch_5", "test_batch"]
    tr, te = open_dataset("cifar10", root, "train"), open_dataset("cifar10", root, "test")
    assert len(tr) == 50 and len(te) == 10 and tr.kind == "cifar10"
    # independent decode of the official layout: row = R plane, G plane, B plane (1024 each)
    with open(root / "data_batch_2", "rb") as f:
        b = pickle.load(f, encoding="bytes")
    row, lab = b[b"data"][3], b[b"labels"][3]
    img = np.asarray(tr.load_image(10 + 3))
    np.testing.assert_array_equal(img[..., 0].ravel(), row[:1024])
    np.testing.assert_array_equal(img[..., 2].ravel(), row[2048:])
    assert tr.labels[13] == lab and tr.classes[0] == "beach"
    assert tr.fingerprint() == open_dataset("cifar10", root, "train").fingerprint() != te.fingerprint()
    again = write_cifar10(tmp_path / "again", seed=0, scale=0.1)
    assert _tree_hash(again) == _tree_hash(root)


def _write_cifar100(root: Path) -> None:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    for split, n in (("train", 6), ("test", 3)):
        d = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"fine_labels": list(range(n)),
             b"coarse_labels": [k % 2 for k in range(n)], b"filenames": [b"x"] * n}
        (root / split).write_bytes(pickle.dumps(d, protocol=2))
    meta = {b"fine_label_names": [f"f{k}".encode() for k in range(100)],
            b"coarse_label_names": [f"c{k}".encode() for k in range(20)]}
    (root / "meta").write_bytes(pickle.dumps(meta, protocol=2))


def test_cifar100_fine_and_coarse(tmp_path: Path):
    root = tmp_path / "cifar-100-python"
    _write_cifar100(root)
    fine = open_dataset("cifar100", root, "train")
    coarse = open_dataset("cifar100", root, "test", label="coarse")
    assert fine.labels.tolist() == [0, 1, 2, 3, 4, 5] and len(fine.classes) == 100
    assert coarse.labels.tolist() == [0, 1, 0] and coarse.classes[:2] == ["c0", "c1"]
    with pytest.raises(UserError, match="does not take"):
        open_dataset("cifar100", root, "test", colour="blue")


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("echo pwned > /dev/null",))


def test_cifar_unsafe_pickle_refused(tmp_path: Path):
    root = write_cifar10(tmp_path, seed=0, scale=0.1)
    (root / "test_batch").write_bytes(pickle.dumps({b"data": _Evil(), b"labels": []}, protocol=2))
    with pytest.raises(BadData, match="refusing to load global") as e:
        open_dataset("cifar10", root, "test")
    assert e.value.path == str(root / "test_batch")


def test_cifar_truncated_and_missing_batch(tmp_path: Path):
    root = write_cifar10(tmp_path, seed=0, scale=0.1)
    b = root / "data_batch_3"
    b.write_bytes(b.read_bytes()[:500])
    with pytest.raises(BadData, match="corrupt") as e:
        open_dataset("cifar10", root, "train")
    assert e.value.path == str(b)
    b.unlink()
    with pytest.raises(BadData, match="not found") as e:
        open_dataset("cifar10", root, "train")
    assert e.value.path == str(b)


def test_cifar_image_folders(tmp_path: Path):
    root = tmp_path / "cifar-10-batches-py"
    write_imagefolder(root, seed=0, per_class=2, size=32, classes=3)
    ds = open_dataset("cifar10", root, "train")
    assert ds.kind == "cifar10" and len(ds) == 6 and ds.classes == ["disc", "square", "triangle"]


# ------------------------------------------------------------------ digits

def test_digits_matches_sklearn():
    from sklearn.datasets import load_digits

    d = load_digits()
    tr, te = open_dataset("digits", "", "train"), open_dataset("digits", "", "test")
    assert len(tr) == 1348 and len(te) == 449 and len(tr) + len(te) == 1797
    np.testing.assert_array_equal(te.labels, d.target[3::4])
    im8 = open_dataset("digits", "", "test", size=8).load_image(5)
    expect = np.rint(255 - d.images[3 + 4 * 5] * 255 / 16)
    np.testing.assert_allclose(np.asarray(im8)[..., 1], expect, atol=1)
    assert te.load_image(0).size == (32, 32) and te.classes == [str(k) for k in range(10)]
    with pytest.raises(BadData):
        open_dataset("digits", "", "val")


# ------------------------------------------------------------------ ImageFolder

def test_imagefolder_empty_and_corrupt(tmp_path: Path, capsys):
    empty = tmp_path / "if" / "train" / "a"
    empty.mkdir(parents=True)
    with pytest.raises(BadData, match="empty") as e:
        open_dataset("imagefolder", tmp_path / "if", "train")
    assert e.value.path == str(tmp_path / "if" / "train")
    root = write_imagefolder(tmp_path / "ok", seed=0, per_class=2, size=32, classes=2)
    bad = root / "train" / "disc" / "00001.jpg"
    bad.write_bytes(bad.read_bytes()[:200])
    ds = open_dataset("imagefolder", root, "train")
    with pytest.raises(BadData, match="truncated|unreadable") as e:
        ds.load_image(1)
    assert e.value.path == str(bad)
    sk = open_dataset("imagefolder", root, "train", skip_corrupt=True)
    assert len(sk) == 3 and sk.labels.tolist() == [0, 1, 1] and len(sk.skipped) == 1
    assert sk.describe()["skipped_corrupt"] == 1


def test_cifar_numpy1_module_path(tmp_path: Path):
    """The official batches name ``numpy.core.multiarray`` (numpy < 2 / Python 2); numpy 2 writes ``numpy._core``."""
    root = write_cifar10(tmp_path, seed=0, scale=0.1)
    ref = open_dataset("cifar10", root, "test")
    raw = (root / "test_batch").read_bytes()
    assert b"numpy._core.multiarray" in raw
    (root / "test_batch").write_bytes(raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    old = open_dataset("cifar10", root, "test")
    np.testing.assert_array_equal(old.data, ref.data)
    np.testing.assert_array_equal(old.labels, ref.labels)


def test_object_imagefolder_one_voc_class_per_image(tmp_path: Path):
    from evalsuite.data.synth_voc import render_scene
    from evalsuite.data.synthetic import write_object_imagefolder
    from evalsuite.data.voc import VOC_CLASSES

    root = write_object_imagefolder(tmp_path / "a", seed=3, per_class=2, size=32)
    tr, va = open_dataset("imagefolder", root, "train"), open_dataset("imagefolder", root, "val")
    assert tr.classes == list(VOC_CLASSES) and len(tr) == 40 and len(va) == 20
    assert np.bincount(tr.labels).tolist() == [2] * 20
    assert _tree_hash(write_object_imagefolder(tmp_path / "b", seed=3, per_class=2, size=32)) == _tree_hash(root)
    # every image holds exactly its class's object (same renderer call, annotations instead of pixels)
    for c in (0, 7, 19):
        _, objects = render_scene(np.random.default_rng([3, 11, 0, c, 1]), 32, 32, first_class=c, n_objects=1,
                                  radius=(0.22, 0.36))
        assert [o["name"] for o in objects] == [VOC_CLASSES[c]]


def test_object_imagefolder_shared_backdrops(tmp_path: Path):
    """``backgrounds=k``: every image's backdrop comes from one pool of k, whatever its class or split;
    outside its object an image then differs from its backdrop by the pixel noise alone."""
    from evalsuite.data.synth_voc import _background, render_scene
    from evalsuite.data.synthetic import write_object_imagefolder

    backdrop = _background(np.random.default_rng([5, 13, 0]), 48, 48)
    img, objects = render_scene(np.random.default_rng(1), 48, 48, first_class=4, n_objects=1, radius=(0.22, 0.36),
                                background=backdrop)
    x1, y1, x2, y2 = objects[0]["box"]
    outside = np.ones((48, 48), bool)
    outside[y1 - 1:y2, x1 - 1:x2] = False
    assert outside.sum() > 400
    assert np.abs(img - backdrop)[outside].mean() < 4.5  # N(0, 4) noise: mean |x| = 3.2
    assert np.abs(img - backdrop)[~outside].mean() > 20  # the object is drawn over it

    from PIL import Image

    def pixels(root):
        return [np.asarray(Image.open(p), np.float32) for p in sorted(root.rglob("*.jpg"))]

    shared = pixels(write_object_imagefolder(tmp_path / "one", seed=5, per_class=1, size=48, backgrounds=1))
    own = pixels(write_object_imagefolder(tmp_path / "own", seed=5, per_class=1, size=48))
    assert len(shared) == len(own) == 40  # 20 train + 20 val (half of 1, at least one)

    def median_gap(ims):  # per pixel, median over pairs: most pixels are backdrop in both images
        return float(np.median([np.median(np.abs(a - b)) for a, b in zip(ims, ims[1:])]))

    assert median_gap(shared) < 10 < 30 < median_gap(own)
    # one backdrop of the pool is the first of the seed's pool, the one the renderer was given above
    assert np.median(np.abs(shared[0] - backdrop)) < 10
