"""A Places205-like synthetic scene dataset written with the official list-file layout.

Each category is a *layout* (where the horizon, vanishing point, verticals and repeated structures
are) plus *texture statistics* (orientation and frequency of the fill patterns); every colour is
drawn at random per image and per region, so no category has a characteristic colour.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..io import replace_dir
from .render import polygon_mask, rand_color, save_jpeg, smooth_noise, texture, two_tone, write_text

CATEGORIES = ("b/beach", "c/corridor", "f/forest_path", "s/skyscraper", "f/field", "m/mountain", "s/shelves",
              "d/desert", "s/street", "c/crosswalk")


def _fill(rng, h, w, kind, period, angle, contrast=0.5):
    c1, c2 = rand_color(rng, 30, 230), rand_color(rng, 30, 230)
    c2 = c1 + contrast * (c2 - c1)
    return two_tone(texture(kind, h, w, rng.uniform(0, w), rng.uniform(0, h), period, angle), c1, c2)


def _sky(rng, h, w):
    a, b = rand_color(rng, 60, 250), rand_color(rng, 60, 250)
    t = np.linspace(0, 1, h, dtype=np.float32)[:, None, None]
    return a * (1 - t) + b * t + smooth_noise(rng, h, w, 24, 6.0)


def render_place(rng: np.random.Generator, cat: int, s: int) -> np.ndarray:
    h = w = s
    name = CATEGORIES[cat].split("/")[1]
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    img = _sky(rng, h, w)
    jit = rng.uniform(-0.08, 0.08)
    if name == "beach":  # sky / sea of fine horizontal waves / sand of fine noise
        hz, sh = (0.35 + jit) * h, (0.62 + jit) * h
        sea = _fill(rng, h, w, "stripes", rng.uniform(2, 4), math.pi / 2 + rng.uniform(-0.1, 0.1))
        sand = _fill(rng, h, w, "noise", rng.uniform(1, 2), rng.uniform(0, 3), 0.3)
        shore = sh + 3 * np.sin(xs / rng.uniform(5, 12))
        img = np.where((ys >= hz)[..., None], sea, img)
        img = np.where((ys >= shore)[..., None], sand, img)
    elif name in ("corridor", "street"):  # one-point perspective
        vx, vy = w * (0.5 + rng.uniform(-0.15, 0.15)), h * (0.45 + jit)
        floor = _fill(rng, h, w, "checker" if name == "corridor" else "noise", rng.uniform(3, 6), 0.0, 0.4)
        side = _fill(rng, h, w, "stripes", rng.uniform(3, 7), 0.0)
        left = polygon_mask(h, w, [[(0, 0), (vx, vy), (0, h)]], [])
        right = polygon_mask(h, w, [[(w, 0), (vx, vy), (w, h)]], [])
        bottom = polygon_mask(h, w, [[(0, h), (vx, vy), (w, h)]], [])
        img = np.where((left | right)[..., None], side, img)
        img = np.where(bottom[..., None], floor, img)
        if name == "corridor":
            top = polygon_mask(h, w, [[(0, 0), (vx, vy), (w, 0)]], [])
            img = np.where(top[..., None], _fill(rng, h, w, "stripes", 5, math.pi / 2, 0.2), img)
            for k in range(1, 6):  # door frames along the walls
                f = 1 - 0.8 ** k
                for x0 in (0, w):
                    x = x0 + (vx - x0) * f
                    img[int(vy + (0 - vy) * (1 - f)):int(vy + (h - vy) * (1 - f)), int(max(0, x - 1)):int(x + 1)] = \
                        rand_color(rng, 0, 80)
        else:  # road edges and dashed centre line
            for t in np.linspace(0.05, 0.95, 7):
                y0, y1 = vy + (h - vy) * t, vy + (h - vy) * (t + 0.06)
                m = polygon_mask(h, w, [[(vx - 0.02 * (y0 - vy), y0), (vx + 0.02 * (y0 - vy), y0),
                                         (vx + 0.02 * (y1 - vy), y1), (vx - 0.02 * (y1 - vy), y1)]], [])
                img[m] = rand_color(rng, 180, 256)
    elif name == "forest_path":  # many vertical trunks over foliage
        img = _fill(rng, h, w, "noise", rng.uniform(1.5, 3), rng.uniform(0, 3), 0.6)
        for _ in range(int(rng.integers(6, 12))):
            x, tw = rng.uniform(0, w), rng.uniform(2, 7)
            m = np.abs(xs - x - (ys - h) * rng.uniform(-0.05, 0.05)) < tw / 2
            img[m] = (rand_color(rng, 20, 120) * (0.8 + 0.2 * np.sin(ys[m] / 2)[:, None]))
    elif name == "skyscraper":  # tall blocks with window grids
        for _ in range(int(rng.integers(2, 5))):
            x0, bw = rng.uniform(-0.1, 0.8) * w, rng.uniform(0.2, 0.4) * w
            top = rng.uniform(0.0, 0.35) * h
            m = (xs >= x0) & (xs < x0 + bw) & (ys >= top)
            win = two_tone(((np.mod(xs - x0, 6) < 3) & (np.mod(ys - top, 7) < 4)).astype(np.float32),
                           rand_color(rng), rand_color(rng))
            img[m] = win[m]
    elif name == "field":  # low horizon, oriented grass strokes
        hz = (0.55 + jit) * h
        grass = _fill(rng, h, w, "stripes", rng.uniform(1.5, 3), rng.uniform(0.2, 0.5) * rng.choice([-1, 1]))
        img = np.where((ys >= hz)[..., None], grass * (0.7 + 0.3 * ((ys - hz) / h))[..., None], img)
    elif name == "mountain":  # jagged silhouettes in layers
        for layer in range(int(rng.integers(2, 4))):
            base = (0.35 + 0.15 * layer + jit) * h
            pts = [(0, h)]
            for x in np.linspace(0, w, 9):
                pts.append((x, base - rng.uniform(0, 0.3) * h))
            pts.append((w, h))
            m = polygon_mask(h, w, [pts], [])
            img[m] = _fill(rng, h, w, "noise", rng.uniform(2, 4), rng.uniform(0, 3), 0.25)[m]
    elif name == "shelves":  # horizontal shelves with small boxes
        img = _fill(rng, h, w, "noise", 6, 0, 0.1)
        n = int(rng.integers(3, 6))
        for k in range(n):
            y = (k + 1) * h / (n + 1)
            img[int(y):int(y) + 2] = rand_color(rng, 0, 90)
            x = rng.uniform(0, 5)
            while x < w - 3:
                bw, bh = rng.uniform(3, 9) * h / 96, rng.uniform(0.4, 0.9) * (h / (n + 1) - 1)
                img[int(max(0, y - bh)):int(y), int(x):int(x + bw)] = rand_color(rng)
                x += bw + rng.uniform(0, 4)
    elif name == "desert":  # smooth dunes: sinusoidal bands
        hz = (0.4 + jit) * h
        phase = rng.uniform(0, 6)
        band = np.sin(ys / rng.uniform(4, 8) + 2 * np.sin(xs / rng.uniform(12, 25) + phase))
        c1, c2 = rand_color(rng, 60, 240), rand_color(rng, 60, 240)
        dunes = two_tone((0.5 + 0.5 * band).astype(np.float32), c1, c1 + 0.4 * (c2 - c1))
        img = np.where((ys >= hz)[..., None], dunes, img)
    elif name == "crosswalk":  # road seen from above-ish: thick parallel bars across the image
        img = _fill(rng, h, w, "noise", 2, 0, 0.2)
        ang = rng.uniform(-0.3, 0.3)
        u = (xs - w / 2) * math.cos(ang) + (ys - h / 2) * math.sin(ang)
        v = -(xs - w / 2) * math.sin(ang) + (ys - h / 2) * math.cos(ang)
        m = (np.mod(u, 12) < 6) & (np.abs(v) < h * rng.uniform(0.2, 0.35))
        img[m] = rand_color(rng, 150, 256)
    else:  # pragma: no cover
        raise ValueError(name)
    # global clutter and noise so no single low-level statistic decides the class
    img = img * rng.uniform(0.75, 1.15) + smooth_noise(rng, h, w, 16, 10.0) + rng.normal(0, 4, (h, w, 3))
    return img


def write_places205(root: str | Path, seed: int = 0, scale: float = 1.0, image_size: int = 96,
                    train_per_class: int = 30, val_per_class: int = 10, classes: int = len(CATEGORIES)) -> Path:
    """Write ``root/places205`` (images256/, trainvalsplit_places205/{train,val}_places205.csv,
    categoryIndex_places205.csv) and return it. ``scale`` multiplies the images per class."""
    target = Path(root) / "places205"
    cats = CATEGORIES[:classes]
    counts = {"train": max(2, round(train_per_class * scale)), "val": max(1, round(val_per_class * scale))}
    with replace_dir(target) as tmp:
        lists: dict[str, list[str]] = {"train": [], "val": []}
        for c, cat in enumerate(cats):
            d = tmp / "images256" / cat
            d.mkdir(parents=True)
            for split, n in counts.items():
                for k in range(n):
                    rng = np.random.default_rng([seed, c, 0 if split == "train" else 1, k])
                    rel = f"{cat}/{split}_{k:05d}.jpg"
                    save_jpeg(render_place(rng, c, image_size), tmp / "images256" / rel)
                    lists[split].append(f"{rel} {c}")
        for split, lines in lists.items():
            write_text(tmp / "trainvalsplit_places205" / f"{split}_places205.csv", "".join(f"{ln}\n" for ln in lines))
        write_text(tmp / "categoryIndex_places205.csv", "".join(f"/{cat} {c}\n" for c, cat in enumerate(cats)))
    return target
