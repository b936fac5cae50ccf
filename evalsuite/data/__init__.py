"""Dataset readers (real on-disk formats) and the synthetic generator.

``open_dataset(kind, root, split)`` is the single entry point tasks use.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..errors import UserError
from .base import ClassificationDataset, ImageDataset, Subset, load_rgb
from .cifar import CIFAR, open_cifar
from .digits import Digits
from .imagefolder import ImageFolder
from .imagenet import ImageNet
from .nyuv2 import NYUv2
from .places import Places205
from .transfer import TRANSFER_DATASETS, TransferSpec, open_transfer, transfer_opener
from .video import EgoMotion, VideoFolder
from .voc import VOC2007, VOC2012, VOC_CLASSES

READERS: dict[str, Callable[..., ImageDataset]] = {
    "imagefolder": ImageFolder,
    "imagenet": ImageNet,
    "voc2007": VOC2007,
    "voc2012": VOC2012,
    "nyuv2": NYUv2,
    "places205": Places205,
    "cifar10": open_cifar("cifar10"),
    "cifar100": open_cifar("cifar100"),
    "digits": Digits,
    "video": VideoFolder,
    "egomotion": EgoMotion,
}
# the transfer suite's datasets (cifar10, cifar100 and voc2007 keep their readers above; open_transfer gives them
# the suite's val / trainval splits)
READERS.update({name: transfer_opener(name) for name in TRANSFER_DATASETS if name not in READERS})


# Where each format lives under a data root (the synthetic generator writes the same layout).
DATA_LAYOUT: dict[str, str] = {
    "imagefolder": "imagefolder",
    "imagenet": "imagenet",
    "voc2007": "VOCdevkit/VOC2007",
    "voc2012": "VOCdevkit/VOC2012",
    "places205": "places205",
    "nyuv2": "nyuv2",
    "cifar10": "cifar-10-batches-py",
    "cifar100": "cifar-100-python",
    "digits": "",  # scikit-learn's bundled 8x8 digits: no files under the data root
    "video": "video",
    "egomotion": "egomotion",
}
DATA_LAYOUT.update({name: spec.layout for name, spec in TRANSFER_DATASETS.items() if name not in DATA_LAYOUT})


def open_dataset(kind: str, root: str | Path, split: str, **options) -> ImageDataset:
    if kind not in READERS:
        raise UserError(f"unknown dataset kind {kind!r}; known: {', '.join(sorted(READERS))}")
    try:
        return READERS[kind](root, split, **options)
    except TypeError as e:
        if "unexpected keyword argument" in str(e):
            raise UserError(f"dataset kind {kind!r} does not take that option ({e})") from None
        raise


__all__ = ["CIFAR", "DATA_LAYOUT", "ClassificationDataset", "Digits", "EgoMotion", "ImageDataset", "ImageFolder",
           "ImageNet", "NYUv2", "Places205", "READERS", "Subset", "TRANSFER_DATASETS", "TransferSpec", "VOC2007",
           "VOC2012", "VOC_CLASSES", "VideoFolder", "load_rgb", "open_dataset", "open_transfer"]
