"""A tiny ImageNet-like dataset written in the ILSVRC2012 on-disk layouts (:mod:`evalsuite.data.imagenet` reads both).

Each class is one object shape of :func:`evalsuite.data.synthetic.shape_image` (a textured, cluttered background
and one object in a random colour) under a synthetic WordNet id; images have varied sizes and aspect ratios, and one
train image is greyscale and one CMYK, as a few real ones are.

- ``layout="official"``: ``train/<wnid>/<wnid>_<n>.JPEG``; the val images flat in ``val/`` as
  ``ILSVRC2012_val_<8 digits>.JPEG``, classes shuffled; ``ILSVRC2012_devkit_t12.tar.gz`` with ``data/meta.mat`` (a
  ``synsets`` struct in the devkit's field order: the leaf classes, whose ILSVRC2012_IDs run in the reverse order
  of their wnids, and one parent synset) and ``data/ILSVRC2012_validation_ground_truth.txt``.
- ``layout="folder"``: the same images with the val ones in ``val/<wnid>/``.

Deterministic: the same seed gives byte-identical files (the MAT header and the tar and gzip times are pinned).
"""

from __future__ import annotations

import gzip
import io
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from ..io import replace_dir
from .imagenet import DEVKIT, GROUND_TRUTH, META_MAT

SYNSET_FIELDS = ("ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children", "wordnet_height",
                 "num_train_images")


def synthetic_wnids(classes: int) -> list[str]:
    return [f"n{90000001 + c:08d}" for c in range(classes)]


def _image(seed: int, split: int, c: int, k: int, size: int) -> Image.Image:
    from .synthetic import SHAPES, shape_image

    rng = np.random.default_rng([seed, 7, split, c, k])
    img = shape_image(rng, SHAPES[c], size)
    aspect = rng.uniform(3 / 4, 4 / 3)
    return img.resize((int(round(size * aspect)), size), Image.BILINEAR)


def _meta_mat(wnids: list[str], names: list[str], ids: list[int], n_train: int, work: Path) -> bytes:
    """The devkit's meta.mat: one record per synset, the leaves (num_children 0) first, then their parent."""
    import scipy.io as sio

    from .render_nyu import _fixed_mat5_header

    u16 = np.uint16
    rows = [(u16(i), w, n, f"a synthetic {n}", u16(0), np.zeros(0, u16), u16(0), u16(n_train))
            for i, w, n in zip(ids, wnids, names)]
    rows.append((u16(len(wnids) + 1), "n90000000", "shape", "a synthetic parent synset", u16(len(wnids)),
                 np.array(ids, u16), u16(1), u16(0)))
    synsets = np.zeros(len(rows), dtype=[(f, object) for f in SYNSET_FIELDS])
    for r, row in enumerate(rows):
        synsets[r] = row
    path = work / "meta.mat"
    sio.savemat(path, {"synsets": synsets})
    _fixed_mat5_header(path)
    data = path.read_bytes()
    path.unlink()
    return data


def _tar_gz(members: dict[str, bytes]) -> bytes:
    raw = io.BytesIO()
    with gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz, tarfile.open(fileobj=gz, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            tar.addfile(info, io.BytesIO(data))
    return raw.getvalue()


def write_imagenet(root: str | Path, seed: int = 0, scale: float = 1.0, image_size: int = 64,
                   layout: str = "official", classes: int = 8, train_per_class: int = 12,
                   val_per_class: int = 4) -> Path:
    """``root/imagenet`` in ``layout`` ("official" or "folder"); ``scale`` multiplies the images per class."""
    from .synthetic import SHAPES

    if layout not in ("official", "folder"):
        raise ValueError(f"layout must be 'official' or 'folder', got {layout!r}")
    if not 1 <= classes <= len(SHAPES):
        raise ValueError(f"classes must be in 1..{len(SHAPES)}, got {classes}")
    n_train, n_val = max(1, round(train_per_class * scale)), max(1, round(val_per_class * scale))
    wnids, names = synthetic_wnids(classes), list(SHAPES[:classes])
    ids = [classes - c for c in range(classes)]  # ILSVRC2012_IDs in another order than the sorted wnids
    target = Path(root) / "imagenet"
    with replace_dir(target) as tmp:
        for c, wnid in enumerate(wnids):
            (tmp / "train" / wnid).mkdir(parents=True)
            for k in range(n_train):
                img = _image(seed, 0, c, k, image_size)
                img = img.convert("L") if (c, k) == (0, 0) else img.convert("CMYK") if (c, k) == (1, 0) else img
                img.save(tmp / "train" / wnid / f"{wnid}_{k}.JPEG", format="JPEG", quality=90)
        truth = []
        for i, j in enumerate(np.random.default_rng([seed, 8]).permutation(classes * n_val), 1):
            c, k = divmod(int(j), n_val)
            folder = tmp / "val" / (wnids[c] if layout == "folder" else "")
            folder.mkdir(parents=True, exist_ok=True)
            _image(seed, 1, c, k, image_size).save(folder / f"ILSVRC2012_val_{i:08d}.JPEG", format="JPEG", quality=90)
            truth.append(f"{ids[c]}\n")
        if layout == "official":
            members = {f"{DEVKIT}/{META_MAT}": _meta_mat(wnids, names, ids, n_train, tmp),
                       f"{DEVKIT}/{GROUND_TRUTH}": "".join(truth).encode()}
            (tmp / f"{DEVKIT}.tar.gz").write_bytes(_tar_gz(members))
    return target
