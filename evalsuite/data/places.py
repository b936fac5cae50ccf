"""Places205 from its official list files (the Goyal et al. 2019 linear-probe data).

``ROOT`` (``<data root>/places205``) holds a list file per split and the images it points to::

    trainvalsplit_places205/train_places205.csv   "<relative image path> <label>" per line (space separated)
    trainvalsplit_places205/val_places205.csv
    images256/<letter>/<category>/<file>.jpg      the image root the paths are relative to
    categoryIndex_places205.csv                   optional "/<letter>/<category> <label>" lines (class names)

Also accepted: the list files directly under ``ROOT`` (``<split>_places205.csv`` or ``<split>.txt``),
and images under ``data/vision/torralba/deeplearning/images256`` (the tarball's own prefix) or ``ROOT``.
Without the category index, a class is named after the folder of its first image.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import BadData
from .base import ClassificationDataset

IMAGE_ROOTS = ("images256", "data/vision/torralba/deeplearning/images256", ".")


def list_file_candidates(root: Path, split: str) -> list[Path]:
    return [root / "trainvalsplit_places205" / f"{split}_places205.csv", root / f"{split}_places205.csv",
            root / f"{split}.txt"]


def read_list_file(path: Path) -> list[tuple[str, int]]:
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise BadData(f"unreadable list file ({e})", path) from None
    out = []
    for n, ln in enumerate(text.splitlines(), 1):
        if not ln.strip():
            continue
        parts = ln.rsplit(None, 1)
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit() or int(parts[1]) < 0:
            raise BadData(f"line {n}: expected '<relative image path> <label>', got {ln!r}", path)
        out.append((parts[0].lstrip("/"), int(parts[1])))
    if not out:
        raise BadData("list file is empty", path)
    return out


class Places205(ClassificationDataset):
    kind = "places205"

    def __init__(self, root: str | Path, split: str = "train", skip_corrupt: bool = False):
        super().__init__(root, split)
        if not self.root.is_dir():
            raise BadData("Places205 directory not found", self.root)
        cands = list_file_candidates(self.root, split)
        lf = next((p for p in cands if p.is_file()), None)
        if lf is None:
            raise BadData(f"list file for split {split!r} not found", cands[0])
        self.list_file = lf
        entries = read_list_file(lf)
        self.image_root = next((self.root / r for r in IMAGE_ROOTS if (self.root / r / entries[0][0]).exists()),
                               self.root / IMAGE_ROOTS[0])
        n_classes = max(lab for _, lab in entries) + 1
        names = self._category_names()
        if names is not None:
            n_classes = max(n_classes, len(names))
        else:
            names = [""] * n_classes
            for rel, lab in entries:
                if not names[lab]:
                    names[lab] = Path(rel).parent.name
            names = [nm or f"class{k}" for k, nm in enumerate(names)]
        self.classes = names
        keep = self._keep_readable([self.image_root / rel for rel, _ in entries], skip_corrupt)
        self.entries = [entries[k] for k in keep]
        self._labels = np.array([lab for _, lab in self.entries], dtype=np.int64)

    def _category_names(self) -> list[str] | None:
        p = self.root / "categoryIndex_places205.csv"
        if not p.is_file():
            return None
        pairs = read_list_file(p)
        names = [""] * (max(lab for _, lab in pairs) + 1)
        for name, lab in pairs:
            names[lab] = name.split("/")[-1]
        return names

    def __len__(self) -> int:
        return len(self.entries)

    def image_path(self, i: int) -> Path:
        return self.image_root / self.entries[i][0]

    @property
    def ids(self) -> list[str]:
        return [rel for rel, _ in self.entries]

    @property
    def labels(self) -> np.ndarray:
        return self._labels
