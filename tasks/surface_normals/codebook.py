"""A codebook of surface-normal clusters: normals estimation as per-pixel classification.

Following the NYUv2 normals setup of Wang, Fouhey & Gupta (2015) that the Goyal et al. 2019 benchmark
inherits, each training normal is assigned to the nearest of K cluster centres found by k-means on the
training normals (here spherical k-means: cosine similarity, centres renormalised to unit length),
the network predicts a distribution over the K clusters per pixel, and the predicted normal is the centre of
the most likely cluster (``hard``) or the renormalised probability-weighted mean of the centres (``soft``, a
soft-argmax).

All functions are pure (numpy / torch in, numpy / torch out) and deterministic for a given seed.
"""

from __future__ import annotations

import numpy as np
import torch


def fit_codebook(normals: np.ndarray, k: int, seed: int = 0, iters: int = 50,
                 max_samples: int | None = 200_000) -> np.ndarray:
    """Spherical k-means on unit normals (N, 3) -> centres (k, 3) float32, unit length.

    At most ``max_samples`` normals (drawn uniformly with ``seed``) are clustered: k-means++ seeding
    (:func:`kmeans_pp_init`), then ``iters`` Lloyd iterations of ``faiss.Kmeans(spherical=True)`` (an empty
    cluster takes half of a large one). Centres are sorted by cluster size (largest first) so that the
    codebook is stable across runs.
    """
    import faiss

    x = np.asarray(normals, dtype=np.float64).reshape(-1, 3)
    if x.shape[0] < k:
        raise ValueError(f"need at least {k} valid normals to fit a {k}-entry codebook, got {x.shape[0]}")
    rng = np.random.default_rng(seed)
    if max_samples is not None and x.shape[0] > max_samples:
        x = x[rng.choice(x.shape[0], max_samples, replace=False)]
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    init = kmeans_pp_init(x, k, rng)
    # every sample is clustered (faiss would otherwise subsample to 256 per centre and warn below 39)
    kmeans = faiss.Kmeans(3, k, niter=iters, seed=seed, spherical=True, max_points_per_centroid=x.shape[0],
                          min_points_per_centroid=1, verbose=False)
    kmeans.train(x.astype(np.float32), init_centroids=init.astype(np.float32))
    centres = kmeans.centroids
    sizes = np.bincount(assign(x, centres), minlength=k)
    return centres[np.argsort(-sizes, kind="stable")].astype(np.float32)


def kmeans_pp_init(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding on unit vectors (N, 3) with the angular distance 1 - cos -> (k, 3) rows of ``x``.

    faiss's own initialisation draws k random points, which on a few dominant planes often puts two centres
    in one cluster and none in another.
    """
    centres = [int(rng.integers(x.shape[0]))]
    dist = 1.0 - x @ x[centres[0]]
    for _ in range(1, k):
        w = np.maximum(dist, 0.0) ** 2
        total = w.sum()
        i = int(rng.choice(x.shape[0], p=w / total)) if total > 0 else int(rng.integers(x.shape[0]))
        centres.append(i)
        dist = np.minimum(dist, 1.0 - x @ x[i])
    return x[centres]


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
