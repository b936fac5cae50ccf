"""surface_normals end to end on the NYUv2 reader and its ray-cast synthetic scenes (write_nyuv2)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

import tasks.surface_normals.task as sn
from evalsuite.cli import main as cli_main
from evalsuite.data import open_dataset
from evalsuite.data.synthetic import write_nyuv2
from evalsuite.errors import BadData
from evalsuite.task import TaskContext
from tasks.surface_normals.metrics import angular_errors_deg, metric_names, summarize_errors
from tests.helpers import make_context


def make_ctx(data_root, out, overrides=()) -> TaskContext:
    return make_context("surface_normals", data_root, out, overrides=overrides)


def mean_normal_baseline(root):
    train, test = open_dataset("nyuv2", root, "train"), open_dataset("nyuv2", root, "test")
    pooled = np.concatenate([train.normals(i)[train.valid_mask(i)] for i in range(len(train))])
    mean = pooled.mean(axis=0) / np.linalg.norm(pooled.mean(axis=0))
    errs = np.concatenate([angular_errors_deg(np.broadcast_to(mean, test.normals(i).shape), test.normals(i),
                                              test.valid_mask(i)) for i in range(len(test))])
    return summarize_errors(errs)


@pytest.mark.slow
def test_cli_quick_on_synthetic_nyuv2_beats_the_mean_normal(tmp_path, cache_dir):
    nyu = write_nyuv2(tmp_path / "data", seed=0, n_train=12, n_test=4, height=48, width=64)
    rc = cli_main(["run", "--checkpoint", "random:resnet18", "--tasks", "surface_normals", "--protocol", "quick",
                   "--set", "surface_normals.epochs=8", "--set", "surface_normals.codebook_size=20",
                   "--data-root", str(tmp_path / "data"), "--out", str(tmp_path / "runs"), "--no-progress"])
    assert rc == 0
    rows = [json.loads(line) for line in (tmp_path / "runs" / "results.jsonl").read_text().splitlines()]
    assert [r["metric"] for r in rows] == metric_names()
    by = {r["metric"]: r["value"] for r in rows}
    base = mean_normal_baseline(nyu)
    assert by["median_angle_error_deg"] < base["median_angle_error_deg"] - 15, (by, base)
    assert by["pct_within_11.25deg"] > base["pct_within_11.25deg"] + 30, (by, base)
    p = rows[0]["params"]
    assert (p["num_train"], p["num_test"], p["layer"]) == (12, 4, "res5_onwards")
    test = open_dataset("nyuv2", nyu, "test")
    assert p["valid_test_pixels"] == sum(int(test.valid_mask(i).sum()) for i in range(len(test)))
    assert np.asarray(p["codebook"]).shape == (20, 3) and rows[0]["protocol"] == "quick"


def test_dir_layout_with_a_corrupt_normal_file_names_it(tmp_path):
    nyu = write_nyuv2(tmp_path / "data", seed=1, n_train=4, n_test=2, height=32, width=48, fmt="dir")
    stem = sorted((nyu / "normal" / "train").glob("*.npy"))[1]
    np.save(stem, np.load(stem) * 2.5)                             # not unit length any more
    with pytest.raises(BadData, match="not unit length") as e:
        sn.task.run(make_ctx(tmp_path / "data", tmp_path / "out"))
    assert f"id {stem.stem}" in str(e.value) or stem.name in str(e.value)


def test_dir_layout_with_mismatched_rgb_size_is_refused(tmp_path):
    nyu = write_nyuv2(tmp_path / "data", seed=2, n_train=4, n_test=2, height=32, width=48, fmt="dir")
    img = sorted((nyu / "image" / "test").glob("*.png"))[0]
    Image.open(img).resize((40, 30)).save(img)
    with pytest.raises(BadData, match="RGB image is 30x40"):
        sn.task.run(make_ctx(tmp_path / "data", tmp_path / "out",
                             ["surface_normals.epochs=1", "surface_normals.codebook_size=4"]))
