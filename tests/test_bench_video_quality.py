"""The video mode of bench_pretrain_quality: video methods pretrained on synthetic videos / ego-motion walks and
compared with random init through kNN (and the VOC SVM) on the studio ImageFolder."""

from __future__ import annotations

import json
import types

import numpy as np
import pytest

from evalsuite.checkpoints import read_metadata
from evalsuite.errors import UserError

TWELVE = {"slow_features", "slow_steady", "shuffle_learn", "odd_one_out", "tracking", "motion_masks",
          "video_colorization", "video_context", "ambient_sound", "av_correspondence", "egomotion",
          "egomotion_equivariance"}


def fake_recorder(calls: list):
    """A stand-in for the navigation plug-in's recorder (no GL needed): per seed a walk of 0.15 m steps and 15
    degree turns, its frames a noise pattern shifted with the pose so motion shows."""

    def record(env, seeds, length, size):
        for seed in seeds:
            calls.append((env, length, size))
            rng = np.random.default_rng(seed)
            actions = [int(x) for x in rng.choice(3, size=length - 1, p=[0.2, 0.2, 0.6])]
            poses = [np.zeros(3)]
            for act in actions:
                x, y, h = poses[-1]
                if act == 2:
                    poses.append(np.array([x + 0.15 * np.cos(h), y + 0.15 * np.sin(h), h]))
                else:
                    poses.append(np.array([x, y, h + (1 if act == 0 else -1) * np.pi / 12]))
            pattern = rng.integers(0, 256, (size, 3 * size, 3), np.uint8)
            frames = np.stack([np.roll(pattern, int(40 * p[2] + 20 * p[0]), axis=1)[:, :size] for p in poses])
            yield frames, np.stack(poses), actions

    return record


def test_video_methods_and_their_data():
    from benchmarks.bench_pretrain_quality import video_dataset, video_methods

    assert set(video_methods()) == TWELVE and len(video_methods()) == 12
    assert {m: video_dataset(m) for m in TWELVE} == {
        **{m: "video" for m in TWELVE}, "egomotion": "egomotion", "egomotion_equivariance": "egomotion"}
    with pytest.raises(UserError, match="'rotnet' trains on images"):
        video_dataset("rotnet")


@pytest.mark.slow
def test_bench_video_mode(tmp_path, monkeypatch, capsys):
    """A video method and an ego-motion method, 1 step each on 2 tiny videos / walks: the random-init row and
    both methods' rows with per-tap kNN top-1 and VOC mAP, each checkpoint trained on its kind of data."""
    import benchmarks.common
    from benchmarks import bench_pretrain_quality as bench

    calls: list = []
    monkeypatch.setattr("evalsuite.data.cli.egomotion_recorder", lambda: fake_recorder(calls))
    monkeypatch.setattr(benchmarks.common, "OUT_DIR", tmp_path / "out")
    work, root = tmp_path / "work", tmp_path / "data"
    argv = ["--video", "--methods", "slow_features,egomotion", "--steps", "1", "--batch-size", "4", "--px", "32",
            "--per-class", "2", "--voc-scale", "0.1", "--videos", "2", "--egomotion-sequences", "2",
            "--video-seconds", "1.5", "--video-px", "32", "--samples-per-video", "4", "--set", "dim=16",
            "--set", "fc6_dim=16", "--set", "fc7_dim=16", "--set", "max_gap=3", "--eval-set", "voc07_svm.costs=[1.0]",
            "--eval-set", "voc07_svm.folds=2", "--threads", "1", "--precision", "fp32", "--data-root", str(root),
            "--keep", str(work)]
    bench.main(argv)
    data = json.loads((tmp_path / "out" / "bench_pretrain_quality_video.json").read_text())
    assert data["data"]["knn_set"]["pretrain_data"] == "studio seed=0 per_class=2 backgrounds=16"
    assert len(list((root / "video" / "train").glob("vid_*.json"))) == 2
    assert len(list((root / "egomotion" / "train").glob("seq_*.json"))) == 2
    # 2 train walks + 1 val walk, 15 frames (1.5 s at 10 fps) of 32 px each
    assert len(calls) == 3 and {c[1:] for c in calls} == {(15, 32)}
    rand, slow, ego = data["rows"]
    assert rand["method"] == "random:resnet18" and rand["steps"] == 0
    assert (slow["method"], slow["pretrain_dataset"]) == ("slow_features", "video")
    assert (ego["method"], ego["pretrain_dataset"]) == ("egomotion", "egomotion")
    for row in (slow, ego):
        assert row["steps"] == 1 and row["image_size"] == 32 and row["load_before"] >= 0
        meta = read_metadata(work / f"{row['method']}.safetensors")
        assert meta["data_kind"] == row["pretrain_dataset"]
        assert row["d_knn"] == round(row["knn_top1"] - rand["knn_top1"], 2)
        assert row["beats_random_knn"] == (row["knn_top1"] > rand["knn_top1"])
    for row in (rand, slow, ego):
        per = row["knn_top1_per_layer"]
        assert set(per) == {"conv1", "res2", "res3", "res4", "res5"} and set(row["map_per_layer"]) == set(per)
        # 20 classes x 1 val image: every top-1 is a multiple of 5
        assert row["knn_top1"] == max(per.values()) and all(0 <= v <= 100 and v % 5 == 0 for v in per.values())
        assert "voc07_svm.costs=[1.0]" in row["eval_overrides"]
    out = capsys.readouterr().out
    assert "| random:resnet18 |" in out and "| slow_features (video) |" in out and "| egomotion (egomotion) |" in out
    # a reused data root holding other videos (3 instead of 2; or each with its own backdrop where a pool is
    # asked for) is refused before anything is written
    for videos, pool in ((3, None), (2, 4)):
        other = types.SimpleNamespace(seed=0, videos=videos, egomotion_sequences=2, video_seconds=1.5, video_px=32,
                                      video_backgrounds=pool)
        with pytest.raises(SystemExit):
            bench.make_video_data(root, other, {"video"})
    assert len(list((root / "video" / "train").glob("vid_*.json"))) == 2


def test_video_mode_refuses_image_methods(capsys):
    from benchmarks import bench_pretrain_quality as bench

    with pytest.raises(SystemExit) as e:
        bench.main(["--video", "--methods", "slow_features,rotnet"])
    assert e.value.code == 2 and "'rotnet' trains on images" in capsys.readouterr().err
