"""Dataset readers (real on-disk formats) and the synthetic generator.

``open_dataset(kind, root, split)`` is the single entry point tasks use.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..errors import UserError
from .base import ClassificationDataset, ImageDataset, load_rgb
from .cifar import CIFAR, open_cifar
from .digits import Digits
from .imagefolder import ImageFolder
from .nyuv2 import NYUv2
from .places import Places205
from .voc import VOC2007, VOC2012, VOC_CLASSES

READERS: dict[str, Callable[..., ImageDataset]] = {
    "imagefolder": ImageFolder,
    "voc2007": VOC2007,
    "voc2012": VOC2012,
    "nyuv2": NYUv2,
    "places205": Places205,
    "cifar10": open_cifar("cifar10"),
    "cifar100": open_cifar("cifar100"),
    "digits": Digits,
}


def open_dataset(kind: str, root: str | Path, split: str, **options) -> ImageDataset:
    if kind not in READERS:
        raise UserError(f"unknown dataset kind {kind!r}; known: {', '.join(sorted(READERS))}")
    try:
        return READERS[kind](root, split, **options)
    except TypeError as e:
        if "unexpected keyword argument" in str(e):
            raise UserError(f"dataset kind {kind!r} does not take that option ({e})") from None
        raise


__all__ = ["CIFAR", "ClassificationDataset", "Digits", "ImageDataset", "ImageFolder", "NYUv2", "Places205", "READERS",
           "VOC2007", "VOC2012", "VOC_CLASSES", "load_rgb", "open_dataset"]
