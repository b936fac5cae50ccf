"""Augmented training views of the linear benchmarks: random crops, flips and colour noise before the trunk.

Recipes (``train_augmentation``):

- ``goyal19``: fair_self_supervision_benchmark's ResNet-50 Places205 linear configs
  (``configs/benchmark_tasks/image_classification/places205/resnet50_*_finetune_linear.yaml``:
  ``DATA_TRANSFORMS: [random_sized_crop, horizontal_flip]``, ``DATA_PROCESSING: [color_normalization, lighting,
  color_jitter]``), applied as ``self_supervision_benchmark/data/data_input.py`` does, in the order crop, flip,
  /255, colour jitter, lighting, normalisation, with ``data/data_transformation.py``'s functions: a crop of
  8-100% of the area with aspect ratio uniform in [3/4, 4/3] (sides swapped with p 0.5; after 10 failed tries,
  the centre crop of the image scaled to the crop size) resized bilinearly without antialiasing (cv2
  INTER_LINEAR), a horizontal flip with p 0.5, brightness / contrast / saturation jitter of 0.4 in random order
  (no clipping), and AlexNet PCA lighting noise with std 0.1.
- ``vissl``: VISSL's ``eval_resnet_8gpu_transfer_places205_linear.yaml``: torchvision ``RandomResizedCrop(size)``
  then ``RandomHorizontalFlip()`` (no colour noise).
- ``dino21``: DINO's ``eval_linear.py`` ``train_transform``: the same ``RandomResizedCrop(224)`` +
  ``RandomHorizontalFlip()`` (the ``vissl`` recipe's draws, cached under their own name).

Every draw comes from a generator seeded by (run seed, view index, the image's pixels), so a view is the same
whichever worker, shard or process extracts it, and the feature cache can key it by ``(recipe, seed, view)``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from evalsuite.colorspace import to_input_space
from evalsuite.errors import UserError
from evalsuite.features import Transform

RECIPES = ("goyal19", "vissl", "dino21")
RECIPE_NOTES = {
    "goyal19": "fair_ssb random_sized_crop (area 0.08-1, aspect 3/4-4/3) + horizontal flip + colour jitter 0.4 "
               "(brightness, contrast, saturation) + PCA lighting 0.1",
    "vissl": "torchvision RandomResizedCrop + RandomHorizontalFlip",
    "dino21": "DINO eval_linear.py: torchvision RandomResizedCrop + RandomHorizontalFlip",
}

# fair_ssb data_input.py / data_transformation.py constants
CROP_AREA = (0.08, 1.0)  # TRAIN.IMG_CROP_MIN_AREA, IMG_CROP_MAX_AREA
CROP_ASPECT = (3.0 / 4.0, 4.0 / 3.0)
JITTER = 0.4  # color_jitter(img_brightness=0.4, img_contrast=0.4, img_saturation=0.4)
LIGHTING_STD = 0.1
PCA_EIGVAL = np.array([0.2175, 0.0188, 0.0045], dtype=np.float32)  # RGB
PCA_EIGVEC = np.array([[-0.5675, 0.7192, 0.4009],
                       [-0.5808, -0.0045, -0.8140],
                       [-0.5836, -0.6948, 0.4203]], dtype=np.float32)


# ---------------------------------------------------------------------------- fair_ssb (goyal19)
# ``rng`` needs ``uniform``, ``integers``, ``permutation`` and ``normal``; the draws happen in fair_ssb's order.


def sample_crop(rng, height: int, width: int) -> tuple[int, int, int, int] | None:
    """fair_ssb ``random_sized_crop``'s box ``(y, x, h, w)``; None when its 10 tries fail."""
    for _ in range(10):
        target = rng.uniform(*CROP_AREA) * height * width
        aspect = rng.uniform(*CROP_ASPECT)
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if rng.uniform() < 0.5:
            w, h = h, w
        if h <= height and w <= width:
            y = 0 if h == height else int(rng.integers(0, height - h))
            x = 0 if w == width else int(rng.integers(0, width - w))
            return y, x, h, w
    return None


def resize_bilinear(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(C, H, W) float resized like cv2 INTER_LINEAR (half-pixel centres, no antialiasing)."""
    return F.interpolate(x[None], size=(height, width), mode="bilinear", align_corners=False, antialias=False)[0]


def scale_center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """fair_ssb's fallback ``center_crop(size, scale(size, image))``: shorter side to ``size`` (floor), ceil offsets."""
    h, w = x.shape[1:]
    if not ((w <= h and w == size) or (h <= w and h == size)):
        new_h, new_w = size, size
        if w < h:
            new_h = int(math.floor(h / w * size))
        else:
            new_w = int(math.floor(w / h * size))
        x = resize_bilinear(x, new_h, new_w)
        h, w = new_h, new_w
    y0, x0 = math.ceil((h - size) / 2), math.ceil((w - size) / 2)
    return x[:, y0:y0 + size, x0:x0 + size]


def grayscale(x: torch.Tensor) -> torch.Tensor:
    return 0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2]


def color_jitter(x: torch.Tensor, rng, strength: float = JITTER) -> torch.Tensor:
    """Brightness, contrast and saturation blends in a random order, each with alpha 1 + U(-strength, strength)."""
    for op in rng.permutation(3):
        alpha = 1.0 + rng.uniform(-strength, strength)
        if op == 0:  # brightness: blend with black
            x = x * alpha
        elif op == 1:  # contrast: blend with the mean grey level
            x = x * alpha + float(grayscale(x).mean()) * (1 - alpha)
        else:  # saturation: blend with the greyscale image
            x = x * alpha + grayscale(x)[None] * (1 - alpha)
    return x


def lighting(x: torch.Tensor, rng, std: float = LIGHTING_STD) -> torch.Tensor:
    """AlexNet PCA noise: every pixel shifted by eigvec @ (alpha * eigval), alpha ~ N(0, std^2) per component."""
    alpha = np.asarray(rng.normal(0, std, size=(1, 3)), dtype=np.float32)
    rgb = (PCA_EIGVEC * alpha * PCA_EIGVAL[None]).sum(axis=1)
    return x + torch.from_numpy(rgb).to(x.dtype)[:, None, None]


def goyal19_view(image: Image.Image, size: int, rng) -> torch.Tensor:
    """One fair_ssb training view of ``image``: RGB (3, size, size) on the [0, 1] scale (not clipped)."""
    x = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32).copy()).permute(2, 0, 1)
    box = sample_crop(rng, x.shape[1], x.shape[2])
    if box is None:
        x = scale_center_crop(x, size)
    else:
        y, x0, h, w = box
        x = resize_bilinear(x[:, y:y + h, x0:x0 + w], size, size)
    if rng.uniform() < 0.5:
        x = x.flip(-1)
    x = x / 255.0
    return lighting(color_jitter(x, rng), rng)


# ---------------------------------------------------------------------------- VISSL


def vissl_view(image: Image.Image, size: int, seed: int) -> torch.Tensor:
    """``Compose([RandomResizedCrop(size), RandomHorizontalFlip(), ToTensor()])`` run under ``torch.manual_seed(seed)``
    (the global generator is left as it was)."""
    from torchvision import transforms as T
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        i, j, h, w = T.RandomResizedCrop.get_params(image, [0.08, 1.0], [3.0 / 4.0, 4.0 / 3.0])
        flip = bool(torch.rand(1) < 0.5)
    image = TF.resized_crop(image, i, j, h, w, [size, size], InterpolationMode.BILINEAR, antialias=True)
    if flip:
        image = TF.hflip(image)
    return TF.to_tensor(image)


# ---------------------------------------------------------------------------- the transform


def image_digest(image: Image.Image) -> int:
    """64 bits of the image's pixels (with its mode and size)."""
    h = hashlib.blake2b(f"{image.mode}|{image.size}|".encode(), digest_size=8)
    h.update(image.tobytes())
    return int.from_bytes(h.digest(), "little")


@dataclass(frozen=True)
class AugmentedTransform(Transform):
    """View ``view`` of ``recipe`` for every image; the normalisation and input space are the base transform's.

    A :class:`~evalsuite.features.Transform` for the feature extractor: ``to_dict()`` (the cache key) adds
    ``recipe``, ``seed`` and ``view``, so every view is cached on its own.
    """

    recipe: str = "goyal19"
    seed: int = 0
    view: int = 0

    def __post_init__(self):
        super().__post_init__()
        if self.recipe not in RECIPES:
            raise UserError(f"unknown train augmentation {self.recipe!r}; choose one of {', '.join(RECIPES)}")

    @classmethod
    def of(cls, base: Transform, recipe: str, seed: int, view: int) -> AugmentedTransform:
        kept = {f.name: getattr(base, f.name) for f in dataclasses.fields(Transform)}
        return cls(**kept, recipe=recipe, seed=int(seed), view=int(view))

    def rng(self, image: Image.Image) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.view, image_digest(image)])

    def __call__(self, image: Image.Image) -> torch.Tensor:
        rng = self.rng(image)
        if self.recipe == "goyal19":
            rgb = goyal19_view(image, self.size, rng)
        else:
            rgb = vissl_view(image, self.size, int(rng.integers(2**63)))
        return to_input_space(rgb, self.input_space, self.mean, self.std)
