"""NYUv2-like indoor scenes from a small numpy ray-caster: exact per-pixel normals, depth and validity.

A room (floor, back and side walls, sometimes a ceiling) holds axis-aligned boxes turned about the
vertical axis and slanted rectangular planes (ramps, leaning boards). The camera has a random
height, yaw, pitch and roll. Each pixel's ray is intersected with every primitive; the nearest hit
gives depth (z in metres), the surface normal (turned to face the camera, expressed in the camera
frame: x right, y down, z forward) and a textured, Lambert-shaded colour, so normals are inferable
from shading and texture gradients, not from colour alone. Invalid pixels (like the Kinect's holes):
rays that leave the room (open ceiling), depth beyond 10 m, and random sensor-dropout blobs.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image

from ..io import replace_dir
from .nyuv2 import LABELED_MAT, SPLITS_MAT
from .render import to_uint8

MAX_DEPTH = 10.0


def intrinsics(h: int, w: int) -> tuple[float, float, float]:
    """Pinhole (f, cx, cy) in pixels of every synthetic frame of size (h, w): pixel (r, c) looks along
    ((c + 0.5 - cx) / f, (r + 0.5 - cy) / f, 1) in the camera frame."""
    return 0.9 * w, w / 2, h / 2


def _rot_y(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]], np.float64)


def _rot_x(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]], np.float64)


def _rot_z(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]], np.float64)


class _Hits:
    """Nearest-hit buffers over all rays (world frame)."""

    def __init__(self, n: int):
        self.t = np.full(n, np.inf)
        self.normal = np.zeros((n, 3))
        self.uv = np.zeros((n, 2))
        self.surf = np.full(n, -1, np.int64)

    def update(self, t, normal, uv, surf_id):
        better = (t > 1e-6) & (t < self.t)
        self.t[better] = t[better]
        self.normal[better] = normal[better] if normal.ndim == 2 else normal
        self.uv[better] = uv[better]
        self.surf[better] = surf_id


def _plane(hits: _Hits, o, d, point, normal, axis_u, axis_v, half_u, half_v, sid):
    """Rectangle centred at ``point`` spanned by unit ``axis_u``/``axis_v`` (half extents; inf = unbounded)."""
    denom = d @ normal
    with np.errstate(divide="ignore", invalid="ignore"):
        t = ((point - o) @ normal) / denom
    p = o + t[:, None] * d
    u = (p - point) @ axis_u
    v = (p - point) @ axis_v
    ok = (np.abs(u) <= half_u) & (np.abs(v) <= half_v) & np.isfinite(t)
    t = np.where(ok, t, np.inf)
    hits.update(t, np.broadcast_to(normal, d.shape), np.stack([u, v], 1), sid)


def _box(hits: _Hits, o, d, center, half, yaw, sid):
    """Oriented box (rotation ``yaw`` about the vertical y axis), slab intersection in its local frame."""
    R = _rot_y(yaw)
    ol = (o - center) @ R  # world -> local: x_l = R^T (x - c)
    dl = d @ R
    with np.errstate(divide="ignore", invalid="ignore"):
        t1 = (-half - ol) / dl
        t2 = (half - ol) / dl
    tmin = np.nanmax(np.minimum(t1, t2), axis=1)
    tmax = np.nanmin(np.maximum(t1, t2), axis=1)
    ok = (tmax >= tmin) & (tmin > 1e-6)
    t = np.where(ok, tmin, np.inf)
    axis = np.nanargmax(np.minimum(t1, t2), axis=1)
    pl = ol + np.where(ok, tmin, 0)[:, None] * dl
    nl = np.zeros_like(dl)
    rows = np.arange(len(d))
    nl[rows, axis] = np.sign(pl[rows, axis])
    uv = np.stack([pl[rows, (axis + 1) % 3], pl[rows, (axis + 2) % 3]], 1)
    hits.update(t, nl @ R.T, uv, sid)


def render_room(rng: np.random.Generator, h: int, w: int) -> dict[str, np.ndarray]:
    """One scene -> rgb uint8 (h, w, 3), normals float32 (h, w, 3), depth float32 (h, w), mask bool (h, w)."""
    f, cx0, cy0 = intrinsics(h, w)
    cam_h = rng.uniform(1.0, 1.6)
    room_w, room_d, room_h = rng.uniform(3, 6), rng.uniform(4, 8), rng.uniform(2.4, 3.0)
    has_ceiling = rng.random() < 0.5
    Rwc = _rot_y(rng.uniform(-0.5, 0.5)) @ _rot_x(-rng.uniform(0.15, 0.55)) @ _rot_z(rng.uniform(-0.08, 0.08))
    # world frame: x right, y DOWN (floor at y = 0 is below the camera at y = -cam_h), z forward
    o = np.array([rng.uniform(-0.3, 0.3) * room_w, -cam_h, -room_d * rng.uniform(0.35, 0.5)])
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    dc = np.stack([(xs + 0.5 - cx0) / f, (ys + 0.5 - cy0) / f, np.ones_like(xs)], -1).reshape(-1, 3)
    d = dc @ Rwc.T
    oo = np.broadcast_to(o, d.shape)
    hits = _Hits(len(d))
    ex, ey, ez = np.eye(3)
    hw, hd = room_w / 2, room_d / 2
    _plane(hits, oo, d, np.zeros(3), -ey, ex, ez, hw, hd, 0)  # floor faces up (-y)
    _plane(hits, oo, d, np.array([0, -room_h / 2, hd]), -ez, ex, ey, hw, room_h / 2, 1)  # back wall
    _plane(hits, oo, d, np.array([-hw, -room_h / 2, 0]), ex, ez, ey, hd, room_h / 2, 2)  # left wall
    _plane(hits, oo, d, np.array([hw, -room_h / 2, 0]), -ex, ez, ey, hd, room_h / 2, 3)  # right wall
    if has_ceiling:
        _plane(hits, oo, d, np.array([0, -room_h, 0]), ey, ex, ez, hw, hd, 4)
    sid = 5
    for _ in range(int(rng.integers(1, 5))):  # boxes standing on the floor
        half = np.array([rng.uniform(0.2, 0.7), rng.uniform(0.2, 0.6), rng.uniform(0.2, 0.6)])
        c = np.array([rng.uniform(-hw + 0.5, hw - 0.5), -half[1], rng.uniform(-0.1, hd - 0.5)])
        _box(hits, oo, d, c, half, rng.uniform(-0.8, 0.8), sid)
        sid += 1
    for _ in range(int(rng.integers(0, 3))):  # slanted planes (ramps / leaning boards)
        tilt, yaw = rng.uniform(0.3, 1.2) * rng.choice([-1, 1]), rng.uniform(-1, 1)
        n = _rot_y(yaw) @ _rot_x(tilt) @ -ey
        au = _rot_y(yaw) @ ex
        av = np.cross(n, au)
        c = np.array([rng.uniform(-hw + 0.6, hw - 0.6), -rng.uniform(0.3, 1.2), rng.uniform(0, hd - 0.5)])
        _plane(hits, oo, d, c, n, au, av, rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), sid)
        sid += 1
    depth_z = hits.t  # rays have camera-frame z = 1, so the ray parameter is the z-depth
    valid = np.isfinite(depth_z) & (depth_z < MAX_DEPTH)
    nw = hits.normal.copy()
    flip = np.einsum("ij,ij->i", nw, d) > 0
    nw[flip] *= -1
    nc = nw @ Rwc  # world -> camera
    # albedo: per-surface two colours and a texture in surface coordinates
    rgb = np.zeros((len(d), 3))
    light = _rot_y(rng.uniform(-1, 1)) @ np.array([0.3, -1.0, -0.4])
    light /= np.linalg.norm(light)
    for s in range(sid):
        m = (hits.surf == s) & valid
        if not m.any():
            continue
        c1, c2 = rng.uniform(40, 230, 3), rng.uniform(40, 230, 3)
        u, v = hits.uv[m, 0], hits.uv[m, 1]
        kind = int(rng.integers(0, 4))
        period = rng.uniform(0.15, 0.5)
        if kind == 0:
            pat = (np.floor(u / period) + np.floor(v / period)) % 2
        elif kind == 1:
            pat = (np.sin(2 * np.pi * u / period) > 0).astype(float)
        elif kind == 2:
            pat = 0.5 + 0.5 * np.sin(u * 7.1 + np.sin(v * 5.3)) * np.cos(v * 3.7)
        else:
            pat = np.full(u.shape, 0.5)
        alb = pat[:, None] * c1 + (1 - pat[:, None]) * c2
        shade = 0.35 + 0.65 * np.clip(nw[m] @ -light, 0, 1)
        rgb[m] = alb * shade[:, None]
    rgb = rgb.reshape(h, w, 3) + rng.normal(0, 3, (h, w, 3))
    valid = valid.reshape(h, w)
    for _ in range(int(rng.integers(0, 4))):  # sensor dropout blobs
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(2, 0.08 * w)
        valid &= (ys - cy) ** 2 + (xs - cx) ** 2 > r * r
    nc = nc.reshape(h, w, 3).astype(np.float32)
    nc[~valid] = 0
    depth = np.where(valid, depth_z.reshape(h, w), 0).astype(np.float32)
    return {"rgb": to_uint8(rgb), "normals": nc, "depth": depth, "mask": valid}


def _fixed_mat5_header(path: Path) -> None:
    """scipy writes the creation time into a MAT 5 header; pin it so the same seed gives the same bytes."""
    b = bytearray(path.read_bytes())
    hdr = b"MATLAB 5.0 MAT-file, Platform: evalsuite, Created on: synthetic"
    b[:116] = hdr.ljust(116, b" ")
    path.write_bytes(bytes(b))


def _matlab73_userblock(path: Path) -> None:
    hdr = b"MATLAB 7.3 MAT-file, Platform: evalsuite, Created on: synthetic HDF5 schema 1.00 ."
    with open(path, "r+b") as f:
        f.write(hdr.ljust(116, b" ") + b"\x00" * 8 + b"\x00\x02" + b"IM")


def write_nyuv2(root: str | Path, seed: int = 0, scale: float = 1.0, fmt: str = "mat", height: int = 96,
                width: int = 128, n_train: int = 64, n_test: int = 32) -> Path:
    """Write ``root/nyuv2`` in the "mat" (labeled .mat + splits.mat) or "dir" layout; returns that path.

    ``scale`` multiplies the frame counts. Frames are numbered 1..N like the labeled file; the split
    is a seeded interleaving, as in the official one.
    """
    if fmt not in ("mat", "dir"):
        raise ValueError(f"fmt must be 'mat' or 'dir', not {fmt!r}")
    ntr, nte = max(4, round(n_train * scale)), max(2, round(n_test * scale))
    n = ntr + nte
    perm = np.random.default_rng([seed, 11]).permutation(n) + 1
    test_idx, train_idx = np.sort(perm[:nte]), np.sort(perm[nte:])
    frames = [render_room(np.random.default_rng([seed, k]), height, width) for k in range(1, n + 1)]
    target = Path(root) / "nyuv2"
    with replace_dir(target) as tmp:
        if fmt == "mat":
            import h5py
            import scipy.io as sio

            with h5py.File(tmp / LABELED_MAT, "w", userblock_size=512) as fh:
                def put(name, arr, cls):
                    ds = fh.create_dataset(name, data=arr, compression="gzip", compression_opts=4,
                                           chunks=(1, *arr.shape[1:]))
                    ds.attrs["MATLAB_class"] = np.bytes_(cls)
                put("images", np.stack([fr["rgb"].transpose(2, 1, 0) for fr in frames]), "uint8")
                put("depths", np.stack([fr["depth"].T for fr in frames]), "single")
                put("normals", np.stack([fr["normals"].transpose(2, 1, 0) for fr in frames]), "single")
                put("normals_mask", np.stack([fr["mask"].T.astype(np.uint8) for fr in frames]), "uint8")
            _matlab73_userblock(tmp / LABELED_MAT)
            sio.savemat(tmp / SPLITS_MAT, {"trainNdxs": train_idx.astype(np.uint16)[:, None],
                                           "testNdxs": test_idx.astype(np.uint16)[:, None]})
            _fixed_mat5_header(tmp / SPLITS_MAT)
        else:
            for split, idx in (("train", train_idx), ("test", test_idx)):
                for what in ("image", "normal", "mask", "depth"):
                    (tmp / what / split).mkdir(parents=True)
                for k in idx:
                    fr, stem = frames[k - 1], f"{int(k):05d}"
                    Image.fromarray(fr["rgb"]).save(tmp / "image" / split / f"{stem}.png")
                    np.save(tmp / "normal" / split / f"{stem}.npy", fr["normals"])
                    Image.fromarray(fr["mask"].astype(np.uint8) * 255).save(tmp / "mask" / split / f"{stem}.png")
                    np.save(tmp / "depth" / split / f"{stem}.npy", fr["depth"])
    return target
