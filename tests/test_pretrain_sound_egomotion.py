"""Image trunks learned from sound and ego-motion: the spectrogram, band statistics and losses against hand-written
versions, the samplers against what their references sample, motion binning and classes by hand, and each method
trained through the trainer on real (synthetic, lossless) files into a checkpoint that loads; videos without sound
are refused."""

from __future__ import annotations

import json
import math
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from evalsuite.checkpoints import load_checkpoint
from evalsuite.data import open_dataset
from evalsuite.data.video import relative_pose
from evalsuite.errors import UserError
from pretrain import TrainConfig, Trainer, train
from pretrain.audio import AudioNet, band_envelopes, log_spectrogram, mel_filterbank, sound_statistics, statistics_dim
from pretrain.losses import binned_motion_loss, bit_prediction_loss, equivariance_loss
from pretrain.methods.ambient_sound import envelope_frames, frame_windows, sound_windows
from pretrain.methods.av_correspondence import AVPairSampler
from pretrain.methods.egomotion import MotionPairSampler, motion_bins
from pretrain.methods.egomotion_equivariance import EquivarianceSampler, motion_classes, pair_motions

#: small heads that fit the tiny test data
SMALL = {
    "ambient_sound": {"n_clusters": 3, "window_s": 1.0},
    "av_correspondence": {"audio_width": 4, "fusion_dim": 8},
    "egomotion": {"max_gap": 3, "fc6_dim": 16, "fc7_dim": 16},
    "egomotion_equivariance": {"n_motions": 3, "dim": 8},
}

# ---------------------------------------------------------------------------------------------- sound features


def hann(n: int) -> np.ndarray:
    return 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n) / n)  # periodic


def test_log_spectrogram_against_numpy():
    rng = np.random.default_rng(0)
    wave = rng.normal(size=16000) * np.linspace(0.1, 1, 16000)
    ours = log_spectrogram(torch.tensor(wave, dtype=torch.float32), 16000)
    # 10 ms = 160 samples in a 256-point DFT, hop 80: 1 + (16000 - 256) // 80 frames
    assert ours.shape == (129, 197)
    window = np.zeros(256)
    window[48:208] = hann(160)  # centred in the DFT length
    frames = np.stack([wave[m * 80:m * 80 + 256] * window for m in range(197)], 1)
    db = 10 * np.log10(np.maximum(np.abs(np.fft.rfft(frames, axis=0)) ** 2, 1e-10))
    expected = np.maximum(db - db.max(), -80)
    np.testing.assert_allclose(ours.numpy(), expected, atol=2e-3)
    # a batch keeps its leading dims; L3's 48 kHz setting: 257 bins (n_dft 512)
    assert log_spectrogram(torch.zeros(2, 3, 8000), 16000).shape == (2, 3, 129, 97)
    assert log_spectrogram(torch.randn(48000), 48000).shape == (257, 1 + (48000 - 512) // 240)


def test_mel_filterbank_by_hand():
    bank = mel_filterbank(2, 16, 1600).numpy()  # bins every 100 Hz up to 800 Hz
    mel = lambda f: 2595 * math.log10(1 + f / 700)  # noqa: E731
    hz = [700 * (10 ** (m / 2595) - 1) for m in np.linspace(0, mel(800), 4)]
    assert bank.shape == (2, 9)
    for b in range(2):
        for k, f in enumerate(range(0, 801, 100)):
            lo, c, hi = hz[b], hz[b + 1], hz[b + 2]
            want = (f - lo) / (c - lo) if lo <= f <= c else (hi - f) / (hi - c) if c < f <= hi else 0.0
            assert bank[b, k] == pytest.approx(max(want, 0.0), abs=1e-6)


def test_band_envelopes_put_a_tone_in_its_band():
    t = np.arange(16000) / 16000
    tone = torch.tensor(np.sin(2 * np.pi * 1000 * t), dtype=torch.float32)
    env = band_envelopes(tone, 16000, n_bands=16)
    assert env.shape == (16, 1 + (16000 - 512) // 160)
    mel = lambda f: 2595 * math.log10(1 + f / 700)  # noqa: E731
    centres = [700 * (10 ** (m / 2595) - 1) for m in np.linspace(0, mel(8000), 18)[1:-1]]
    assert int(env.mean(1).argmax()) == int(np.argmin(np.abs(np.array(centres) - 1000)))
    assert float(env.std(1).max()) < 1e-2 * float(env.max())  # a steady tone: flat envelopes


def test_sound_statistics_by_hand():
    rate, n = 100.0, 100
    t = np.arange(n) / rate
    rng = np.random.default_rng(1)
    env = np.stack([1 + 0.5 * np.sin(2 * np.pi * 4 * t),  # all its modulation at 4 Hz
                    2 + 0.3 * np.sin(2 * np.pi * 16 * t) + 0.1 * np.sin(2 * np.pi * 2 * t),
                    np.full(n, 3.0),  # constant: no spread, no correlation, no modulation
                    rng.uniform(0, 1, n)])
    ours = sound_statistics(torch.tensor(env), rate, n_mod=5, mod_low_hz=1.0, corr_offsets=(1, 2, 4)).numpy()
    assert ours.shape == (statistics_dim(4, 5, (1, 2, 4)),) == (4 + 4 + 3 + 2 + 20,)
    mean, std = env.mean(1), env.std(1)
    corr = []
    for o in (1, 2):
        for b in range(4 - o):
            corr.append(0.0 if std[b] == 0 or std[b + o] == 0 else np.corrcoef(env[b], env[b + o])[0, 1])
    mods = np.zeros((4, 5))
    for b in range(4):
        power = np.abs(np.fft.rfft(env[b] - env[b].mean())) ** 2
        freqs = np.arange(len(power)) * rate / n
        if power[1:].sum() > 0:
            for k in range(5):
                inside = (freqs >= 2 ** k) & (freqs < 2 ** (k + 1))
                mods[b, k] = power[inside].sum() / power[1:].sum()
    np.testing.assert_allclose(ours, np.concatenate([mean, std, corr, mods.ravel()]), atol=1e-5)
    assert mods[0, 2] == pytest.approx(1.0) and mods[2].sum() == 0  # 4 Hz lies in the [4, 8) Hz band
    np.testing.assert_allclose(ours[-20:].reshape(4, 5)[1], [0, 0.1 ** 2 / (0.1 ** 2 + 0.3 ** 2), 0, 0,
                                                             0.3 ** 2 / (0.1 ** 2 + 0.3 ** 2)], atol=1e-6)


def test_sound_windows_by_hand():
    np.testing.assert_allclose(sound_windows(3.0, 1.0, 0.5),
                               [[0, 1], [0.25, 1.25], [0.75, 1.75], [1.25, 2.25], [1.75, 2.75], [2, 3]])
    np.testing.assert_allclose(sound_windows(3.0, 3.75, 1.0), [[0, 3]] * 3)  # longer than the track: all of it
    assert frame_windows(30, 10, 0.5, 6).tolist() == [k // 5 for k in range(30)]
    assert frame_windows(12, 4, 1.0, 2).tolist() == [0] * 4 + [1] * 8  # frames past the last window keep it
    # envelope frames m (samples [160 m, 160 m + 512)) inside [0.25 s, 1.25 s] at 16 kHz
    assert envelope_frames(0.25, 1.25, 16000, 512, 160, 1000) == slice(25, 122)
    assert envelope_frames(0.0, 0.01, 16000, 512, 160, 1000) == slice(0, 1)  # too short: the nearest frame


def test_audio_net_is_l3s_audio_subnetwork():
    net = AudioNet(width=2).eval()
    convs = [m for m in net.features if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [2, 2, 4, 4, 8, 8, 16, 16]
    assert all(c.kernel_size == (3, 3) and c.padding == (1, 1) for c in convs)
    spec = torch.randn(2, 1, 129, 197)
    maps = net.features(spec)
    assert maps.shape == (2, 16, 129 // 8, 197 // 8)  # three 2x2 pools
    torch.testing.assert_close(net(spec), maps.flatten(2).max(2).values)  # global max pool
    assert net.out_dim == 16


# ---------------------------------------------------------------------------------------------- losses


def test_bit_prediction_loss_against_a_hand_written_version():
    logits = torch.tensor([[2.0, -1.0, 0.5], [-0.3, 0.0, 4.0]])
    bits = torch.tensor([[1, 0, 0], [1, 1, 1]])
    total = 0.0
    for i in range(2):
        for k in range(3):
            p = 1 / (1 + math.exp(-float(logits[i, k])))
            total -= math.log(p) if bits[i, k] else math.log(1 - p)
    loss, logs = bit_prediction_loss(logits, bits)
    assert loss.item() == pytest.approx(total / 6, rel=1e-6)
    assert logs["bit_acc"] == pytest.approx(3 / 6)  # right: (0,0), (0,1), (1,2)


def test_binned_motion_loss_sums_one_cross_entropy_per_dimension():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(4, 3, 5))
    labels = rng.integers(5, size=(4, 3))
    expected = 0.0
    for d in range(3):
        expected += np.mean([np.log(np.exp(logits[i, d]).sum()) - logits[i, d, labels[i, d]] for i in range(4)])
    ours = binned_motion_loss(torch.tensor(logits), torch.tensor(labels)).item()
    assert ours == pytest.approx(expected, rel=1e-6)


def test_equivariance_loss_against_a_hand_written_version():
    rng = np.random.default_rng(3)
    maps = rng.normal(size=(3, 4, 4)) * 0.5
    src, dst = rng.normal(size=(6, 4)), rng.normal(size=(6, 4))
    dst[1] = maps[2] @ src[1] + 0.01  # an equivariant pair
    motion = np.array([0, 2, 1, 2, 0, 1])
    similar = np.array([1, 1, 0, 0, 1, 0])
    weight = np.array([1.0, 2.0, 1.0, 0.0, 1.0, 1.0])
    for margin in (0.5, 3.0):
        total = 0.0
        for i in range(6):
            d = np.linalg.norm(maps[motion[i]] @ src[i] - dst[i])
            total += weight[i] * (d * d if similar[i] else max(margin - d, 0.0) ** 2) / 2
        ours = equivariance_loss(torch.tensor(src), torch.tensor(dst), torch.tensor(maps), torch.tensor(motion),
                                 torch.tensor(similar), margin, torch.tensor(weight)).item()
        assert ours == pytest.approx(total / weight.sum(), rel=1e-5)
    # identity maps and z(y) = z(x): pulled pairs cost nothing
    eye = torch.eye(4).repeat(2, 1, 1)
    z = torch.tensor(src[:2])
    assert equivariance_loss(z, z, eye, torch.tensor([0, 1]), torch.ones(2)).item() == 0.0


# ---------------------------------------------------------------------------------------------- motion labels


def test_motion_bins_by_hand():
    edges = torch.linspace(-2.0, 2.0, 4)  # n_bins 2, bin size 1 (max_gap 7): -2, -2/3, 2/3, 2
    mean, div = torch.tensor([0.1, 0.0, 0.0]), torch.tensor([0.5, 0.5, 0.2])
    motion = torch.tensor([[0.1 - 1.5, 0.0, -0.4],  # z = -3, 0, -2
                           [0.1 + 0.5, 0.4, 0.5]])  # z = 1, 0.8, 2.5
    assert motion_bins(motion, mean, div, edges).tolist() == [[0, 2, 1], [3, 3, 4]]


def test_motion_classes_and_pairs_by_hand():
    centroids = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [3.0, 3.0]])
    scale = torch.tensor([0.5, 2.0])
    motion = torch.tensor([[0.5, 9.0, 0.0],  # (1, 0): class 1 (left is not clustered)
                           [0.0, 0.0, 1.8],  # (0, 0.9): class 2
                           [0.5, 0.0, 2.0],  # (1, 1): equally near 1 and 2 -> the first
                           [-0.1, 0.0, -0.1]])
    assert motion_classes(motion, scale, centroids).tolist() == [1, 2, 1, 0]
    poses = np.array([[0, 0, 0], [1, 0, 0], [1, 0, math.pi / 2], [1, 2, math.pi / 2], [1, 2, 0]], float)
    got = pair_motions(poses, 2)
    assert got.shape == (2 * (4 + 3), 3)
    want = [relative_pose(poses[a], poses[a + s * k]) for k in (1, 2) for s in (1, -1)
            for a in (range(5 - k) if s > 0 else range(k, 5))]
    np.testing.assert_allclose(sorted(map(tuple, got)), sorted(map(tuple, want)), atol=1e-12)


class PoseVideos:
    """A stand-in ego-motion reader: video v has ``lengths[v]`` frames whose pixels show their index; poses walk
    0.15 m forward or turn 15 degrees per frame."""

    def __init__(self, lengths: list[int], size: int = 8):
        self.lengths, self.size = lengths, size
        self._poses = []
        for v, n in enumerate(lengths):
            rng, p, walk = np.random.default_rng(v), np.zeros(3), []
            for _ in range(n):
                walk.append(p.copy())
                if rng.random() < 0.6:
                    p[:2] += 0.15 * np.array([math.cos(p[2]), math.sin(p[2])])
                else:
                    p[2] += math.radians(15) * rng.choice([-1, 1])
            self._poses.append(np.array(walk))

    def __len__(self) -> int:
        return len(self.lengths)

    def info(self, v: int):
        return types.SimpleNamespace(num_frames=self.lengths[v], path=f"v{v}.mkv")

    def poses(self, v: int) -> np.ndarray:
        return self._poses[v].copy()

    def clip(self, v: int, start: int, num_frames: int, stride: int = 1) -> torch.Tensor:
        out = torch.zeros(num_frames, self.size, self.size, 3, dtype=torch.uint8)
        out[..., 0] = torch.arange(start, start + num_frames * stride, stride, dtype=torch.uint8).view(-1, 1, 1)
        return out


def frame_ids(frames: torch.Tensor) -> list[int]:
    return (frames[..., 0, :, :].mean((-1, -2)) * 255).round().long().flatten().tolist()


def test_motion_pair_sampler_draws_the_references_pairs():
    data, sampler = PoseVideos([20, 9]), MotionPairSampler(8, max_gap=4)
    gaps = []
    for k in range(300):
        v = k % 2
        s = sampler(data, v, np.random.default_rng([5, k]))
        a, b = s["time"].tolist()
        assert frame_ids(s["frames"]) == [a, b] and 0 <= a < data.lengths[v] and 0 <= b < data.lengths[v]
        np.testing.assert_allclose(s["motion"].numpy(), relative_pose(data.poses(v)[a], data.poses(v)[b]), atol=1e-6)
        assert abs(b - a) <= 4
        gaps.append(b - a)
    assert set(gaps) == set(range(-4, 5))  # zero gaps (the reference's round(u * 7) = 0) and both directions


def test_equivariance_sampler_draws_two_partners_near_the_frame():
    data, sampler = PoseVideos([15, 3]), EquivarianceSampler(8, max_gap=2)
    for k in range(200):
        v = k % 2
        s = sampler(data, v, np.random.default_rng([6, k]))
        a, b, c = s["time"].tolist()
        assert frame_ids(s["frames"]) == [a, b, c] and len({a, b, c}) == 3
        assert 1 <= abs(b - a) <= 2 and 1 <= abs(c - a) <= 2
        want = relative_pose(data.poses(v)[[a, a]], data.poses(v)[[b, c]])
        np.testing.assert_allclose(s["motion"].numpy(), want, atol=1e-6)


# ---------------------------------------------------------------------------------------------- AVC sampling


class SoundVideos:
    """A stand-in reader with sound: video v is ``seconds[v]`` long at 10 fps; its audio sample j (at 100 Hz) is
    1000 v + j, so a clip tells its video and start; frame pixels show the frame index."""

    sample_rate, fps, size = 100, 10, 8

    def __init__(self, seconds: list[float]):
        self.seconds = seconds

    def __len__(self) -> int:
        return len(self.seconds)

    def info(self, v: int):
        n = int(self.seconds[v] * self.fps)
        return types.SimpleNamespace(num_frames=n, fps=float(self.fps), duration=n / self.fps, path=f"v{v}.mp4")

    def audio(self, v: int, t0: float, t1: float) -> torch.Tensor:
        first = round(t0 * self.sample_rate)
        return (1000.0 * v + torch.arange(first, round(t1 * self.sample_rate), dtype=torch.float32))[None]

    clip = PoseVideos.clip


def test_av_pairs_positive_same_video_same_time_negative_another_video():
    data = SoundVideos([3.0, 2.0, 4.0])
    sampler = AVPairSampler(8, clip_s=1.0, pos_fraction=0.5)
    labels, sources = [], {0: set(), 1: set(), 2: set()}
    for k in range(600):
        v = k % 3
        s = sampler(data, v, np.random.default_rng([9, k]))
        src, frame = int(s["audio_video"]), int(s["time"])
        first = round(float(s["audio_start"]) * 100)
        start = first / 100
        audio = s["audio"].numpy()
        assert audio.shape == (100,)  # 1 s at the reader's rate
        np.testing.assert_array_equal(audio, 1000 * src + np.arange(first, first + 100))  # the clip said
        assert start + 1.0 <= data.info(src).duration + 1e-9
        assert (src == v) == bool(s["label"])
        assert frame_ids(s["frames"]) == [frame]
        # the frame is drawn within the clip's second (reference: int(start * fps) + randrange(fps)), clamped
        assert int(start * 10) <= frame < int(start * 10) + 10 or frame == data.info(v).num_frames - 1
        labels.append(int(s["label"]))
        if src != v:
            sources[v].add(src)
    assert abs(np.mean(labels) - 0.5) < 0.07
    assert sources == {0: {1, 2}, 1: {0, 2}, 2: {0, 1}}  # negatives from every other video, never its own


# ---------------------------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def video_root(tmp_path_factory) -> Path:
    """``video/train``: 3 lossless 2 s, 10 fps, 32 px synthetic videos with sound."""
    from evalsuite.data.synth_video import write_videos

    root = tmp_path_factory.mktemp("sounddata")
    write_videos(root, seed=0, n_train=3, n_val=1, seconds=2.0, size=32, fps=10, codec_name="ffv1")
    return root


@pytest.fixture(scope="module")
def silent_root(tmp_path_factory) -> Path:
    """``video/train``: 2 lossless videos without an audio stream."""
    from evalsuite.data.synth_video import write_video

    root = tmp_path_factory.mktemp("silent")
    rng = np.random.default_rng(0)
    for k in range(2):
        write_video(root / "video" / "train" / f"mute_{k}.mkv", rng.integers(0, 256, (12, 32, 32, 3), np.uint8), 10,
                    codec_name="ffv1")
    return root


@pytest.fixture(scope="module")
def ego_root(tmp_path_factory) -> Path:
    """``egomotion/train`` in the reader's on-disk format: 3 lossless 14-frame sequences with a ``poses``
    sidecar (a MiniWorld-like walk: 0.15 m steps and 15 degree turns; the frames a noise pattern shifted with
    the pose, so motion shows)."""
    from evalsuite.data.synth_video import write_video

    root = tmp_path_factory.mktemp("ego")
    walk = PoseVideos([14, 14, 14])
    rng = np.random.default_rng(1)
    for v in range(3):
        pattern = rng.integers(0, 256, (32, 96, 3), np.uint8)
        poses = walk.poses(v)
        frames = np.stack([np.roll(pattern, int(40 * p[2] + 20 * p[0]), axis=1)[:, :32] for p in poses])
        stem = root / "egomotion" / "train" / f"seq_{v:05d}"
        write_video(stem.with_suffix(".mkv"), frames, 10, codec_name="ffv1")
        stem.with_suffix(".json").write_text(json.dumps({"poses": poses.tolist()}))
    return root


def cfg(method: str, root: Path, out: Path, dataset: str, **kw) -> TrainConfig:
    base = dict(method=method, data_root=str(root), dataset=dataset, out=str(out), batch_size=4, image_size=32,
                epochs=1, max_steps_per_epoch=1, samples_per_video=4, hp=SMALL[method], progress=False)
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("method,dataset", [("ambient_sound", "video"), ("av_correspondence", "video"),
                                            ("egomotion", "egomotion"), ("egomotion_equivariance", "egomotion")])
def test_method_trains_and_checkpoint_loads(method, dataset, video_root, ego_root, random_init, tmp_path):
    root = video_root if dataset == "video" else ego_root
    out = train(cfg(method, root, tmp_path / f"{method}.safetensors", dataset))
    ck = load_checkpoint(out)
    assert ck.report.missing == [] and ck.report.unexpected == []
    meta = ck.metadata
    assert meta["method"] == method and meta["data_kind"] == dataset and meta["steps"] == 1
    assert all(meta["hyperparameters"][k] == v for k, v in SMALL[method].items())
    assert math.isfinite(meta["final_loss"]) and method in meta  # the method's own record
    taps = ck.build_trunk()(torch.zeros(1, 3, 32, 32))
    assert all(torch.isfinite(v).all() for v in taps.values())
    init = random_init("resnet18")
    assert any(not torch.equal(v, init[k]) for k, v in ck.state_dict.items() if v.is_floating_point())


def test_ambient_sound_targets_follow_the_windows(video_root, tmp_path):
    trainer = Trainer(cfg("ambient_sound", video_root, tmp_path / "a.safetensors", "video",
                          hp={"target": "binary", "n_bits": 4, "window_s": 1.0, "hop_s": 0.5}))
    method = trainer.method
    method.on_train_start(trainer)
    data = trainer.data
    assert method.summary["windows"] == 3 * 4 and method.summary["bits"] == 4  # 2 s videos, a window per 0.5 s
    assert method.targets.shape == (3, 20, 4)
    stats, frames = method.window_statistics(data, 1)
    assert stats.shape == (4, statistics_dim(32, 5, (1, 2, 4, 8))) and frames.tolist() == [k // 5 for k in range(20)]
    for k in range(20):  # every frame carries its window's code
        assert method.targets[1, k].tolist() == method.targets[1, 5 * (k // 5)].tolist()
    # one step of the binary variant through the method
    batch = types.SimpleNamespace(index=torch.tensor([0, 2]), extra={"frames": torch.zeros(2, 3, 32, 32),
                                                                       "time": torch.tensor([3, 17])})
    loss, logs = method.training_step(batch)
    assert math.isfinite(loss.item()) and 0 <= logs["bit_acc"] <= 1


def test_positive_av_clip_is_the_videos_sound(video_root):
    data = open_dataset("video", video_root / "video", "train")
    sampler = AVPairSampler(32, pos_fraction=1.0)
    s = sampler(data, 2, np.random.default_rng(4))
    start = float(s["audio_start"])
    first = round(start * data.sample_rate)
    want = data.audio(2, first / data.sample_rate, (first + data.sample_rate) / data.sample_rate).mean(0)
    torch.testing.assert_close(s["audio"], want)
    assert int(s["label"]) == 1 and int(s["audio_video"]) == 2 and s["audio"].abs().max() > 0.01


def test_videos_without_sound_and_data_of_another_kind_are_refused(silent_root, video_root, ego_root, tmp_path):
    for method in ("ambient_sound", "av_correspondence"):
        with pytest.raises(UserError, match=rf"method '{method}' learns from sound, but 2 of 2 videos in .* have no "
                                            r"audio stream \(first: train/mute_0.mkv\)"):
            train(cfg(method, silent_root, tmp_path / f"{method}.safetensors", "video"))
        with pytest.raises(UserError, match=rf"'{method}' trains on video data; --dataset egomotion is egomotion"):
            Trainer(cfg(method, ego_root, tmp_path / "x.safetensors", "egomotion"))
    for method in ("egomotion", "egomotion_equivariance"):
        with pytest.raises(UserError, match=rf"'{method}' trains on egomotion data; --dataset video is video data"):
            Trainer(cfg(method, video_root, tmp_path / "y.safetensors", "video"))
