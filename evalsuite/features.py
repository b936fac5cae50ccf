"""Batched feature extraction over any dataset, all taps in one forward pass, through the cache.

Precision: ``"fp32"`` computes in float32 as the references do (the default of the
goyal19 and vissl presets, :data:`PRESET_PRECISION`); ``"auto"`` (the quick preset's)
is the fast path, channels_last + bfloat16 autocast where the device supports it.
Features are cached as float16 (float32 for a tap beyond float16's range). The
precision is part of the cache key, so the two never mix.

Multi-process (``torchrun``): when a process group is initialised, rank r
extracts shards r, r+W, ...; rank 0 writes the manifests after a barrier.
Batches never cross shard boundaries, so the result equals one process exactly.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .cache import CacheEntry, CorruptEntry, FeatureCache, FeatureStore, storage_array
from .colorspace import IMAGENET_MEAN, IMAGENET_STD, INPUT_SPACES, to_input_space
from .console import progress, warn
from .data.base import ImageDataset
from .errors import BadData, BadFeatures, UserError
from .protocols import INTERPOLATIONS, RESIZE_MODES
from .trunks import PoolSpec, check_taps, pool_features, pool_spec, tap_shapes

PRECISIONS = ("auto", "fp32", "bf16")
# The precision a run extracts in when --precision is not given: the references (fair_ssb, VISSL, DINO)
# extract in fp32, and bf16 moves published-protocol numbers by more than 0.1 point
# (benchmarks/fidelity/features.py); the quick preset keeps the fast path.
PRESET_PRECISION = {"goyal19": "fp32", "vissl": "fp32", "dino21": "fp32", "quick": "auto"}




@dataclass(frozen=True)
class Transform:
    """Evaluation transform; recorded in results and part of the cache key.

    ``mode``: ``"square"`` resizes to ``size`` x ``size``; ``"center_crop"`` resizes the shorter
    side to ``resize`` and takes the central ``size`` crop (DINO's kNN, the linear probes);
    ``"scale_square"`` resizes the shorter side to ``resize``, then the whole image to ``size`` x
    ``size`` (the VOC07 SVM: fair_ssb's ``[scale, global_resize]``, VISSL's Resize(256) + Resize([224, 224])).
    ``resize`` None: ``size`` x 256/224.

    ``interpolation``: ``"bilinear"`` / ``"bicubic"`` are PIL's filters as torchvision's Resize applies them
    to PIL images (DINO's ``interpolation=3`` is bicubic); ``"cv2_bilinear"`` is OpenCV's ``INTER_LINEAR`` on
    float pixels, without antialiasing, as fair_ssb's ``cv2.resize`` (self_supervision_benchmark/data/
    data_transformation.py ``scale`` / ``global_resize``).
    """

    size: int = 224
    mode: str = "square"
    resize: int | None = None
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    input_space: str = "rgb"
    interpolation: str = "bilinear"

    def __post_init__(self):
        if self.mode not in RESIZE_MODES:
            raise UserError(f"unknown transform mode {self.mode!r}; use {', '.join(RESIZE_MODES)}")
        if self.interpolation not in INTERPOLATIONS:
            raise UserError(f"unknown interpolation {self.interpolation!r}; use {', '.join(INTERPOLATIONS)}")
        if self.input_space not in INPUT_SPACES:
            raise UserError(f"unknown input space {self.input_space!r}; known: {', '.join(INPUT_SPACES)}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @property
    def shorter_side(self) -> int:
        return self.resize or int(round(self.size * 256 / 224))

    def __call__(self, image) -> torch.Tensor:
        from torchvision.transforms import functional as TF

        if self.interpolation == "cv2_bilinear":
            x = _cv2_bilinear_resize(image, self)
        else:
            x = TF.to_tensor(_pil_resize(image, self))
        return to_input_space(x, self.input_space, self.mean, self.std)

    @classmethod
    def from_protocol(cls, protocol: Any, checkpoint_meta: dict | None = None) -> Transform:
        """The protocol's ``image_size`` / ``resize_mode`` / ``resize`` / ``interpolation`` with the checkpoint's
        normalisation."""
        meta = checkpoint_meta or {}
        norm = meta.get("normalize") or {}
        return cls(
            size=int(protocol_get(protocol, "image_size", 224)),
            mode=protocol_get(protocol, "resize_mode", "square"),
            resize=protocol_get(protocol, "resize", None),
            mean=tuple(norm.get("mean", IMAGENET_MEAN)),
            std=tuple(norm.get("std", IMAGENET_STD)),
            input_space=meta.get("input_space", "rgb"),
            interpolation=protocol_get(protocol, "interpolation", "bilinear"),
        )


def _pil_resize(image, tf: Transform):
    """torchvision's Resize / CenterCrop on a PIL image (PIL's filters)."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    interp = InterpolationMode(tf.interpolation)
    if tf.mode == "square":
        return TF.resize(image, [tf.size, tf.size], interpolation=interp, antialias=True)
    image = TF.resize(image, tf.shorter_side, interpolation=interp, antialias=True)
    if tf.mode == "center_crop":
        return TF.center_crop(image, [tf.size, tf.size])
    return TF.resize(image, [tf.size, tf.size], interpolation=interp, antialias=True)


def _cv2_bilinear_resize(image, tf: Transform) -> torch.Tensor:
    """fair_ssb's resizing on float pixels: cv2.resize INTER_LINEAR (half-pixel centres, no antialiasing) is
    torch's bilinear interpolation with align_corners=False and antialias=False. Returns (3, H, W) in [0, 1]."""
    import torch.nn.functional as F
    from torchvision.transforms import functional as TF

    x = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1).unsqueeze(0)

    def resize(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        if (h, w) == tuple(x.shape[-2:]):
            return x
        return F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=False)

    if tf.mode != "square":
        # data_transformation.scale: the shorter side to `resize`, the longer one floor(long / short * resize)
        h, w = x.shape[-2:]
        side = tf.shorter_side
        if w < h:
            x = resize(x, int(math.floor(h / w * side)), side)
        else:
            x = resize(x, side, int(math.floor(w / h * side)))
    if tf.mode == "center_crop":
        x = TF.center_crop(x, [tf.size, tf.size])
    else:
        x = resize(x, tf.size, tf.size)
    return x[0] / 255.0


def protocol_get(protocol: Any, key: str, default: Any = None) -> Any:
    """A field that not every task's protocol has (``pooling``, ``resize``...), ``default`` when it has none."""
    return getattr(protocol, key, default)


class TransformedImages(torch.utils.data.Dataset):
    """Applies the transform; returns errors as values so the main process reports them cleanly
    (:func:`collate_images` raises them as one BadData line)."""

    def __init__(self, dataset: ImageDataset, transform: Transform):
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        try:
            return self.transform(self.dataset.load_image(i)), i, None
        except BadData as e:
            return None, i, (e.message, e.path)


def collate_images(batch):
    """Stack (image, index, error) items into (images, indices); the first error becomes BadData."""
    for _x, i, err in batch:
        if err is not None:
            raise BadData(err[0], err[1] or f"sample {i}")
    return torch.stack([b[0] for b in batch]), torch.tensor([b[1] for b in batch])


def preset_precision(preset: str, precision: str | None = None) -> str:
    """``precision`` when one is given, else the preset's (:data:`PRESET_PRECISION`)."""
    return precision or PRESET_PRECISION.get(preset, "auto")


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device`` (None means plain fp32)."""
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}; choose {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return None
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
    elif device.type == "cpu":
        ok = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    else:
        ok = False
    if precision == "bf16" and not ok:
        raise UserError(f"bfloat16 is not supported on this {device.type} device; use --precision fp32")
    return torch.bfloat16 if ok else None


@dataclass
class FeatureRequest:
    dataset: ImageDataset
    taps: Sequence[str]
    pooling: str = "goyal"
    transform: Transform = field(default_factory=Transform)


class FeatureExtractor:
    """Features of one checkpoint's trunk, computed once and served from the cache afterwards."""

    def __init__(
        self,
        trunk: nn.Module,
        checkpoint_id: str,
        arch: str,
        cache: FeatureCache | None = None,
        device: str | torch.device = "cpu",
        precision: str = "auto",
        batch_size: int = 64,
        workers: int = 0,
        progress: bool = True,
        source: str = "",
    ):
        self.trunk = trunk
        self.source = source  # the checkpoint's file or spec, named by errors
        self.checkpoint_id = checkpoint_id
        self.arch = arch
        self.cache = cache or FeatureCache()
        self.device = torch.device(device)
        self.autocast_dtype = resolve_precision(precision, self.device)
        self.precision = "bf16" if self.autocast_dtype is not None else "fp32"
        self.batch_size = batch_size
        self.workers = workers
        self.progress = progress
        self.stats = {"cache_hits": 0, "extracted_images": 0}

    # ------------------------------------------------------------ public

    def pool_specs(self, taps: Sequence[str], pooling: str, transform: Transform) -> dict[str, PoolSpec]:
        check_taps(self.trunk, taps)
        shapes = tap_shapes(self.arch, transform.size, taps)
        return {t: pool_spec(self.arch, t, shapes[t][0], shapes[t][1], pooling) for t in taps}

    def entry_fields(self, dataset: ImageDataset, tap: str, spec: PoolSpec, transform: Transform) -> dict:
        return {
            "checkpoint": self.checkpoint_id,
            "arch": self.arch,
            "dataset": dataset.fingerprint(),
            "dataset_kind": dataset.kind,
            "split": dataset.split,
            "tap": tap,
            "transform": transform.to_dict(),
            "pooling": {"method": spec.method, "op": spec.op, "shape": list(spec.out_shape)},
            "precision": self.precision,
        }

    def features(
        self, dataset: ImageDataset, taps: Sequence[str], pooling: str = "goyal", transform: Transform | None = None
    ) -> dict[str, np.ndarray]:
        """(N, D) features per tap for every sample of ``dataset``, in dataset order (float16, or float32 for
        a tap whose values exceed float16's range)."""
        return self._read(dataset, taps, pooling, transform, lambda entry: entry.load())

    def feature_stores(
        self, dataset: ImageDataset, taps: Sequence[str], pooling: str = "goyal", transform: Transform | None = None
    ) -> dict[str, FeatureStore]:
        """The same features as :meth:`features`, extracted when missing, as memory-mapped stores that load
        nothing (``evalsuite.cache.FeatureStore``: read in blocks, streamed in shuffled batches, or loaded with
        ``resident()`` when they fit the cache's memory budget)."""
        return self._read(dataset, taps, pooling, transform,
                          lambda entry: entry.open(memory_budget=self.cache.memory_budget))

    def _read(self, dataset: ImageDataset, taps: Sequence[str], pooling: str, transform: Transform | None,
              read: Callable[[CacheEntry], Any]) -> dict[str, Any]:
        """``read(entry)`` per tap from complete cache entries, extracting the missing ones (all taps in one
        pass); a corrupt entry is reported and rebuilt."""
        transform = transform or Transform()
        n = len(dataset)
        if n == 0:
            raise BadData("dataset is empty", dataset.root)
        specs = self.pool_specs(taps, pooling, transform)
        entries = {t: self.cache.entry(self.entry_fields(dataset, t, specs[t], transform), n) for t in taps}
        out: dict[str, np.ndarray] = {}
        todo: dict[str, CacheEntry] = {}
        for tap, entry in entries.items():
            if entry.is_complete():
                try:
                    out[tap] = read(entry)
                    self.stats["cache_hits"] += 1
                    continue
                except CorruptEntry as e:

                    warn(f"feature cache entry {entry.dir} is corrupt ({e}); rebuilding")
                    entry.clear()
            todo[tap] = entry
        if todo:
            self._extract(dataset, todo, {t: specs[t] for t in todo}, transform)
            for tap, entry in todo.items():
                out[tap] = read(entry)
        return {t: out[t] for t in taps}

    # ------------------------------------------------------------ extraction

    def _extract(self, dataset, entries: dict[str, CacheEntry], specs: dict[str, PoolSpec], transform) -> None:
        rank, world = _dist_info()
        for e in entries.values():
            if rank == 0:
                e.prepare()
        _barrier(world)
        any_entry = next(iter(entries.values()))
        missing = sorted({i for e in entries.values() for i in e.missing_shards()})
        mine = [i for i in missing if i % world == rank]
        if mine:
            self._run_shards(dataset, entries, specs, transform, any_entry, mine)
        _barrier(world)
        if rank == 0:
            for tap, e in entries.items():
                e.finalize({"pool": specs[tap].op, "shape": list(specs[tap].out_shape)})
        _barrier(world)

    def _run_shards(self, dataset, entries, specs, transform, ref: CacheEntry, shards: list[int]) -> None:
        need = {tap: {i for i in shards if not e.shard_done(i)} for tap, e in entries.items()}
        shards = [i for i in shards if any(i in s for s in need.values())]
        if not shards:
            return
        batches = []
        for i in shards:
            lo, hi = ref.shard_range(i)
            batches.extend(list(range(b, min(hi, b + self.batch_size))) for b in range(lo, hi, self.batch_size))
        loader = torch.utils.data.DataLoader(
            TransformedImages(dataset, transform),
            batch_sampler=batches,
            num_workers=self.workers,
            collate_fn=collate_images,
            persistent_workers=False,
        )
        taps = list(entries)
        trunk = self.trunk.to(self.device).eval()
        if self._channels_last():
            trunk = trunk.to(memory_format=torch.channels_last)
        buffers: dict[str, list[np.ndarray]] = {t: [] for t in taps}
        current = None
        filled = 0
        total = sum(ref.shard_range(i)[1] - ref.shard_range(i)[0] for i in shards)
        bar = progress(total=total, desc=f"features {dataset.kind}/{dataset.split}", unit="img",
                       enabled=self.progress)
        with torch.inference_mode():
            for x, idx in loader:
                shard = int(idx[0]) // ref.shard_rows
                if current is None:
                    current = shard
                feats = self._forward(trunk, x, taps, specs, dataset, idx)
                for t in taps:
                    buffers[t].append(feats[t])
                filled += len(idx)
                lo, hi = ref.shard_range(shard)
                if filled == hi - lo:
                    for t in taps:
                        if shard in need[t]:
                            entries[t].write_shard(shard, np.concatenate(buffers[t]))
                        buffers[t] = []
                    filled, current = 0, None
                self.stats["extracted_images"] += len(idx)
                bar.update(len(idx))
        bar.close()

    def _channels_last(self) -> bool:
        """channels_last helps convolutional trunks on CPU/CUDA; ViTs (tokens) opt out."""
        return self.device.type in ("cpu", "cuda") and getattr(self.trunk, "supports_channels_last", True)

    def _forward(self, trunk, x, taps, specs, dataset, idx) -> dict[str, np.ndarray]:
        x = x.to(self.device, non_blocking=True)
        if self._channels_last():
            x = x.contiguous(memory_format=torch.channels_last)
        ctx = (
            torch.autocast(self.device.type, dtype=self.autocast_dtype)
            if self.autocast_dtype is not None
            else contextlib.nullcontext()
        )
        with ctx:
            acts = trunk(x, taps)
        out = {}
        for t in taps:
            y = pool_features(acts[t].float(), specs[t])
            if not torch.isfinite(y).all():
                bad = int(idx[(~torch.isfinite(y)).any(dim=1).nonzero()[0, 0]])
                raise BadFeatures(
                    f"the checkpoint's {t} features are NaN/Inf (first on {dataset.kind} {dataset.split} sample "
                    f"{bad}): its weights are probably broken", self.source or f"checkpoint {self.checkpoint_id[:12]}")
            out[t] = storage_array(y.detach().cpu().numpy())  # fp16 unless out of its range
        return out


def _dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def l2_normalize(x: np.ndarray, eps: float = 1e-5, *, clamp: bool = False, dtype=np.float32,
                 inplace: bool = False) -> np.ndarray:
    """Row-wise L2 normalisation, the one the tasks share.

    Default: x / (||x|| + eps), the Goyal et al. benchmark's ``normalize_features`` (eps 1e-5).
    ``clamp=True``: x / max(||x||, eps), torch's ``F.normalize`` as DINO's kNN uses it (eps 1e-12; zero rows
    stay zero). ``inplace`` reuses ``x`` when it already has ``dtype``.
    """
    out = np.asarray(x, dtype=dtype)
    if not (inplace and out is x):
        out = out.copy()
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    if clamp:
        np.maximum(norms, eps, out=norms)
    else:
        norms += eps
    out /= norms
    return out


def check_features(x: np.ndarray, what: str = "features", source: Any = None, chunk_bytes: int = 1 << 26) -> None:
    """(N, D) with N, D > 0 and every value finite, or one BadFeatures line naming ``what`` and ``source``.

    Checked in row chunks, so a memory-mapped matrix is never copied whole.
    """
    shape = tuple(getattr(x, "shape", ()))
    if len(shape) != 2:
        raise BadFeatures(f"{what} must be a 2-D (samples, dims) array, got shape {shape}", source)
    if shape[0] == 0:
        raise BadFeatures(f"{what} are empty (0 samples)", source)
    if shape[1] == 0:
        raise BadFeatures(f"{what} have 0 dimensions", source)
    rows = max(1, chunk_bytes // max(1, shape[1] * x.itemsize))
    for lo in range(0, shape[0], rows):
        finite = np.isfinite(x[lo:lo + rows]).all(axis=1)
        if not finite.all():
            bad = int((~finite).sum())
            raise BadFeatures(f"{what} contain NaN/Inf in {bad}+ row(s), first at row {lo + int(np.argmin(finite))}",
                              source)
