"""Videos with optional sound, and ego-motion sequences: a folder of video files read through PyAV (FFmpeg).

Any container and codec FFmpeg decodes is read (``.mp4``, ``.mkv``, ``.avi``, ``.webm``, ...). Opening a folder
builds an index of its videos (frame count, frame rate, size, audio) once and caches it (see
:class:`VideoFolder`); training then reads at random: ``clip(i, start, num_frames, stride)`` and
``audio(i, t0, t1)``. Frame ``k`` of a video is the frame on screen ``k / fps`` seconds after its first frame
(a constant frame rate is assumed; a variable-rate video is sampled at those times); audio times are on the same
clock, so ``audio(i, k / fps, (k + n) / fps)`` is the sound of frames ``k .. k + n - 1``.
``sample_pair`` / ``sample_tuple`` / ``sample_clip`` draw frame indices for training (pure functions).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..console import warn
from ..errors import BadData, UserError
from ..io import atomic_write_json
from .base import ImageDataset

VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".ogv", ".flv", ".wmv", ".ts",
                  ".3gp")
INDEX_FORMAT = 1
INDEX_NAME = ".evalsuite-video-index.json"
LAYOUTS = {1: "mono", 2: "stereo"}


@dataclass(frozen=True)
class VideoInfo:
    """One video of the index. ``start`` is the first frame's time in the file (seconds): the origin of frame
    and audio times. ``sample_rate`` / ``audio_channels`` are the file's own (0 without audio)."""

    path: str  # relative to the dataset root
    size: int
    mtime_ns: int
    num_frames: int
    fps: float
    width: int
    height: int
    start: float
    has_audio: bool
    sample_rate: int
    audio_channels: int

    @property
    def duration(self) -> float:
        return self.num_frames / self.fps


_FIELDS = set(VideoInfo.__dataclass_fields__)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


@contextmanager
def open_container(path: Path) -> Iterator[Any]:
    """``av.open`` for reading; a missing or unreadable file raises BadData naming it."""
    import av

    if not path.is_file():
        raise BadData("video file not found", path)
    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError, ValueError) as e:
        raise BadData(f"unreadable video ({_first_line(e)})", path) from None
    try:
        yield container
    finally:
        container.close()


def probe(path: Path) -> dict[str, Any]:
    """The index fields of one file (all but path, size, mtime); BadData when it has no decodable video stream.
    The frame count is the container's, or the number of video packets when the container does not store it."""
    import av

    with open_container(path) as c:
        try:
            if not c.streams.video:
                raise BadData("no video stream", path)
            v = c.streams.video[0]
            rate = v.average_rate or v.guessed_rate or v.base_rate
            if not rate or not v.codec_context.width or not v.codec_context.height:
                raise BadData("video stream without frame rate or size", path)
            n = int(v.frames or 0)
            if n <= 0:
                n = sum(1 for p in c.demux(v) if p.size)
            if n <= 0:
                raise BadData("video stream has no frames", path)
            a = c.streams.audio[0] if c.streams.audio else None
            return {"num_frames": n, "fps": float(rate), "width": int(v.codec_context.width),
                    "height": int(v.codec_context.height),
                    "start": float(v.start_time * v.time_base) if v.start_time is not None else 0.0,
                    "has_audio": a is not None, "sample_rate": int(a.sample_rate) if a else 0,
                    "audio_channels": int(a.channels) if a else 0}
        except av.FFmpegError as e:
            raise BadData(f"unreadable video ({_first_line(e)})", path) from None


def index_path(root: Path, cache_dir: str | Path | None) -> Path:
    """Where the index of ``root`` lives: beside the data when that folder is writable, else in ``cache_dir``
    (default ``$XDG_CACHE_HOME/evalsuite/video-index``) under a hash of the folder's absolute path."""
    if cache_dir is None and os.access(root, os.W_OK):
        return root / INDEX_NAME
    if cache_dir is None:
        cache_dir = Path(os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache"))) / "evalsuite" / "video-index"
    key = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:16]
    return Path(cache_dir) / f"{key}.json"


def build_index(root: Path, files: list[Path], where: Path, skip_corrupt: bool = False
                ) -> tuple[list[VideoInfo], list[tuple[str, str]]]:
    """The index entries of ``files`` (paths under ``root``): reused from ``where`` when a file's size and mtime
    match, probed otherwise; ``where`` is rewritten (atomically) only when every probe succeeded and something
    changed. A file that cannot be probed raises BadData, or with ``skip_corrupt`` is left out and returned."""
    cached: dict[str, dict] = {}
    try:
        saved = json.loads(where.read_text())
        if saved.get("format") == INDEX_FORMAT and isinstance(saved.get("videos"), dict):
            cached = saved["videos"]
    except (OSError, ValueError, AttributeError):
        cached = {}  # no index yet, or an unreadable one: rebuilt
    infos, skipped, changed = [], [], False
    for f in files:
        rel, st = f.relative_to(root).as_posix(), f.stat()
        entry = cached.get(rel)
        fresh = (isinstance(entry, dict) and set(entry) == _FIELDS and entry["size"] == st.st_size
                 and entry["mtime_ns"] == st.st_mtime_ns)
        if not fresh:
            try:
                entry = {"path": rel, "size": st.st_size, "mtime_ns": st.st_mtime_ns, **probe(f)}
            except BadData as e:
                if not skip_corrupt:
                    raise
                skipped.append((str(f), e.message))
                continue
            cached[rel], changed = entry, True
        infos.append(VideoInfo(**entry))
    if changed:
        try:
            atomic_write_json(where, {"format": INDEX_FORMAT, "videos": cached}, indent=0)
        except OSError as e:  # a read-only cache: the index is rebuilt next time
            warn(f"cannot write the video index {where} ({_first_line(e)})")
    return infos, skipped


class VideoFolder(ImageDataset):
    """Every video file under ``ROOT/<split>/`` (any depth, sorted by path; ``split="all"``: under ``ROOT``).

    A video ``x.mp4`` may have a JSON sidecar ``x.json`` (``annotations(i)``; the synthetic writer's ground
    truth). ``sample_rate`` / ``channels`` fix the audio that ``audio()`` returns (resampled, down- or up-mixed).
    The index is kept in ``ROOT/.evalsuite-video-index.json`` (or in ``cache_dir``); ``skip_corrupt`` leaves out
    files that cannot be opened (listed in ``skipped``) instead of failing. As an image dataset (``load_image``)
    each video is its middle frame.
    """

    kind = "video"

    def __init__(self, root: str | Path, split: str = "train", sample_rate: int = 16000, channels: int = 1,
                 cache_dir: str | Path | None = None, skip_corrupt: bool = False):
        super().__init__(root, split)
        if channels not in LAYOUTS:
            raise UserError(f"audio channels must be 1 or 2, got {channels}")
        if sample_rate <= 0:
            raise UserError(f"audio sample rate must be positive, got {sample_rate}")
        self.sample_rate, self.channels = int(sample_rate), int(channels)
        if not self.root.is_dir():
            raise BadData("video folder not found", self.root)
        if (self.root / split).is_dir():
            folder = self.root / split
        elif split == "all":
            folder = self.root
        else:
            raise BadData(f"split folder {split!r} not found (split 'all' reads every video under the root)",
                          self.root / split)
        files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES and p.is_file()
                       and not any(part.startswith(".") for part in p.relative_to(folder).parts))
        if not files:
            raise BadData(f"no video files ({', '.join(VIDEO_SUFFIXES)})", folder)
        self.folder = folder
        self.videos, self.skipped = build_index(self.root, files, index_path(self.root, cache_dir), skip_corrupt)
        if self.skipped:
            warn(f"skipped {len(self.skipped)} unreadable video(s) in {folder} (first: {self.skipped[0][0]}: "
                 f"{self.skipped[0][1]})")
        if not self.videos:
            raise BadData("no readable video files", folder)

    def __len__(self) -> int:
        return len(self.videos)

    def image_path(self, i: int) -> Path:
        return self.root / self.videos[i].path

    @property
    def ids(self) -> list[str]:
        return [v.path for v in self.videos]

    def info(self, i: int) -> VideoInfo:
        return self.videos[i]

    def load_image(self, i: int) -> Image.Image:
        """The middle frame of video ``i``."""
        return Image.fromarray(self.clip(i, self.videos[i].num_frames // 2, 1)[0].numpy())

    def annotations(self, i: int) -> dict | None:
        """The video's JSON sidecar (same name, ``.json``), or None when it has none."""
        path = self.image_path(i).with_suffix(".json")
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise BadData(f"unreadable JSON sidecar ({_first_line(e)})", path) from None

    # ------------------------------------------------------------------------- frames

    def clip(self, i: int, start: int, num_frames: int, stride: int = 1):
        """Frames ``start, start + stride, ...`` (``num_frames`` of them) of video ``i`` as a uint8 tensor
        (T, H, W, 3), RGB at the index's size. Seeks to the key frame before ``start`` and decodes from there."""
        import av
        import torch

        info = self.videos[i]
        last = start + (num_frames - 1) * stride
        if num_frames < 1 or stride < 1 or start < 0 or last >= info.num_frames:
            raise IndexError(f"clip start={start} num_frames={num_frames} stride={stride} outside the "
                             f"{info.num_frames} frames of {info.path}")
        wanted = list(range(start, last + 1, stride))
        path = self.image_path(i)
        out = np.empty((num_frames, info.height, info.width, 3), np.uint8)
        try:
            got = _decode_at(path, info, wanted, out)
        except av.FFmpegError as e:
            raise BadData(f"cannot decode frames {start}..{last} ({_first_line(e)})", path) from None
        if got == 0:
            raise BadData(f"no frame decoded at frames {start}..{last} (truncated file?)", path)
        return torch.from_numpy(out)

    # ------------------------------------------------------------------------- sound

    def audio(self, i: int, t0: float, t1: float):
        """The sound of video ``i`` from ``t0`` to ``t1`` seconds (the frames' clock) as float32 (channels,
        samples) at ``sample_rate``: ``round(t1 * rate) - round(t0 * rate)`` samples, zeros where the file has
        no sound (before its audio starts, after it ends). BadData if the video has no audio stream."""
        import av
        import torch

        info = self.videos[i]
        path = self.image_path(i)
        if not info.has_audio:
            raise BadData("video has no audio stream", path)
        if t0 < 0 or t1 < t0:
            raise IndexError(f"audio interval [{t0}, {t1}] of {info.path} is empty or negative")
        rate = self.sample_rate
        first = round(t0 * rate)
        out = np.zeros((self.channels, round(t1 * rate) - first), np.float32)
        try:
            pcm, origin, src = _decode_audio(path, info.start + t0, info.start + t1, self.channels)
        except av.FFmpegError as e:
            raise BadData(f"cannot decode audio {t0:.3f}..{t1:.3f} s ({_first_line(e)})", path) from None
        pcm = _resample(pcm, src, rate)
        offset = round((info.start - origin) * rate) + first  # where out[:, 0] is in pcm
        lo, hi = max(offset, 0), min(offset + out.shape[1], pcm.shape[1])
        if hi > lo:
            out[:, lo - offset:hi - offset] = pcm[:, lo:hi]
        return torch.from_numpy(out)

    # ------------------------------------------------------------------------- checks

    def check(self, i: int) -> dict[str, int]:
        """Decode every frame and every audio sample of video ``i``; BadData naming the file if any fails or the
        file holds fewer frames than the index says. Returns the decoded counts."""
        import av

        info, path = self.videos[i], self.image_path(i)
        frames = samples = 0
        with open_container(path) as c:
            streams = [c.streams.video[0], *c.streams.audio[:1]]
            try:
                for packet in c.demux(*streams):
                    for f in packet.decode():
                        if packet.stream is streams[0]:
                            frames += 1
                        else:
                            samples += f.samples
            except av.FFmpegError as e:
                raise BadData(f"cannot decode ({_first_line(e)})", path) from None
        if frames < info.num_frames:
            raise BadData(f"decoded {frames} of {info.num_frames} frames (truncated file?)", path)
        return {"frames": frames, "audio_samples": samples}

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d["frames"] = sum(v.num_frames for v in self.videos)
        d["seconds"] = round(sum(v.duration for v in self.videos), 2)
        d["with_audio"] = sum(v.has_audio for v in self.videos)
        d["sizes"] = "/".join(sorted({f"{v.width}x{v.height}" for v in self.videos}))
        d["fps"] = "/".join(sorted({f"{v.fps:g}" for v in self.videos}))
        return d

    def index_records(self) -> list[dict[str, Any]]:
        """The index as plain dicts (path, num_frames, fps, duration, has_audio, sample_rate, ...)."""
        return [{**asdict(v), "duration": v.duration} for v in self.videos]


def _decode_at(path: Path, info: VideoInfo, wanted: list[int], out: np.ndarray) -> int:
    """Fill ``out`` with the frames on screen at indices ``wanted`` (ascending): seek to the key frame before the
    first, or decode from the start when that seek lands late or past the end (containers without an index).
    Wanted frames past the last decoded frame hold it. Returns 0 when no frame decodes, else ``len(wanted)``."""
    last_rgb: list = [None, None]  # (frame, its RGB array): a frame wanted twice is converted once

    def rgb(frame) -> np.ndarray:
        if last_rgb[0] is not frame:
            last_rgb[:] = [frame, frame.to_ndarray(format="rgb24", width=info.width, height=info.height)]
        return last_rgb[1]

    for from_start in ((False, True) if wanted[0] > 0 else (True,)):
        with open_container(path) as c:  # afresh for each try: a seek back to 0 is not the file's start
            v = c.streams.video[0]
            if not from_start:
                c.seek(int((info.start + (wanted[0] - 0.5) / info.fps) / v.time_base), stream=v, backward=True)
            pos, held, late = 0, None, False
            for count, frame in enumerate(c.decode(v)):
                if frame.time is not None:
                    k = round((frame.time - info.start) * info.fps)
                else:  # no timestamps: frames are counted, which needs decoding from the start
                    k = count if from_start else wanted[0] + 1
                if held is None and k > wanted[0] and not from_start:
                    late = True
                    break
                while pos < len(wanted) and k > wanted[pos]:
                    out[pos] = rgb(held if held is not None else frame)
                    pos += 1
                if pos == len(wanted):
                    return pos
                held = frame
        if late or (held is None and not from_start):  # the seek landed late, or past the end
            continue
        if held is None:
            return 0
        out[pos:] = rgb(held)
        return len(wanted)
    return 0  # pragma: no cover - decoding from the start never breaks early


def _decode_audio(path: Path, t0: float, t1: float, channels: int) -> tuple[np.ndarray, float, int]:
    """Audio covering [t0, t1] (file seconds, with 50 ms to spare on each side) as float32 (channels, N) at the
    file's own rate: (pcm, time of ``pcm[:, 0]``, rate). Seeks to just before ``t0`` when the stream's timestamps
    resolve single samples (MP4, MPEG-TS, AVI), else decodes from the start and counts samples (Matroska / WebM
    stamp whole milliseconds: Opus's 20 ms packets after its 6.5 ms pre-skip would all be 0.5 ms off); also from
    the start when the seek lands late. Only the channel layout is converted here (the rate later, by
    :func:`_resample`): FFmpeg's resampler stamps its output undelayed though its filter delays it."""
    import av

    seek = True
    while True:
        with open_container(path) as c:  # afresh for each try: a seek back to 0 is not the file's start
            a = c.streams.audio[0]
            src, tb = int(a.sample_rate), a.time_base
            start = float(a.start_time * tb) if a.start_time is not None else 0.0
            seek = seek and tb is not None and tb * src <= 1 and t0 > start + 0.05
            if seek:
                c.seek(int((t0 - 0.05) / tb), stream=a, backward=True)
            mixer = av.AudioResampler(format="fltp", layout=LAYOUTS[channels], rate=src)
            chunks, origin, n = [], None, 0
            for frame in c.decode(a):
                if origin is None:
                    origin = frame.time if frame.time is not None else start
                    if seek and origin > t0:
                        break
                for o in mixer.resample(frame):
                    chunks.append(o.to_ndarray())
                    n += o.samples
                if origin + n / src >= t1 + 0.05:
                    break
            else:
                chunks += [o.to_ndarray() for o in mixer.resample(None)]
        if seek and (origin is None or origin > t0):  # the seek landed late, or past the end
            seek = False
            continue
        if not chunks:
            return np.zeros((channels, 0), np.float32), t0, src
        return np.concatenate(chunks, axis=1).astype(np.float32, copy=False), origin, src


def _resample(pcm: np.ndarray, src: int, rate: int) -> np.ndarray:
    """``pcm`` from ``src`` to ``rate`` Hz with a zero-phase polyphase filter (sample 0 stays at time 0)."""
    from math import gcd

    from scipy.signal import resample_poly

    if src == rate or pcm.shape[1] == 0:
        return pcm
    g = gcd(src, rate)
    return resample_poly(pcm, rate // g, src // g, axis=1).astype(np.float32)


# ----------------------------------------------------------------------------- ego-motion


def relative_pose(p0: np.ndarray, p1: np.ndarray) -> np.ndarray:
    """SE(2) motion from pose ``p0`` to ``p1`` ((..., 3) arrays of x, y, heading) in ``p0``'s frame:
    (forward, left, turn), turn wrapped to [-pi, pi)."""
    p0, p1 = np.asarray(p0, np.float64), np.asarray(p1, np.float64)
    dx, dy = p1[..., 0] - p0[..., 0], p1[..., 1] - p0[..., 1]
    c, s = np.cos(p0[..., 2]), np.sin(p0[..., 2])
    turn = np.mod(p1[..., 2] - p0[..., 2] + np.pi, 2 * np.pi) - np.pi
    return np.stack([c * dx + s * dy, -s * dx + c * dy, turn], -1)


class EgoMotion(VideoFolder):
    """Ego-motion sequences: ``ROOT/<split>/<name>.<video>`` with a ``<name>.json`` sidecar holding ``poses``
    ((x, y, heading) per frame: metres on the ground plane, radians counter-clockwise from +x) and optionally
    ``actions``. ``poses(i)`` float64 (T, 3); ``relative(i)`` (T - 1, 3): (forward, left, turn) of each frame
    in the camera frame of the one before (:func:`relative_pose`)."""

    kind = "egomotion"

    def __init__(self, root: str | Path, split: str = "train", cache_dir: str | Path | None = None,
                 skip_corrupt: bool = False):
        super().__init__(root, split, cache_dir=cache_dir, skip_corrupt=skip_corrupt)
        self._poses = []
        for i, v in enumerate(self.videos):
            side = self.image_path(i).with_suffix(".json")
            meta = self.annotations(i)
            if meta is None:
                raise BadData("ego-motion sequence without its JSON sidecar (poses)", side)
            poses = np.asarray(meta.get("poses", []), np.float64)
            if poses.shape != (v.num_frames, 3) or not np.isfinite(poses).all():
                raise BadData(f"'poses' must be {v.num_frames} finite (x, y, heading) rows, one per frame; got "
                              f"shape {poses.shape}", side)
            self._poses.append(poses)

    def poses(self, i: int) -> np.ndarray:
        return self._poses[i].copy()

    def relative(self, i: int) -> np.ndarray:
        p = self._poses[i]
        return relative_pose(p[:-1], p[1:])

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d["path_metres"] = round(float(sum(np.linalg.norm(np.diff(p[:, :2], axis=0), axis=1).sum()
                                           for p in self._poses)), 2)
        return d


# ----------------------------------------------------------------------------- samplers


def sample_clip(rng: np.random.Generator, num_frames: int, length: int, stride: int = 1) -> int:
    """A uniformly random start for ``length`` frames ``stride`` apart within ``num_frames``."""
    span = (length - 1) * stride
    if length < 1 or stride < 1 or span >= num_frames:
        raise ValueError(f"{length} frames {stride} apart do not fit in {num_frames} frames")
    return int(rng.integers(0, num_frames - span))


def sample_pair(rng: np.random.Generator, num_frames: int, max_gap: int, min_gap: int = 1) -> tuple[int, int]:
    """Two frames ``i < j`` with ``min_gap <= j - i <= max_gap`` (the gap uniform, then the position)."""
    max_gap = min(max_gap, num_frames - 1)
    if min_gap < 1 or max_gap < min_gap:
        raise ValueError(f"no frame pair {min_gap}..{max_gap} apart in {num_frames} frames")
    gap = int(rng.integers(min_gap, max_gap + 1))
    i = int(rng.integers(0, num_frames - gap))
    return i, i + gap


def sample_tuple(rng: np.random.Generator, num_frames: int, length: int = 3, max_span: int | None = None,
                 shuffled: bool = False) -> np.ndarray:
    """``length`` distinct frames within ``max_span`` frames of each other, in temporal order; ``shuffled``
    permutes them into an order that is neither increasing nor decreasing (a negative for order verification;
    needs ``length >= 3``). int64 (length,)."""
    span = num_frames - 1 if max_span is None else min(max_span, num_frames - 1)
    if length < 2 or span < length - 1 or (shuffled and length < 3):
        raise ValueError(f"no {'shuffled ' if shuffled else ''}{length}-frame tuple within {span} frames")
    first = int(rng.integers(0, num_frames - span))
    idx = first + np.sort(rng.choice(span + 1, size=length, replace=False)).astype(np.int64)
    if shuffled:
        while True:
            perm = idx[rng.permutation(length)]
            d = np.diff(perm)
            if not ((d > 0).all() or (d < 0).all()):
                return perm
    return idx
