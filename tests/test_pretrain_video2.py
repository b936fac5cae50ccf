"""Image trunks from video, second set: tracking (Wang & Gupta 2015), motion masks (Pathak et al. 2017), video
colorization (Vondrick et al. 2018) and context prediction on video frames. Losses against hand-written versions,
the motion analysis against known motion, the samplers against the synthetic videos' ground truth (JSON sidecar),
training through the trainer on lossless synthetic video files, checkpoints."""

from __future__ import annotations

import importlib.util
import math
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from evalsuite.checkpoints import load_checkpoint
from evalsuite.data import open_dataset
from pretrain import TrainConfig, train
from pretrain.losses import colour_copy_loss, mask_loss, triplet_ranking_loss
from pretrain.methods.motion_masks import MotionMaskSampler, camera_shift, motion_mask
from pretrain.methods.relative_position import OFFSETS, patch_geometry, position_label
from pretrain.methods.tracking import TrackedPairSampler
from pretrain.methods.video_colorization import ColourCopySampler, fit_colours, quantize_ab
from pretrain.methods.video_context import ContextPairSampler
from pretrain.pretext import normalize_tiles

#: the motion analysis and the trackers are OpenCV's (an optional dependency)
needs_cv2 = pytest.mark.skipif(importlib.util.find_spec("cv2") is None, reason="OpenCV is not installed")

#: small heads and windows that fit the 20-frame, 48 px test videos
SMALL = {
    "tracking": {"track_frames": 4, "dim": 16},
    "motion_masks": {"grid": 2, "bottleneck": 16, "out_size": 8},
    "video_colorization": {"n_ref": 2, "dim": 8, "head_hidden": 16, "kmeans_examples": 4, "kmeans_pixels": 1000,
                           "colours": 8},
    "video_context": {"hidden": 32, "frame_gap": 2},
}


# ---------------------------------------------------------------------------------------------- losses


def hand_rank_hard_loss(feats, labels, margin, neg_num, chosen):
    """RankHardLoss's forward (xiaolonw/caffe-video_triplet rank_hard_loss_layer.cpp) over interleaved pairs,
    with the layer's candidate rule checked and its negatives given by ``chosen`` [pair][patch]."""
    f = [np.asarray(v) / (np.linalg.norm(v) + 1e-12) for v in feats]
    num = len(f)
    dis = [[-float(np.dot(f[i], f[j])) for j in range(num)] for i in range(num)]
    loss = 0.0
    for i in range(0, num, 2):
        for j in range(num):
            if not chosen[i // 2][j]:
                continue
            assert labels[j] != labels[i] and dis[i][i + 1] - dis[i][j] + margin > 0
            loss += max(0.0, dis[i][i + 1] - dis[i][j] + margin) + max(0.0, dis[i][i + 1] - dis[i + 1][j] + margin)
    return loss / (neg_num * num / 2 * 2)


def violating(feats, labels, margin):
    """[pair] -> the layer's candidates: patches of other videos with a positive anchor hinge, hardest first."""
    f = [np.asarray(v) / np.linalg.norm(v) for v in feats]
    out = []
    for i in range(0, len(f), 2):
        cands = [j for j in range(len(f)) if labels[j] != labels[i]
                 and -np.dot(f[i], f[i + 1]) + np.dot(f[i], f[j]) + margin > 0]
        out.append(sorted(cands, key=lambda j: -np.dot(f[i], f[j])))
    return out


def test_triplet_ranking_loss_against_the_caffe_layer():
    rng = np.random.default_rng(0)
    p, d = 6, 5
    anchor, positive = rng.normal(size=(p, d)), rng.normal(size=(p, d))
    positive[0] = anchor[0] + 0.05 * rng.normal(size=d)  # an easy pair: few violating negatives
    videos = np.array([0, 0, 1, 2, 2, 3])
    feats = np.stack([anchor, positive], 1).reshape(2 * p, d)
    labels = np.repeat(videos, 2)
    ta, tp, tv = torch.tensor(anchor), torch.tensor(positive), torch.tensor(videos)
    for margin in (0.5, 1.0):
        cands = violating(feats, labels, margin)
        # every violating negative when there are at most neg_num
        loss, mask = triplet_ranking_loss(ta, tp, tv, margin, neg_num=2 * p)
        assert [sorted(np.flatnonzero(r).tolist()) for r in mask.numpy()] == [sorted(c) for c in cands]
        assert loss.item() == pytest.approx(hand_rank_hard_loss(feats, labels, margin, 2 * p, mask.numpy()), rel=1e-6)
        # hard_ratio 1: the neg_num most similar violating negatives
        loss, mask = triplet_ranking_loss(ta, tp, tv, margin, neg_num=2, hard_ratio=1.0, rand_ratio=0.0)
        assert [sorted(np.flatnonzero(r).tolist()) for r in mask.numpy()] == [sorted(c[:2]) for c in cands]
        assert loss.item() == pytest.approx(hand_rank_hard_loss(feats, labels, margin, 2, mask.numpy()), rel=1e-6)
    # the released prototxt's mix: 2 of the 4 hardest and 2 drawn from the rest, never a same-video patch
    cands = violating(feats, labels, 1.0)
    seen = set()
    for seed in range(20):
        loss, mask = triplet_ranking_loss(ta, tp, tv, 1.0, neg_num=4, hard_ratio=0.5, rand_ratio=0.5,
                                          generator=torch.Generator().manual_seed(seed))
        for c, row in zip(cands, mask.numpy()):
            picked = set(np.flatnonzero(row).tolist())
            assert picked <= set(c) and len(picked) == min(4, len(c))
            assert len(c) <= 4 or len(picked & set(c[:4])) >= 2
        seen.add(tuple(mask.flatten().tolist()))
        assert loss.item() == pytest.approx(hand_rank_hard_loss(feats, labels, 1.0, 4, mask.numpy()), rel=1e-6)
    assert len(seen) > 1  # the draws vary


def test_mask_loss_against_a_hand_written_version():
    rng = np.random.default_rng(1)
    logits, target = rng.normal(size=(3, 4, 5)) * 2, (rng.random((3, 4, 5)) > 0.5).astype(float)
    weight = np.array([1.0, 0.0, 2.0])

    def bce(x, y):
        return -(y * math.log(1 / (1 + math.exp(-x))) + (1 - y) * math.log(1 - 1 / (1 + math.exp(-x))))

    per_example = [np.mean([bce(x, y) for x, y in zip(logits[b].ravel(), target[b].ravel())]) for b in range(3)]
    ours = mask_loss(torch.tensor(logits), torch.tensor(target), torch.tensor(weight)).item()
    assert ours == pytest.approx(np.dot(per_example, weight) / weight.sum(), rel=1e-6)
    assert mask_loss(torch.tensor(logits), torch.tensor(target)).item() == pytest.approx(np.mean(per_example))


def test_colour_copy_loss_against_the_attention_formula():
    rng = np.random.default_rng(2)
    b, n, m, d, k, temp = 2, 5, 7, 3, 4, 0.7
    tgt, ref = rng.normal(size=(b, n, d)), rng.normal(size=(b, m, d))
    ref_c, tgt_c = rng.integers(0, k - 1, size=(b, m)), rng.integers(0, k - 1, size=(b, n))
    tgt_c[0, 0] = k - 1  # a colour no reference pixel has: left out
    total, count, right = 0.0, 0, 0
    for i in range(b):
        for j in range(n):
            s = [np.dot(tgt[i, j], ref[i, q]) / temp for q in range(m)]
            a = np.exp(s - np.max(s))
            a /= a.sum()
            probs = [sum(a[q] for q in range(m) if ref_c[i, q] == c) for c in range(k)]
            right += int(np.argmax(probs) == tgt_c[i, j])
            if probs[tgt_c[i, j]] > 0:
                total, count = total - math.log(probs[tgt_c[i, j]]), count + 1
    loss, logs = colour_copy_loss(torch.tensor(tgt), torch.tensor(ref), torch.tensor(tgt_c), torch.tensor(ref_c), temp)
    assert loss.item() == pytest.approx(total / count, rel=1e-6)
    assert logs["acc"] == pytest.approx(right / (b * n)) and logs["reachable"] == pytest.approx(count / (b * n))


def test_colours_quantised_to_the_nearest_cluster():
    centres = torch.tensor([[0.0, 0.0], [40.0, -10.0], [-30.0, 25.0]])
    points = [(1.0, 2.0), (39.0, -9.0), (-29.0, 21.0), (24.0, -1.0), (-20.0, 14.0), (12.0, -6.0)]  # (a, b)
    expected = [min(range(3), key=lambda c: (a - centres[c, 0]) ** 2 + (b - centres[c, 1]) ** 2) for a, b in points]
    ab = torch.tensor(points).t().reshape(2, 2, 3)  # (2, h, w): the a channel, then b
    assert quantize_ab(ab, centres).flatten().tolist() == expected == [0, 1, 2, 1, 2, 0]
    assert quantize_ab(ab.expand(4, 2, 2, 3), centres).shape == (4, 2, 3)  # any leading dimensions
    # k-means recovers three blobs of ab values, the largest first
    rng = np.random.default_rng(3)
    blobs = [(np.array(c), s) for c, s in (((50.0, 10.0), 300), ((-20.0, -40.0), 200), ((0.0, 60.0), 100))]
    ab = np.concatenate([c + rng.normal(scale=1.0, size=(s, 2)) for c, s in blobs])
    got = fit_colours(ab, 3, seed=0)
    np.testing.assert_allclose(got, [c for c, _ in blobs], atol=0.3)


# ---------------------------------------------------------------------------------------------- motion analysis


def textured(rng, size=48):
    """A blurred random texture (an uneven backdrop the camera can be located on)."""
    import cv2

    return cv2.GaussianBlur(rng.integers(0, 256, (size, size, 3)).astype(np.uint8), (3, 3), 0)


@needs_cv2
def test_camera_translation_is_recovered_and_the_moving_object_segmented():
    import cv2

    rng = np.random.default_rng(4)
    world = textured(rng, 80)
    obj = textured(rng, 14)
    a, b = world[10:58, 10:58].copy(), world[12:60, 7:55].copy()  # the camera moves by (-3, +2): content by (3, -2)
    a[20:34, 10:24] = obj
    b[23:37, 15:29] = obj  # the object moves by (5, 3) in the world, (8, 1) on screen
    assert camera_shift(cv2.cvtColor(a, cv2.COLOR_RGB2GRAY), cv2.cvtColor(b, cv2.COLOR_RGB2GRAY), 5) == (3, -2)
    mask = motion_mask(a, b, flow_threshold=1.0)
    truth = np.zeros(mask.shape, bool)
    truth[20:34, 10:24] = True
    assert (mask & truth).sum() / (mask | truth).sum() > 0.5
    assert mask[:, 30:].mean() < 0.05  # the backdrop, moved by the camera only, stays still


@pytest.fixture(scope="module")
def video_root(tmp_path_factory) -> Path:
    """A data root with ``video/train``: 3 lossless 2 s, 10 fps, 48 px synthetic videos (20 frames each)."""
    from evalsuite.data.synth_video import write_videos

    root = tmp_path_factory.mktemp("videodata2")
    write_videos(root, seed=0, n_train=3, n_val=1, seconds=2.0, size=48, fps=10, codec_name="ffv1")
    return root


def sidecar_box(box) -> list[float]:
    """A sidecar box (1-based inclusive) as [x1, y1, x2, y2) in 0-based pixels."""
    return [box[0] - 1, box[1] - 1, box[2], box[3]]


def overlap(a, b) -> float:
    return max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))


@needs_cv2
def test_tracked_patches_move_with_the_objects(video_root):
    ds = open_dataset("video", video_root / "video", "train")
    sampler = TrackedPairSampler(48, track_frames=5, patch_frac=0.4)
    errors, moves = [], []
    for k in range(12):
        v = k % len(ds)
        s = sampler(ds, v, np.random.default_rng([5, k]))
        (t0, t1), boxes = s["time"].tolist(), s["boxes"].tolist()
        assert s["frames"].shape == (2, 3, 48, 48) and t0 < t1 <= t0 + 5
        frames = ds.clip(v, 0, ds.info(v).num_frames).permute(0, 3, 1, 2).float() / 255
        for patch, t, (x1, y1, x2, y2) in zip(s["frames"], (t0, t1), boxes):  # the file's pixels, resized, mirrored
            want = torch.nn.functional.interpolate(frames[t:t + 1, :, y1:y2, x1:x2], size=(48, 48), mode="bilinear",
                                                   align_corners=False, antialias=True)[0].clamp(0, 1)
            assert min(float((patch - w).abs().max()) for w in (want, want.flip(-1))) < 1e-5
        # the object the first patch covers most moved as the patch did
        objects = [o for o in ds.annotations(v)["objects"] if o["boxes"][t0] and o["boxes"][t1]]
        obj = max(objects, key=lambda o: overlap(boxes[0], sidecar_box(o["boxes"][t0])))
        assert overlap(boxes[0], sidecar_box(obj["boxes"][t0])) > 0
        moved = np.subtract(obj["centres"][t1], obj["centres"][t0])
        shift = np.subtract(boxes[1][:2], boxes[0][:2]) + (np.subtract(boxes[1][2:], boxes[1][:2])
                                                           - np.subtract(boxes[0][2:], boxes[0][:2])) / 2
        errors.append(np.linalg.norm(shift - moved))
        moves.append(np.linalg.norm(moved))
    assert np.median(moves) > 3  # a box left in place would be off by this much
    assert np.median(errors) < 2.0


@needs_cv2
def test_motion_masks_cover_the_moving_objects(video_root):
    ds = open_dataset("video", video_root / "video", "train")
    sampler = MotionMaskSampler(48, flow_gap=2)
    ious = []
    for k in range(12):
        v = k % len(ds)
        s = sampler(ds, v, np.random.default_rng([6, k]))
        t = int(s["time"][0])
        assert s["frames"].shape == (1, 3, 48, 48) and set(s["mask"].unique().tolist()) <= {0.0, 1.0}
        assert int(s["time"][1]) == t + 2
        area = float(s["mask"].mean())
        assert float(s["valid"]) == float(0.01 <= area <= 0.75)
        if not s["valid"]:
            continue
        whole = ds.clip(v, t, 1).permute(0, 3, 1, 2).float() / 255
        assert min(float((s["frames"] - w).abs().max()) for w in (whole, whole.flip(-1))) < 1e-6
        flipped = not torch.allclose(s["frames"], whole)
        truth = np.zeros((48, 48), bool)
        for o in ds.annotations(v)["objects"]:
            if o["boxes"][t]:
                x1, y1, x2, y2 = sidecar_box(o["boxes"][t])
                truth[y1:y2, x1:x2] = True
        mask = s["mask"].numpy().astype(bool)
        mask = mask[:, ::-1] if flipped else mask
        ious.append((mask & truth).sum() / (mask | truth).sum())
    assert len(ious) >= 10 and np.mean(ious) > 0.4 and np.min(ious) > 0.1


def test_colour_copy_sampler_draws_consecutive_frames(video_root):
    ds = open_dataset("video", video_root / "video", "train")
    s = ColourCopySampler(48, n_ref=3, stride=2)(ds, 1, np.random.default_rng(0))
    t = s["time"].tolist()
    assert np.diff(t).tolist() == [2, 2, 2] and t[-1] < ds.info(1).num_frames
    whole = ds.clip(1, 0, ds.info(1).num_frames).permute(0, 3, 1, 2).float() / 255
    torch.testing.assert_close(s["frames"], whole[t])


class RandomVideos:
    """A stand-in reader: video v's frame k is seeded noise, so a patch tells which frame and place it came from."""

    def __init__(self, n_frames: int = 12, size: int = 32):
        self.n, self.size = n_frames, size

    def __len__(self) -> int:
        return 2

    def info(self, v: int):
        return types.SimpleNamespace(num_frames=self.n, path=f"v{v}.mkv")

    def frame(self, v: int, k: int) -> torch.Tensor:
        return torch.from_numpy(np.random.default_rng([v, k]).integers(0, 256, (self.size, self.size, 3),
                                                                       dtype=np.uint8))

    def clip(self, v: int, start: int, num_frames: int, stride: int = 1) -> torch.Tensor:
        return torch.stack([self.frame(v, start + i * stride) for i in range(num_frames)])


@pytest.mark.parametrize("frame_gap", [0, 3])
def test_context_pairs_are_relative_position_pairs_across_frames(frame_gap):
    data = RandomVideos()
    sampler = ContextPairSampler(32, frame_gap=frame_gap, colour="none", crop_scale_min=1.0)
    p, g, j = patch_geometry(32)
    labels = set()
    for k in range(40):
        with torch.random.fork_rng(devices=[]):  # the label and jitter are torch draws, seeded as SampleDataset does
            torch.manual_seed(k)
            s = sampler(data, k % 2, np.random.default_rng([8, k]))
        (t0, t1), label = s["time"].tolist(), int(s["label"])
        assert (t0 == t1) if frame_gap == 0 else 1 <= abs(t1 - t0) <= frame_gap
        (cy, cx), (ny, nx) = s["corners"].tolist()
        assert position_label((cy, cx), (ny, nx)) == label
        for offset, moved in zip(OFFSETS[label], (ny - cy, nx - cx)):  # a cell away along a displaced axis
            assert offset * moved >= p + g - 2 * j if offset else abs(moved) <= 2 * j
        frames = [data.frame(k % 2, t).permute(2, 0, 1).float() / 255 for t in (t0, t1)]
        for flip in (False, True):  # one mirror for both frames
            f0, f1 = (f.flip(-1) if flip else f for f in frames)
            want = normalize_tiles(torch.stack([f0[:, cy:cy + p, cx:cx + p], f1[:, ny:ny + p, nx:nx + p]]))
            if torch.allclose(s["pair"], want, atol=1e-5):
                break
        else:
            pytest.fail("the pair is not the frames' patches at its corners")
        labels.add(label)
    assert labels == set(range(8))


# ---------------------------------------------------------------------------------------------- training


def cfg(method: str, root: Path, out: Path, **kw) -> TrainConfig:
    base = dict(method=method, data_root=str(root), dataset="video", out=str(out), batch_size=4, image_size=32,
                epochs=1, max_steps_per_epoch=1, samples_per_video=2, hp=SMALL[method], progress=False)
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("method,arch", [pytest.param("tracking", "resnet18", marks=needs_cv2),
                                         pytest.param("motion_masks", "resnet18", marks=needs_cv2),
                                         ("video_colorization", "resnet18"), ("video_context", "resnet18"),
                                         pytest.param("motion_masks", "vit_tiny_patch16", marks=needs_cv2),
                                         ("video_colorization", "vit_tiny_patch16")])
def test_method_trains_and_checkpoint_loads(method, arch, video_root, random_init, tmp_path):
    out = train(cfg(method, video_root, tmp_path / f"{method}.safetensors", arch=arch))
    ck = load_checkpoint(out)
    assert ck.report.missing == [] and ck.report.unexpected == []
    meta = ck.metadata
    assert meta["method"] == method and meta["arch"] == arch and meta["data_kind"] == "video" and meta["steps"] == 1
    assert math.isfinite(meta["final_loss"]) and meta["hyperparameters"].items() >= SMALL[method].items()
    if method == "video_colorization":  # a gray trunk, its colour clusters recorded
        assert meta["input_space"] == "gray" and len(meta["colour_clusters"]) == 8
    taps = ck.build_trunk()(torch.zeros(1, 3, 32, 32))
    assert all(torch.isfinite(v).all() for v in taps.values())
    init = random_init(arch)
    assert any(not torch.equal(v, init[k]) for k, v in ck.state_dict.items() if v.is_floating_point())
