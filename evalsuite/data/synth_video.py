"""Synthetic videos with sound, and ego-motion sequences, written in real containers through PyAV.

Videos: the VOC-like objects of ``synth_voc`` (20 classes, drawn by its ``paint_object``) move smoothly over its
cluttered backdrops (``_background``), with a slowly panning camera; objects pass in front of each other
(occlusion). The sound track depends on the objects: each class has its own pitch (``class_pitch``), its body
shape sets the timbre (harmonics) and its texture a tremolo; each object's loudness grows with its speed and it
is panned by its horizontal position (stereo). A JSON sidecar beside each video holds the ground truth: classes,
per-frame boxes (VOC's 1-based inclusive convention), centres, speeds. Deterministic per seed.

Ego-motion: sequences of simulator frames with the agent's pose, recorded by a navigation plug-in (see
``write_egomotion``), written losslessly (FFV1 in Matroska) with the poses in the sidecar.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..io import atomic_write, atomic_write_json, replace_dir
from .render import TEXTURES, to_uint8
from .synth_voc import BODIES, _background, class_recipe, object_look, paint_object, visible_box, visible_parts
from .video import LAYOUTS, relative_pose
from .voc import VOC_CLASSES

SIDECAR_FORMAT = 1


@dataclass(frozen=True)
class Codec:
    """How a video is encoded: FFmpeg encoder, pixel format, container (format name, suffix), audio encoder."""

    encoder: str
    pix_fmt: str
    container: str
    suffix: str
    audio: str
    options: dict = field(default_factory=dict)


CODECS = {
    # 4:4:4 chroma (High 4:4:4 profile): at 64 px, 4:2:0 blurs the objects' colour textures away (mean error 10
    # grey levels against 3.5). One thread and no macroblock tree: with either, x264's bytes varied between runs.
    "h264": Codec("libx264", "yuv444p", "mp4", ".mp4", "aac",
                  {"crf": "18", "preset": "medium", "threads": "1", "x264-params": "mbtree=0"}),
    # fixed quantiser 3 (ffmpeg's -q:v 3; 118 is FFmpeg's FF_QP2LAMBDA)
    "mpeg4": Codec("mpeg4", "yuv420p", "mp4", ".mp4", "aac",
                   {"flags": "+qscale", "global_quality": str(3 * 118), "threads": "1"}),
    "ffv1": Codec("ffv1", "bgr0", "matroska", ".mkv", "flac", {"threads": "1"}),
}


def codec(name: str) -> Codec:
    """The named codec; ``h264`` falls back to MPEG-4 part 2 when PyAV's FFmpeg has no libx264."""
    import av

    if name not in CODECS:
        raise UserError(f"unknown video codec {name!r}; known: {', '.join(CODECS)}")
    c = CODECS[name]
    try:
        av.codec.Codec(c.encoder, "w")
    except av.codec.codec.UnknownCodecError:
        if name == "h264":
            return codec("mpeg4")
        raise UserError(f"PyAV's FFmpeg has no {c.encoder} encoder") from None
    return c


def write_video(path: str | Path, frames: np.ndarray, fps: int, audio: np.ndarray | None = None,
                sample_rate: int = 0, codec_name: str = "h264") -> Path:
    """Encode ``frames`` (uint8 (T, H, W, 3)) at ``fps`` and, if given, ``audio`` (float32 (channels, samples) in
    [-1, 1], 1 or 2 channels, at ``sample_rate``) into one container; atomic (a temporary file renamed into place).
    The path's suffix should be the codec's (``CODECS[name].suffix``)."""
    import av

    c = codec(codec_name)
    t, h, w, _ = frames.shape
    if c.pix_fmt == "yuv420p" and (h % 2 or w % 2):
        raise UserError(f"{c.encoder} in {c.pix_fmt} needs even frame sides, got {w}x{h}")

    def write(tmp: Path) -> None:
        # bitexact: no random segment id or wall-clock date in the header (Matroska), so same input -> same bytes
        with av.open(str(tmp), "w", format=c.container, container_options={"fflags": "+bitexact"}) as out:
            vs = out.add_stream(c.encoder, rate=fps, options=dict(c.options))
            vs.width, vs.height, vs.pix_fmt = w, h, c.pix_fmt
            vs.codec_context.gop_size = fps  # a key frame every second: random access decodes at most 1 s
            streams = [vs]
            if audio is not None:
                layout = LAYOUTS[audio.shape[0]]
                aus = out.add_stream(c.audio, rate=sample_rate, layout=layout)
                streams.append(aus)
            for i in range(t):
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frames[i]), format="rgb24")
                frame = frame.reformat(format=c.pix_fmt)
                frame.pts = i
                out.mux(vs.encode(frame))
            if audio is not None:
                step = 1024  # PyAV re-chunks to the encoder's frame size and converts the sample format
                pcm = np.ascontiguousarray(audio, dtype=np.float32)
                for s in range(0, pcm.shape[1], step):
                    af = av.AudioFrame.from_ndarray(np.ascontiguousarray(pcm[:, s:s + step]), format="fltp",
                                                    layout=layout)
                    af.sample_rate, af.pts = sample_rate, s
                    out.mux(aus.encode(af))
            for s in streams:
                out.mux(s.encode(None))

    return atomic_write(path, write)


# ----------------------------------------------------------------------------- sound design

TIMBRES = {  # harmonic amplitudes (1st, 2nd, ...) per body shape
    "disc": (1.0,),  # pure tone
    "square": (1.0, 0.0, 1 / 3, 0.0, 1 / 5),  # odd harmonics (square-like)
    "triangle": (1.0, 1 / 2, 1 / 3, 1 / 4, 1 / 5, 1 / 6),  # all harmonics (saw-like)
    "star": (1.0, 0.8, 0.0, 0.6, 0.0, 0.0, 0.0, 0.4),  # octaves (bright, hollow)
    "cross": (1.0, 0.0, 1 / 9, 0.0, 1 / 25),  # odd harmonics falling fast (triangle-like, soft)
}
TREMOLO_HZ = {"stripes": 0.0, "checker": 4.0, "dots": 8.0, "rings": 12.0}  # amplitude modulation per texture
assert set(TIMBRES) == set(BODIES) and set(TREMOLO_HZ) == set(TEXTURES)


def class_pitch(c: int) -> float:
    """Fundamental frequency (Hz) of class ``c``: one semitone per class from 220 Hz (A3) up."""
    return 220.0 * 2.0 ** (c / 12.0)


def object_sound(c: int, gain: np.ndarray, pan: np.ndarray, sample_rate: int, phase: float = 0.0) -> np.ndarray:
    """Stereo float32 (2, S) sound of one object of class ``c``; ``gain`` and ``pan`` (0 left .. 1 right) are
    given per sample. Harmonics are normalised to unit power so every class is equally loud at equal gain."""
    body, tex, _ = class_recipe(c)
    t = np.arange(len(gain)) / sample_rate
    f0 = class_pitch(c)
    amps = np.asarray(TIMBRES[body], np.float64)
    wave = sum(a * np.sin(2 * np.pi * (k + 1) * f0 * t + (k + 1) * phase) for k, a in enumerate(amps) if a)
    wave = wave * math.sqrt(2.0 / float((amps ** 2).sum()))  # RMS 1 before the envelope
    rate = TREMOLO_HZ[tex]
    if rate:
        wave = wave * (1.0 - 0.4 * (1.0 - np.cos(2 * np.pi * rate * t)) / 2)
    mono = wave * gain
    return np.stack([mono * np.cos(pan * np.pi / 2), mono * np.sin(pan * np.pi / 2)]).astype(np.float32)


# ----------------------------------------------------------------------------- videos

SPEED_RANGE = (0.1, 0.4)  # mean object speed, in frame sides per second
LOUD_SPEED = 0.7  # speed (sides per second) at which an object is at full loudness
OBJECT_GAIN = 0.25  # peak amplitude of one object (three at full speed stay within [-1, 1])


def render_video(seed: int | Sequence[int], num_frames: int = 30, size: int = 64, fps: int = 10,
                 sample_rate: int = 16000, classes: Sequence[int] | None = None,
                 backdrops: Sequence[np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """One video: frames uint8 (T, size, size, 3), stereo audio float32 (2, T * sample_rate / fps) and its ground
    truth (the sidecar's content). ``classes`` fixes the objects' classes (default: 1-3 distinct at random; the
    first is drawn at the back). ``backdrops``: a pool (:func:`backdrop_pool`) the video draws its backdrop from,
    instead of clutter of its own."""
    rng = np.random.default_rng(seed)
    if classes is None:
        n = int(rng.choice([1, 2, 3], p=[0.4, 0.35, 0.25]))
        classes = [int(c) for c in rng.choice(len(VOC_CLASSES), size=n, replace=False)]
    margin = size // 4
    if backdrops is None:
        pooled, backdrop = None, _background(rng, size + 2 * margin, size + 2 * margin)
    else:
        pooled = int(rng.integers(len(backdrops)))
        backdrop = backdrops[pooled]
        if backdrop.shape[:2] != (size + 2 * margin, size + 2 * margin):
            raise ValueError(f"backdrops must be {size + 2 * margin} px square for {size} px frames")
    # camera: a slow elliptical pan over the larger backdrop (integer offsets: the backdrop stays crisp)
    pan_period, pan_phase = rng.uniform(4.0, 8.0), rng.uniform(0, 2 * math.pi)
    times = np.arange(num_frames) / fps
    cam = np.stack([margin + np.rint(margin * 0.8 * np.cos(2 * np.pi * times / pan_period + pan_phase)),
                    margin + np.rint(margin * 0.8 * np.sin(2 * np.pi * times / pan_period + pan_phase))], 1)
    cam = cam.astype(int)

    objects = []
    for c in classes:
        r = rng.uniform(0.14, 0.24) * size
        pos = rng.uniform(0.2 * size, 0.8 * size, 2)
        heading, turn = rng.uniform(0, 2 * math.pi), rng.uniform(-0.6, 0.6)  # rad, rad/s
        v0 = rng.uniform(*SPEED_RANGE) * size  # px/s, modulated by a slow sine so loudness changes
        v_period, v_phase = rng.uniform(1.5, 4.0), rng.uniform(0, 2 * math.pi)
        angle, spin = rng.uniform(-0.45, 0.45), rng.uniform(-0.5, 0.5)
        look = object_look(rng, r)
        centres, speeds, angles = [], [], []
        lo, hi = 0.6 * r, size - 0.6 * r
        for t in times:
            centres.append(pos.copy())
            speed = v0 * (1 + 0.8 * math.sin(2 * math.pi * t / v_period + v_phase))
            speeds.append(speed)
            angles.append(angle + spin * t)
            velocity = speed * np.array([math.cos(heading), math.sin(heading)])
            pos = pos + velocity / fps
            for k in range(2):  # bounce off the frame's inner margin
                if pos[k] < lo or pos[k] > hi:
                    pos[k] = 2 * lo - pos[k] if pos[k] < lo else 2 * hi - pos[k]
                    velocity[k] = -velocity[k]
            heading = math.atan2(velocity[1], velocity[0]) + turn / fps
        objects.append({"class": VOC_CLASSES[c], "class_index": int(c), "pitch_hz": round(class_pitch(c), 3),
                        "radius": round(float(r), 3), "look": look, "centres": np.array(centres),
                        "speeds": np.array(speeds), "angles": np.array(angles), "phase": rng.uniform(0, 2 * math.pi)})

    frames = np.empty((num_frames, size, size, 3), np.uint8)
    boxes = [[] for _ in objects]
    visible = [[] for _ in objects]
    for i in range(num_frames):
        ox, oy = cam[i]
        img = backdrop[oy:oy + size, ox:ox + size].copy()
        masks = []
        for o in objects:
            (cx, cy), angle = o["centres"][i], o["angles"][i]
            inside, _ = paint_object(img, o["class_index"], cx, cy, o["radius"], angle, o["look"])
            masks.append(inside)
        for k, vis in enumerate(visible_parts(masks)):
            n_vis = int(vis.sum())
            boxes[k].append(list(visible_box(vis)) if n_vis >= 12 else None)
            visible[k].append(round(n_vis / max(1, int(masks[k].sum())), 4))
        frames[i] = to_uint8(img)

    n_samples = int(round(num_frames * sample_rate / fps))
    ts = np.arange(n_samples) / sample_rate
    audio = rng.normal(0, 0.002, size=(2, n_samples))  # faint hiss: never digital silence
    for o in objects:
        loud = 0.1 + 0.9 * np.minimum(1.0, o["speeds"] / (LOUD_SPEED * size))
        gain = OBJECT_GAIN * np.interp(ts, times, loud)
        pan = np.interp(ts, times, np.clip(o["centres"][:, 0] / size, 0, 1))
        audio += object_sound(o["class_index"], gain, pan, sample_rate, o["phase"])

    truth = {
        "format": SIDECAR_FORMAT, "fps": fps, "num_frames": num_frames, "width": size, "height": size,
        "sample_rate": sample_rate, "audio_channels": 2, "classes": [o["class"] for o in objects],
        "box_convention": "x1, y1, x2, y2 of the visible pixels, 1-based inclusive (VOC); null when < 12 px visible",
        "camera_offset": cam.tolist(), **({} if pooled is None else {"backdrop": pooled}),
        "objects": [{"class": o["class"], "class_index": o["class_index"], "pitch_hz": o["pitch_hz"],
                     "timbre": class_recipe(o["class_index"])[0], "tremolo_hz": TREMOLO_HZ[class_recipe(
                         o["class_index"])[1]], "radius": o["radius"], "boxes": boxes[k], "visible": visible[k],
                     "centres": np.round(o["centres"], 3).tolist(), "speeds": np.round(o["speeds"], 3).tolist(),
                     "angles": np.round(o["angles"], 4).tolist()} for k, o in enumerate(objects)],
    }
    return frames, np.clip(audio, -1, 1).astype(np.float32), truth


def backdrop_pool(seed: int, k: int, size: int) -> list[np.ndarray]:
    """``k`` cluttered backdrops for ``size`` px frames (each larger by the camera's pan margin on every side)."""
    if k < 1:
        raise UserError(f"a backdrop pool needs at least 1 backdrop, got {k}")
    side = size + 2 * (size // 4)
    return [_background(np.random.default_rng([seed, 23, b]), side, side) for b in range(int(k))]


def write_videos(root: str | Path, seed: int = 0, scale: float = 1.0, n_train: int = 12, n_val: int = 4,
                 seconds: float = 3.0, size: int = 64, fps: int = 10, sample_rate: int = 16000,
                 codec_name: str = "h264", backgrounds: int | None = None) -> Path:
    """``root/video/{train,val}/vid_NNNNN.<mp4|mkv>`` each with a ``.json`` sidecar; returns ``root/video``.
    ``scale`` multiplies the number of videos. ``backgrounds``: None gives every video its own clutter; ``k``
    draws each video's backdrop from one pool of ``k`` shared by all videos and splits, so that the backdrop
    identifies no video (as ``write_object_imagefolder``'s studio set does for images). Deterministic per seed
    (byte-identical files with the same PyAV)."""
    target = Path(root) / "video"
    suffix = codec(codec_name).suffix
    num_frames = max(2, int(round(seconds * fps)))
    counts = {"train": max(1, round(n_train * scale)), "val": max(1, round(n_val * scale))}
    pool = None if backgrounds is None else backdrop_pool(seed, backgrounds, size)
    with replace_dir(target) as tmp:
        for s_i, (split, n) in enumerate(counts.items()):
            for k in range(n):
                frames, audio, truth = render_video([seed, 21, s_i, k], num_frames, size, fps, sample_rate,
                                                    backdrops=pool)
                stem = tmp / split / f"vid_{k:05d}"
                write_video(stem.with_suffix(suffix), frames, fps, audio, sample_rate, codec_name)
                atomic_write_json(stem.with_suffix(".json"), truth, indent=1)
    return target


# ----------------------------------------------------------------------------- ego-motion

#: ``record(env, seeds, length, image_size)`` yields, per seed, frames uint8 (T, H, W, 3), poses float (T, 3) as
#: (x, y, heading) and the T - 1 actions taken (the navigation plug-in's ``record_egomotion``)
Recorder = Callable[[str, Sequence[int], int, int], Iterable[tuple[np.ndarray, np.ndarray, list[int]]]]

EGOMOTION_ENVS = ("miniworld:OneRoom", "miniworld:FourRooms", "miniworld:TMaze", "miniworld:Maze")
POSE_CONVENTION = ("pose = (x, y, heading): ground-plane position in metres (right-handed, y = -z of the "
                   "simulator's y-up frame) and heading in radians counter-clockwise from +x, wrapped to [-pi, pi); "
                   "relative[t] = (forward, left, turn) of pose t+1 in the camera frame of pose t")


def write_egomotion(root: str | Path, record: Recorder, seed: int = 0, scale: float = 1.0, n_train: int = 8,
                    n_val: int = 2, length: int = 30, size: int = 64, envs: Sequence[str] = EGOMOTION_ENVS,
                    fps: int = 10) -> Path:
    """``root/egomotion/{train,val}/seq_NNNNN.mkv`` (lossless FFV1, one frame per simulator step, nominally at
    ``fps``) each with a ``.json`` sidecar holding the poses, the relative motions and the actions; returns
    ``root/egomotion``. Sequence k of a split is recorded in ``envs[k % len(envs)]`` from seed (seed, split, k)."""
    target = Path(root) / "egomotion"
    counts = {"train": max(1, round(n_train * scale)), "val": max(1, round(n_val * scale))}
    with replace_dir(target) as tmp:
        for s_i, (split, n) in enumerate(counts.items()):
            for e_i, env in enumerate(envs):
                ks = list(range(e_i, n, len(envs)))
                seeds = [int(np.random.default_rng([seed, 23, s_i, k]).integers(2 ** 31)) for k in ks]
                for k, sd, (frames, poses, actions) in zip(ks, seeds, record(env, seeds, length, size)):
                    poses = np.asarray(poses, np.float64)
                    stem = tmp / split / f"seq_{k:05d}"
                    write_video(stem.with_suffix(".mkv"), frames, fps, codec_name="ffv1")
                    atomic_write_json(stem.with_suffix(".json"), {
                        "format": SIDECAR_FORMAT, "env": env, "seed": sd, "fps": fps, "num_frames": len(frames),
                        "pose_convention": POSE_CONVENTION, "poses": np.round(poses, 6).tolist(),
                        "relative": np.round(relative_pose(poses[:-1], poses[1:]), 6).tolist(),
                        "actions": [int(a) for a in actions]}, indent=1)
    return target
