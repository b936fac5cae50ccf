"""Dataset readers (real on-disk formats) and the synthetic generator.

``open_dataset(kind, root, split)`` is the single entry point tasks use.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..errors import UserError
from .base import ClassificationDataset, ImageDataset, load_rgb
from .imagefolder import ImageFolder

READERS: dict[str, Callable[..., ImageDataset]] = {
    "imagefolder": ImageFolder,
}


def open_dataset(kind: str, root: str | Path, split: str, **options) -> ImageDataset:
    if kind not in READERS:
        raise UserError(f"unknown dataset kind {kind!r}; known: {', '.join(sorted(READERS))}")
    return READERS[kind](root, split, **options)


__all__ = ["ClassificationDataset", "ImageDataset", "ImageFolder", "READERS", "load_rgb", "open_dataset"]
