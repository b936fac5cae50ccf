"""Image trunks learned from video: the losses against hand-written versions, each sampler against what its paper
samples, training through the trainer on real (synthetic, lossless) video files, checkpoints, the data-kind
refusal and resume."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from evalsuite.checkpoints import load_checkpoint
from evalsuite.data import open_dataset
from evalsuite.errors import UserError
from pretrain import TrainConfig, Trainer, train
from pretrain.losses import contrastive_loss, slow_steady_loss
from pretrain.methods.odd_one_out import OddOneOutSampler
from pretrain.methods.shuffle_learn import OrderTupleSampler
from pretrain.methods.slow_features import SlowPairSampler
from pretrain.methods.slow_steady import SteadyTripletSampler
from pretrain.video import SampleDataset, collate_samples, read_frames, sum_of_differences

VIDEO_METHODS = ["slow_features", "slow_steady", "shuffle_learn", "odd_one_out"]
#: small heads and windows that fit the 20-frame test videos
SMALL = {
    "slow_features": {"dim": 16},
    "slow_steady": {"dim": 16},
    "shuffle_learn": {"tau_max": 8, "tau_min": 3, "frame_dim": 16},
    "odd_one_out": {"n_elements": 3, "clip_len": 3, "dim": 16},
}


# ---------------------------------------------------------------------------------------------- losses


def hand_contrastive(a, b, similar, margin, legacy=False, weight=None) -> float:
    """Per pair: d^2 / 2 if similar, else max(m - d, 0)^2 / 2 (legacy: max(m - d^2, 0) / 2); weighted mean."""
    total = norm = 0.0
    for k in range(len(a)):
        d = math.sqrt(sum((x - y) ** 2 for x, y in zip(a[k], b[k])))
        if similar[k]:
            cost = d * d / 2
        else:
            cost = (max(margin - d * d, 0.0) if legacy else max(margin - d, 0.0) ** 2) / 2
        w = 1.0 if weight is None else weight[k]
        total, norm = total + w * cost, norm + w
    return total / norm


def test_contrastive_loss_against_a_hand_written_version():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(7, 5)) * 0.4, rng.normal(size=(7, 5)) * 0.4
    b[2] = a[2] + 0.01  # a dissimilar pair well inside the margin
    similar = np.array([1, 0, 0, 1, 0, 1, 0])
    weight = np.array([1.0, 0.0, 2.0, 1.0, 1.0, 0.5, 1.0])
    ta, tb, ts = torch.tensor(a), torch.tensor(b), torch.tensor(similar)
    for margin, legacy, w in itertools.product((0.5, 2.0), (False, True), (None, weight)):
        ours = contrastive_loss(ta, tb, ts, margin, legacy, None if w is None else torch.tensor(w)).item()
        assert ours == pytest.approx(hand_contrastive(a, b, similar, margin, legacy, w), rel=1e-5)
    # the two forms differ, and a pair beyond the margin costs nothing
    assert contrastive_loss(ta, tb, ts, 2.0).item() != pytest.approx(contrastive_loss(ta, tb, ts, 2.0, True).item())
    far = torch.tensor([[0.0, 0.0], [0.0, 3.0]])
    assert contrastive_loss(far[:1], far[1:], torch.tensor([0]), 2.0).item() == 0.0


def test_slow_steady_loss_against_a_hand_written_version():
    rng = np.random.default_rng(1)
    za, zb, zc, zr = (rng.normal(size=(4, 3)) for _ in range(4))
    slow, steady = slow_steady_loss(*(torch.tensor(z) for z in (za, zb, zc, zr)), margin_slow=1.5, margin_steady=0.7)
    pairs_left = np.concatenate([za, zb, za, zc])
    pairs_right = np.concatenate([zb, zc, zr, zr])
    expected_slow = hand_contrastive(pairs_left, pairs_right, [1] * 8 + [0] * 8, 1.5, legacy=True)
    expected_steady = hand_contrastive(np.concatenate([zb - za, zb - za]), np.concatenate([zc - zb, zr - zb]),
                                       [1] * 4 + [0] * 4, 0.7, legacy=True)
    assert slow.item() == pytest.approx(expected_slow, rel=1e-5)
    assert steady.item() == pytest.approx(expected_steady, rel=1e-5)
    # a perfectly steady triplet with a far negative costs nothing in the steady term
    line = [torch.tensor([xy]) for xy in ([0.0, 0.0], [0.1, 0.0], [0.2, 0.0], [5.0, 5.0])]
    assert slow_steady_loss(*line, margin_steady=1.0)[1].item() == 0.0


def test_sum_of_differences_against_the_pairwise_sum():
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    pairs = [(i, j) for i in range(5) for j in range(i + 1, 5)]
    expected = sum(x[:, j] - x[:, i] for i, j in pairs) / len(pairs)
    torch.testing.assert_close(sum_of_differences(x, dim=1), expected)
    torch.testing.assert_close(sum_of_differences(x.flip(1), dim=1), -expected)  # reversed order: negated
    assert sum_of_differences(torch.ones(4, 3), dim=0).abs().max() == 0  # a still clip: zero


# ---------------------------------------------------------------------------------------------- samplers


class CountingVideos:
    """A stand-in reader: video v has ``lengths[v]`` frames; every pixel of frame k is k (channel 0) and v
    (channel 1), so a sampled frame tells its own index."""

    def __init__(self, lengths: list[int], size: int = 8):
        self.lengths, self.size, self.calls = lengths, size, 0

    def __len__(self) -> int:
        return len(self.lengths)

    def info(self, v: int):
        return types.SimpleNamespace(num_frames=self.lengths[v], path=f"v{v}.mp4")

    def clip(self, v: int, start: int, num_frames: int, stride: int = 1) -> torch.Tensor:
        assert start >= 0 and start + (num_frames - 1) * stride < self.lengths[v]
        self.calls += 1
        out = torch.zeros(num_frames, self.size, self.size, 3, dtype=torch.uint8)
        out[..., 0] = torch.arange(start, start + num_frames * stride, stride, dtype=torch.uint8).view(-1, 1, 1)
        out[..., 1] = v
        return out


def frame_ids(frames: torch.Tensor) -> np.ndarray:
    """The frame index each sampled frame shows (channel 0, undoing the [0, 1] scaling)."""
    return (frames[..., 0, :, :].mean((-1, -2)) * 255).round().long().numpy()


def draws(sampler, lengths=(40, 25), n=150):
    data = CountingVideos(list(lengths))
    for k in range(n):
        rng = np.random.default_rng([7, k])
        v = k % len(lengths)
        yield data.lengths[v], sampler(data, v, rng)


def test_read_frames_any_order_by_span_or_by_seek():
    data = CountingVideos([200])
    for order in ([5, 2, 9, 2], [3, 150, 40]):
        got = read_frames(data, 0, order, max_span=64)
        assert got[:, 0, 0, 0].tolist() == order
    data.calls = 0
    read_frames(data, 0, [3, 150, 40, 3], max_span=64)
    assert data.calls == 3  # far apart: one seek per distinct frame


def test_slow_pair_sampler_draws_near_pairs_and_a_far_frame():
    gaps = set()
    for n, s in draws(SlowPairSampler(8, max_gap=3)):
        a, b, r = s["time"].tolist()
        assert frame_ids(s["frames"]).tolist() == [a, b, r] and s["frames"].shape == (3, 3, 8, 8)
        assert 1 <= b - a <= 3 and 0 <= a and b < n
        assert min(abs(r - a), abs(r - b)) > 3 and 0 <= r < n
        gaps.add(b - a)
    assert gaps == {1, 2, 3}


def test_steady_triplet_sampler_draws_equally_spaced_frames_and_a_far_one():
    steps = set()
    for n, s in draws(SteadyTripletSampler(8, max_gap=2)):
        a, b, c, r = s["time"].tolist()
        assert frame_ids(s["frames"]).tolist() == [a, b, c, r]
        assert b - a == c - b in (1, 2) and 0 <= a and c < n
        assert min(abs(r - a), abs(r - b), abs(r - c)) > 2
        steps.add(b - a)
    assert steps == {1, 2}


def test_order_tuple_sampler_labels_the_paper_tuples():
    sampler = OrderTupleSampler(8, tau_max=10, tau_min=4, pos_fraction=0.25)
    labels = []
    for n, s in draws(sampler, n=400):
        t = s["time"].tolist()
        assert frame_ids(s["frames"]).tolist() == t
        first, mid, last = t
        if int(s["label"]) == 1:  # (b, c, d) or (d, c, b): the middle frame between the ends
            assert min(first, last) < mid < max(first, last) and 2 <= abs(last - first) <= 10
        else:  # (b, a, d) or (b, e, d): the middle frame outside [b, d], tau_min..tau_max beyond it
            assert first < last and 2 <= last - first <= 10
            gap = first - mid if mid < first else mid - last
            assert 4 <= gap <= 10 and 0 <= mid < n
        labels.append(int(s["label"]))
    assert abs(np.mean(labels) - 0.25) < 0.07  # 25 % positives (binomial sd 0.022 at 400)
    # both orders of a positive occur
    pos = [s["time"].tolist() for _, s in draws(sampler, n=200) if int(s["label"]) == 1]
    assert {t[0] < t[2] for t in pos} == {True, False}


def test_order_tuple_sampler_keeps_the_highest_motion_window():
    """With the counting frames the end frames' mean difference is the window's length: of the candidate
    windows the sampler draws first, the tuple spans the longest (the first of equals)."""
    sampler = OrderTupleSampler(8, tau_max=12, tau_min=3, motion_candidates=5)
    data = CountingVideos([40])
    for k in range(30):
        out = sampler(data, 0, np.random.default_rng([3, k]))
        rng = np.random.default_rng([3, k])
        windows = [sampler.window(rng, 40) for _ in range(5)]
        b, d = windows[int(np.argmax([d - b for b, d in windows]))]
        t = out["time"].tolist()
        assert {t[0], t[2]} == {b, d}


def test_odd_one_out_sampler_shuffles_exactly_one_clip():
    positions = set()
    for n, s in draws(OddOneOutSampler(8, n_elements=4, clip_len=5, clip_span=12)):
        t, odd = s["time"].numpy(), int(s["label"])
        assert s["frames"].shape == (4, 5, 3, 8, 8)
        np.testing.assert_array_equal(frame_ids(s["frames"]), t)
        for k, clip in enumerate(t):
            assert len(set(clip)) == 5 and clip.max() - clip.min() <= 12 and clip.max() < n
            d = np.diff(clip)
            assert ((d > 0).all()) == (k != odd)  # only the odd clip is out of order ...
            assert not (d < 0).all()  # ... and not merely reversed
        positions.add(odd)
    assert positions == {0, 1, 2, 3}


def test_sample_dataset_is_seeded_per_epoch_and_item_and_refuses_short_videos():
    data = CountingVideos([30, 22, 26])
    ds = SampleDataset(data, SlowPairSampler(8, max_gap=2), seed=5, samples_per_video=4)
    assert len(ds) == 12 and [ds[i][1] for i in range(6)] == [0, 1, 2, 0, 1, 2]
    first = [ds[i][0]["time"].tolist() for i in range(12)]
    assert first == [ds[i][0]["time"].tolist() for i in range(12)]  # deterministic
    ds.epoch = 1
    assert first != [ds[i][0]["time"].tolist() for i in range(12)]  # a new epoch draws anew
    batch, index, target = collate_samples([ds[i] for i in range(3)])
    assert batch["frames"].shape == (3, 3, 3, 8, 8) and index.tolist() == [0, 1, 2] and target.tolist() == [0] * 3
    with pytest.raises(UserError, match=r"1 video\(s\) have fewer than the 28 frames .*\(first: v1.mp4, 22 frames\)"):
        SampleDataset(CountingVideos([30, 22]), OrderTupleSampler(8, tau_max=30, tau_min=25), 0, 1)


# ---------------------------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def video_root(tmp_path_factory) -> Path:
    """A data root with ``video/train``: 3 lossless 2 s, 10 fps, 32 px synthetic videos (20 frames each)."""
    from evalsuite.data.synth_video import write_videos

    root = tmp_path_factory.mktemp("videodata")
    write_videos(root, seed=0, n_train=3, n_val=1, seconds=2.0, size=32, fps=10, codec_name="ffv1")
    return root


def cfg(method: str, root: Path, out: Path, **kw) -> TrainConfig:
    base = dict(method=method, data_root=str(root), dataset="video", out=str(out), batch_size=2, image_size=32,
                epochs=1, max_steps_per_epoch=1, samples_per_video=2, hp=SMALL.get(method, {}), progress=False)
    base.update(kw)
    return TrainConfig(**base)


def test_frames_in_memory_are_the_readers_clips_decoded_once(tmp_path):
    """H.264 with the writer's settings (key frames, B-frames): every clip served from the whole-video decode equals
    the reader's own seek-and-decode; a clip outside the video gets the reader's error; each video is decoded once;
    the wrapper pickles (DataLoader workers) and the trainer records whether it held the frames."""
    import pickle

    from evalsuite.data.synth_video import write_videos
    from pretrain.video import FramesInMemory, frames_fit

    write_videos(tmp_path, seed=1, n_train=2, n_val=1, seconds=3.0, size=32, fps=10)
    ds = open_dataset("video", tmp_path / "video", "train")
    mem = FramesInMemory(ds)
    rng = np.random.default_rng(0)
    for _ in range(12):
        v, stride = int(rng.integers(2)), int(rng.integers(1, 4))
        num = int(rng.integers(1, 30 // stride))
        start = int(rng.integers(0, 30 - (num - 1) * stride))
        assert torch.equal(mem.clip(v, start, num, stride), ds.clip(v, start, num, stride)), (v, start, num, stride)
    assert sorted(mem._frames) == [0, 1]
    with pytest.raises(IndexError, match="outside the 30 frames"):
        mem.clip(0, 25, 6)
    again = pickle.loads(pickle.dumps(mem))
    assert torch.equal(again.clip(1, 3, 4), ds.clip(1, 3, 4)) and len(again) == 2 and again.info(0).num_frames == 30
    assert frames_fit(ds, 2, 2 * 30 * 32 * 32 * 3) and not frames_fit(ds, 2, 2 * 30 * 32 * 32 * 3 - 1)


def test_video_examples_are_the_files_frames(video_root):
    ds = open_dataset("video", video_root / "video", "train")
    sampler = SteadyTripletSampler(32, max_gap=2)
    s = sampler(ds, 1, np.random.default_rng(0))
    whole = ds.clip(1, 0, ds.info(1).num_frames).permute(0, 3, 1, 2).float() / 255
    torch.testing.assert_close(s["frames"], whole[s["time"]])


@pytest.mark.parametrize("method", VIDEO_METHODS)
def test_video_method_trains_and_checkpoint_loads(method, video_root, random_init, tmp_path):
    out = train(cfg(method, video_root, tmp_path / f"{method}.safetensors"))
    ck = load_checkpoint(out)
    assert ck.report.missing == [] and ck.report.unexpected == []
    meta = ck.metadata
    assert meta["method"] == method and meta["data_kind"] == "video" and meta["steps"] == 1
    assert meta["sampling"] == {"samples_per_video": 2, "examples_per_epoch": 6,
                                "seed": "numpy Generator per (seed, epoch, example)", "frames_in_memory": True}
    assert meta["augment"]["crop"]["size"] == 32 and meta["n_images"] == 3
    assert math.isfinite(meta["final_loss"])
    taps = ck.build_trunk()(torch.zeros(1, 3, 32, 32))
    assert all(torch.isfinite(v).all() for v in taps.values())
    init = random_init("resnet18")
    assert any(not torch.equal(v, init[k]) for k, v in ck.state_dict.items() if v.is_floating_point())


def test_odd_one_out_on_a_vit_with_frame_encoding(video_root, tmp_path):
    hp = {**SMALL["odd_one_out"], "encoding": "frames", "fusion": "concat"}
    out = train(cfg("odd_one_out", video_root, tmp_path / "o.safetensors", arch="vit_tiny_patch16", hp=hp))
    ck = load_checkpoint(out)
    assert ck.metadata["arch"] == "vit_tiny_patch16" and ck.report.missing == [] and ck.report.unexpected == []
    assert math.isfinite(ck.metadata["final_loss"])


def test_cli_video_pretraining_then_evalsuite_run(video_root, tiny_imagefolder, tmp_path, cache_dir):
    """`evalsuite pretrain --dataset video` (short recipe), then the checkpoint evaluated on images."""
    from evalsuite.cli import main

    out = tmp_path / "sal.safetensors"
    rc = main(["pretrain", "--method", "shuffle_learn", "--recipe", "short", "--dataset", "video", "--data-root",
               str(video_root), "--samples-per-video", "3", "--batch-size", "4", "--image-size", "32",
               "--max-steps-per-epoch", "1", "--set", "frame_dim=16", "--set", "tau_max=8", "--out", str(out),
               "--no-progress"])
    assert rc == 0
    meta = load_checkpoint(out).metadata
    assert meta["sampling"]["samples_per_video"] == 3 and meta["hyperparameters"]["tau_min"] == 3
    assert meta["augment"]["sampler"] == "order_tuple" and meta["augment"]["tau_max"] == 8
    rc = main(["run", "--checkpoint", str(out), "--tasks", "centroid", "--protocol", "quick", "--data-root",
               str(tiny_imagefolder), "--set", "centroid.image_size=32", "--out", str(tmp_path / "runs"),
               "--no-progress"])
    assert rc == 0
    records = [json.loads(line) for line in (tmp_path / "runs" / "results.jsonl").read_text().splitlines()]
    assert records and {r["layer"] for r in records} >= {"res5"}


def test_methods_refuse_data_of_another_kind(video_root, tiny_imagefolder, tmp_path):
    with pytest.raises(UserError, match=r"method 'rotnet' trains on images data; --dataset video is video data"):
        Trainer(cfg("rotnet", video_root, tmp_path / "r.safetensors", hp={}))
    with pytest.raises(UserError, match=r"'shuffle_learn' trains on video or egomotion data; --dataset imagefolder "
                                        r"is images data"):
        Trainer(cfg("shuffle_learn", tiny_imagefolder, tmp_path / "s.safetensors", dataset="imagefolder"))
    with pytest.raises(UserError, match="view-gray: the views of slow_features have no colour-distortion step"):
        Trainer(cfg("slow_features", video_root, tmp_path / "g.safetensors", view_gray=1.0))


def test_video_run_resumes_where_it_was_stopped(video_root, tmp_path):
    def stop_at(step):
        def hook(trainer):
            if trainer.global_step >= step:
                raise KeyboardInterrupt
        return hook

    # one step per epoch: stopped in epoch 2 before its save, the run resumes from epoch 1's end state
    kw = dict(epochs=2, max_steps_per_epoch=1, batch_size=2, save_every=1)
    full = Trainer(cfg("slow_features", video_root, tmp_path / "full.safetensors", **kw))
    full.fit()
    cut = cfg("slow_features", video_root, tmp_path / "cut.safetensors", **kw)
    with pytest.raises(KeyboardInterrupt):
        Trainer(cut, on_step=stop_at(2)).fit()
    with pytest.raises(UserError, match=r"samples_per_video=2 \(now 3\)"):
        Trainer(dataclasses.replace(cut, samples_per_video=3)).fit()
    cut.workers = 1  # how it runs may change: examples drawn in a worker process are the same
    seen = []
    resumed = Trainer(cut, on_step=lambda t: seen.append(t.global_step))
    resumed.fit()
    assert seen == [2]  # only the lost step ran again
    assert len(resumed.losses) == len(full.losses) == 2
    assert resumed.losses == pytest.approx(full.losses, rel=1e-5, abs=1e-6)
    a = load_checkpoint(tmp_path / "full.safetensors").state_dict
    b = load_checkpoint(tmp_path / "cut.safetensors").state_dict
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-5) for k in a)
