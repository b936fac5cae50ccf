"""A VOC2007-like synthetic dataset written in the official devkit layout.

Each of the 20 classes is a (body shape x surface texture x part structure) combination; colours
are random per instance, so colour alone says nothing about the class. Scenes hold 1-4 objects at
varied scale, position and in-plane rotation, overlapping each other (occlusion) and the image
border (truncation), over a cluttered background of smooth noise, textured patches and strokes.
Boxes are the extent of each object's *visible* pixels (as VOC annotators draw them); an object
that is mostly hidden is marked difficult, one mostly outside the frame truncated.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..io import replace_dir
from .render import (
    TEXTURES,
    polygon_mask,
    rand_color,
    save_jpeg,
    smooth_noise,
    texture,
    two_tone,
    write_text,
)
from .voc import VOC_CLASSES

BODIES = ("disc", "square", "triangle", "star", "cross")
PARTS = ("none", "ears", "legs", "tail")


def class_recipe(c: int) -> tuple[str, str, str]:
    """(body, texture, parts) of class index ``c``: 5 bodies x 4 textures, parts tied to both."""
    b, t = divmod(c, 4)
    return BODIES[b], TEXTURES[t], PARTS[(b + t) % 4]


def rotate_points(points, cx: float, cy: float, angle: float) -> list[tuple[float, float]]:
    """Local (x, y) points turned by ``angle`` radians about 0 and moved to the centre (cx, cy)."""
    ca, sa = math.cos(angle), math.sin(angle)
    return [(cx + x * ca - y * sa, cy + x * sa + y * ca) for x, y in points]


def star_points(r: float, inner: float) -> list[tuple[float, float]]:
    """The 10 corners of a five-pointed star centred at 0, tip up: outer radius ``r``, inner ``r * inner``."""
    pts = []
    for k in range(10):
        rr = r if k % 2 == 0 else r * inner
        a = k * math.pi / 5
        pts.append((rr * math.sin(a), -rr * math.cos(a)))
    return pts


def _body(body: str, r: float) -> tuple[list, list]:
    """Local polygons / circles ((x, y, radius)) of a body of half-size ``r`` centred at 0."""
    if body == "disc":
        return [], [(0.0, 0.0, r)]
    if body == "square":
        return [[(-r, -r), (r, -r), (r, r), (-r, r)]], []
    if body == "triangle":
        return [[(0, -r), (r * 0.95, r * 0.7), (-r * 0.95, r * 0.7)]], []
    if body == "star":
        return [star_points(r, 0.5)], []
    if body == "cross":
        w = r * 0.38
        return [[(-r, -w), (r, -w), (r, w), (-r, w)], [(-w, -r), (w, -r), (w, r), (-w, r)]], []
    raise ValueError(body)


def _parts(parts: str, r: float) -> tuple[list, list]:
    if parts == "none":
        return [], []
    if parts == "ears":
        return [], [(-0.55 * r, -1.05 * r, 0.32 * r), (0.55 * r, -1.05 * r, 0.32 * r)]
    if parts == "legs":
        w = 0.13 * r
        legs = [[(x - w, 0.6 * r), (x + w, 0.6 * r), (x + w, 1.55 * r), (x - w, 1.55 * r)] for x in (-0.5 * r, 0.5 * r)]
        return legs, []
    if parts == "tail":
        return [[(0.7 * r, -0.12 * r), (1.6 * r, -0.55 * r), (1.7 * r, -0.35 * r), (0.8 * r, 0.12 * r)]], \
            [(1.65 * r, -0.45 * r, 0.22 * r)]
    raise ValueError(parts)


def _mask(h, w, polys, circles, cx, cy, angle, off):
    P = [rotate_points(p, cx, cy, angle) for p in polys]
    E = []
    for x, y, rad in circles:
        (ex, ey), = rotate_points([(x, y)], cx, cy, angle)
        E.append((ex - rad, ey - rad, ex + rad, ey + rad))
    return polygon_mask(h, w, P, E, off=off)


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    c1, c2 = rand_color(rng, 40, 220), rand_color(rng, 40, 220)
    t = np.linspace(0, 1, h, dtype=np.float32)[:, None, None]
    img = c1 * (1 - t) + c2 * t + smooth_noise(rng, h, w, int(rng.integers(8, 20)), 25.0)
    for _ in range(int(rng.integers(1, 3))):  # textured patches (not object textures' geometry: no body)
        x0, y0 = rng.uniform(-w * 0.2, w * 0.8), rng.uniform(-h * 0.2, h * 0.8)
        pw, ph = rng.uniform(w * 0.2, w * 0.6), rng.uniform(h * 0.2, h * 0.6)
        m = polygon_mask(h, w, [[(x0, y0), (x0 + pw, y0 + rng.uniform(-5, 5)), (x0 + pw, y0 + ph),
                                 (x0 + rng.uniform(-5, 5), y0 + ph)]], [])
        pat = texture(str(rng.choice(["noise", "stripes"])), h, w, x0, y0, rng.uniform(3, 9), rng.uniform(0, 3.2))
        img[m] = (0.6 * img + 0.4 * two_tone(pat, rand_color(rng), rand_color(rng)))[m]
    for _ in range(int(rng.integers(2, 7))):  # strokes
        x0, y0 = rng.uniform(0, w), rng.uniform(0, h)
        a, ln, th = rng.uniform(0, 2 * math.pi), rng.uniform(w * 0.2, w * 0.7), rng.uniform(1, 3.5)
        dx, dy = math.cos(a), math.sin(a)
        nx, ny = -dy * th / 2, dx * th / 2
        m = polygon_mask(h, w, [[(x0 + nx, y0 + ny), (x0 + dx * ln + nx, y0 + dy * ln + ny),
                                 (x0 + dx * ln - nx, y0 + dy * ln - ny), (x0 - nx, y0 - ny)]], [])
        img[m] = rand_color(rng)
    return img


def object_look(rng: np.random.Generator, r: float) -> tuple[np.ndarray, np.ndarray, float, float]:
    """An instance's appearance: two contrasting colours, texture period (pixels) and vertical shading tilt."""
    while True:
        c1, c2 = rand_color(rng), rand_color(rng)
        if np.abs(c1 - c2).sum() > 180:
            break
    return c1, c2, r * rng.uniform(0.35, 0.55), rng.uniform(-1, 1)


def paint_object(img: np.ndarray, c: int, cx: float, cy: float, r: float, angle: float,
                 look: tuple[np.ndarray, np.ndarray, float, float]) -> tuple[np.ndarray, int]:
    """Draw an object of class ``c`` (half-size ``r``, centre (cx, cy), turned by ``angle``) into ``img`` (float
    (h, w, 3), in place); returns its in-frame mask and its full area in pixels (inside the frame or not)."""
    h, w = img.shape[:2]
    pad = max(w, h)
    body, tex, parts = class_recipe(c)
    bp, bc = _body(body, r)
    pp, pc = _parts(parts, r)
    full = _mask(h + 2 * pad, w + 2 * pad, bp + pp, bc + pc, cx, cy, angle, off=pad)
    body_m = _mask(h, w, bp, bc, cx, cy, angle, off=0)
    inside = full[pad:pad + h, pad:pad + w]
    c1, c2, period, tilt = look
    pat = texture(tex, h, w, cx, cy, period, angle)
    shade = 1.0 + 0.25 * np.clip((np.mgrid[0:h, 0:w][0] - cy) / (r + 1e-6), -1, 1)[..., None] * tilt
    obj = two_tone(pat, c1, c2) * shade
    part_m = inside & ~body_m
    img[body_m] = obj[body_m]
    img[part_m] = (0.5 * c1 + 0.5 * c2) * 0.7
    return inside, int(full.sum())


def visible_parts(masks: list[np.ndarray]) -> list[np.ndarray]:
    """Each drawn object's visible pixels: objects drawn later occlude earlier ones."""
    covered = np.zeros_like(masks[0]) if masks else None
    out = [None] * len(masks)
    for k in range(len(masks) - 1, -1, -1):
        out[k] = masks[k] & ~covered
        covered |= masks[k]
    return out


def visible_box(vis: np.ndarray) -> tuple[int, int, int, int]:
    """The extent of a non-empty mask as a VOC box: x1, y1, x2, y2, 1-based and inclusive."""
    ys, xs = np.nonzero(vis)
    return int(xs.min()) + 1, int(ys.min()) + 1, int(xs.max()) + 1, int(ys.max()) + 1


def render_scene(rng: np.random.Generator, w: int, h: int, first_class: int, n_objects: int | None = None,
                 radius: tuple[float, float] = (0.13, 0.3), background: np.ndarray | None = None
                 ) -> tuple[np.ndarray, list[dict]]:
    """One image (float (h, w, 3)) and its object annotations (1-based inclusive boxes); ``n_objects``
    fixes the object count (default: 1-4 at random, as in the VOC-like scenes), ``radius`` the range of
    object half-sizes as fractions of the shorter side, ``background`` a given (h, w, 3) backdrop instead
    of a fresh cluttered one."""
    img = _background(rng, h, w) if background is None else background.astype(np.float32, copy=True)
    n = int(rng.choice([1, 2, 3, 4], p=[0.3, 0.35, 0.2, 0.15])) if n_objects is None else int(n_objects)
    # the scene's guaranteed class is drawn last (on top, central), so it is always visible
    classes = [int(rng.integers(0, 20)) for _ in range(n - 1)] + [first_class]
    inside_masks, info = [], []
    s = min(w, h)
    for j, c in enumerate(classes):
        r = rng.uniform(*radius) * s
        lo = 0.1 if j < n - 1 else 0.3
        cx, cy = rng.uniform(lo * w, (1 - lo) * w), rng.uniform(lo * h, (1 - lo) * h)
        angle = rng.uniform(-0.45, 0.45)
        look = object_look(rng, r)
        inside, full_area = paint_object(img, c, cx, cy, r, angle, look)
        inside_masks.append(inside)
        info.append((c, full_area, float(1 - inside.sum() / max(1, full_area))))
    objects = []
    for k, vis in enumerate(visible_parts(inside_masks)):
        c, full_area, out_frac = info[k]
        if vis.sum() < 12:
            continue
        box = visible_box(vis)
        vis_frac = vis.sum() / max(1, full_area)
        objects.append({"name": VOC_CLASSES[c], "box": box, "truncated": int(out_frac > 0.15),
                        "difficult": int(vis_frac < 0.3 or min(box[2] - box[0], box[3] - box[1]) < 8)})
    img = img + rng.normal(0, 4, size=img.shape).astype(np.float32)
    return img, objects


def voc_xml(image_id: str, w: int, h: int, objects: list[dict]) -> str:
    lines = ["<annotation>", "\t<folder>VOC2007</folder>", f"\t<filename>{image_id}.jpg</filename>",
             "\t<source>", "\t\t<database>evalsuite synthetic VOC2007</database>",
             "\t\t<annotation>evalsuite synthetic</annotation>", "\t\t<image>synthetic</image>", "\t</source>",
             "\t<size>", f"\t\t<width>{w}</width>", f"\t\t<height>{h}</height>", "\t\t<depth>3</depth>",
             "\t</size>", "\t<segmented>0</segmented>"]
    for o in objects:
        x1, y1, x2, y2 = o["box"]
        lines += ["\t<object>", f"\t\t<name>{o['name']}</name>", "\t\t<pose>Unspecified</pose>",
                  f"\t\t<truncated>{o['truncated']}</truncated>", f"\t\t<difficult>{o['difficult']}</difficult>",
                  "\t\t<bndbox>", f"\t\t\t<xmin>{x1}</xmin>", f"\t\t\t<ymin>{y1}</ymin>",
                  f"\t\t\t<xmax>{x2}</xmax>", f"\t\t\t<ymax>{y2}</ymax>", "\t\t</bndbox>", "\t</object>"]
    lines.append("</annotation>")
    return "\n".join(lines) + "\n"


def image_labels(objects: list[dict]) -> np.ndarray:
    """The devkit's per-class label of one image: 1 non-difficult instance, 0 difficult only, -1 absent."""
    lab = -np.ones(len(VOC_CLASSES), np.int8)
    for o in objects:
        c = VOC_CLASSES.index(o["name"])
        if not o["difficult"]:
            lab[c] = 1
        elif lab[c] == -1:
            lab[c] = 0
    return lab


def write_voc2007(root: str | Path, seed: int = 0, scale: float = 1.0, image_size: int = 112,
                  n_trainval: int = 200, n_test: int = 200) -> Path:
    """Write ``root/VOCdevkit/VOC2007`` (JPEGImages, Annotations, ImageSets/Main) and return that path.

    ``scale`` multiplies the image counts (``n_trainval`` split half/half into train and val,
    ``n_test``); each image side is drawn from [0.85, 1.15] x ``image_size``. Deterministic per seed.
    """
    target = Path(root) / "VOCdevkit" / "VOC2007"
    ntv, nte = max(20, round(n_trainval * scale)), max(20, round(n_test * scale))
    n = ntv + nte
    ids = [f"{k:06d}" for k in range(1, n + 1)]
    perm = np.random.default_rng([seed, 7]).permutation(n)
    test = sorted(ids[k] for k in perm[:nte])
    trainval = [ids[k] for k in perm[nte:]]
    train, val = sorted(trainval[: ntv // 2]), sorted(trainval[ntv // 2:])
    splits = {"train": train, "val": val, "trainval": sorted(trainval), "test": test}
    labels: dict[str, np.ndarray] = {}
    with replace_dir(target) as tmp:
        for d in ("JPEGImages", "Annotations", "ImageSets/Main"):
            (tmp / d).mkdir(parents=True)
        for split in ("trainval", "test"):
            for k, image_id in enumerate(splits[split]):
                rng = np.random.default_rng([seed, int(image_id)])
                w = int(round(image_size * rng.uniform(0.85, 1.15)))
                h = int(round(image_size * rng.uniform(0.85, 1.15)))
                img, objects = render_scene(rng, w, h, first_class=k % len(VOC_CLASSES))
                save_jpeg(img, tmp / "JPEGImages" / f"{image_id}.jpg")
                write_text(tmp / "Annotations" / f"{image_id}.xml", voc_xml(image_id, w, h, objects))
                labels[image_id] = image_labels(objects)
        main = tmp / "ImageSets" / "Main"
        for split, sids in splits.items():
            write_text(main / f"{split}.txt", "".join(f"{i}\n" for i in sids))
            for c, cname in enumerate(VOC_CLASSES):
                write_text(main / f"{cname}_{split}.txt", "".join(f"{i} {labels[i][c]:2d}\n" for i in sids))
    return target


def write_object_imagefolder(out: str | Path, seed: int = 0, per_class: int = 20, size: int = 64,
                             splits: dict[str, float] | None = None,
                             radius: tuple[float, float] = (0.22, 0.36), backgrounds: int | None = None) -> Path:
    """``out/<split>/<class>/<n>.jpg``: one object of each of the 20 VOC-like classes per image, over the
    same cluttered backgrounds (``per_class`` train images, half as many val), larger than in the scenes
    (object-centric, as ImageNet photos are). The ImageNet of this synthetic VOC: a pretraining / kNN set
    whose categories are the ones the VOC-like transfer tasks test, as ImageNet's overlap PASCAL's.

    ``backgrounds``: None gives every image its own clutter; ``k`` draws each image's backdrop from one
    pool of ``k`` cluttered backgrounds shared by all classes and splits, so a backdrop identifies neither
    a class nor an image (instance-discrimination methods then have to tell images apart by their object).
    Deterministic per seed."""
    out = Path(out)
    splits = splits or {"train": 1.0, "val": 0.5}
    pool = None if backgrounds is None else [_background(np.random.default_rng([seed, 13, b]), size, size)
                                             for b in range(int(backgrounds))]
    with replace_dir(out) as tmp:
        for s_i, (split, frac) in enumerate(splits.items()):
            for c, cname in enumerate(VOC_CLASSES):
                d = tmp / split / cname
                d.mkdir(parents=True)
                for k in range(max(1, int(per_class * frac))):
                    rng = np.random.default_rng([seed, 11, s_i, c, k])
                    backdrop = None if pool is None else pool[int(rng.integers(len(pool)))]
                    img, _ = render_scene(rng, size, size, first_class=c, n_objects=1, radius=radius,
                                          background=backdrop)
                    save_jpeg(img, d / f"{k:05d}.jpg")
    return out
