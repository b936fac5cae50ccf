"""The dataset contract every reader implements.

A dataset is an ordered, deterministic list of samples of one split. Feature
extraction only needs ``len``, ``load_image(i)`` and ``fingerprint()``; tasks use
the targets (``labels`` for single-label data, ``label_matrix`` for VOC-style
multi-label data, or reader-specific accessors such as boxes or normals).
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import BadData


class ImageDataset(ABC):
    #: short name of the format, e.g. "imagefolder", "voc2007"
    kind: str = "images"

    def __init__(self, root: str | Path, split: str):
        self.root = Path(root)
        self.split = split
        self._fingerprint: str | None = None

    @property
    def name(self) -> str:
        return f"{self.kind}:{self.root.name}"

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def image_path(self, i: int) -> Path | None:
        """Path of sample ``i``'s image file, or None when images are not files (e.g. HDF5)."""

    def load_image(self, i: int) -> Image.Image:
        """Sample ``i`` as an RGB PIL image; a corrupt file raises BadData naming it."""
        path = self.image_path(i)
        if path is None:
            raise NotImplementedError(f"{type(self).__name__} must override load_image")
        return load_rgb(path)

    @property
    def ids(self) -> list[str]:
        return [str(i) for i in range(len(self))]

    def fingerprint_payload(self) -> Iterable[Any]:
        """What identifies the content: by default each image's relative path, size and mtime."""
        for i in range(len(self)):
            p = self.image_path(i)
            if p is None:
                yield i
            else:
                st = p.stat()
                yield (str(p.relative_to(self.root)) if p.is_relative_to(self.root) else str(p),
                       st.st_size, st.st_mtime_ns)

    def fingerprint(self) -> str:
        """A stable hash of the samples in order (used in the feature cache key)."""
        if self._fingerprint is None:
            h = hashlib.sha256(f"{self.kind}|{self.split}|".encode())
            for item in self.fingerprint_payload():
                h.update(json.dumps(item, default=str).encode())
                h.update(b"\n")
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "root": str(self.root), "split": self.split, "n": len(self)}


def load_rgb(path: str | Path) -> Image.Image:
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except FileNotFoundError:
        raise BadData("image file not found", path) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise BadData(f"unreadable or truncated image ({str(e).splitlines()[0] if str(e) else type(e).__name__})",
                      path) from None


class ClassificationDataset(ImageDataset):
    """Single-label data: ``labels`` is an int array, ``classes`` the class names."""

    classes: list[str]

    @property
    @abstractmethod
    def labels(self) -> np.ndarray: ...
