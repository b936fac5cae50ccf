"""PASCAL VOC2007 in the official devkit layout (``VOCdevkit/VOC2007``).

``ROOT`` is the ``VOC2007`` directory holding::

    JPEGImages/<id>.jpg
    Annotations/<id>.xml                   boxes, difficult, truncated (1-based pixel coordinates)
    ImageSets/Main/<split>.txt             the ids of a split (train, val, trainval, test)
    ImageSets/Main/<class>_<split>.txt     "<id> <label>" with label 1 / -1 / 0 (devkit format "%s %2d")

Classification labels follow the Goyal et al. (2019) benchmark code
(fair_self_supervision_benchmark, ``extra_scripts/svm_*``): the devkit's 1 / -1 / 0 become
present / absent / *ignore*, where 0 marks an image whose only instances of the class are
difficult; such an image is left out of both SVM training and testing for that class.
``difficult_as_negative=True`` turns those 0s into -1 instead (what some later works do).

PASCAL VOC2012 (``VOCdevkit/VOC2012``, kind ``voc2012``) has the same devkit layout and XML format
(ids like ``2008_000008``; some objects carry ``<part>`` boxes or no ``<difficult>`` tag, read as 0;
coordinates may be fractional). Its splits are train / val / trainval: the test annotations were
never released, so ``test`` is refused with a clear error. Fast R-CNN's "07+12" training set is
VOC2007 trainval + VOC2012 trainval, evaluated on VOC2007 test.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BadData
from .base import ImageDataset

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
VOC_SPLITS = ("train", "val", "trainval", "test")
VOC2012_SPLITS = ("train", "val", "trainval")


def _read_text(path: Path, what: str) -> str:
    """The text of a devkit list file; a missing or unreadable one raises BadData naming ``what`` and the path."""
    try:
        return path.read_text()
    except FileNotFoundError:
        raise BadData(f"{what} not found", path) from None
    except (OSError, UnicodeDecodeError) as e:
        raise BadData(f"unreadable {what} ({e})", path) from None


def read_id_list(path: Path) -> list[str]:
    """The ids of an ``ImageSets/Main/<split>.txt`` file (one id per line, blank lines ignored)."""
    text = _read_text(path, "split file")
    ids = [ln.split()[0] for ln in text.splitlines() if ln.strip()]
    if not ids:
        raise BadData("split file lists no image ids", path)
    if len(set(ids)) != len(ids):
        raise BadData("split file lists an image id twice", path)
    return ids


def read_class_labels(path: Path) -> dict[str, int]:
    """``<class>_<split>.txt``: id -> label in {1, -1, 0}."""
    text = _read_text(path, "per-class label file")
    out: dict[str, int] = {}
    for n, ln in enumerate(text.splitlines(), 1):
        parts = ln.split()
        if not parts:
            continue
        if len(parts) != 2 or parts[1] not in ("1", "-1", "0"):
            raise BadData(f"line {n}: expected '<id> <1|-1|0>', got {ln!r}", path)
        out[parts[0]] = int(parts[1])
    return out


def parse_annotation(path: Path) -> dict[str, Any]:
    """One VOC XML file -> boxes (float32 (M,4) x1,y1,x2,y2 as written, 1-based), labels, difficult,
    truncated, width, height. A class outside the 20 or a malformed file raises BadData naming it."""
    try:
        tree = ET.parse(path)
    except FileNotFoundError:
        raise BadData("annotation file not found", path) from None
    except (ET.ParseError, OSError) as e:
        raise BadData(f"malformed annotation XML ({e})", path) from None
    root = tree.getroot()
    try:
        size = root.find("size")
        width = int(size.findtext("width"))  # type: ignore[union-attr,arg-type]
        height = int(size.findtext("height"))  # type: ignore[union-attr,arg-type]
    except (AttributeError, TypeError, ValueError):
        raise BadData("annotation has no valid <size><width>/<height>", path) from None
    boxes, labels, difficult, truncated = [], [], [], []
    for obj in root.findall("object"):
        name = (obj.findtext("name") or "").strip()
        if name not in VOC_CLASSES:
            raise BadData(f"object class {name!r} is not one of the 20 VOC classes", path)
        bb = obj.find("bndbox")
        try:
            box = [float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")]  # type: ignore[union-attr,arg-type]
        except (AttributeError, TypeError, ValueError):
            raise BadData(f"object {name!r} has no valid <bndbox>", path) from None
        boxes.append(box)
        labels.append(VOC_CLASSES.index(name))
        difficult.append(int(obj.findtext("difficult") or 0) == 1)
        truncated.append(int(obj.findtext("truncated") or 0) == 1)
    return {
        "boxes": np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
        "labels": np.asarray(labels, dtype=np.int64),
        "difficult": np.asarray(difficult, dtype=bool),
        "truncated": np.asarray(truncated, dtype=bool),
        "width": width,
        "height": height,
    }


class VOC2007(ImageDataset):
    """One split of VOC2007: ``ids``, ``label_matrix`` (int8 (N, 20): 1 / -1 / 0), ``annotations(i)``."""

    kind = "voc2007"
    year = "VOC2007"
    splits: tuple[str, ...] = VOC_SPLITS  # the standard ones; any ImageSets/Main/<split>.txt is read
    refused_splits: tuple[str, ...] = ()
    split_note = ""
    classes: list[str] = list(VOC_CLASSES)

    def __init__(self, root: str | Path, split: str = "trainval", difficult_as_negative: bool = False,
                 skip_corrupt: bool = False):
        super().__init__(root, split)
        self.classes = list(VOC_CLASSES)
        self.difficult_as_negative = bool(difficult_as_negative)
        if not self.root.is_dir():
            raise BadData(f"{self.year} directory not found (expected VOCdevkit/{self.year})", self.root)
        if split in self.refused_splits:
            raise BadData(f"{self.year} has no split {split!r} (splits: {', '.join(self.splits)}){self.split_note}",
                          self.root)
        main = self.root / "ImageSets" / "Main"
        ids = read_id_list(main / f"{split}.txt")
        mat = np.empty((len(ids), len(VOC_CLASSES)), dtype=np.int8)
        for c, cname in enumerate(VOC_CLASSES):
            path = main / f"{cname}_{split}.txt"
            lab = read_class_labels(path)
            missing = [i for i in ids if i not in lab]
            if missing:
                raise BadData(f"no label for image {missing[0]} of {split}.txt ({len(missing)} missing)", path)
            mat[:, c] = [lab[i] for i in ids]
        if self.difficult_as_negative:
            mat[mat == 0] = -1
        keep = self._keep_readable([self.root / "JPEGImages" / f"{i}.jpg" for i in ids], skip_corrupt)
        self._ids = [ids[k] for k in keep]
        self._labels = mat[keep]
        self._ann_cache: dict[int, dict[str, Any]] = {}

    def __len__(self) -> int:
        return len(self._ids)

    @property
    def ids(self) -> list[str]:
        return self._ids

    def image_path(self, i: int) -> Path:
        return self.root / "JPEGImages" / f"{self._ids[i]}.jpg"

    def annotation_path(self, i: int) -> Path:
        return self.root / "Annotations" / f"{self._ids[i]}.xml"

    @property
    def label_matrix(self) -> np.ndarray:
        """int8 (N, 20): 1 present, -1 absent, 0 ignore (difficult-only; -1 with difficult_as_negative)."""
        return self._labels

    def annotations(self, i: int) -> dict[str, Any]:
        """Boxes of image ``i`` (see :func:`parse_annotation`); parsed once, then cached in memory."""
        if i not in self._ann_cache:
            self._ann_cache[i] = parse_annotation(self.annotation_path(i))
        a = self._ann_cache[i]
        return {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in a.items()}

    def check_annotations(self) -> int:
        """Parse every XML of the split (BadData on the first bad one); returns the number of objects."""
        return sum(len(self.annotations(i)["labels"]) for i in range(len(self)))

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        m = self._labels
        d.update(positives=int((m == 1).sum()), ignored=int((m == 0).sum()),
                 difficult_as_negative=self.difficult_as_negative)
        return d


class VOC2012(VOC2007):
    """One split (train, val or trainval) of VOC2012 in the same devkit format as VOC2007."""

    kind = "voc2012"
    year = "VOC2012"
    splits = VOC2012_SPLITS
    refused_splits = ("test",)
    split_note = "; its test annotations were never released (detection tests on voc2007:test)"
