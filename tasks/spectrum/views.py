"""The second view of each image for the alignment metric: its horizontal flip, or one deterministic augmented view
of the linear probes' recipes (:class:`tasks.linear.augment.AugmentedTransform`, seeded per image).

Either is an :class:`evalsuite.features.Transform` whose ``to_dict()`` (the feature cache key) names the view, so
its features are cached beside the plain ones and extracted through ``ctx.features`` like any other.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from PIL import Image, ImageOps

from evalsuite.features import Transform
from tasks.linear.augment import RECIPE_NOTES, RECIPES, AugmentedTransform

VIEWS = ("hflip", *RECIPES)


@dataclass(frozen=True)
class HFlipTransform(Transform):
    """The evaluation transform of the horizontally mirrored image (mirrored before the resize and crop)."""

    hflip: bool = True

    @classmethod
    def of(cls, base: Transform) -> HFlipTransform:
        return cls(**{f.name: getattr(base, f.name) for f in fields(Transform)})

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return super().__call__(ImageOps.mirror(image) if self.hflip else image)


def view_transform(base: Transform, view: str, seed: int) -> Transform:
    """The transform of the second view: ``hflip``, or view 0 of a linear-probe augmentation recipe at ``seed``."""
    if view == "hflip":
        return HFlipTransform.of(base)
    return AugmentedTransform.of(base, view, seed, view=0)


def describe_view(view: str) -> str:
    """What the second view is, for the records."""
    if view == "hflip":
        return "the horizontally mirrored image through the same evaluation transform"
    return f"one augmented view per image ({RECIPE_NOTES[view]}), seeded by (run seed, image pixels)"
