"""Video data: the synthetic writer (real containers through PyAV), the reader's random access to frames and
sound, the index, bad files, the samplers, and ego-motion sequences recorded in MiniWorld."""

from __future__ import annotations

import json
import math
from pathlib import Path

import av
import numpy as np
import pytest

from evalsuite.cli import main
from evalsuite.data import open_dataset
from evalsuite.data import video as V
from evalsuite.data.synth_video import class_pitch, codec, render_video, write_egomotion, write_video, write_videos
from evalsuite.data.video import EgoMotion, VideoFolder, relative_pose, sample_clip, sample_pair, sample_tuple
from evalsuite.errors import BadData

RATE = 16000


@pytest.fixture(scope="module")
def one_object(tmp_path_factory) -> dict:
    """Two 3 s single-object videos (a pure 220 Hz tone without tremolo; a 330 Hz square-like tone with a 12 Hz
    tremolo) in H.264 + AAC, and the first again in lossless FFV1 + FLAC."""
    root = tmp_path_factory.mktemp("vids")
    out = {"root": root}
    for name, c, cod in (("a", 0, "h264"), ("b", 7, "h264"), ("a_lossless", 0, "ffv1")):
        frames, audio, truth = render_video([3, c], num_frames=30, size=64, fps=10, sample_rate=RATE, classes=[c])
        path = write_video(root / f"{name}{codec(cod).suffix}", frames, 10, audio, RATE, cod)
        out[name] = (path, frames, audio, truth)
    return out


def test_writer_containers_read_back_with_pyav_and_are_deterministic(tmp_path: Path):
    root = write_videos(tmp_path / "d1", seed=4, n_train=2, n_val=1, seconds=2.0, size=48, fps=8)
    files = sorted(root.rglob("*.mp4"))
    assert [f.relative_to(root).as_posix() for f in files] == ["train/vid_00000.mp4", "train/vid_00001.mp4",
                                                               "val/vid_00000.mp4"]
    for f in files:
        with av.open(str(f)) as c:
            v, a = c.streams.video[0], c.streams.audio[0]
            assert v.codec_context.name in ("h264", "mpeg4") and a.codec_context.name == "aac"
            assert (v.codec_context.width, v.codec_context.height, float(v.average_rate)) == (48, 48, 8.0)
            assert (a.sample_rate, a.channels) == (RATE, 2)
            assert sum(1 for _ in c.decode(video=0)) == 16  # 2 s at 8 fps
        truth = json.loads(f.with_suffix(".json").read_text())
        assert truth["num_frames"] == 16 and all(len(o["boxes"]) == 16 for o in truth["objects"])
        assert 1 <= len(truth["classes"]) <= 3
    again = write_videos(tmp_path / "d2", seed=4, n_train=2, n_val=1, seconds=2.0, size=48, fps=8)
    assert all(f.read_bytes() == (again / f.relative_to(root)).read_bytes() for f in files)
    assert not [p for p in tmp_path.rglob(".*")]  # no temporaries left behind


def test_videos_drawn_from_a_backdrop_pool_share_their_clutter():
    """With a pool, every video's clutter is one of the pool's backdrops, seen through the video's camera offset:
    outside the objects' boxes, frame 0 is that backdrop's crop (to the uint8 rounding)."""
    from evalsuite.data.render import to_uint8
    from evalsuite.data.synth_video import backdrop_pool

    pool = backdrop_pool(seed=0, k=2, size=32)
    assert [b.shape[:2] for b in pool] == [(48, 48)] * 2  # the frame plus the camera's 8 px margin each side
    used = set()
    for k in range(6):
        frames, _, truth = render_video([5, k], num_frames=4, size=32, fps=10, sample_rate=RATE, backdrops=pool)
        ox, oy = truth["camera_offset"][0]
        free = np.ones((32, 32), bool)
        for o in truth["objects"]:  # every pixel an object may cover: its radius around its centre, generously
            cx, cy = o["centres"][0]
            yy, xx = np.mgrid[:32, :32]
            free &= (xx - cx) ** 2 + (yy - cy) ** 2 > (1.6 * o["radius"] + 2) ** 2
        match = [b for b, back in enumerate(pool)
                 if np.array_equal(frames[0][free], to_uint8(back[oy:oy + 32, ox:ox + 32])[free])]
        assert match == [truth["backdrop"]] and free.sum() > 50, (k, match)
        used |= set(match)
    assert used == {0, 1}
    with pytest.raises(ValueError, match="must be 96 px square for 64 px frames"):
        render_video([5, 0], num_frames=2, size=64, fps=10, sample_rate=RATE, backdrops=pool)
    assert "backdrop" not in render_video([5, 0], num_frames=2, size=32, fps=10, sample_rate=RATE)[2]


def test_data_synth_video_backgrounds_flag(tmp_path: Path, capsys):
    common = ["data", "synth", "--kind", "video", "--size", "0.125", "--image-size", "32", "--seconds", "0.5"]
    assert main([*common, "--out", str(tmp_path / "one"), "--backgrounds", "1"]) == 0
    sidecars = sorted((tmp_path / "one" / "video").rglob("*.json"))
    assert len(sidecars) == 3 and {json.loads(p.read_text())["backdrop"] for p in sidecars} == {0}
    assert main([*common, "--out", str(tmp_path / "none"), "--backgrounds", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "evalsuite: error: --backgrounds must be at least 1, got 0"
    assert not (tmp_path / "none").exists()


def test_clip_returns_the_frames_the_writer_drew(one_object: dict):
    ds = VideoFolder(one_object["root"], "all")
    assert ds.ids == ["a.mp4", "a_lossless.mkv", "b.mp4"]
    lossless, lossy = ds.ids.index("a_lossless.mkv"), ds.ids.index("a.mp4")
    frames = one_object["a"][1]
    for start, n, stride in ((0, 30, 1), (21, 3, 4), (13, 1, 1), (29, 1, 1), (2, 10, 3)):
        want = frames[start:start + (n - 1) * stride + 1:stride]
        got = ds.clip(lossless, start, n, stride)
        assert got.dtype.is_floating_point is False and tuple(got.shape) == (n, 64, 64, 3)
        np.testing.assert_array_equal(got.numpy(), want)
        err = np.abs(ds.clip(lossy, start, n, stride).numpy().astype(int) - want).mean()
        # H.264 4:4:4 at crf 18: about 3.5 grey levels on these textures (MPEG-4 part 2, 4:2:0, the fallback: 10)
        assert err < (6 if codec("h264").encoder == "libx264" else 14)
    # consecutive frames are close (smooth motion), frames far apart are not
    near = np.abs(frames[10].astype(int) - frames[11]).mean()
    far = np.abs(frames[0].astype(int) - frames[29]).mean()
    assert near < far / 2
    with pytest.raises(IndexError):
        ds.clip(lossless, 25, 3, 3)
    np.testing.assert_array_equal(np.asarray(ds.load_image(lossless)), frames[15])
    info = ds.info(lossless)
    assert (info.num_frames, info.fps, info.duration, info.has_audio, info.sample_rate) == (30, 10.0, 3.0, True, RATE)


def test_audio_is_on_the_frames_clock(one_object: dict):
    ds = VideoFolder(one_object["root"], "all", channels=2)
    i = ds.ids.index("a_lossless.mkv")
    audio = one_object["a"][2]
    for t0, t1 in ((0.0, 3.0), (1.3, 2.1), (2.95, 3.0)):
        got = ds.audio(i, t0, t1).numpy()
        lo = round(t0 * RATE)
        assert got.shape == (2, round(t1 * RATE) - lo)
        np.testing.assert_allclose(got, audio[:, lo:lo + got.shape[1]], atol=2e-4)  # FLAC of 16-bit samples
    past = ds.audio(i, 2.5, 3.5).numpy()
    assert past.shape == (2, RATE) and np.abs(past[:, RATE // 2:]).max() == 0  # no sound after the end
    # at another rate and downmixed: no delay (the reference is the mono mix taken at every 2nd sample)
    mono = VideoFolder(one_object["root"], "all", sample_rate=8000).audio(i, 1.0, 2.0).numpy()[0]
    assert mono.shape == (8000,)
    assert _lag(mono, audio.mean(0)[16000:32000:2]) == 0


def _lag(x: np.ndarray, ref: np.ndarray, most: int = 12) -> int:
    """The shift (samples, within less than half the tones' period) that best aligns ``x`` to ``ref``."""
    return max(range(-most, most + 1), key=lambda k: float(np.dot(np.roll(x, -k)[most:-most], ref[most:-most])))


def _write_foreign(path: Path, fmt: str, vcodec: str, acodec: str, rate: int, frames: np.ndarray,
                   audio: np.ndarray) -> None:
    """A container our writer does not make, written with PyAV directly (``audio`` at 16 kHz, resampled)."""
    from scipy.signal import resample_poly

    pcm = resample_poly(audio, rate // 1000, 16, axis=1).astype(np.float32) if rate != RATE else audio
    with av.open(str(path), "w", format=fmt) as out:
        vs = out.add_stream(vcodec, rate=10)
        vs.width = vs.height = 64
        vs.pix_fmt = "yuv420p"
        aus = out.add_stream(acodec, rate=rate, layout="stereo")
        for i, f in enumerate(frames):
            fr = av.VideoFrame.from_ndarray(f, format="rgb24").reformat(format="yuv420p")
            fr.pts = i
            out.mux(vs.encode(fr))
        out.mux(vs.encode(None))
        for s in range(0, pcm.shape[1], 960):
            af = av.AudioFrame.from_ndarray(np.ascontiguousarray(pcm[:, s:s + 960]), format="fltp", layout="stereo")
            af.sample_rate, af.pts = rate, s
            out.mux(aus.encode(af))
        out.mux(aus.encode(None))


def test_other_containers_frames_and_sound_in_step(tmp_path: Path, one_object: dict):
    _, frames, audio, _ = one_object["b"]
    _write_foreign(tmp_path / "x.webm", "webm", "libvpx-vp9", "libopus", 48000, frames, audio)  # 1 ms stamps
    _write_foreign(tmp_path / "x.ts", "mpegts", "libx264", "aac", RATE, frames, audio)  # starts at 1.4 s
    ds = VideoFolder(tmp_path, "all")
    assert ds.ids == ["x.ts", "x.webm"] and [v.num_frames for v in ds.videos] == [30, 30]
    assert ds.info(0).start > 0 and ds.info(1).sample_rate == 48000
    for i in range(2):
        for k in (0, 14, 23, 29):
            got = ds.clip(i, k, 1).numpy()[0].astype(int)
            errs = [np.abs(got - frames[j]).mean() for j in range(30)]
            assert int(np.argmin(errs)) == k  # the frame drawn at k, not a neighbour
        got = ds.audio(i, 1.2, 2.2).numpy()[0]
        assert _lag(got, audio.mean(0)[19200:35200]) == 0


def _band(x: np.ndarray, f: float, half: float = 5.0) -> float:
    spec = np.abs(np.fft.rfft(x)) ** 2
    freqs = np.fft.rfftfreq(len(x), 1 / RATE)
    return float(spec[(freqs > f - half) & (freqs < f + half)].sum())


def test_sound_depends_on_the_objects_and_their_speed(one_object: dict):
    ds = VideoFolder(one_object["root"], "all")
    fa, fb = class_pitch(0), class_pitch(7)
    sa = ds.audio(ds.ids.index("a.mp4"), 0.0, 3.0).numpy()[0]
    sb = ds.audio(ds.ids.index("b.mp4"), 0.0, 3.0).numpy()[0]
    assert _band(sa, fa) > 50 * _band(sa, fb) and _band(sb, fb) > 50 * _band(sb, fa)
    assert _band(sb, 3 * fb) > 0.02 * _band(sb, fb) > 100 * _band(sa, 3 * fa)  # odd harmonics vs a pure tone
    # loudness follows the object's speed (the sidecar's, per frame): RMS over each frame's 100 ms
    speeds = np.array(one_object["a"][3]["objects"][0]["speeds"])
    rms = np.sqrt((sa[:30 * RATE // 10].reshape(30, -1) ** 2).mean(1))
    assert speeds.max() > 2 * speeds.min()
    assert np.corrcoef(rms[1:-1], speeds[1:-1])[0, 1] > 0.9


def test_index_cached_beside_the_data_and_refreshed(tmp_path: Path, one_object: dict, monkeypatch):
    src = one_object["a_lossless"][0]
    (tmp_path / "train").mkdir()
    for k in range(2):
        (tmp_path / "train" / f"v{k}.mkv").write_bytes(src.read_bytes())
    ds = VideoFolder(tmp_path, "train")
    index = json.loads((tmp_path / V.INDEX_NAME).read_text())
    assert sorted(index["videos"]) == ["train/v0.mkv", "train/v1.mkv"]
    assert index["videos"]["train/v0.mkv"]["num_frames"] == 30  # Matroska stores no count: packets counted
    fp = ds.fingerprint()

    def no_probe(path):
        raise AssertionError(f"probed {path} again")

    monkeypatch.setattr(V, "probe", no_probe)
    assert VideoFolder(tmp_path, "train").fingerprint() == fp  # from the index
    monkeypatch.undo()
    frames = one_object["a"][1][:12]
    write_video(tmp_path / "train" / "v1.mkv", frames, 5, codec_name="ffv1")  # replaced: probed afresh
    ds = VideoFolder(tmp_path, "train")
    assert [v.num_frames for v in ds.videos] == [30, 12] and not ds.info(1).has_audio
    with pytest.raises(BadData, match="no audio stream"):
        ds.audio(1, 0.0, 1.0)
    assert ds.fingerprint() != fp
    other = VideoFolder(tmp_path, "train", cache_dir=tmp_path / "cache")  # the index elsewhere
    assert other.videos == ds.videos and len(list((tmp_path / "cache").glob("*.json"))) == 1


def test_corrupt_video_is_one_error_line_and_leaves_no_index(tmp_path: Path, capsys):
    assert main(["data", "synth", "--kind", "video", "--out", str(tmp_path), "--size", "0.125", "--seconds", "1",
                 "--image-size", "32"]) == 0
    root = tmp_path / "video"
    assert len(list((root / "train").glob("*.mp4"))) == 2 and len(list((root / "val").glob("*.mp4"))) == 1
    capsys.readouterr()
    assert main(["data", "check", "--kind", "video", "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "video train: " in out and "n=2, frames=20, seconds=2.0, with_audio=2, sizes=32x32, fps=10" in out
    assert out.rstrip().endswith("ok")
    (root / V.INDEX_NAME).unlink()
    victim = root / "train" / "vid_00001.mp4"
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])  # truncated: MP4's index is at the end
    assert main(["data", "check", "--kind", "video", "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert str(victim) in err and len(err.strip().splitlines()) == 1
    assert not (root / V.INDEX_NAME).exists()  # nothing half-written
    assert main(["data", "check", "--kind", "video", "--root", str(tmp_path), "--skip-corrupt"]) == 0
    out = capsys.readouterr().out
    assert "video train: " in out and " n=1, " in out and "skipped 1 corrupt" in out
    (root / "val" / "vid_00000.mp4").write_bytes(b"not a video at all")
    with pytest.raises(BadData, match="unreadable video") as e:
        open_dataset("video", root, "val")
    assert e.value.path == str(root / "val" / "vid_00000.mp4")


def test_samplers_stay_in_bounds_and_cover_them():
    rng = np.random.default_rng(0)
    pairs = [sample_pair(rng, 20, max_gap=4, min_gap=2) for _ in range(2000)]
    gaps = {j - i for i, j in pairs}
    assert gaps == {2, 3, 4} and min(i for i, _ in pairs) == 0 and max(j for _, j in pairs) == 19
    for _ in range(500):
        t = sample_tuple(rng, 30, length=3, max_span=6)
        assert (np.diff(t) > 0).all() and t[-1] - t[0] <= 6 and 0 <= t[0] and t[-1] < 30
        s = sample_tuple(rng, 30, length=4, max_span=10, shuffled=True)
        d = np.diff(s)
        assert len(set(s.tolist())) == 4 and not ((d > 0).all() or (d < 0).all()) and s.max() - s.min() <= 10
        start = sample_clip(rng, 30, length=8, stride=3)
        assert 0 <= start and start + 21 <= 29
    assert sample_clip(np.random.default_rng(1), 30, 8) == sample_clip(np.random.default_rng(1), 30, 8)
    with pytest.raises(ValueError):
        sample_pair(rng, 3, max_gap=5, min_gap=3)
    with pytest.raises(ValueError):
        sample_tuple(rng, 10, length=2, shuffled=True)


def test_relative_pose_by_hand():
    # facing +y (heading pi/2), moving 1 m along +y and turning 0.1 rad left: 1 m forward, nothing sideways
    np.testing.assert_allclose(relative_pose([1, 2, math.pi / 2], [1, 3, math.pi / 2 + 0.1]), [1, 0, 0.1], atol=1e-12)
    # facing +x, moving to (1, 1): 1 forward, 1 to the left; a half turn wraps to -pi
    np.testing.assert_allclose(relative_pose([0, 0, 0], [1, 1, math.pi]), [1, 1, -math.pi], atol=1e-12)
    # facing -y (heading -pi/2), moving +x: that is to the agent's left; turning from 3.0 to -3.0 is +0.283 rad
    np.testing.assert_allclose(relative_pose([0, 0, -math.pi / 2], [2, 0, -math.pi / 2]), [0, 2, 0], atol=1e-12)
    np.testing.assert_allclose(relative_pose([0, 0, 3.0], [0, 0, -3.0])[2], 2 * math.pi - 6.0, atol=1e-12)
    poses = np.array([[0, 0, 0], [1, 0, 0], [1, 0, math.pi / 2], [1, 2, math.pi / 2]])
    np.testing.assert_allclose(relative_pose(poses[:-1], poses[1:]),
                               [[1, 0, 0], [0, 0, math.pi / 2], [2, 0, 0]], atol=1e-12)


def test_egomotion_recorded_in_miniworld(tmp_path: Path, monkeypatch, capsys):
    nav_env = pytest.importorskip("tasks.navigation.env")
    if not nav_env.gl_available():
        pytest.skip("EGL/GL libraries missing")
    frames_seen = []

    def record(env, seeds, length, size):  # the real recorder, keeping what it yields to compare
        for item in nav_env.record_egomotion(env, seeds, length, size):
            frames_seen.append(item)
            yield item

    root = write_egomotion(tmp_path, record, seed=1, n_train=2, n_val=1, length=12, size=32,
                           envs=["miniworld:OneRoom"])
    ds = EgoMotion(root, "train")
    assert len(ds) == 2 and ds.info(0).num_frames == 12
    frames, poses, actions = frames_seen[0]
    np.testing.assert_array_equal(ds.clip(0, 0, 12).numpy(), frames)  # lossless
    np.testing.assert_allclose(ds.poses(0), poses, atol=1e-6)
    # MiniWorld's fixed steps (no domain randomisation): 0.15 m forward, 15 degree turns, never sideways
    step, turn = 0.15, math.radians(15)
    for i in range(len(ds)):
        rel, acts = ds.relative(i), np.array(ds.annotations(i)["actions"])
        assert len(acts) == 11 and set(acts) <= {0, 1, 2}
        np.testing.assert_allclose(rel[acts == 0], np.tile([0, 0, turn], ((acts == 0).sum(), 1)), atol=1e-5)
        np.testing.assert_allclose(rel[acts == 1], np.tile([0, 0, -turn], ((acts == 1).sum(), 1)), atol=1e-5)
        fwd = rel[acts == 2]
        assert np.allclose(fwd[:, 1:], 0, atol=1e-5) and np.all(np.isclose(fwd[:, 0], step, atol=1e-5)
                                                                  | np.isclose(fwd[:, 0], 0, atol=1e-5))
        np.testing.assert_allclose(rel, ds.annotations(i)["relative"], atol=1e-5)
    # the CLI goes through the recorder a plug-in registers; without one, one line says what to install
    import evalsuite.registry as registry

    real = registry.entry_points
    monkeypatch.setattr(registry, "entry_points", lambda group: {} if group == "evalsuite.recorders" else real(group))
    assert main(["data", "synth", "--kind", "egomotion", "--out", str(tmp_path / "x")]) == 2
    assert "no ego-motion recorder" in capsys.readouterr().err
    monkeypatch.setattr("evalsuite.data.cli.egomotion_recorder", lambda: nav_env.record_egomotion)
    assert main(["data", "synth", "--kind", "egomotion", "--out", str(tmp_path / "y"), "--size", "0.125",
                 "--seconds", "0.8", "--image-size", "32", "--env", "OneRoom"]) == 0
    assert main(["data", "check", "--kind", "egomotion", "--root", str(tmp_path / "y")]) == 0
    out = capsys.readouterr().out
    assert "egomotion train: " in out and "n=1, frames=8," in out and "mean_step_m=" in out
    assert out.rstrip().endswith("ok")
