"""The dataset contract every reader implements.

A dataset is an ordered, deterministic list of samples of one split. Feature
extraction only needs ``len``, ``load_image(i)`` and ``fingerprint()``; tasks use
the targets (``labels`` for single-label data, ``label_matrix`` for VOC-style
multi-label data, or reader-specific accessors such as boxes or normals).
"""

from __future__ import annotations

import hashlib
import json
import sys
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
        d = {"kind": self.kind, "root": str(self.root), "split": self.split, "n": len(self)}
        if getattr(self, "skipped", None):
            d["skipped_corrupt"] = len(self.skipped)
        return d

    #: (path, reason) of every file dropped by ``skip_corrupt=True``; empty otherwise
    skipped: list[tuple[str, str]] = []

    def _keep_readable(self, paths: list[Path], skip_corrupt: bool) -> list[int]:
        """Indices of ``paths`` to keep. Without ``skip_corrupt`` every index (errors surface on load);
        with it each image is fully decoded once, unreadable ones are dropped, counted in
        ``self.skipped`` and reported once on stderr."""
        if not skip_corrupt:
            self.skipped = []
            return list(range(len(paths)))
        keep, skipped = [], []
        for i, p in enumerate(paths):
            reason = image_problem(p)
            if reason is None:
                keep.append(i)
            else:
                skipped.append((str(p), reason))
        self.skipped = skipped
        if skipped:
            print(f"warning: skipped {len(skipped)} corrupt or missing image(s) in {self.root} "
                  f"(first: {skipped[0][0]}: {skipped[0][1]})", file=sys.stderr)
        return keep


def image_problem(path: str | Path) -> str | None:
    """Why ``path`` is not a readable image, or None if it decodes fully."""
    try:
        load_rgb(path)
    except BadData as e:
        return e.message
    return None


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


class LabelledFiles(ClassificationDataset):
    """Single-label data given as a list of (image file, class index) pairs: the one implementation of
    length, paths, ids (relative to ``ids_root``) and labels that file-list readers share."""

    ids_root: Path

    def _set_samples(self, samples: Iterable[tuple[Path, int]], skip_corrupt: bool) -> None:
        samples = [(Path(p), int(c)) for p, c in samples]
        keep = self._keep_readable([p for p, _ in samples], skip_corrupt)
        self.samples = [samples[k] for k in keep]
        self._labels = np.array([c for _, c in self.samples], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.samples)

    def image_path(self, i: int) -> Path:
        return self.samples[i][0]

    @property
    def ids(self) -> list[str]:
        root = self.ids_root
        return [str(p.relative_to(root)) if p.is_relative_to(root) else str(p) for p, _ in self.samples]

    @property
    def labels(self) -> np.ndarray:
        return self._labels


class Subset(ImageDataset):
    """The samples ``indices`` of ``dataset``, in that order: a dataset of its own for the feature cache (its
    fingerprint is the parent's and the indices), so a task can extract features of a sample of a split;
    ``split`` names it (e.g. a held-out "val" drawn from "train")."""

    def __init__(self, dataset: ImageDataset, indices: Iterable[int], split: str | None = None):
        super().__init__(dataset.root, split or dataset.split)
        self.dataset = dataset
        self.kind = dataset.kind
        self.indices = np.asarray(list(indices), dtype=np.int64)
        if len(self.indices) and (self.indices.min() < 0 or self.indices.max() >= len(dataset)):
            raise ValueError(f"subset indices outside the dataset's {len(dataset)} samples")

    def __len__(self) -> int:
        return len(self.indices)

    def image_path(self, i: int) -> Path | None:
        return self.dataset.image_path(int(self.indices[i]))

    def load_image(self, i: int) -> Image.Image:
        return self.dataset.load_image(int(self.indices[i]))

    @property
    def ids(self) -> list[str]:
        ids = self.dataset.ids
        return [ids[i] for i in self.indices]

    def fingerprint_payload(self) -> Iterable[Any]:
        yield self.dataset.fingerprint()
        yield hashlib.sha256(self.indices.tobytes()).hexdigest()


class ClassificationSubset(Subset, ClassificationDataset):
    """A :class:`Subset` of a single-label dataset, with its classes and labels."""

    def __init__(self, dataset: ClassificationDataset, indices: Iterable[int], split: str | None = None):
        super().__init__(dataset, indices, split)
        self.classes = list(dataset.classes)
        self.skipped = getattr(dataset, "skipped", [])

    @property
    def labels(self) -> np.ndarray:
        return self.dataset.labels[self.indices]
