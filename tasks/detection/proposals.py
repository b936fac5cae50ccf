"""Object proposals for Fast R-CNN: ``selective_search`` (OpenCV), ``sliding_window`` (a fixed grid, for CI)
and ``file`` (Detectron's or detectron2's published proposal pickles), cached one ``.npy`` per image
(``ProposalCache``), and the ``evalsuite proposals`` command that precomputes them. Methods and formats:
docs/tasks/detection.md.

Boxes are float32 ``(N, 4)`` x1, y1, x2, y2 in continuous 0-based image coordinates (pixel ``k`` of the XML's
1-based convention spans ``[k-1, k]``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from evalsuite.console import HelpFormatter
from evalsuite.console import progress as progress_bar
from evalsuite.errors import UserError
from evalsuite.io import atomic_write

METHODS = ("selective_search", "sliding_window", "file")


def selective_search(image: np.ndarray, mode: str = "fast", max_side: int | None = None,
                     max_boxes: int | None = None, threads: int = 1) -> np.ndarray:
    """Selective search boxes of an RGB ``uint8 (H, W, 3)`` image (continuous 0-based x1, y1, x2, y2), in OpenCV's
    order; ``max_side`` downscales the image first (None: full resolution), ``max_boxes`` keeps the first ones."""
    import cv2

    try:
        seg = cv2.ximgproc.segmentation
    except AttributeError:
        raise UserError("selective search needs opencv-contrib (cv2.ximgproc); install "
                        "opencv-contrib-python-headless") from None
    if mode not in ("fast", "quality"):
        raise UserError(f"selective search mode must be fast or quality, got {mode!r}")
    h, w = image.shape[:2]
    scale = 1.0
    if max_side and max(h, w) > max_side:
        scale = max_side / max(h, w)
        image = cv2.resize(image, (max(1, round(w * scale)), max(1, round(h * scale))),
                           interpolation=cv2.INTER_AREA)
    cv2.setNumThreads(threads)
    _seed_c_rand(0)  # OpenCV ranks the boxes with C rand(): fix it, so the same image gives the same boxes
    ss = seg.createSelectiveSearchSegmentation()
    ss.setBaseImage(np.ascontiguousarray(image[:, :, ::-1]))  # OpenCV wants BGR
    ss.switchToSelectiveSearchFast() if mode == "fast" else ss.switchToSelectiveSearchQuality()
    rects = ss.process()
    if rects is None or len(rects) == 0:
        return np.zeros((0, 4), np.float32)
    rects = np.asarray(rects, dtype=np.float32)[: max_boxes or None]
    boxes = np.stack([rects[:, 0], rects[:, 1], rects[:, 0] + rects[:, 2], rects[:, 1] + rects[:, 3]], 1)
    boxes /= scale
    boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, w)
    boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, h)
    return boxes.astype(np.float32)


def _seed_c_rand(seed: int) -> None:
    """Seed the C library's ``rand()`` (used by OpenCV's selective search ranking); best effort."""
    import ctypes

    try:
        ctypes.CDLL(None).srand(seed)
    except (OSError, AttributeError, TypeError):
        pass


SLIDING_SIZES = (0.3, 0.5, 0.75, 1.0)
SLIDING_RATIOS = (0.5, 1.0, 2.0)
SLIDING_STRIDE = 0.5


def sliding_window(width: int, height: int, sizes=SLIDING_SIZES, ratios=SLIDING_RATIOS,
                   stride_frac: float = SLIDING_STRIDE) -> np.ndarray:
    """A deterministic grid of boxes: side ``s * min(W, H)``, aspect ratios ``ratios``; along each axis the
    positions are evenly spaced from one image edge to the other, at most ``stride_frac`` box sides apart."""
    out = []
    base = min(width, height)
    for s in sizes:
        for r in ratios:
            bw = min(width, s * base * np.sqrt(r))
            bh = min(height, s * base / np.sqrt(r))
            nx = int(np.ceil((width - bw) / max(1.0, bw * stride_frac) - 1e-6)) + 1
            ny = int(np.ceil((height - bh) / max(1.0, bh * stride_frac) - 1e-6)) + 1
            xs = np.linspace(0.0, width - bw, max(1, nx))
            ys = np.linspace(0.0, height - bh, max(1, ny))
            gx, gy = np.meshgrid(xs, ys)
            out.append(np.stack([gx.ravel(), gy.ravel(), gx.ravel() + bw, gy.ravel() + bh], 1))
    boxes = np.round(np.concatenate(out), 2).astype(np.float32)
    _, first = np.unique(boxes, axis=0, return_index=True)
    boxes = boxes[np.sort(first)]
    # a fixed shuffle, so that any prefix (a proposal limit) still covers every scale and position
    return boxes[np.random.default_rng(0).permutation(len(boxes))]


def compute(method: str, image, params: dict[str, Any]) -> np.ndarray:
    """Proposals of one PIL image with ``method``."""
    if method == "selective_search":
        return selective_search(np.asarray(image.convert("RGB")), mode=params.get("mode", "fast"),
                                max_side=params.get("max_side"))
    if method == "sliding_window":
        w, h = image.size
        return sliding_window(w, h)
    raise UserError(f"unknown proposal method {method!r}; choose one of {', '.join(METHODS)}")


def default_root() -> Path:
    from evalsuite.cache import default_cache_root

    return default_cache_root() / "proposals"


def method_params(method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
    """The parameters that identify a proposal set (defaults filled in). Every box of an image is kept: the task
    applies its training and test limits when it reads them."""
    params = dict(params or {})
    if method == "selective_search":
        return {"mode": params.get("mode", "fast"), "max_side": params.get("max_side"), "impl": "opencv-ximgproc"}
    if method == "file":
        if not params.get("file"):
            raise UserError("proposals=file needs a proposal file for every set (detection.proposal_files)")
        f = Path(params["file"]).resolve()
        st = f.stat() if f.exists() else None
        return {"file": str(f), "size": st.st_size if st else None, "mtime": st.st_mtime_ns if st else None}
    if method == "sliding_window":
        return {"sizes": list(SLIDING_SIZES), "ratios": list(SLIDING_RATIOS), "stride_frac": SLIDING_STRIDE,
                "positions": "edge to edge"}
    raise UserError(f"unknown proposal method {method!r}; choose one of {', '.join(METHODS)}")


class ProposalCache:
    """Per-image proposal files for one (method, parameters, dataset) under ``root``.

    ``dataset_key`` identifies the images (the task passes ``dataset.fingerprint()``: ids,
    sizes and mtimes), so changed images never reuse stale boxes. A file that does not load as finite
    ``(N, 4)`` boxes is recomputed, never used; an interrupted run resumes where it stopped.
    """

    def __init__(self, root: str | Path | None, method: str, params: dict[str, Any] | None = None,
                 dataset_key: str = ""):
        self.method = method
        self.params = method_params(method, params)
        key = hashlib.sha256(json.dumps({"method": method, "params": self.params, "data": dataset_key},
                                        sort_keys=True).encode()).hexdigest()[:16]
        self.dir = Path(root or default_root()) / f"{method}-{key}"
        self.computed = 0  # how many this instance computed (the rest were read)
        self._published: dict[str, np.ndarray] | None = None  # method "file": the file's boxes by id key

    def path(self, image_id: str) -> Path:
        return self.dir / f"{image_id}.npy"

    def load(self, image_id: str) -> np.ndarray | None:
        p = self.path(image_id)
        if not p.exists():
            return None
        try:
            boxes = np.load(p, allow_pickle=False)
        except (OSError, ValueError):
            return None
        if boxes.ndim != 2 or boxes.shape[1] != 4 or not np.isfinite(boxes).all():
            return None
        return boxes.astype(np.float32)

    def save(self, image_id: str, boxes: np.ndarray) -> None:
        """Write atomically: an interrupted run leaves whole files only."""

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:  # a file object: np.save would add ".npy" to a path
                np.save(f, np.asarray(boxes, dtype=np.float32))

        atomic_write(self.path(image_id), write)

    def get(self, dataset, i: int) -> np.ndarray:
        """Proposals of image ``i`` of ``dataset`` (computed and cached on a miss)."""
        image_id = dataset.ids[i] if hasattr(dataset, "ids") else str(i)
        if self.method == "file":
            return self._from_file(image_id)
        boxes = self.load(image_id)
        if boxes is None:
            boxes = compute(self.method, dataset.load_image(i), self.params)
            self.save(image_id, boxes)
            self.computed += 1
        return boxes

    def _from_file(self, image_id: str) -> np.ndarray:
        from evalsuite.errors import BadData

        if self._published is None:
            self._published = read_proposal_file(self.params["file"])
        boxes = self._published.get(id_key(image_id))
        if boxes is None:
            raise BadData(f"image {image_id} has no entry in the proposal file", self.params["file"])
        return boxes

    def precompute(self, dataset, progress: bool = True) -> int:
        """Fill the cache for every image of ``dataset``; returns how many were computed (resumable)."""
        before = self.computed
        for i in progress_bar(range(len(dataset.ids)), desc=f"proposals {self.method}", enabled=progress):
            self.get(dataset, i)
        return self.computed - before


def id_key(image_id) -> str:
    """How an image id is matched against a proposal file's: numeric VOC ids as numbers."""
    s = image_id.decode() if isinstance(image_id, bytes) else str(image_id)
    digits = s.replace("_", "")
    return str(int(digits)) if digits.isdigit() else s


def read_proposal_file(path: str | Path) -> dict[str, np.ndarray]:
    """A Detectron or detectron2 proposal pickle -> {``id_key``: float32 (N, 4) continuous boxes}."""
    from evalsuite.data.pickles import safe_unpickle
    from evalsuite.errors import BadData

    data = safe_unpickle(Path(path), what="proposal file")
    if not isinstance(data, dict):
        raise BadData("a proposal file holds a dict of boxes and ids", path)
    data = {k.decode() if isinstance(k, bytes) else k: v for k, v in data.items()}
    id_field = next((k for k in ("indexes", "ids") if k in data), None)
    if id_field is None or "boxes" not in data:
        raise BadData(f"a proposal file needs 'boxes' and 'indexes' or 'ids'; found {sorted(data)}", path)
    ids, boxes = list(data[id_field]), list(data["boxes"])
    if len(ids) != len(boxes):
        raise BadData(f"{len(ids)} {id_field} but {len(boxes)} box arrays", path)
    detectron2 = "objectness_logits" in data or "bbox_mode" in data
    if detectron2 and int(data.get("bbox_mode", 0)) != 0:
        raise BadData(f"bbox_mode {data['bbox_mode']} is not XYXY_ABS (0)", path)
    logits = data.get("objectness_logits")
    if logits is not None and len(logits) != len(ids):
        raise BadData(f"{len(ids)} {id_field} but {len(logits)} objectness_logits arrays", path)
    out = {}
    for k, (image_id, b) in enumerate(zip(ids, boxes)):
        b = np.asarray(b, np.float32).reshape(-1, 4) if np.size(b) else np.zeros((0, 4), np.float32)
        if not np.isfinite(b).all():
            raise BadData(f"non-finite boxes for image {image_id}", path)
        if logits is not None:  # detectron2 sorts by decreasing objectness
            score = np.asarray(logits[k], np.float32).reshape(-1)
            if len(score) != len(b):
                raise BadData(f"image {image_id}: {len(b)} boxes but {len(score)} objectness_logits", path)
            b = b[np.argsort(-score, kind="stable")]
        if not detectron2:  # Detectron: 0-based inclusive pixels; continuous coordinates end one pixel later
            b = b + np.array([0, 0, 1, 1], np.float32)
        out[id_key(image_id)] = b
    return out


def add_command(sub) -> None:
    p = sub.add_parser("proposals", help="precompute object proposals for detection",
                       formatter_class=HelpFormatter,
                       description="Compute and cache object proposals (one file per image, resumable).",
                       epilog="examples:\n  evalsuite proposals --data-root data --split test\n"
                              "  evalsuite proposals --data-root data --split trainval --method sliding_window")
    p.add_argument("--data-root", type=Path, required=True, help="directory holding the datasets")
    p.add_argument("--dataset", default="voc2007", help="dataset kind (default voc2007; voc2012 for 07+12)")
    p.add_argument("--split", action="append", required=True, help="split(s) to process; repeatable")
    p.add_argument("--method", default="selective_search", choices=[m for m in METHODS if m != "file"])
    p.add_argument("--mode", default="fast", choices=["fast", "quality"], help="selective search mode")
    p.add_argument("--max-side", type=int, default=None,
                   help="downscale the longer side to this before searching (default: full resolution, as goyal19)")
    p.add_argument("--cache-dir", type=Path, help="proposal cache (default $EVALSUITE_CACHE/proposals)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_proposals)


def cmd_proposals(a: argparse.Namespace) -> int:
    from evalsuite.data import DATA_LAYOUT, open_dataset

    sub = DATA_LAYOUT.get(a.dataset, a.dataset)
    for split in a.split:
        ds = open_dataset(a.dataset, a.data_root / sub, split)
        cache = ProposalCache(a.cache_dir, a.method, {"mode": a.mode, "max_side": a.max_side},
                              dataset_key=ds.fingerprint())
        n = cache.precompute(ds, progress=not a.no_progress)
        print(f"{split}: {len(ds)} images, {n} computed, {len(ds) - n} already cached in {cache.dir}")
    return 0
