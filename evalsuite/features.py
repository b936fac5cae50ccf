"""Batched feature extraction over any dataset, all taps in one forward pass, through the cache.

Precision: ``"fp32"`` computes in float32 as the references do (the default of the
goyal19 and vissl presets, :data:`PRESET_PRECISION`); ``"auto"`` (the quick preset's)
is the fast path, channels_last + bfloat16 autocast where the device supports it.
Features are cached as float16 (float32 for a tap beyond float16's range). The
precision is part of the cache key, so the two never mix.

Multi-process (``torchrun``): when a process group is initialised, rank r
extracts shards r, r+W, ...; rank 0 writes the manifests after a barrier.
Batches never cross shard boundaries, so the result equals one process exactly.
Across machines, array task p of N extracts the same share (:meth:`FeatureExtractor.extract_part`,
driven by :mod:`evalsuite.extract_array`).

Decoding (``decode``): ``"cpu"`` decodes each image with PIL (libjpeg) in the data-loading workers and
resizes with PIL's filters, as the references; ``"gpu"`` reads the JPEG bytes in the workers, decodes each
batch in one ``torchvision.io.decode_jpeg`` call on the CUDA device (nvjpeg) and resizes there with
torchvision's antialiased tensor resize; ``"auto"`` is ``gpu`` when extracting on CUDA, ``cpu`` otherwise.
The two can differ by a few grey levels per pixel (the resize; nvjpeg's IDCT may add its own), so a GPU-decoded
entry has ``decode: gpu`` in its cache key (CPU-decoded keys carry no decode field: they are the keys every
earlier cache holds).
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
from .distributed import rank_and_world
from .errors import BadData, BadFeatures, UserError
from .protocols import INTERPOLATIONS, RESIZE_MODES
from .trunks import PoolSpec, check_taps, pool_features, pool_spec, tap_shapes

PRECISIONS = ("auto", "fp32", "bf16")
# The precision a run extracts in when --precision is not given: the references (fair_ssb, VISSL, DINO)
# extract in fp32, and bf16 moves published-protocol numbers by more than 0.1 point
# (benchmarks/fidelity/features.py); the quick preset keeps the fast path.
PRESET_PRECISION = {"goyal19": "fp32", "vissl": "fp32", "dino21": "fp32", "ericsson21": "fp32", "quick": "auto"}

DECODERS = ("auto", "cpu", "gpu")
# The decoder a run uses when --decode is not given: the published protocols decode on the CPU (PIL / libjpeg)
# as their references; the quick preset takes the GPU's decoder when it extracts on CUDA.
PRESET_DECODE = {"goyal19": "cpu", "vissl": "cpu", "dino21": "cpu", "ericsson21": "cpu", "quick": "auto"}


@dataclass(frozen=True)
class Transform:
    """Evaluation transform; recorded in results and part of the cache key.

    ``mode``: ``"square"`` resizes to ``size`` x ``size``; ``"center_crop"`` resizes the shorter
    side to ``resize`` and takes the central ``size`` crop (DINO's kNN, the linear probes);
    ``"scale_square"`` resizes the shorter side to ``resize``, then the whole image to ``size`` x
    ``size`` (the VOC07 SVM: fair_ssb's ``[scale, global_resize]``, VISSL's Resize(256) + Resize([224, 224]));
    ``"square_center_crop"`` resizes the whole image to ``resize`` x ``resize``, then takes the central ``size``
    crop (CD-FSL's ``Scale([1.15 size] * 2)`` + ``CenterCrop(size)``, the few-shot task).
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

    def on_tensor(self, image: torch.Tensor) -> torch.Tensor:
        """The transform of a decoded uint8 (3, H, W) image tensor, on its device (the GPU decoder's path):
        torchvision's tensor resize with the same steps and antialiasing as PIL's (bilinear within a grey level of
        PIL's, bicubic within a few)."""
        if self.interpolation == "cv2_bilinear":
            x = _cv2_bilinear_resize_tensor(image.float(), self)
        else:
            x = _pil_resize(image, self).float() / 255.0  # uint8 in, uint8 out, rounded as PIL rounds
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
    if tf.mode == "square_center_crop":
        image = TF.resize(image, [tf.shorter_side, tf.shorter_side], interpolation=interp, antialias=True)
        return TF.center_crop(image, [tf.size, tf.size])
    image = TF.resize(image, tf.shorter_side, interpolation=interp, antialias=True)
    if tf.mode == "center_crop":
        return TF.center_crop(image, [tf.size, tf.size])
    return TF.resize(image, [tf.size, tf.size], interpolation=interp, antialias=True)


def _cv2_bilinear_resize(image, tf: Transform) -> torch.Tensor:
    """fair_ssb's resizing on float pixels: cv2.resize INTER_LINEAR (half-pixel centres, no antialiasing) is
    torch's bilinear interpolation with align_corners=False and antialias=False. Returns (3, H, W) in [0, 1]."""
    return _cv2_bilinear_resize_tensor(torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1), tf)


def _cv2_bilinear_resize_tensor(x: torch.Tensor, tf: Transform) -> torch.Tensor:
    """:func:`_cv2_bilinear_resize` on a (3, H, W) float tensor of 0-255 pixels, on its device."""
    import torch.nn.functional as F
    from torchvision.transforms import functional as TF

    x = x.unsqueeze(0)

    def resize(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        if (h, w) == tuple(x.shape[-2:]):
            return x
        return F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=False)

    if tf.mode == "square_center_crop":
        return TF.center_crop(resize(x, tf.shorter_side, tf.shorter_side), [tf.size, tf.size])[0] / 255.0
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


@dataclass
class EncodedImage:
    """One sample for the GPU decoder: a JPEG file's bytes (``encoded``) or, for any other image, its decoded
    uint8 (3, H, W) pixels; ``path`` names the file in errors."""

    data: torch.Tensor
    encoded: bool
    path: str | None = None


class EncodedImages(torch.utils.data.Dataset):
    """Reads each JPEG file's bytes in the loading workers (decoded later, a batch at a time, on the GPU); other
    images (PNG, in-memory arrays, readers with their own ``load_image``) are decoded here with PIL."""

    def __init__(self, dataset: ImageDataset):
        self.dataset = dataset
        # a reader that overrides load_image (crops, HDF5, pickles) is read its own way
        self.plain_files = type(dataset).load_image is ImageDataset.load_image

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        try:
            path = self.dataset.image_path(i) if self.plain_files else None
            if path is not None:
                try:
                    data = path.read_bytes()
                except FileNotFoundError:
                    raise BadData("image file not found", path) from None
                if data[:2] == b"\xff\xd8":  # the JPEG start-of-image marker
                    return EncodedImage(torch.frombuffer(bytearray(data), dtype=torch.uint8), True, str(path)), i, None
            image = np.asarray(self.dataset.load_image(i), dtype=np.uint8)
            return EncodedImage(torch.from_numpy(image.copy()).permute(2, 0, 1).contiguous(), False), i, None
        except BadData as e:
            return None, i, (e.message, e.path)


def collate_encoded(batch):
    """(list of EncodedImage, indices); the first error becomes BadData."""
    for _x, i, err in batch:
        if err is not None:
            raise BadData(err[0], err[1] or f"sample {i}")
    return [b[0] for b in batch], torch.tensor([b[1] for b in batch])


def decode_images(items: Sequence[EncodedImage], device: torch.device | str) -> list[torch.Tensor]:
    """uint8 (3, H, W) tensors on ``device``: the JPEGs decoded in one batched ``decode_jpeg`` call (nvjpeg on a
    CUDA device), the other images moved there. A batch that fails is decoded one image at a time, so a corrupt
    file is one BadData naming it."""
    from torchvision.io import ImageReadMode, decode_jpeg

    out: list[torch.Tensor | None] = [None if it.encoded else it.data.to(device) for it in items]
    jpeg = [k for k, it in enumerate(items) if it.encoded]
    if jpeg:
        try:
            decoded = decode_jpeg([items[k].data for k in jpeg], mode=ImageReadMode.RGB, device=device)
        except RuntimeError:
            decoded = [_decode_one(items[k], device) for k in jpeg]
        for k, x in zip(jpeg, decoded):
            out[k] = x
    return out


def _decode_one(item: EncodedImage, device) -> torch.Tensor:
    """One JPEG on ``device``; one that decoder refuses (nvjpeg and CMYK, say) is decoded by PIL, and one that PIL
    refuses too is a BadData line naming the file."""
    import io

    from PIL import Image, UnidentifiedImageError
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        return decode_jpeg(item.data, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        pass
    try:
        with Image.open(io.BytesIO(item.data.numpy().tobytes())) as im:
            rgb = np.array(im.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BadData(f"unreadable or truncated image ({first})", item.path) from None
    return torch.from_numpy(rgb).permute(2, 0, 1).contiguous().to(device)


def resolve_decode(decode: str, device: torch.device) -> str:
    """``cpu`` or ``gpu``: the decoder ``decode`` means on ``device`` (``auto``: the GPU's on CUDA). ``gpu``
    without a CUDA device is one UserError line."""
    if decode not in DECODERS:
        raise UserError(f"unknown decoder {decode!r}; choose {', '.join(DECODERS)}")
    on_cuda = device.type == "cuda" and torch.cuda.is_available()
    if decode == "gpu" and not on_cuda:
        why = "no CUDA device is available" if not torch.cuda.is_available() else f"extraction runs on {device}"
        raise UserError(f"--decode gpu decodes JPEGs on the CUDA device that extracts, but {why}; "
                        "use --decode cpu (or auto), or --device cuda")
    return "gpu" if decode != "cpu" and on_cuda else "cpu"


def preset_decode(preset: str, decode: str | None = None) -> str:
    """``decode`` when one is given, else the preset's (:data:`PRESET_DECODE`)."""
    return decode or PRESET_DECODE.get(preset, "auto")


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
        decode: str = "cpu",
        array: Any = None,
    ):
        self.trunk = trunk
        self.source = source  # the checkpoint's file or spec, named by errors
        self.checkpoint_id = checkpoint_id
        self.arch = arch
        self.cache = cache or FeatureCache()
        self.device = torch.device(device)
        self.autocast_dtype = resolve_precision(precision, self.device)
        self.precision = "bf16" if self.autocast_dtype is not None else "fp32"
        self.decode = resolve_decode(decode, self.device)
        self.batch_size = batch_size
        self.workers = workers
        self.progress = progress
        # an evalsuite.extract_array.ArrayExtraction: a dataset of at least its min_images is extracted by an
        # array job of its tasks instead of this process
        self.array = array
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
            # the GPU decoder's pixels differ slightly from PIL's: in the key when it decoded (see the module doc)
            **({"decode": "gpu"} if self.decode == "gpu" else {}),
        }

    def cache_entries(self, dataset: ImageDataset, taps: Sequence[str], pooling: str,
                      transform: Transform) -> tuple[dict[str, CacheEntry], dict[str, PoolSpec]]:
        """The cache entry and pooling of each tap for ``dataset`` (nothing is read or written)."""
        if len(dataset) == 0:
            raise BadData("dataset is empty", dataset.root)
        specs = self.pool_specs(taps, pooling, transform)
        n = len(dataset)
        return {t: self.cache.entry(self.entry_fields(dataset, t, specs[t], transform), n) for t in taps}, specs

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
        entries, specs = self.cache_entries(dataset, taps, pooling, transform)
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
            if self.array is not None and len(dataset) >= self.array.min_images:
                from .extract_array import extract_array

                extract_array(self, dataset, list(todo), pooling, transform)
            else:
                self._extract(dataset, todo, {t: specs[t] for t in todo}, transform)
            for tap, entry in todo.items():
                out[tap] = read(entry)
        return {t: out[t] for t in taps}

    # ------------------------------------------------------------ extraction

    def _extract(self, dataset, entries: dict[str, CacheEntry], specs: dict[str, PoolSpec], transform) -> None:
        rank, world = rank_and_world()  # torchrun: this rank extracts its share of the missing shards
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
            finalize_entries(entries, specs)
        _barrier(world)

    def extract_part(self, dataset: ImageDataset, taps: Sequence[str], pooling: str, transform: Transform,
                     part: int, parts: int) -> dict[str, CacheEntry]:
        """One array task's share: shards ``part``, ``part + parts``, ... of every incomplete entry (the rule
        torchrun ranks follow; a shard already on disk is kept), then the manifests when every shard of every
        entry is on disk (the task that finishes last writes them; two at once write the same bytes). Returns
        the entries."""
        if not 0 <= part < parts:
            raise UserError(f"array task {part} of {parts} does not exist")
        entries, specs = self.cache_entries(dataset, taps, pooling, transform)
        todo = {t: e for t, e in entries.items() if not e.is_complete()}
        for e in todo.values():
            if not (e.dir / "key.json").is_file():
                e.prepare(clean=False)  # other tasks may be writing here: the launcher cleans up after them
        if todo:
            any_entry = next(iter(todo.values()))
            mine = list(range(part, any_entry.num_shards, parts))
            self._run_shards(dataset, todo, {t: specs[t] for t in todo}, transform, any_entry, mine)
            if all_shards_done(todo, specs):
                finalize_entries(todo, specs)
        return entries

    def _run_shards(self, dataset, entries, specs, transform, ref: CacheEntry, shards: list[int]) -> None:
        need = {tap: {i for i in shards if not e.shard_done(i)} for tap, e in entries.items()}
        shards = [i for i in shards if any(i in s for s in need.values())]
        if not shards:
            return
        batches = []
        for i in shards:
            lo, hi = ref.shard_range(i)
            batches.extend(list(range(b, min(hi, b + self.batch_size))) for b in range(lo, hi, self.batch_size))
        gpu_decode = self.decode == "gpu"
        loader = torch.utils.data.DataLoader(
            EncodedImages(dataset) if gpu_decode else TransformedImages(dataset, transform),
            batch_sampler=batches,
            num_workers=self.workers,
            collate_fn=collate_encoded if gpu_decode else collate_images,
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
                if gpu_decode:  # one batched decode on the device, then the transform there
                    x = torch.stack([transform.on_tensor(im) for im in decode_images(x, self.device)])
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


def all_shards_done(entries: dict[str, CacheEntry], specs: dict[str, PoolSpec]) -> bool:
    """Every shard of every entry on disk with its rows and the tap's dimension (a bad one is deleted)."""
    return all(e.shard_done(i, specs[t].dim) for t, e in entries.items()
               for i in range(e.num_shards))


def finalize_entries(entries: dict[str, CacheEntry], specs: dict[str, PoolSpec]) -> None:
    """Write each entry's manifest (shard hashes, and the tap's pooling and pooled shape)."""
    for tap, e in entries.items():
        e.finalize({"pool": specs[tap].op, "shape": list(specs[tap].out_shape)})


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
