"""NYUv2 reader on the real sample and split file; the ray-caster's output checked by geometry."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from evalsuite.data import open_dataset
from evalsuite.data.nyuv2 import decode_normal_png, encode_normal_png, read_nyu_splits
from evalsuite.data.render_nyu import intrinsics
from evalsuite.data.synthetic import write_nyuv2
from evalsuite.errors import BadData
from tests.helpers import open_dataset_error


@pytest.fixture(scope="module")
def nyu_fixture(fixtures_dir: Path) -> Path:
    return fixtures_dir / "nyuv2_mini"


@pytest.fixture(scope="module")
def synth_mat(tmp_path_factory) -> Path:
    return write_nyuv2(tmp_path_factory.mktemp("nyumat"), seed=2, scale=0.125, fmt="mat", height=48, width=64)


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory) -> Path:
    return write_nyuv2(tmp_path_factory.mktemp("nyudir"), seed=2, scale=0.125, fmt="dir", height=48, width=64)


def test_official_splits(nyu_fixture: Path):
    s = read_nyu_splits(nyu_fixture / "splits.mat")
    assert len(s["train"]) == 795 and len(s["test"]) == 654
    txt_tr = np.loadtxt(nyu_fixture / "splits_trainNdxs.txt", dtype=np.int64)
    txt_te = np.loadtxt(nyu_fixture / "splits_testNdxs.txt", dtype=np.int64)
    np.testing.assert_array_equal(s["train"], txt_tr)
    np.testing.assert_array_equal(s["test"], txt_te)
    assert s["train"].min() == 3 and s["train"].max() == 1440
    assert sorted(np.concatenate([s["train"], s["test"]]).tolist()) == list(range(1, 1450))


def test_real_sample_in_dir_layout(tmp_path: Path, nyu_fixture: Path):
    root = tmp_path / "nyuv2"
    for what, src in (("image", "image.png"), ("normal", "normal.png")):
        (root / what / "train").mkdir(parents=True)
        shutil.copy(nyu_fixture / "sample" / src, root / what / "train" / "00003.png")
    ds = open_dataset("nyuv2", root, "train")
    assert ds.layout == "dir" and ds.ids == ["00003"] and len(ds) == 1
    assert ds.load_image(0).size == (682, 512)  # README: resized RGB, (H, W) = (512, 682)
    n = ds.normals(0)
    assert n.shape == (480, 640, 3) and n.dtype == np.float32
    norms = np.linalg.norm(n, axis=-1)
    assert 0.985 < norms.min() and norms.max() < 1.03  # README: 0.990..1.027
    assert ds.valid_mask(0).all()  # README: no invalid pixel in this sample
    raw = np.asarray(Image.open(nyu_fixture / "sample" / "normal.png").convert("RGB"))
    # the README's "wall facing the camera": raw R, G, B = 3, 138, 97 -> (x, y, z) = (-0.24, 0.08, -0.98)
    hit = np.argwhere((raw == [3, 138, 97]).all(-1))
    assert len(hit) > 0
    r, c = hit[0]
    np.testing.assert_allclose(n[r, c], [97 / 127.5 - 1, 138 / 127.5 - 1, 3 / 127.5 - 1], atol=1e-6)
    # table top faces up: y strongly negative (y points down)
    up = np.argwhere((raw == [110, 0, 127]).all(-1))
    assert len(up) > 0 and n[tuple(up[0])][1] == pytest.approx(-1.0)


def test_normal_png_round_trip():
    rng = np.random.default_rng(0)
    v = rng.normal(size=(5, 7, 3))
    v /= np.linalg.norm(v, axis=-1, keepdims=True)
    back = decode_normal_png(encode_normal_png(v))
    assert np.abs(back - v).max() <= 1 / 255 + 1e-6


def _depth_normals(z: np.ndarray, h: int, w: int) -> np.ndarray:
    """Independent normals from depth: back-project, cross product of central differences."""
    f, cx, cy = intrinsics(h, w)
    ys, xs = np.mgrid[0:h, 0:w] + 0.5
    p = np.stack([(xs - cx) / f * z, (ys - cy) / f * z, z], -1)
    du = p[1:-1, 2:] - p[1:-1, :-2]
    dv = p[2:, 1:-1] - p[:-2, 1:-1]
    n = np.cross(du, dv)
    n /= np.linalg.norm(n, axis=-1, keepdims=True) + 1e-12
    return n


def test_synthetic_normals_agree_with_depth(synth_mat: Path):
    ds = open_dataset("nyuv2", synth_mat, "train")
    assert ds.layout == "mat" and len(ds) == 8
    errs = []
    for i in range(len(ds)):
        n, m, z = ds.normals(i), ds.valid_mask(i), ds.depth(i)
        h, w = z.shape
        assert n.shape == (h, w, 3) and m.dtype == bool and z.dtype == np.float32
        assert ds.load_image(i).size == (w, h)
        assert m.mean() > 0.5
        np.testing.assert_allclose(np.linalg.norm(n[m], axis=-1), 1.0, atol=1e-5)
        assert (z[m] > 0.1).all() and (z[m] < 10).all()
        assert (n[~m] == 0).all()
        nd = _depth_normals(z.astype(np.float64), h, w)
        nd *= -np.sign(nd[..., 2:3] + 1e-12) * np.sign(-n[1:-1, 1:-1, 2:3] + 1e-12)  # same hemisphere
        # interior of planar patches: neighbours valid and inverse depth locally linear (planes are
        # exactly linear in 1/z across pixels), which drops creases and occlusion edges
        inner = m[1:-1, 1:-1] & m[2:, 1:-1] & m[:-2, 1:-1] & m[1:-1, 2:] & m[1:-1, :-2]
        iz = 1.0 / np.maximum(z.astype(np.float64), 1e-3)
        lin_u = np.abs(iz[1:-1, 2:] + iz[1:-1, :-2] - 2 * iz[1:-1, 1:-1]) < 1e-4
        lin_v = np.abs(iz[2:, 1:-1] + iz[:-2, 1:-1] - 2 * iz[1:-1, 1:-1]) < 1e-4
        inner &= lin_u & lin_v
        assert inner.mean() > 0.5
        cos = np.abs((nd * n[1:-1, 1:-1]).sum(-1))[inner]
        errs.append(np.degrees(np.arccos(np.clip(cos, -1, 1))))
    e = np.concatenate(errs)
    assert np.median(e) < 0.5  # exact planes: central differences of exact depth give the exact normal
    assert (e < 2).mean() > 0.98
    # normals face the camera: n . ray < 0 on valid pixels
    f, cx, cy = intrinsics(h, w)
    ys, xs = np.mgrid[0:h, 0:w] + 0.5
    ray = np.stack([(xs - cx) / f, (ys - cy) / f, np.ones_like(xs)], -1)
    assert ((ds.normals(0) * ray).sum(-1)[ds.valid_mask(0)] < 0).all()


def test_mat_and_dir_layouts_hold_the_same_frames(synth_mat: Path, synth_dir: Path):
    for split in ("train", "test"):
        a, b = open_dataset("nyuv2", synth_mat, split), open_dataset("nyuv2", synth_dir, split)
        assert a.ids == b.ids and b.layout == "dir"
        for i in range(len(a)):
            np.testing.assert_array_equal(np.asarray(a.load_image(i)), np.asarray(b.load_image(i)))
            np.testing.assert_array_equal(a.normals(i), b.normals(i))
            np.testing.assert_array_equal(a.valid_mask(i), b.valid_mask(i))
            np.testing.assert_array_equal(a.depth(i), b.depth(i))
    tr, te = open_dataset("nyuv2", synth_mat, "train"), open_dataset("nyuv2", synth_mat, "test")
    assert not set(tr.ids) & set(te.ids)
    # the .mat really has MATLAB's transposed axes: images (N, 3, W, H)
    with h5py.File(synth_mat / "nyu_depth_v2_labeled.mat", "r") as f:
        assert f["images"].shape == (12, 3, 64, 48) and f["depths"].shape == (12, 64, 48)
        img = f["images"][int(tr.ids[0]) - 1].transpose(2, 1, 0)
    np.testing.assert_array_equal(img, np.asarray(tr.load_image(0)))
    assert (synth_mat / "nyu_depth_v2_labeled.mat").read_bytes()[:19] == b"MATLAB 7.3 MAT-file"


def _tree_hash(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*"))
            if p.is_file()}


def test_same_seed_byte_identical(tmp_path: Path, synth_mat: Path, synth_dir: Path):
    assert _tree_hash(write_nyuv2(tmp_path / "a", seed=2, scale=0.125, fmt="mat", height=48, width=64)) \
        == _tree_hash(synth_mat)
    assert _tree_hash(write_nyuv2(tmp_path / "b", seed=2, scale=0.125, fmt="dir", height=48, width=64)) \
        == _tree_hash(synth_dir)


def test_mat_without_expected_keys(tmp_path: Path, nyu_fixture: Path):
    root = tmp_path / "nyuv2"
    root.mkdir()
    with h5py.File(root / "nyu_depth_v2_labeled.mat", "w") as f:
        f.create_dataset("rgb", data=np.zeros((2, 3, 4, 4), np.uint8))
    shutil.copy(nyu_fixture / "splits.mat", root / "splits.mat")
    mat = root / "nyu_depth_v2_labeled.mat"
    assert open_dataset_error("nyuv2", root, "train", match="lacks images, depths").path == str(mat)
    mat.write_bytes(b"not hdf5 at all")
    assert open_dataset_error("nyuv2", root, "train", match="HDF5").path.endswith("nyu_depth_v2_labeled.mat")


def test_splits_mat_without_keys_and_missing(tmp_path: Path, synth_mat: Path):
    import scipy.io as sio

    root = tmp_path / "nyuv2"
    shutil.copytree(synth_mat, root)
    sio.savemat(root / "splits.mat", {"foo": np.arange(3)})
    assert open_dataset_error("nyuv2", root, "test", match="trainNdxs").path == str(root / "splits.mat")
    (root / "splits.mat").unlink()
    open_dataset_error("nyuv2", root, "test", match="not found")


def test_dir_layout_bad_inputs(tmp_path: Path, synth_dir: Path):
    open_dataset_error("nyuv2", tmp_path / "nowhere", "train", match="not found")
    root = tmp_path / "nyuv2"
    shutil.copytree(synth_dir, root)
    empty = root / "image" / "test"
    for p in empty.iterdir():
        p.unlink()
    assert open_dataset_error("nyuv2", root, "test", match="no images").path == str(empty)
    first = sorted((root / "normal" / "train").iterdir())[0]
    first.unlink()
    with pytest.raises(BadData, match="no normal map") as e:
        open_dataset("nyuv2", root, "train")
    assert first.stem in e.value.path


def test_official_mat_with_toolkit_normal_pngs(tmp_path: Path):
    """The official labeled file has no normals: they come from normal/<split>/<NNNNN>.png."""
    import scipy.io as sio

    root = tmp_path / "nyuv2"
    root.mkdir()
    rng = np.random.default_rng(0)
    h, w = 6, 8
    imgs = rng.integers(0, 256, (3, h, w, 3), dtype=np.uint8)
    depths = rng.uniform(0.5, 9, (3, h, w)).astype(np.float32)
    with h5py.File(root / "nyu_depth_v2_labeled.mat", "w") as f:  # MATLAB's column-major view
        f.create_dataset("images", data=imgs.transpose(0, 3, 2, 1))
        f.create_dataset("depths", data=depths.transpose(0, 2, 1))
    sio.savemat(root / "splits.mat", {"trainNdxs": np.array([[1], [3]], np.uint16),
                                      "testNdxs": np.array([[2]], np.uint16)})
    n = rng.normal(size=(h, w, 3))
    n /= np.linalg.norm(n, axis=-1, keepdims=True)
    n[0, :3] = 0  # no ground truth there -> mid-grey in the PNG
    (root / "normal" / "train").mkdir(parents=True)
    Image.fromarray(encode_normal_png(n)).save(root / "normal" / "train" / "00003.png")
    ds = open_dataset("nyuv2", root, "train")
    assert ds.layout == "mat" and ds.ids == ["00001", "00003"]
    np.testing.assert_array_equal(np.asarray(ds.load_image(1)), imgs[2])
    np.testing.assert_array_equal(ds.depth(1), depths[2])
    m = ds.valid_mask(1)
    assert not m[0, :3].any() and m.sum() == h * w - 3
    assert np.abs(ds.normals(1)[m] - n[m]).max() <= 1 / 255 + 1e-6
    with pytest.raises(BadData, match="no normal map") as e:
        ds.normals(0)
    assert e.value.path.endswith("normal/train/00001.png")
    sio.savemat(root / "splits.mat", {"trainNdxs": np.array([[1], [4]], np.uint16), "testNdxs": np.array([[2]])})
    assert open_dataset_error("nyuv2", root, "train", match="out of range").path.endswith("splits.mat")
