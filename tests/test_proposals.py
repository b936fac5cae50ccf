"""Proposals: selective search on real and synthetic images, the per-image cache, the CLI command."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.ops import box_iou

from evalsuite.cli import main as cli_main
from evalsuite.data import open_dataset
from tasks.detection.fast_rcnn import xml_to_continuous
from tasks.detection.proposals import ProposalCache, selective_search, sliding_window


def test_selective_search_on_a_real_voc_image_covers_its_objects(fixtures_dir):
    ds = open_dataset("voc2007", fixtures_dir / "voc2007_mini" / "VOCdevkit" / "VOC2007", "trainval")
    i = 0
    a = ds.annotations(i)
    boxes = selective_search(np.asarray(ds.load_image(i)), max_side=300, max_boxes=2000)
    w, h = a["width"], a["height"]
    assert boxes.dtype == np.float32 and boxes.ndim == 2 and len(boxes) > 50
    assert boxes[:, [0, 2]].min() >= 0 and boxes[:, [0, 2]].max() <= w
    assert boxes[:, [1, 3]].min() >= 0 and boxes[:, [1, 3]].max() <= h
    assert np.all(boxes[:, 2] > boxes[:, 0]) and np.all(boxes[:, 3] > boxes[:, 1])
    best = box_iou(torch.from_numpy(xml_to_continuous(a["boxes"])), torch.from_numpy(boxes)).max(1).values
    assert float(best.max()) >= 0.5  # at least one object is found at the detection IoU


def test_selective_search_finds_a_single_square():
    img = np.full((80, 100, 3), 30, np.uint8)
    img[20:50, 40:80] = (220, 200, 10)
    boxes = selective_search(img, max_side=None)
    iou = box_iou(torch.tensor([[40.0, 20.0, 80.0, 50.0]]), torch.from_numpy(boxes)).max()
    assert float(iou) > 0.9


def test_sliding_window_is_deterministic_and_any_prefix_covers_scales():
    a, b = sliding_window(120, 90), sliding_window(120, 90)
    np.testing.assert_array_equal(a, b)
    assert len(np.unique(a, axis=0)) == len(a)
    side = np.sqrt((a[:100, 2] - a[:100, 0]) * (a[:100, 3] - a[:100, 1]))
    assert side.min() < 30 and side.max() > 80  # shorter side 90: sizes 0.3 .. 1.0 of it
    assert a[:, 0].min() == 0 and a[:, 1].min() == 0  # edge to edge
    assert a[:, 2].max() == pytest.approx(120) and a[:, 3].max() == pytest.approx(90)


def np_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Continuous-coordinate IoU matrix, written out with numpy."""
    ix = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    iy = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
    inter = ix * iy
    return inter / (area(a)[:, None] + area(b)[None, :] - inter)


def test_sliding_window_recalls_the_synthetic_voc_objects(synthetic_voc):
    """The grid is sized for the synthetic VOC-like objects: nearly every non-difficult box has a window
    at IoU >= 0.5, also in a 100-box prefix (the quick preset's limit is larger)."""
    ds = open_dataset("voc2007", synthetic_voc / "VOCdevkit" / "VOC2007", "test")
    best_all, best_100 = [], []
    for i in range(len(ds)):
        a = ds.annotations(i)
        gt = xml_to_continuous(a["boxes"][~a["difficult"]])
        if not len(gt):
            continue
        win = sliding_window(a["width"], a["height"])
        best_all += list(np_iou(gt, win).max(1))
        best_100 += list(np_iou(gt, win[:100]).max(1))
    assert len(best_all) > 30
    assert np.mean(np.array(best_all) >= 0.5) >= 0.95
    assert np.mean(np.array(best_100) >= 0.5) >= 0.8


class TinySet:
    def __init__(self, n: int):
        self.ids = [f"im{k}" for k in range(n)]
        self.loads = 0

    def load_image(self, i: int):
        self.loads += 1
        rng = np.random.default_rng(i)
        return Image.fromarray((rng.random((40, 50, 3)) * 255).astype(np.uint8))


def test_cache_writes_once_reads_after_and_rebuilds_a_corrupt_file(tmp_path):
    ds = TinySet(3)
    c = ProposalCache(tmp_path, "selective_search", {"max_side": None}, dataset_key="k")
    assert c.precompute(ds, progress=False) == 3 and ds.loads == 3
    files = sorted(p.name for p in c.dir.iterdir())
    assert files == ["im0.npy", "im1.npy", "im2.npy"]  # no temporary file left behind
    first = c.get(ds, 1)
    again = ProposalCache(tmp_path, "selective_search", {"max_side": None}, dataset_key="k")
    assert again.precompute(ds, progress=False) == 0 and ds.loads == 3  # all read from disk
    np.testing.assert_array_equal(again.get(ds, 1), first)
    (c.dir / "im1.npy").write_bytes(b"garbage")
    np.save(c.dir / "im2.npy", np.full((3, 4), np.nan, np.float32))
    assert again.precompute(ds, progress=False) == 2  # both bad files recomputed, never used
    np.testing.assert_array_equal(again.get(ds, 1), first)
    # other parameters or other images live elsewhere
    assert ProposalCache(tmp_path, "selective_search", {"max_side": 20}, dataset_key="k").dir != c.dir
    assert ProposalCache(tmp_path, "selective_search", {"max_side": None}, dataset_key="j").dir != c.dir


def test_an_interrupted_precompute_resumes(tmp_path):
    ds = TinySet(4)
    c = ProposalCache(tmp_path, "sliding_window", dataset_key="k")

    class Boom(Exception):
        pass

    orig = ds.load_image

    def flaky(i):
        if i == 2:
            raise Boom
        return orig(i)

    ds.load_image = flaky
    with pytest.raises(Boom):
        c.precompute(ds, progress=False)
    assert sorted(p.name for p in c.dir.iterdir()) == ["im0.npy", "im1.npy"]
    ds.load_image = orig
    assert ProposalCache(tmp_path, "sliding_window", dataset_key="k").precompute(ds, progress=False) == 2


def test_cli_precomputes_and_resumes(tmp_path, capsys):
    from evalsuite.data.synthetic import write_voc2007

    data = tmp_path / "data"
    write_voc2007(data, seed=1, scale=0.1, image_size=48)
    args = ["proposals", "--data-root", str(data), "--split", "test", "--cache-dir", str(tmp_path / "c"),
            "--no-progress"]
    assert cli_main(args) == 0
    assert "20 images, 20 computed, 0 already cached" in capsys.readouterr().out
    assert cli_main(args) == 0
    assert "0 computed, 20 already cached" in capsys.readouterr().out


def test_cli_finds_voc2012_under_the_data_root(tmp_path, capsys):
    from evalsuite.data.synthetic import write_voc2007
    from tests.test_data_voc import voc2012_from

    data = tmp_path / "data"
    voc07 = write_voc2007(tmp_path / "src", seed=2, scale=0.1, image_size=40)
    voc2012_from(voc07, data, lambda i: f"2008_{i}")
    n = len((voc07 / "ImageSets" / "Main" / "trainval.txt").read_text().split())
    args = ["proposals", "--data-root", str(data), "--dataset", "voc2012", "--split", "trainval",
            "--method", "sliding_window", "--cache-dir", str(tmp_path / "c"), "--no-progress"]
    assert cli_main(args) == 0
    assert f"{n} images, {n} computed" in capsys.readouterr().out


def _write_pickle(path, obj, protocol=2):
    import pickle

    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    return path


def test_published_detectron_and_detectron2_proposal_files(tmp_path):
    """Detectron's files: integer ``indexes`` (VOC id 000005 = 5), boxes in 0-based inclusive pixels, kept in
    file order; detectron2's: string ``ids``, continuous XYXY_ABS boxes sorted by decreasing objectness."""
    from evalsuite.errors import BadData
    from tasks.detection.proposals import read_proposal_file

    b5 = np.array([[0, 0, 9, 19], [4, 5, 6, 7]], np.float32)  # a 10 x 20 box: x 0..9 inclusive
    v1 = _write_pickle(tmp_path / "ss.pkl", {"boxes": [b5, np.zeros((0, 4), np.float32)], "scores": [np.ones(2), []],
                                             "indexes": [5, 2008000001]})
    got = read_proposal_file(v1)
    np.testing.assert_array_equal(got["5"], [[0, 0, 10, 20], [4, 5, 7, 8]])  # continuous: 10 wide, 20 high
    assert got["2008000001"].shape == (0, 4)

    class Ids:  # the cache looks images up by the dataset's own ids
        ids = ["000005", "2008_000001", "000007"]

    cache = ProposalCache(tmp_path / "c", "file", {"file": str(v1)})
    np.testing.assert_array_equal(cache.get(Ids, 0), got["5"])
    assert cache.get(Ids, 1).shape == (0, 4)
    with pytest.raises(BadData, match="000007 has no entry in the proposal file") as e:
        cache.get(Ids, 2)
    assert str(v1) in str(e.value)
    assert not (tmp_path / "c").exists()  # read from the file, never copied into the cache

    logits = np.array([0.1, 2.0, -1.0], np.float32)
    boxes = np.array([[1, 1, 5, 5], [2, 2, 8, 8], [0, 0, 3, 3]], np.float32)
    v2 = _write_pickle(tmp_path / "d2.pkl", {"ids": ["000005"], "boxes": [boxes], "objectness_logits": [logits],
                                             "bbox_mode": 0}, protocol=4)
    np.testing.assert_array_equal(read_proposal_file(v2)["5"], boxes[[1, 0, 2]])
    # detectron2 boxes without scores: continuous already, file order kept
    v2n = _write_pickle(tmp_path / "d2n.pkl", {"ids": ["000005"], "boxes": [boxes], "bbox_mode": 0})
    np.testing.assert_array_equal(read_proposal_file(v2n)["5"], boxes)

    bad = {
        "xywh.pkl": {"ids": ["1"], "boxes": [boxes], "objectness_logits": [logits], "bbox_mode": 1},
        "noids.pkl": {"boxes": [boxes]},
        "count.pkl": {"indexes": [1, 2], "boxes": [boxes]},
        "nan.pkl": {"indexes": [1], "boxes": [np.full((1, 4), np.nan)]},
        "nlogits.pkl": {"ids": ["1"], "boxes": [boxes], "objectness_logits": [logits, logits]},
        "logits.pkl": {"ids": ["1"], "boxes": [boxes], "objectness_logits": [logits[:2]]},
    }
    for name, obj in bad.items():
        with pytest.raises(BadData) as e:
            read_proposal_file(_write_pickle(tmp_path / name, obj))
        assert name in str(e.value)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with pytest.raises(BadData, match="unsafe pickle"):
        read_proposal_file(_write_pickle(tmp_path / "evil.pkl", {"indexes": [1], "boxes": [Evil()]}))
    with pytest.raises(BadData, match="proposal file not found"):
        read_proposal_file(tmp_path / "missing.pkl")
