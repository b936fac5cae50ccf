"""Training views for fine-tuning: a random crop resized to the training size, then a horizontal flip (p 0.5).

Recipes (``train_augmentation``):

- ``simclr``: SimCLR's ``data_util.preprocess_for_train`` as ``run.py --train_mode=finetune`` calls it (no colour
  distortion, no blur): ``crop_and_resize`` then ``tf.image.random_flip_left_right``. Its crop is
  ``tf.image.sample_distorted_bounding_box`` with 8-100 % of the area, aspect ratio (w / h) in [3/4, 4/3],
  ``min_object_covered=0.1`` over the whole image (so at least 10 % of it), 100 attempts, else the whole image,
  resized bicubically. Here area and aspect are drawn uniformly and a box that does not fit or covers less than
  10 % is drawn again (TF's kernel samples in its own way), and the resizing is PIL's bicubic filter, which
  antialiases where TF's ``resize_bicubic`` does not.
- ``vissl``: torchvision's ``RandomResizedCrop(size)`` (8-100 % of the area, log-uniform aspect ratio in
  [3/4, 4/3], 10 attempts, else the centre crop) resized bilinearly, then ``RandomHorizontalFlip()``, as VISSL's
  ``eval_resnet_8gpu_transfer_in1k_semi_sup_fulltune.yaml`` lists them.

Every draw comes from a generator seeded by (seed, epoch, image index), so a view is the same in any data-loader
worker and after a resume.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from evalsuite.colorspace import to_input_space
from evalsuite.errors import UserError

RECIPES = ("simclr", "vissl")
RECIPE_NOTES = {
    "simclr": "random crop (8-100% of the area, at least 10%, aspect 3/4-4/3, 100 tries, else the whole image) "
              "resized bicubically + horizontal flip (SimCLR preprocess_for_train, color_distort=False)",
    "vissl": "torchvision RandomResizedCrop (bilinear) + RandomHorizontalFlip",
}
AREA = (0.08, 1.0)
ASPECT = (3.0 / 4.0, 4.0 / 3.0)
SIMCLR_MIN_COVERED = 0.1  # crop_and_resize's min_object_covered, the bounding box being the whole image
SIMCLR_ATTEMPTS = 100
TORCHVISION_ATTEMPTS = 10


def simclr_box(rng: np.random.Generator, height: int, width: int) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a SimCLR training crop (see the module docstring)."""
    area = height * width
    for _ in range(SIMCLR_ATTEMPTS):
        aspect = rng.uniform(*ASPECT)
        target = rng.uniform(*AREA) * area
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < h <= height and 0 < w <= width and h * w >= SIMCLR_MIN_COVERED * area:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    return 0, 0, height, width


def torchvision_box(rng: np.random.Generator, height: int, width: int) -> tuple[int, int, int, int]:
    """(top, left, h, w) drawn as torchvision's ``RandomResizedCrop.get_params`` draws it."""
    area = height * width
    for _ in range(TORCHVISION_ATTEMPTS):
        target = rng.uniform(*AREA) * area
        aspect = math.exp(rng.uniform(math.log(ASPECT[0]), math.log(ASPECT[1])))
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    ratio = width / height
    if ratio < ASPECT[0]:
        w, h = width, int(round(width / ASPECT[0]))
    elif ratio > ASPECT[1]:
        w, h = int(round(height * ASPECT[1])), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


@dataclass(frozen=True)
class TrainView:
    """One recipe at one size with the checkpoint's input normalisation: ``view(image, seed, epoch, index)``."""

    recipe: str = "simclr"
    size: int = 224
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    input_space: str = "rgb"

    def __post_init__(self):
        if self.recipe not in RECIPES:
            raise UserError(f"unknown train augmentation {self.recipe!r}; choose one of {', '.join(RECIPES)}")

    def __call__(self, image: Image.Image, seed: int, epoch: int, index: int) -> torch.Tensor:
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as TF

        rng = np.random.default_rng([int(seed), int(epoch), int(index)])
        box = simclr_box if self.recipe == "simclr" else torchvision_box
        top, left, h, w = box(rng, image.height, image.width)
        mode = InterpolationMode.BICUBIC if self.recipe == "simclr" else InterpolationMode.BILINEAR
        image = TF.resized_crop(image, top, left, h, w, [self.size, self.size], mode, antialias=True)
        if rng.uniform() < 0.5:
            image = TF.hflip(image)
        return to_input_space(TF.to_tensor(image), self.input_space, self.mean, self.std)
