"""scikit-learn's bundled 8x8 handwritten digits (1,797 real images, 10 classes) as a small RGB dataset.

No files are needed: the data ships inside scikit-learn (``sklearn.datasets.load_digits``, the UCI
optical-recognition test set). Each 8x8 image (ink 0..16) is scaled to 0..255, inverted to dark ink on
white like a scan, and upsampled bilinearly to ``size`` x ``size`` RGB. Splits are deterministic:
``test`` is every 4th image (indices 3, 7, 11, ...; 449 images), ``train`` the rest (1,348), ``all``
everything, each in the original order.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import BadData
from .base import ClassificationDataset


class Digits(ClassificationDataset):
    kind = "digits"

    def __init__(self, root: str | Path = "", split: str = "train", size: int = 32):
        super().__init__(root or ".", split)
        from sklearn.datasets import load_digits

        d = load_digits()
        idx = np.arange(len(d.target))
        if split == "train":
            idx = idx[idx % 4 != 3]
        elif split == "test":
            idx = idx[idx % 4 == 3]
        elif split != "all":
            raise BadData(f"unknown digits split {split!r} (train, test or all)", self.root)
        self.indices = idx
        self.size = int(size)
        self.images8 = d.images[idx]
        self._labels = d.target[idx].astype(np.int64)
        self.classes = [str(k) for k in range(10)]
        self.skipped = []

    @property
    def name(self) -> str:
        return "digits:sklearn"

    def __len__(self) -> int:
        return len(self.indices)

    def image_path(self, i: int) -> None:
        return None

    def load_image(self, i: int) -> Image.Image:
        g = (255 - self.images8[i] * (255 / 16)).round().astype(np.uint8)
        im = Image.fromarray(g, "L").resize((self.size, self.size), Image.BILINEAR)
        return im.convert("RGB")

    @property
    def labels(self) -> np.ndarray:
        return self._labels

    def fingerprint_payload(self):
        yield self.size
        yield hashlib.sha256(self.images8.tobytes()).hexdigest()
        yield hashlib.sha256(self._labels.tobytes()).hexdigest()

    def describe(self):
        d = super().describe()
        d["root"] = "sklearn.datasets.load_digits"
        return d
