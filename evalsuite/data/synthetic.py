"""Synthetic datasets written in real on-disk formats (the embedded default data).

Deterministic: the same seed gives byte-identical files.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .synth_voc import rotate_points, star_points

SHAPES = ("disc", "square", "triangle", "cross", "ring", "bar", "star", "diamond")


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, angle: float, fill) -> None:
    def rot(points):
        return rotate_points(points, cx, cy, angle)

    if shape == "disc":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fill, width=max(2, int(r / 3)))
    elif shape == "square":
        draw.polygon(rot([(-r, -r), (r, -r), (r, r), (-r, r)]), fill=fill)
    elif shape == "diamond":
        draw.polygon(rot([(0, -r), (r * 0.6, 0), (0, r), (-r * 0.6, 0)]), fill=fill)
    elif shape == "triangle":
        draw.polygon(rot([(0, -r), (r * 0.87, r * 0.5), (-r * 0.87, r * 0.5)]), fill=fill)
    elif shape == "bar":
        draw.polygon(rot([(-r, -r * 0.25), (r, -r * 0.25), (r, r * 0.25), (-r, r * 0.25)]), fill=fill)
    elif shape == "cross":
        w = r * 0.3
        draw.polygon(rot([(-r, -w), (r, -w), (r, w), (-r, w)]), fill=fill)
        draw.polygon(rot([(-w, -r), (w, -r), (w, r), (-w, r)]), fill=fill)
    elif shape == "star":
        draw.polygon(rot(star_points(r, 0.45)), fill=fill)
    else:
        raise ValueError(shape)


def shape_image(rng: np.random.Generator, shape: str, size: int) -> Image.Image:
    """One image: a textured, cluttered background and one object of ``shape`` in a random colour."""
    base = rng.integers(0, 256, size=3)
    noise = rng.normal(0, 40, size=(size // 4 + 1, size // 4 + 1, 3))
    bg = np.clip(base + np.kron(noise, np.ones((4, 4, 1)))[:size, :size], 0, 255).astype(np.uint8)
    img = Image.fromarray(bg).filter(ImageFilter.GaussianBlur(1))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(1, 4))):  # clutter: small distractor blobs
        x, y = rng.uniform(0, size, 2)
        rr = rng.uniform(size * 0.03, size * 0.08)
        draw.ellipse([x - rr, y - rr, x + rr, y + rr], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    r = rng.uniform(size * 0.18, size * 0.32)
    cx, cy = rng.uniform(r, size - r, 2)
    color = tuple(int(v) for v in rng.integers(0, 256, 3))
    _draw_shape(draw, shape, cx, cy, r, rng.uniform(0, 2 * math.pi), color)
    return img


def write_imagefolder(out: str | Path, seed: int = 0, per_class: int = 20, size: int = 64,
                      classes: int = 8, splits: dict[str, float] | None = None) -> Path:
    """``out/<split>/<class>/<n>.jpg`` with ``per_class`` train images and half as many val per class."""
    out = Path(out)
    splits = splits or {"train": 1.0, "val": 0.5}
    rng = np.random.default_rng(seed)
    for split, frac in splits.items():
        for shape in SHAPES[:classes]:
            d = out / split / shape
            d.mkdir(parents=True, exist_ok=True)
            for n in range(max(1, int(per_class * frac))):
                shape_image(rng, shape, size).save(d / f"{n:05d}.jpg", quality=90)
    return out


# re-exported: every writer is importable from here
from .render_nyu import write_nyuv2  # noqa: E402
from .synth_imagenet import write_imagenet  # noqa: E402
from .synth_places import write_places205  # noqa: E402
from .synth_voc import write_object_imagefolder, write_voc2007  # noqa: E402


def write_cifar10(root: str | Path, seed: int = 0, scale: float = 1.0, train_per_class: int = 50,
                  test_per_class: int = 10) -> Path:
    """``root/cifar-10-batches-py`` in the official python-pickle format (5 train batches, test_batch,
    batches.meta; protocol-2 pickles with bytes keys, as the original Python 2 files): the 10
    Places-like scene categories rendered at 32x32. ``scale`` multiplies the images per class."""
    import pickle

    from ..io import replace_dir
    from .render import to_uint8
    from .synth_places import CATEGORIES, render_place

    target = Path(root) / "cifar-10-batches-py"
    counts = {"train": max(1, round(train_per_class * scale)), "test": max(1, round(test_per_class * scale))}
    with replace_dir(target) as tmp:
        for split, n in counts.items():
            xs, ys, names = [], [], []
            for k in range(n):
                for c in range(len(CATEGORIES)):
                    img = to_uint8(render_place(np.random.default_rng([seed, 32, c, int(split == "test"), k]), c, 32))
                    xs.append(img.transpose(2, 0, 1).reshape(-1))
                    ys.append(c)
                    names.append(f"{CATEGORIES[c].split('/')[1]}_{split}_{k:05d}.png".encode())
            data = np.stack(xs)
            parts = np.array_split(np.arange(len(ys)), 5) if split == "train" else [np.arange(len(ys))]
            for b, idx in enumerate(parts, 1):
                name = f"data_batch_{b}" if split == "train" else "test_batch"
                batch = {b"batch_label": f"{split} batch {b}".encode(), b"labels": [ys[i] for i in idx],
                         b"data": data[idx], b"filenames": [names[i] for i in idx]}
                (tmp / name).write_bytes(pickle.dumps(batch, protocol=2))
        meta = {b"label_names": [c.split("/")[1].encode() for c in CATEGORIES], b"num_cases_per_batch": 0,
                b"num_vis": 3072}
        (tmp / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return target

__all__ = ["SHAPES", "shape_image", "write_cifar10", "write_imagefolder", "write_imagenet", "write_nyuv2",
           "write_object_imagefolder", "write_places205", "write_voc2007"]
