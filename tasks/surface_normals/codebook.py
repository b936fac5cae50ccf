"""A codebook of surface-normal clusters: normals estimation as per-pixel classification.

Following the NYUv2 normals setup of Wang, Fouhey & Gupta (2015) that the Goyal et al. 2019 benchmark
inherits, each training normal is assigned to the nearest of K cluster centres found by k-means on the
training normals (here spherical k-means: cosine similarity, centres renormalised), the network predicts
a distribution over the K clusters per pixel, and the predicted normal is the centre of the most likely
cluster (``hard``) or the renormalised probability-weighted mean of the centres (``soft``, a soft-argmax).

All functions are pure (numpy / torch in, numpy / torch out) and deterministic for a given seed.
"""

from __future__ import annotations

import numpy as np
import torch


def fit_codebook(normals: np.ndarray, k: int, seed: int = 0, iters: int = 50,
                 max_samples: int | None = 200_000) -> np.ndarray:
    """Spherical k-means (k-means++ seeding) on unit normals (N, 3) -> centres (k, 3) float32, unit length.

    At most ``max_samples`` normals (drawn uniformly with ``seed``) are clustered. Centres are sorted by
    cluster size (largest first) so that the codebook is stable across runs. Empty clusters are re-seeded
    with the point worst served by its centre.
    """
    x = np.asarray(normals, dtype=np.float64).reshape(-1, 3)
    if x.shape[0] < k:
        raise ValueError(f"need at least {k} valid normals to fit a {k}-entry codebook, got {x.shape[0]}")
    rng = np.random.default_rng(seed)
    if max_samples is not None and x.shape[0] > max_samples:
        x = x[rng.choice(x.shape[0], max_samples, replace=False)]
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    # k-means++ on the angular distance 1 - cos
    centres = [x[rng.integers(x.shape[0])]]
    dist = 1.0 - x @ centres[0]
    for _ in range(1, k):
        w = np.maximum(dist, 0.0) ** 2
        total = w.sum()
        i = rng.choice(x.shape[0], p=w / total) if total > 0 else rng.integers(x.shape[0])
        centres.append(x[i])
        dist = np.minimum(dist, 1.0 - x @ x[i])
    c = np.stack(centres)
    for _ in range(iters):
        sim = x @ c.T
        a = sim.argmax(axis=1)
        new = np.zeros_like(c)
        np.add.at(new, a, x)
        counts = np.bincount(a, minlength=k)
        for j in np.flatnonzero(counts == 0):  # re-seed empty clusters
            worst = int(np.argmin(sim[np.arange(x.shape[0]), a]))
            new[j] = x[worst]
            a[worst] = j
            sim[worst, a[worst]] = 1.0
        norms = np.linalg.norm(new, axis=1, keepdims=True)
        new = np.where(norms > 1e-12, new / np.maximum(norms, 1e-12), c)
        if np.allclose(new, c, atol=1e-10):
            c = new
            break
        c = new
    sizes = np.bincount((x @ c.T).argmax(axis=1), minlength=k)
    order = np.argsort(-sizes, kind="stable")
    return c[order].astype(np.float32)


def assign(normals: np.ndarray | torch.Tensor, codebook: np.ndarray | torch.Tensor):
    """Index of the nearest centre (largest cosine) for each normal (..., 3) -> (...) int64."""
    if isinstance(normals, torch.Tensor):
        cb = torch.as_tensor(codebook, dtype=normals.dtype, device=normals.device)
        return (normals @ cb.T).argmax(dim=-1)
    return (np.asarray(normals, dtype=np.float64) @ np.asarray(codebook, dtype=np.float64).T).argmax(axis=-1)


def cluster_radius_deg(normals: np.ndarray, codebook: np.ndarray) -> np.ndarray:
    """Largest angle (degrees) between a centre and the normals assigned to it (k,); 0 for empty clusters."""
    x = np.asarray(normals, dtype=np.float64).reshape(-1, 3)
    cb = np.asarray(codebook, dtype=np.float64)
    a = assign(x, cb)
    cos = np.clip(np.sum(x * cb[a], axis=1) / np.linalg.norm(x, axis=1), -1.0, 1.0)
    ang = np.degrees(np.arccos(cos))
    radius = np.zeros(cb.shape[0])
    np.maximum.at(radius, a, ang)
    return radius


def decode(logits: torch.Tensor, codebook: torch.Tensor, mode: str = "hard") -> torch.Tensor:
    """Per-pixel logits (B, K, H, W) -> unit normals (B, 3, H, W).

    ``hard``: the centre of the arg-max cluster. ``soft``: softmax-weighted mean of the centres,
    renormalised (falls back to the arg-max centre where the mean is ~0).
    """
    cb = codebook.to(device=logits.device, dtype=logits.dtype)
    hard = cb[logits.argmax(dim=1)].permute(0, 3, 1, 2)
    if mode == "hard":
        return hard.contiguous()
    if mode != "soft":
        raise ValueError(f"unknown codebook decoding {mode!r}; use hard or soft")
    mean = torch.einsum("bkhw,kc->bchw", logits.softmax(dim=1), cb)
    n = mean.norm(dim=1, keepdim=True)
    return torch.where(n > 1e-6, mean / n.clamp_min(1e-6), hard)
