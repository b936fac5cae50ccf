"""The many-dataset transfer suite of Ericsson et al. (CVPR 2021, github linusericsson/ssl-transfer) and the CD-FSL
few-shot sets (github IBM/cdfsl-benchmark): one :class:`TransferSpec` per dataset in :data:`TRANSFER_DATASETS`, and
``open_transfer(name, root, split)`` returning a :class:`~evalsuite.data.base.ClassificationDataset` (VOC2007: the
multi-label :class:`~evalsuite.data.voc.VOC2007`).

Files are read by torchvision's own dataset classes (``download=False``) where it has one, by torchvision's
``ImageFolder`` where the reference does so (Caltech101, CropDisease), and by :mod:`evalsuite.data.cdfsl` for ISIC and
ChestX. ``root`` is the dataset's folder (``<data root>/<TransferSpec.layout>``, the folder name torchvision expects)
or the data root holding it.

Splits (``train``, ``val``, ``trainval``, ``test``) follow ssl-transfer's ``linear.py`` (``get_train_valid_loader``):

- official val (Aircraft, DTD partition 1, Flowers102, VOC2007): the dataset's own train / val / test files;
  ``trainval`` = train + val (the reference's ``ConcatDataset``).
- no official val (Caltech101, Cars, CIFAR, Food101, Pets, SUN397 partition 1): ``trainval`` = the official training
  split (Pets: its ``trainval`` file), ``val`` = a random 20 % of it and ``train`` = the other 80 %: the reference's
  ``np.random.seed(0); np.random.shuffle(range(N))``, first ``floor(0.2 N)`` indices to val (:func:`holdout_split`).
- Caltech101 has no official split: the reference's ``caltech101-splits`` (``create_caltech101_splits``): over
  ``ImageFolder(101_ObjectCategories)`` (102 classes, ``BACKGROUND_Google`` included, which torchvision's
  ``Caltech101`` drops), 30 draws *with replacement* per class after ``np.random.seed(0)``, duplicates removed,
  is train (2,416 images); the rest is test (6,728). :func:`caltech101_train_indices` reproduces the published
  ``train.txt`` (commit 416913f) exactly (checked in the tests from the class sizes).
- the CD-FSL sets (EuroSAT, ISIC, ChestX, CropDisease) have one split, ``test``: every image, the pool CD-FSL and
  ssl-transfer's ``few_shot.py`` draw their episodes from.

Derived splits keep the dataset's order (ascending indices). Labels are torchvision's (e.g. Aircraft's follow
``variants.txt``, the reference's sorted names: the same partition, other indices).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ..errors import BadData, UserError
from .base import ClassificationDataset, ClassificationSubset, ImageDataset, LabelledFiles

Metric = Literal["top1", "mean_per_class", "map11"]
ALL_SPLITS = ("train", "val", "trainval", "test")
FEWSHOT_SPLITS = ("test",)
VAL_FRACTION = 0.2  # ssl-transfer get_train_valid_loader(valid_size=0.2, random_seed=0)
VAL_SEED = 0
CALTECH_TRAIN_PER_CLASS = 30  # ssl-transfer create_caltech101_splits(num_train_per_class=30), np.random.seed(0)
CALTECH_SEED = 0


@dataclass(frozen=True)
class TransferSpec:
    """One dataset of the suite: who reads it, how it is scored, where it lives and where its splits come from."""

    name: str
    reader: str  # the class that reads the files
    metric: Metric  # ssl-transfer's LINEAR_DATASETS metric (few-shot: mean episode accuracy)
    num_classes: int  # of the real dataset
    layout: str  # folder under the data root (DATA_LAYOUT)
    val: Literal["official", "holdout", "none"]  # the dataset's own val, 20 % of train, or no val (few-shot)
    provenance: str  # where each split comes from
    protocol: Literal["linear", "fewshot"] = "linear"

    @property
    def splits(self) -> tuple[str, ...]:
        return FEWSHOT_SPLITS if self.protocol == "fewshot" else ALL_SPLITS


_HOLDOUT = "val = a random 20% of it (np.random.seed(0) shuffle), train = the other 80%"
_FEWSHOT = "test = every image (CD-FSL draws its episodes from the whole dataset)"

TRANSFER_DATASETS: dict[str, TransferSpec] = {s.name: s for s in (
    TransferSpec("fgvc_aircraft", "torchvision.datasets.FGVCAircraft", "mean_per_class", 100, "fgvc-aircraft-2013b",
                 "official", "official images_variant_{train,val,test}.txt (variant level); trainval = train + val"),
    TransferSpec("caltech101", "torchvision.datasets.ImageFolder", "mean_per_class", 102, "caltech101", "holdout",
                 "101_ObjectCategories with BACKGROUND_Google; trainval = ssl-transfer's caltech101-splits train "
                 "(30 draws with replacement per class, seed 0, deduplicated), test = the rest; " + _HOLDOUT),
    TransferSpec("stanford_cars", "torchvision.datasets.StanfordCars", "top1", 196, "stanford_cars", "holdout",
                 "official train (devkit/cars_train_annos.mat) and test (cars_test_annos_withlabels.mat); "
                 "trainval = train; " + _HOLDOUT),
    TransferSpec("cifar10", "evalsuite.data.cifar.CIFAR", "top1", 10, "cifar-10-batches-py", "holdout",
                 "official data_batch_1..5 / test_batch; trainval = train; " + _HOLDOUT),
    TransferSpec("cifar100", "evalsuite.data.cifar.CIFAR", "top1", 100, "cifar-100-python", "holdout",
                 "official train / test (fine labels); trainval = train; " + _HOLDOUT),
    TransferSpec("dtd", "torchvision.datasets.DTD", "top1", 47, "dtd", "official",
                 "official partition 1: labels/{train,val,test}1.txt; trainval = train + val"),
    TransferSpec("flowers102", "torchvision.datasets.Flowers102", "mean_per_class", 102, "flowers-102", "official",
                 "official setid.mat trnid / valid / tstid; trainval = train + val"),
    TransferSpec("food101", "torchvision.datasets.Food101", "top1", 101, "food-101", "holdout",
                 "official meta/train.json and meta/test.json; trainval = train; " + _HOLDOUT),
    TransferSpec("oxford_pets", "torchvision.datasets.OxfordIIITPet", "mean_per_class", 37, "oxford-iiit-pet",
                 "holdout", "official annotations/trainval.txt and test.txt; trainval = the official trainval; "
                 + _HOLDOUT),
    TransferSpec("sun397", "torchvision.datasets.SUN397", "top1", 397, "SUN397", "holdout",
                 "official partition 1: Training_01.txt / Testing_01.txt (50 + 50 per class); trainval = "
                 "Training_01; " + _HOLDOUT),
    TransferSpec("voc2007", "evalsuite.data.voc.VOC2007", "map11", 20, "VOCdevkit/VOC2007", "official",
                 "official ImageSets/Main train / val / trainval / test (multi-label, 11-point mAP)"),
    TransferSpec("eurosat", "torchvision.datasets.EuroSAT", "top1", 10, "eurosat", "none",
                 "EuroSAT RGB (2750/<class>/*.jpg); " + _FEWSHOT, "fewshot"),
    TransferSpec("isic", "evalsuite.data.cdfsl.isic_samples", "top1", 7, "ISIC", "none",
                 "ISIC 2018 task 3 training set with its one-hot ground-truth CSV; " + _FEWSHOT, "fewshot"),
    TransferSpec("chestx", "evalsuite.data.cdfsl.chestx_samples", "top1", 7, "chestX", "none",
                 "ChestX-ray8 Data_Entry_2017.csv rows with one of CD-FSL's 7 findings; " + _FEWSHOT, "fewshot"),
    TransferSpec("cropdisease", "torchvision.datasets.ImageFolder", "top1", 38, "CropDiseases", "none",
                 "CD-FSL's dataset/train/<class>/ ImageFolder (New Plant Diseases, augmented); " + _FEWSHOT,
                 "fewshot"),
)}


def transfer_spec(name: str) -> TransferSpec:
    if name not in TRANSFER_DATASETS:
        raise UserError(f"unknown transfer dataset {name!r}; known: {', '.join(TRANSFER_DATASETS)}")
    return TRANSFER_DATASETS[name]


# ------------------------------------------------------------------------------------------------ split rules

def holdout_split(n: int, fraction: float = VAL_FRACTION, seed: int = VAL_SEED) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) ascending indices: ssl-transfer's ``np.random.seed(seed); np.random.shuffle(range(n))``, the first
    ``floor(fraction * n)`` shuffled indices to val (legacy RandomState, so the same draw as the reference)."""
    indices = list(range(n))
    np.random.RandomState(seed).shuffle(indices)
    cut = int(np.floor(fraction * n))
    return np.sort(np.asarray(indices[cut:], dtype=np.int64)), np.sort(np.asarray(indices[:cut], dtype=np.int64))


def caltech101_train_indices(labels: np.ndarray, per_class: int = CALTECH_TRAIN_PER_CLASS,
                             seed: int = CALTECH_SEED) -> np.ndarray:
    """Ascending indices of ssl-transfer's Caltech101 train split: ``per_class`` draws with replacement from each
    class in label order (``np.random.choice`` after ``np.random.seed(seed)``), duplicates removed."""
    labels = np.asarray(labels)
    rs = np.random.RandomState(seed)
    draws = [rs.choice(np.flatnonzero(labels == c), per_class) for c in range(int(labels.max()) + 1)]
    return np.unique(np.concatenate(draws)).astype(np.int64)


# ------------------------------------------------------------------------------------------------ datasets

class TransferImages(LabelledFiles):
    """A list of (image file, label) pairs of one split, with the class names."""

    def __init__(self, kind: str, root: Path, split: str, samples: Sequence[tuple[Path, int]],
                 classes: Sequence[str], skip_corrupt: bool = False):
        super().__init__(root, split)
        self.kind = kind
        if not samples:
            raise BadData(f"{kind} split {split!r} lists no images", root)
        self.classes = list(classes)
        self.ids_root = Path(root)
        self._set_samples(samples, skip_corrupt)
        if len(self._labels) and (self._labels.min() < 0 or self._labels.max() >= len(self.classes)):
            raise BadData(f"{kind} split {split!r}: a label lies outside the {len(self.classes)} classes", root)


# ------------------------------------------------------------------------------------------------ readers

Samples = list[tuple[Path, int]]


def _require(*paths: Path) -> None:
    for p in paths:
        if not p.exists():
            raise BadData("not found", p)


def _torchvision(cls: Callable[..., Any], folder: Path, expected: str, **kw) -> Any:
    """``cls(<folder's parent>, download=False, **kw)``: torchvision finds each dataset in a fixed folder name under
    the root it is given; any error it raises becomes one BadData line naming ``folder``."""
    if folder.name != expected:
        raise BadData(f"torchvision's {cls.__name__} reads this dataset from a folder named {expected!r}", folder)
    try:
        return cls(str(folder.parent), download=False, **kw)
    except Exception as e:  # RuntimeError "Dataset not found", scipy's MatReadError, KeyError on a bad label ...
        raise BadData(f"torchvision's {cls.__name__} cannot read it ({type(e).__name__}: {e})", folder) from None


def _image_folder(folder: Path) -> tuple[Samples, list[str]]:
    from torchvision.datasets import ImageFolder

    _require(folder)
    try:
        ds = ImageFolder(str(folder))
    except Exception as e:  # FileNotFoundError: no class folder, or a class folder without images
        raise BadData(f"torchvision's ImageFolder cannot read it ({type(e).__name__}: {e})", folder) from None
    return [(Path(p), c) for p, c in ds.samples], list(ds.classes)


def _aircraft(ds: Path, split: str) -> tuple[Samples, list[str]]:
    from torchvision.datasets import FGVCAircraft

    _require(ds / "data" / "variants.txt", ds / "data" / f"images_variant_{split}.txt", ds / "data" / "images")
    tv = _torchvision(FGVCAircraft, ds, "fgvc-aircraft-2013b", split=split, annotation_level="variant")
    return [(Path(p), c) for p, c in zip(tv._image_files, tv._labels)], list(tv.classes)


def _caltech101(ds: Path, split: str, train_per_class: int = CALTECH_TRAIN_PER_CLASS) -> tuple[Samples, list[str]]:
    samples, classes = _image_folder(ds / "101_ObjectCategories")
    train = caltech101_train_indices(np.array([c for _, c in samples]), train_per_class)
    keep = train if split == "train" else np.setdiff1d(np.arange(len(samples)), train)
    return [samples[k] for k in keep], classes


def _cars(ds: Path, split: str) -> tuple[Samples, list[str]]:
    from torchvision.datasets import StanfordCars

    annos = ds / "devkit" / "cars_train_annos.mat" if split == "train" else ds / "cars_test_annos_withlabels.mat"
    _require(ds / "devkit" / "cars_meta.mat", annos, ds / f"cars_{split}")
    tv = _torchvision(StanfordCars, ds, "stanford_cars", split=split)
    return [(Path(p), int(c)) for p, c in tv._samples], [str(c) for c in tv.classes]


def _dtd(ds: Path, split: str) -> tuple[Samples, list[str]]:
    from torchvision.datasets import DTD

    _require(ds / "dtd" / "labels" / f"{split}1.txt", ds / "dtd" / "images")
    tv = _torchvision(DTD, ds, "dtd", split=split, partition=1)
    # torchvision names the classes of the split file; the reference (and so every split) the image folders
    classes = sorted(d.name for d in (ds / "dtd" / "images").iterdir() if d.is_dir())
    index = {c: k for k, c in enumerate(classes)}
    missing = [c for c in tv.classes if c not in index]
    if missing:
        raise BadData(f"class {missing[0]!r} of {split}1.txt has no image folder", ds / "dtd" / "images")
    return [(Path(p), index[tv.classes[c]]) for p, c in zip(tv._image_files, tv._labels)], classes


def _flowers102(ds: Path, split: str) -> tuple[Samples, list[str]]:
    import scipy.io
    from torchvision.datasets import Flowers102

    class Flowers102Files(Flowers102):
        # torchvision checks the md5 of the official .mat files; any file in the format is accepted here
        def _check_integrity(self) -> bool:
            return self._images_folder.is_dir()

    _require(ds / "jpg", ds / "imagelabels.mat", ds / "setid.mat")
    tv = _torchvision(Flowers102Files, ds, "flowers-102", split=split)
    # every split's classes: as many of torchvision's names as imagelabels.mat has labels (102 on the real data)
    n = int(np.max(scipy.io.loadmat(ds / "imagelabels.mat", squeeze_me=True)["labels"]))
    classes = list(Flowers102.classes[:n]) + [f"class {k + 1}" for k in range(len(Flowers102.classes), n)]
    return [(Path(p), c) for p, c in zip(tv._image_files, tv._labels)], classes


def _food101(ds: Path, split: str) -> tuple[Samples, list[str]]:
    from torchvision.datasets import Food101

    _require(ds / "meta" / f"{split}.json", ds / "images")
    tv = _torchvision(Food101, ds, "food-101", split=split)
    return [(Path(p), c) for p, c in zip(tv._image_files, tv._labels)], list(tv.classes)


def _pets(ds: Path, split: str) -> tuple[Samples, list[str]]:
    from torchvision.datasets import OxfordIIITPet

    split = "trainval" if split == "train" else split  # the reference's train is the official trainval
    _require(ds / "annotations" / f"{split}.txt", ds / "images")
    tv = _torchvision(OxfordIIITPet, ds, "oxford-iiit-pet", split=split)
    return [(Path(p), c) for p, c in zip(tv._images, tv._labels)], list(tv.classes)


def _sun397(ds: Path, split: str) -> tuple[Samples, list[str]]:
    from torchvision.datasets import SUN397

    partition = ds / ("Training_01.txt" if split == "train" else "Testing_01.txt")
    _require(ds / "ClassName.txt", partition)
    tv = _torchvision(SUN397, ds, "SUN397")  # every image (labels from its folder); the partition picks 100/class
    label = {Path(p): c for p, c in zip(tv._image_files, tv._labels)}
    samples = []
    for n, line in enumerate(partition.read_text().splitlines(), 1):
        if line.strip():
            path = ds / line.strip().lstrip("/")
            if path not in label:
                raise BadData(f"line {n}: no image {line.strip()} under a class of ClassName.txt", partition)
            samples.append((path, label[path]))
    return samples, list(tv.classes)


def _eurosat(ds: Path, split: str) -> tuple[Samples, list[str]]:
    from torchvision.datasets import EuroSAT

    _require(ds / "2750")
    tv = _torchvision(EuroSAT, ds, "eurosat")
    return [(Path(p), c) for p, c in tv.samples], list(tv.classes)


def _isic(ds: Path, split: str) -> tuple[Samples, list[str]]:
    from .cdfsl import isic_samples

    return isic_samples(ds)


def _chestx(ds: Path, split: str) -> tuple[Samples, list[str]]:
    from .cdfsl import chestx_samples

    return chestx_samples(ds)


def _cropdisease(ds: Path, split: str) -> tuple[Samples, list[str]]:
    return _image_folder(ds / "dataset" / "train")


# name -> reader of the dataset's own splits (train / val / test as its files define them; few-shot: test)
_READERS: dict[str, Callable[..., tuple[Samples, list[str]]]] = {
    "fgvc_aircraft": _aircraft, "caltech101": _caltech101, "stanford_cars": _cars, "dtd": _dtd,
    "flowers102": _flowers102, "food101": _food101, "oxford_pets": _pets, "sun397": _sun397, "eurosat": _eurosat,
    "isic": _isic, "chestx": _chestx, "cropdisease": _cropdisease,
}


def dataset_dir(name: str, root: str | Path) -> Path:
    """The dataset's folder: ``root`` itself, or ``root/<layout>`` when ``root`` is the data root holding it."""
    root, layout = Path(root), transfer_spec(name).layout
    return root / layout if root.name != Path(layout).name and (root / layout).is_dir() else root


def _own_split(name: str, ds: Path, split: str, skip_corrupt: bool, **options) -> ClassificationDataset:
    """One of the splits the dataset's files define (CIFAR through the project's CIFAR reader)."""
    if name in ("cifar10", "cifar100"):
        from .cifar import open_cifar

        return open_cifar(name)(ds, split, skip_corrupt=skip_corrupt, **options)
    if not ds.is_dir():
        raise BadData(f"{name} data not found", ds)
    samples, classes = _READERS[name](ds, split, **options)
    return TransferImages(name, ds, split, samples, classes, skip_corrupt)


def _concat(a: TransferImages, b: TransferImages, split: str) -> TransferImages:
    if a.classes != b.classes:
        raise BadData(f"{a.kind}: the {a.split} and {b.split} splits name different classes", a.root)
    return TransferImages(a.kind, a.root, split, a.samples + b.samples, a.classes)


def open_transfer(name: str, root: str | Path, split: str, skip_corrupt: bool = False,
                  **options) -> ImageDataset:
    """Split ``split`` (train / val / trainval / test; few-shot sets: test) of transfer dataset ``name`` under
    ``root`` (its folder or the data root), with the split rules of the module docstring."""
    spec = transfer_spec(name)
    ds = dataset_dir(name, root)
    if split not in spec.splits:
        raise BadData(f"{name} has no split {split!r} (splits: {', '.join(spec.splits)})", ds)
    if name == "voc2007":
        from .voc import VOC2007

        return VOC2007(ds, split, skip_corrupt=skip_corrupt, **options)
    if spec.val == "official" and split == "trainval":
        return _concat(_own_split(name, ds, "train", skip_corrupt, **options),
                       _own_split(name, ds, "val", skip_corrupt, **options), "trainval")
    if spec.val == "holdout" and split != "test":
        full = _own_split(name, ds, "train", skip_corrupt, **options)
        if split == "trainval":
            full.split = "trainval"  # the reference's trainval is the whole official training split
            return full
        train, val = holdout_split(len(full))
        return ClassificationSubset(full, train if split == "train" else val, split)
    return _own_split(name, ds, split, skip_corrupt, **options)


def transfer_opener(name: str) -> Callable[..., ImageDataset]:
    """``open_dataset``'s reader for ``name``: ``(root, split, **options)``."""
    def opener(root: str | Path, split: str = "train", **options) -> ImageDataset:
        return open_transfer(name, root, split, **options)
    return opener
