"""Dataset readers (real on-disk formats) and the synthetic generator.

``open_dataset(kind, root, split)`` is the single entry point tasks use.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..errors import UserError
from .base import ClassificationDataset, ImageDataset, load_rgb
from .imagefolder import ImageFolder
from .nyuv2 import NYUv2
from .voc import VOC2007, VOC_CLASSES

READERS: dict[str, Callable[..., ImageDataset]] = {
    "imagefolder": ImageFolder,
    "voc2007": VOC2007,
    "nyuv2": NYUv2,
}


def open_dataset(kind: str, root: str | Path, split: str, **options) -> ImageDataset:
    if kind not in READERS:
        raise UserError(f"unknown dataset kind {kind!r}; known: {', '.join(sorted(READERS))}")
    return READERS[kind](root, split, **options)


__all__ = ["ClassificationDataset", "ImageDataset", "ImageFolder", "NYUv2", "READERS", "VOC2007", "VOC_CLASSES",
           "load_rgb", "open_dataset"]
