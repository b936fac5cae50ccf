"""Which training images keep their labels: a published file list, or a seeded class-balanced sample.

- A file list (``subset_file``): one training image per line, as SimCLR's ``imagenet_subsets/1percent.txt`` and
  ``10percent.txt`` write them (``n01440764_10026.JPEG``). A line names an image by its id (``class/file`` in an
  ImageFolder) or by its file name; a name the split lacks, one that several images share, or a line given twice is
  refused in one line.
- A class-balanced sample: ``floor(fraction x N)`` images, the same number per class up to one (the first
  ``remainder`` classes in class order take one more, as VISSL's ``balanced_sub_sampling``), drawn without
  replacement by a generator seeded with (seed, class). SimCLR's lists have this shape: 1 % of ImageNet is
  12811 = 811 x 13 + 189 x 12 images, 10 % is 128116 = 116 x 129 + 884 x 128.

Either way the subset is recorded (:attr:`Subset.record`): its size, how many classes hold how many images, the seed
or the file's sha256, and the sha256 of the chosen ids.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from evalsuite.errors import BadData, NotApplicable, UserError, require_file


@dataclass(frozen=True)
class Subset:
    """The labelled training images (indices into the split, ascending) and how they were chosen."""

    indices: np.ndarray
    record: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.indices)


def subset_size(num_images: int, fraction: float) -> int:
    """``floor(fraction x num_images)`` (rounded to 6 decimals first, so 0.29 x 100 is 29, not 28)."""
    if not 0 < fraction <= 1:
        raise UserError(f"semi_supervised.label_fraction must be in (0, 1], got {fraction}")
    return math.floor(round(fraction * num_images, 6))


def balanced_counts(size: int, num_classes: int) -> np.ndarray:
    """Images per class: ``size // C`` each, one more for the first ``size % C`` classes."""
    quotient, remainder = divmod(size, num_classes)
    return np.array([quotient + (c < remainder) for c in range(num_classes)], dtype=np.int64)


def balanced_sample(labels: np.ndarray, num_classes: int, fraction: float, seed: int) -> np.ndarray:
    """Ascending indices of a class-balanced sample of ``floor(fraction x N)`` images (see the module docstring)."""
    labels = np.asarray(labels, dtype=np.int64)
    size = subset_size(len(labels), fraction)
    if size < num_classes:
        # the data is too small for the protocol: `--tasks all` skips the task with this line
        raise NotApplicable(f"semi_supervised.label_fraction={fraction} keeps {size} of {len(labels)} images: fewer "
                            f"than one for each of the {num_classes} classes")
    chosen = []
    for c, k in enumerate(balanced_counts(size, num_classes)):
        members = np.flatnonzero(labels == c)
        if len(members) < k:
            raise BadData(f"class {c} has {len(members)} training images, fewer than the {k} the class-balanced "
                          f"{fraction:g} sample takes from it")
        rng = np.random.default_rng([int(seed), c])
        chosen.append(rng.choice(members, size=int(k), replace=False))
    return np.sort(np.concatenate(chosen))


def read_subset_file(path: str | Path, ids: list[str]) -> np.ndarray:
    """Ascending indices of the images a list file names (one id or file name per line, blank lines ignored)."""
    path = require_file(path, "subset file")
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not names:
        raise BadData("the subset file names no image", path)
    by_id = {name: i for i, name in enumerate(ids)}
    by_file: dict[str, int] = {}
    for i, name in enumerate(ids):
        base = PurePosixPath(name).name
        by_file[base] = -1 if base in by_file else i  # -1: several images share this file name
    found, missing, ambiguous = [], [], []
    for name in names:
        i = by_id.get(name, by_file.get(PurePosixPath(name).name))
        if i is None:
            missing.append(name)
        elif i < 0:
            ambiguous.append(name)
        else:
            found.append(i)
    if missing:
        raise BadData(f"{len(missing)} of {len(names)} names are not in the training split (first: {missing[0]!r})",
                      path)
    if ambiguous:
        raise BadData(f"{len(ambiguous)} names match several training images (first: {ambiguous[0]!r}); write them "
                      "as class/file", path)
    repeated = [name for name, n in Counter(found).items() if n > 1]
    if repeated:
        raise BadData(f"{len(repeated)} images are listed more than once (first: {ids[repeated[0]]!r})", path)
    return np.sort(np.asarray(found, dtype=np.int64))


def choose_subset(ids: list[str], labels: np.ndarray, num_classes: int, fraction: float, seed: int,
                  subset_file: str | Path | None = None) -> Subset:
    """The labelled images: the file's when one is given, else the seeded class-balanced sample."""
    labels = np.asarray(labels, dtype=np.int64)
    if subset_file is not None:
        indices = read_subset_file(subset_file, ids)
        how = {"source": "file", "file": str(subset_file),
               "file_sha256": hashlib.sha256(Path(subset_file).read_bytes()).hexdigest()}
    else:
        indices = balanced_sample(labels, num_classes, fraction, seed)
        how = {"source": "class_balanced_sample", "seed": int(seed),
               "rule": "floor(fraction x N) images, N // C per class, one more for the first N % C classes"}
    per_class = np.bincount(labels[indices], minlength=num_classes)
    digest = hashlib.sha256("\n".join(ids[i] for i in indices).encode()).hexdigest()
    histogram = {str(k): int(v) for k, v in sorted(Counter(per_class.tolist()).items())}
    record = {**how, "fraction": float(fraction), "size": int(len(indices)), "of": int(len(labels)),
              "classes_with_count": histogram, "ids_sha256": digest}
    return Subset(indices, record)
