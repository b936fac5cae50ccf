"""CIFAR-10 / CIFAR-100: the official "python version" pickle batches, or JPEG/PNG class folders.

Pickle layout (Krizhevsky's download, unpacked)::

    cifar-10-batches-py/data_batch_1..5, test_batch, batches.meta    dict b"data" (N, 3072) uint8 (R plane,
                                                                      G plane, B plane of 32x32), b"labels"
    cifar-100-python/train, test, meta                                b"fine_labels", b"coarse_labels"

The batches are read with :func:`evalsuite.data.pickles.safe_unpickle` (numpy arrays only), so a
downloaded batch cannot run code.

Folder layout: ``ROOT/<split>/<class>/<image>`` (as written by the usual ``cifar2png`` converters) is
read with the ImageFolder reader when ``ROOT/<split>`` exists.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import BadData
from .base import ClassificationDataset
from .imagefolder import ImageFolder
from .pickles import safe_unpickle


def _get(d: dict, key: str, path: Path):
    for k in (key.encode(), key):
        if isinstance(d, dict) and k in d:
            return d[k]
    raise BadData(f"CIFAR batch lacks key {key!r}", path)


VARIANTS = {
    "cifar10": {"train": [f"data_batch_{k}" for k in range(1, 6)], "test": ["test_batch"], "meta": "batches.meta",
                "names": "label_names", "labels": {"fine": "labels"}},
    "cifar100": {"train": ["train"], "test": ["test"], "meta": "meta", "names": "fine_label_names",
                 "labels": {"fine": "fine_labels", "coarse": "coarse_labels"}},
}


class CIFAR(ClassificationDataset):
    """``cifar10`` / ``cifar100`` (``label="fine"`` or ``"coarse"`` for CIFAR-100), splits train/test."""

    kind = "cifar10"

    def __init__(self, root: str | Path, split: str = "train", variant: str = "cifar10", label: str = "fine"):
        super().__init__(root, split)
        self.kind = variant
        v = VARIANTS[variant]
        if split not in ("train", "test"):
            raise BadData(f"unknown CIFAR split {split!r} (train or test)", self.root)
        if label not in v["labels"]:
            raise BadData(f"label {label!r} not available for {variant}", self.root)
        if not self.root.is_dir():
            raise BadData(f"{variant} directory not found", self.root)
        datas, labels = [], []
        for name in v[split]:
            path = self.root / name
            b = safe_unpickle(path, "CIFAR batch file")
            x = np.asarray(_get(b, "data", path))
            y = np.asarray(_get(b, v["labels"][label], path))
            if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072 or len(y) != len(x):
                raise BadData(f"unexpected data {x.dtype} {x.shape} / {len(y)} labels", path)
            datas.append(x)
            labels.append(y.astype(np.int64))
        self.data = np.concatenate(datas).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        self._labels = np.concatenate(labels)
        meta_path = self.root / v["meta"]
        names_key = v["names"] if label == "fine" else "coarse_label_names"
        if meta_path.exists():
            names = _get(safe_unpickle(meta_path, "CIFAR batch file"), names_key, meta_path)
            self.classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
        else:
            self.classes = [str(k) for k in range(int(self._labels.max()) + 1)]
        if self._labels.min() < 0 or self._labels.max() >= len(self.classes):
            raise BadData("label outside the class list", self.root / v[split][0])
        self.skipped = []

    def __len__(self) -> int:
        return len(self.data)

    def image_path(self, i: int) -> None:
        return None

    def load_image(self, i: int) -> Image.Image:
        return Image.fromarray(self.data[i], "RGB")

    @property
    def labels(self) -> np.ndarray:
        return self._labels

    def fingerprint_payload(self):
        yield hashlib.sha256(self.data.tobytes()).hexdigest()
        yield hashlib.sha256(self._labels.tobytes()).hexdigest()


def open_cifar(variant: str):
    def opener(root: str | Path, split: str = "train", skip_corrupt: bool = False, **options) -> ClassificationDataset:
        root = Path(root)
        if (root / split).is_dir():  # JPEG/PNG class folders
            ds = ImageFolder(root, split, skip_corrupt=skip_corrupt)
            ds.kind = variant
            return ds
        return CIFAR(root, split, variant=variant, **options)
    return opener
