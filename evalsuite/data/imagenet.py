"""ImageNet (ILSVRC2012) in its two usual layouts: class folders, or the official flat val folder with the devkit.

``ROOT`` (``<data root>/imagenet``) holds one folder per split::

    train/<wnid>/<wnid>_<n>.JPEG               the per-class tars of ILSVRC2012_img_train.tar, extracted
    val/<wnid>/ILSVRC2012_val_<8 digits>.JPEG  folder layout (what DINO's and VISSL's ImageFolder read), or
    val/ILSVRC2012_val_<8 digits>.JPEG         official layout: ILSVRC2012_img_val.tar extracted as it is,
    ILSVRC2012_devkit_t12[.tar.gz]             labelled by the devkit (data/meta.mat and
                                               data/ILSVRC2012_validation_ground_truth.txt)
    meta.bin                                   or by the devkit as torchvision.datasets.ImageNet parsed it

The layout is detected per split (``layout="auto"``; ``"folder"`` or ``"official"`` to insist). Classes are the
WordNet ids sorted, the label order of torchvision's ``ImageFolder`` and ``ImageNet``; ``class_names`` are the
synsets' words where the devkit is at hand. The ground truth parsing follows torchvision's
``datasets/imagenet.py`` (``parse_devkit_archive``): the leaf synsets of ``meta.mat`` (``num_children == 0``) are
the classes, and line i of the ground truth file is the ILSVRC2012_ID of ``ILSVRC2012_val_<i>.JPEG``. We parse
it ourselves, reading the archive in memory, because ``torchvision.datasets.ImageNet`` insists on the md5 of the
official archives, writes ``meta.bin`` into the data root and extracts and moves the image archives on first use;
a ``meta.bin`` it wrote is read with torchvision's own ``load_meta_file``.
"""

from __future__ import annotations

import io
import re
import tarfile
from pathlib import Path

from ..errors import BadData
from .imagefolder import IMAGE_SUFFIXES, ImageFolder

DEVKIT = "ILSVRC2012_devkit_t12"
META_MAT = "data/meta.mat"
GROUND_TRUTH = "data/ILSVRC2012_validation_ground_truth.txt"
LAYOUTS = ("auto", "folder", "official")
VAL_NAME = re.compile(r"ILSVRC2012_val_(\d{8})\.\w+", re.IGNORECASE)


def parse_meta_mat(data: bytes | Path) -> tuple[dict[int, str], dict[str, tuple[str, ...]]]:
    """The devkit's ``meta.mat``: {ILSVRC2012_ID: wnid} and {wnid: words} of the leaf synsets (the classes)."""
    import scipy.io as sio
    from scipy.io.matlab import MatReadError

    try:
        synsets = sio.loadmat(io.BytesIO(data) if isinstance(data, bytes) else data, squeeze_me=True)["synsets"]
        leaves = [s for s in synsets if int(s["num_children"]) == 0]
        idx_to_wnid = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in leaves}
        words = {str(s["WNID"]): tuple(str(s["words"]).split(", ")) for s in leaves}
    except (MatReadError, KeyError, ValueError, TypeError, IndexError, NotImplementedError) as e:
        raise BadData(f"not an ILSVRC2012 devkit meta.mat (a 'synsets' struct with ILSVRC2012_ID, WNID, words, "
                      f"num_children): {e}") from None
    if not leaves:
        raise BadData("meta.mat has no leaf synsets (num_children == 0)")
    return idx_to_wnid, words


def parse_ground_truth(text: str, idx_to_wnid: dict[int, str]) -> list[str]:
    """The wnid of every val image in order (line i: the ILSVRC2012_ID of image i)."""
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if not line.strip().isdigit() or int(line) not in idx_to_wnid:
            raise BadData(f"ground truth line {n}: {line.strip()!r} is not the ILSVRC2012_ID of a class in meta.mat")
        out.append(idx_to_wnid[int(line)])
    return out


def read_devkit(root: Path) -> tuple[list[str], dict[str, tuple[str, ...]]]:
    """(wnid of val image i, {wnid: words}) from the devkit folder, its archive, or torchvision's meta.bin."""
    folder, archive, meta_bin = root / DEVKIT, root / f"{DEVKIT}.tar.gz", root / "meta.bin"
    if folder.is_dir():
        files = {name: folder / name for name in (META_MAT, GROUND_TRUTH)}
        missing = [str(p) for p in files.values() if not p.is_file()]
        if missing:
            raise BadData(f"devkit file missing: {missing[0]}", folder)
        idx_to_wnid, words = _parsed(lambda: parse_meta_mat(files[META_MAT]), files[META_MAT])
        return _parsed(lambda: parse_ground_truth(files[GROUND_TRUTH].read_text(), idx_to_wnid),
                       files[GROUND_TRUTH]), words
    if archive.is_file():
        members = _read_members(archive, [f"{DEVKIT}/{META_MAT}", f"{DEVKIT}/{GROUND_TRUTH}"])
        idx_to_wnid, words = _parsed(lambda: parse_meta_mat(members[0]), archive)
        return _parsed(lambda: parse_ground_truth(members[1].decode(), idx_to_wnid), archive), words
    if meta_bin.is_file():
        from torchvision.datasets.imagenet import load_meta_file

        try:
            words, val_wnids = load_meta_file(str(root))
        except Exception as e:  # torch.load of a foreign or truncated file: report it, whatever it raised
            raise BadData(f"unreadable meta.bin ({type(e).__name__}: {e})", meta_bin) from None
        return list(val_wnids), dict(words)
    raise BadData(f"the val images are not in class folders and no devkit is here (expected {DEVKIT}/ or "
                  f"{DEVKIT}.tar.gz with {META_MAT} and {GROUND_TRUTH}, or torchvision's meta.bin)", root)


def _parsed(parse, path: Path):
    try:
        return parse()
    except BadData as e:
        raise BadData(e.message, path) from None
    except (OSError, UnicodeDecodeError) as e:
        raise BadData(f"unreadable devkit file ({e})", path) from None


def _read_members(archive: Path, names: list[str]) -> list[bytes]:
    try:
        with tarfile.open(archive, "r:*") as tar:
            out = []
            for name in names:
                try:
                    out.append(tar.extractfile(name).read())
                except (KeyError, AttributeError):  # no such member, or not a file
                    raise BadData(f"{name} is not in the devkit archive", archive) from None
            return out
    except (tarfile.TarError, OSError, EOFError) as e:
        raise BadData(f"unreadable devkit archive ({e})", archive) from None


def _is_flat(split_dir: Path) -> bool:
    """Images directly in the split folder and no class folders: the official val layout."""
    has_dirs = any(d.is_dir() and not d.name.startswith(".") for d in split_dir.iterdir())
    has_images = any(f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES for f in split_dir.iterdir())
    return has_images and not has_dirs


class ImageNet(ImageFolder):
    """ILSVRC2012: ``labels`` int64 indices into ``classes`` (sorted wnids), ``class_names`` (words or wnids)."""

    kind = "imagenet"

    def __init__(self, root: str | Path, split: str = "train", layout: str = "auto", skip_corrupt: bool = False):
        if layout not in LAYOUTS:
            raise BadData(f"unknown ImageNet layout {layout!r}; choose one of {', '.join(LAYOUTS)}", root)
        split_dir = Path(root) / split
        if not split_dir.is_dir():
            raise BadData(f"split directory {split!r} not found", split_dir)
        official = _is_flat(split_dir) if layout == "auto" else layout == "official"
        self.layout = "official" if official else "folder"
        if official:
            words = self._read_official(Path(root), split, split_dir, skip_corrupt)
        else:
            super().__init__(root, split, skip_corrupt)
            try:  # class names only: a folder layout does not need the devkit
                words = read_devkit(Path(root))[1]
            except BadData:
                words = {}
        self.class_names = [", ".join(words.get(w, (w,))) for w in self.classes]

    def _read_official(self, root: Path, split: str, split_dir: Path, skip_corrupt: bool) -> dict:
        """The flat split labelled by the devkit; returns the devkit's {wnid: words}."""
        super(ImageFolder, self).__init__(root, split)  # the base dataset's fields, without ImageFolder's folder scan
        self.split_dir = split_dir
        val_wnids, words = read_devkit(root)
        self.classes = sorted(set(words) | set(val_wnids))
        index = {w: i for i, w in enumerate(self.classes)}
        samples = []
        for f in sorted(split_dir.iterdir()):
            if not (f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES):
                continue
            m = VAL_NAME.fullmatch(f.name)
            number = int(m.group(1)) if m else 0
            if not 1 <= number <= len(val_wnids):
                raise BadData(f"{f.name} is not ILSVRC2012_val_<n> with n in 1..{len(val_wnids)} (the ground truth's "
                              f"lines)", f)
            samples.append((f, index[val_wnids[number - 1]]))
        if not samples:
            raise BadData("dataset is empty: no images in the split folder", split_dir)
        self.ids_root = split_dir
        self._set_samples(samples, skip_corrupt)
        return words

    def describe(self) -> dict:
        return {**super().describe(), "layout": self.layout}
