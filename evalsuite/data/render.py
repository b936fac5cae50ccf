"""Small deterministic drawing helpers shared by the synthetic writers (numpy + Pillow only)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# The synthetic writers build each dataset in a temporary sibling and swap it in whole.

TEXTURES = ("stripes", "checker", "dots", "rings")


def texture(kind: str, h: int, w: int, cx: float, cy: float, period: float, angle: float) -> np.ndarray:
    """A binary-ish pattern in [0, 1] (float32 (h, w)) anchored at (cx, cy), rotated by ``angle``."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    x -= cx
    y -= cy
    ca, sa = math.cos(angle), math.sin(angle)
    u = (x * ca + y * sa) / period
    v = (-x * sa + y * ca) / period
    if kind == "stripes":
        t = np.sin(2 * np.pi * u) > 0
    elif kind == "checker":
        t = (np.floor(u) + np.floor(v)) % 2 == 0
    elif kind == "dots":
        t = (u - np.round(u)) ** 2 + (v - np.round(v)) ** 2 < 0.09
    elif kind == "rings":
        t = np.sin(2 * np.pi * np.sqrt(u * u + v * v)) > 0
    elif kind == "noise":  # smooth blotches, fixed by the anchor so deterministic
        t = (np.sin(u * 2.1 + np.sin(v * 1.3)) + np.sin(v * 2.7 + np.sin(u * 0.7))) > 0
    else:
        raise ValueError(kind)
    return t.astype(np.float32)


def rand_color(rng: np.random.Generator, lo: int = 0, hi: int = 256) -> np.ndarray:
    return rng.integers(lo, hi, size=3).astype(np.float32)


def two_tone(pattern: np.ndarray, c1: np.ndarray, c2: np.ndarray) -> np.ndarray:
    """(h, w, 3) float image: ``c1`` where pattern is 1, ``c2`` where 0."""
    p = pattern[..., None]
    return p * c1 + (1 - p) * c2


def smooth_noise(rng: np.random.Generator, h: int, w: int, cell: int, amp: float) -> np.ndarray:
    """Blocky low-frequency noise upsampled by bilinear interpolation, (h, w, 3) float32."""
    gh, gw = h // cell + 2, w // cell + 2
    g = rng.normal(0, amp, size=(gh, gw, 3)).astype(np.float32)
    out = np.empty((h, w, 3), np.float32)
    ys = np.linspace(0, gh - 1.001, h)
    xs = np.linspace(0, gw - 1.001, w)
    y0, x0 = ys.astype(int), xs.astype(int)
    fy, fx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
    a = g[y0][:, x0]
    b = g[y0][:, x0 + 1]
    c = g[y0 + 1][:, x0]
    d = g[y0 + 1][:, x0 + 1]
    out[:] = (a * (1 - fx) + b * fx) * (1 - fy) + (c * (1 - fx) + d * fx) * fy
    return out


def polygon_mask(h: int, w: int, polys: list[list[tuple[float, float]]], ellipses=(), off: float = 0.0) -> np.ndarray:
    """bool (h, w) mask of polygons and ellipses ([x0, y0, x1, y1]); coordinates shifted by ``off``."""
    im = Image.new("L", (w, h), 0)
    d = ImageDraw.Draw(im)
    for p in polys:
        d.polygon([(x + off, y + off) for x, y in p], fill=255)
    for e in ellipses:
        d.ellipse([e[0] + off, e[1] + off, e[2] + off, e[3] + off], fill=255)
    return np.asarray(im) > 127


def to_uint8(a: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


def save_jpeg(arr: np.ndarray, path: Path, quality: int = 90) -> None:
    Image.fromarray(to_uint8(arr)).save(path, format="JPEG", quality=quality)


def write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="\n") as f:
        f.write(text)
