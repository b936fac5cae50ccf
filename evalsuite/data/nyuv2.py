"""NYU Depth V2 with surface-normal ground truth, in two layouts under ``ROOT`` (``<data root>/nyuv2``).

**"mat" layout** (the official download)::

    nyu_depth_v2_labeled.mat   MATLAB v7.3 = HDF5, read with h5py. MATLAB is column-major, so h5py sees
                               the axes reversed: images (N, 3, W, H) uint8, depths (N, W, H) float32
                               metres; we transpose back to (H, W, 3) / (H, W).
    splits.mat                 the official split: trainNdxs (795, 1) / testNdxs (654, 1), 1-based
                               frame indices (MAT 5, scipy.io.loadmat; a v7.3 file is read with h5py too).
    normals: either datasets ``normals`` (N, 3, W, H) float32 and ``normals_mask`` (N, W, H) uint8 inside
             the labeled .mat (what ``write_nyuv2(fmt="mat")`` writes), or per-frame PNGs
             ``normal/<split>/<NNNNN>.png`` (+ optional ``mask/<split>/<NNNNN>.png``), NNNNN the
             1-based frame index, in the encoding described below.

**"dir" layout** (one file per frame and modality; split by folder)::

    image/<split>/<id>.png     RGB
    normal/<split>/<id>.npy    float32 (H, W, 3) unit vectors, or <id>.png (encoding below)
    mask/<split>/<id>.png      optional validity mask (non-zero = valid)
    depth/<split>/<id>.npy     optional float32 metres, or <id>.png uint16 millimetres

**Normal encoding of PNGs** is that of the widely used nyuv2-python-toolkit extraction of the
Ladický et al. (ECCV 2014) ground truth (see ``tests/fixtures/nyuv2_mini/README.md``): channel value
v decodes as n = v / 255 * 2 - 1, and the file's R, G, B hold (z, y, x), i.e. (x, y, z) in OpenCV's BGR
order. **Camera frame**: x right, y down, z forward; normals point toward the camera. Without a mask
file, a pixel is valid when its decoded vector has length within 0.1 of 1 (so (0, 0, 0) and mid-grey
encodings of "no normal" are invalid). To convert other annotations, write per-frame ``.npy`` files of
unit vectors in this frame (flip y and z of a y-up / z-backward OpenGL-style frame) and a mask PNG.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..errors import BadData
from .base import ImageDataset, load_rgb

LABELED_MAT = "nyu_depth_v2_labeled.mat"
SPLITS_MAT = "splits.mat"
SPLIT_KEYS = {"train": "trainNdxs", "test": "testNdxs"}


def decode_normal_png(arr: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) as read RGB -> float32 (H, W, 3) camera-frame (x, y, z)."""
    n = arr.astype(np.float32) / 255.0 * 2.0 - 1.0
    return np.ascontiguousarray(n[..., ::-1])


def encode_normal_png(n: np.ndarray) -> np.ndarray:
    """Inverse of :func:`decode_normal_png` (rounded); invalid pixels should be passed as zeros -> 128."""
    return np.clip(np.rint((n[..., ::-1] + 1.0) / 2.0 * 255.0), 0, 255).astype(np.uint8)


def unit_mask(n: np.ndarray, tol: float = 0.1) -> np.ndarray:
    return np.abs(np.linalg.norm(n, axis=-1) - 1.0) < tol


def read_nyu_splits(path: Path) -> dict[str, np.ndarray]:
    """splits.mat -> {"train": 1-based int64 indices, "test": ...}; MAT 5 (scipy) or v7.3 (HDF5)."""
    if not path.is_file():
        raise BadData("NYUv2 split file not found", path)
    try:
        import scipy.io as sio

        m = sio.loadmat(str(path))
    except NotImplementedError:  # v7.3 -> HDF5
        import h5py

        try:
            with h5py.File(path, "r") as f:
                m = {k: np.asarray(f[k]) for k in f.keys()}
        except OSError as e:
            raise BadData(f"unreadable split file ({e})", path) from None
    except (ValueError, OSError, TypeError) as e:
        raise BadData(f"unreadable split file ({e})", path) from None
    missing = [k for k in SPLIT_KEYS.values() if k not in m]
    if missing:
        raise BadData(f"split file lacks {', '.join(missing)} (expected trainNdxs/testNdxs)", path)
    return {s: np.asarray(m[k]).astype(np.int64).ravel() for s, k in SPLIT_KEYS.items()}


class NYUv2(ImageDataset):
    """One split (train/test) of NYUv2: ``load_image``, ``normals``, ``valid_mask``, ``depth``."""

    kind = "nyuv2"

    def __init__(self, root: str | Path, split: str = "train", layout: str = "auto", skip_corrupt: bool = False):
        super().__init__(root, split)
        if split not in SPLIT_KEYS:
            raise BadData(f"unknown NYUv2 split {split!r} (train or test)", self.root)
        if not self.root.is_dir():
            raise BadData("NYUv2 directory not found", self.root)
        if layout == "auto":
            layout = "mat" if (self.root / LABELED_MAT).exists() else "dir"
        self.layout = layout
        if layout == "mat":
            self._init_mat()
        elif layout == "dir":
            self._init_dir(skip_corrupt)
        else:
            raise BadData(f"unknown NYUv2 layout {layout!r} (mat or dir)", self.root)

    # ------------------------------------------------------------------ mat layout
    def _init_mat(self) -> None:
        import h5py

        self.mat = self.root / LABELED_MAT
        try:
            with h5py.File(self.mat, "r") as f:
                keys = set(f.keys())
                missing = [k for k in ("images", "depths") if k not in keys]
                if missing:
                    raise BadData(f"labeled .mat lacks {', '.join(missing)} (expected the NYUv2 labeled file "
                                  "with images/depths)", self.mat)
                n, c, w, h = f["images"].shape
                if c != 3 or f["depths"].shape != (n, w, h):
                    raise BadData(f"unexpected shapes images {f['images'].shape} / depths {f['depths'].shape}",
                                  self.mat)
                self._mat_normals = "normals" in keys
                self._mat_mask = "normals_mask" in keys
        except OSError as e:
            raise BadData(f"not an HDF5 (MATLAB v7.3) file ({str(e).splitlines()[0]})", self.mat) from None
        self.n_frames, self.height, self.width = n, h, w
        idx = read_nyu_splits(self.root / SPLITS_MAT)[self.split]
        if len(idx) and (idx.min() < 1 or idx.max() > n):
            raise BadData(f"split indices out of range 1..{n}", self.root / SPLITS_MAT)
        self.indices = idx  # 1-based
        self._ids = [f"{int(k):05d}" for k in idx]
        self.skipped = []

    def _h5(self, key: str, i: int) -> np.ndarray:
        import h5py

        try:
            with h5py.File(self.mat, "r") as f:
                return np.asarray(f[key][int(self.indices[i]) - 1])
        except (OSError, KeyError) as e:
            raise BadData(f"cannot read {key} of frame {self.indices[i]} ({e})", self.mat) from None

    # ------------------------------------------------------------------ dir layout
    def _init_dir(self, skip_corrupt: bool) -> None:
        d = self.root / "image" / self.split
        if not d.is_dir():
            raise BadData(f"NYUv2 image folder for split {self.split!r} not found (expected {LABELED_MAT} "
                          "or image/<split>/)", d)
        stems = sorted(p.stem for p in d.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
        if not stems:
            raise BadData("no images in NYUv2 image folder", d)
        for s in stems:
            if self._dir_file("normal", s, (".npy", ".png")) is None:
                raise BadData(f"no normal map for frame {s}", self.root / "normal" / self.split / f"{s}.png")
        keep = self._keep_readable([self.image_path_of(s) for s in stems], skip_corrupt)
        self._ids = [stems[k] for k in keep]

    def _dir_file(self, what: str, stem: str, suffixes) -> Path | None:
        for suf in suffixes:
            p = self.root / what / self.split / f"{stem}{suf}"
            if p.exists():
                return p
        return None

    def image_path_of(self, stem: str) -> Path:
        p = self._dir_file("image", stem, (".png", ".jpg", ".jpeg"))
        return p if p is not None else self.root / "image" / self.split / f"{stem}.png"

    # ------------------------------------------------------------------ API
    def __len__(self) -> int:
        return len(self._ids)

    @property
    def ids(self) -> list[str]:
        return self._ids

    def image_path(self, i: int) -> Path | None:
        return None if self.layout == "mat" else self.image_path_of(self._ids[i])

    def load_image(self, i: int) -> Image.Image:
        if self.layout == "mat":
            return Image.fromarray(np.ascontiguousarray(self._h5("images", i).transpose(2, 1, 0)), "RGB")
        return load_rgb(self.image_path(i))

    def normals(self, i: int) -> np.ndarray:
        """float32 (H, W, 3) camera-frame unit normals (x right, y down, z forward); invalid pixels as stored."""
        if self.layout == "mat" and self._mat_normals:
            return np.ascontiguousarray(self._h5("normals", i).transpose(2, 1, 0)).astype(np.float32)
        split_dir = self.root / "normal" / self.split
        p = self._dir_file("normal", self._ids[i], (".npy", ".png"))
        if p is None:
            raise BadData(f"no normal map for frame {self._ids[i]}", split_dir / f"{self._ids[i]}.png")
        if p.suffix == ".npy":
            n = _load_npy(p)
            if n.ndim != 3 or n.shape[2] != 3:
                raise BadData(f"normal map must be (H, W, 3), got {n.shape}", p)
            return n.astype(np.float32)
        return decode_normal_png(np.asarray(load_rgb(p)))

    def valid_mask(self, i: int) -> np.ndarray:
        """bool (H, W): pixels with ground-truth normals (mask file if present, else unit-length test)."""
        if self.layout == "mat" and self._mat_mask:
            return self._h5("normals_mask", i).T > 0
        p = self._dir_file("mask", self._ids[i], (".png",))
        if p is not None:
            try:
                with Image.open(p) as im:
                    m = np.asarray(im.convert("L")) > 0
            except OSError as e:
                raise BadData(f"unreadable mask ({e})", p) from None
            return m
        return unit_mask(self.normals(i))

    def depth(self, i: int) -> np.ndarray:
        """float32 (H, W) depth in metres."""
        if self.layout == "mat":
            return np.ascontiguousarray(self._h5("depths", i).T).astype(np.float32)
        p = self._dir_file("depth", self._ids[i], (".npy", ".png"))
        if p is None:
            raise BadData(f"no depth for frame {self._ids[i]}", self.root / "depth" / self.split)
        if p.suffix == ".npy":
            return _load_npy(p).astype(np.float32)
        try:
            with Image.open(p) as im:
                return np.asarray(im, dtype=np.float32) / 1000.0
        except OSError as e:
            raise BadData(f"unreadable depth PNG ({e})", p) from None

    def fingerprint_payload(self):
        if self.layout == "mat":
            st = self.mat.stat()
            yield (LABELED_MAT, st.st_size, st.st_mtime_ns)
            yield [int(k) for k in self.indices]
        else:
            yield from super().fingerprint_payload()

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d["layout"] = self.layout
        return d


def _load_npy(p: Path) -> np.ndarray:
    try:
        return np.load(p, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise BadData(f"unreadable .npy ({e})", p) from None
