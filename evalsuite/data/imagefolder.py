"""ImageFolder: ``ROOT/<split>/<class>/<image>`` (torchvision's layout)."""

from __future__ import annotations

from pathlib import Path

from ..errors import BadData
from .base import LabelledFiles

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp", ".tif", ".tiff")


class ImageFolder(LabelledFiles):
    kind = "imagefolder"

    def __init__(self, root: str | Path, split: str = "train", skip_corrupt: bool = False):
        super().__init__(root, split)
        split_dir = self.root / split if split else self.root
        if not split_dir.is_dir():
            raise BadData(f"split directory {split!r} not found", split_dir)
        self.split_dir = split_dir
        self.classes = sorted(d.name for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
        if not self.classes:
            raise BadData("no class subdirectories (expected <split>/<class>/<image>)", split_dir)
        samples = []
        for ci, cname in enumerate(self.classes):
            for f in sorted((split_dir / cname).iterdir()):
                if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES:
                    samples.append((f, ci))
        if not samples:
            raise BadData("dataset is empty: no images in any class folder", split_dir)
        self.ids_root = split_dir
        self._set_samples(samples, skip_corrupt)
