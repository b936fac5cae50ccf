"""A codebook of surface-normal clusters: normals estimation as per-pixel classification.

Following the NYUv2 normals setup of Wang, Fouhey & Gupta (2015) that Goyal et al. 2019 run through
imisra/semantic-segmentation-pytorch (README_normals.md), each training normal is assigned to the nearest of K
codebook entries (Euclidean distance, as ``make_SN_labels.py`` does with ``pairwise_distances_argmin_min``), the
network predicts a distribution over the K entries per pixel, and the predicted normal is the probability-weighted
sum of the entries, renormalised (``soft``: ``normals_evaluation_utils.py convert_discrete_to_continuous``) or the
most likely entry (``hard``, ours).

The codebook is the published one (Wang et al.'s ``vocab40.mat``, read by :func:`load_codebook_file`) when the
user has it, else our spherical k-means on the training normals (:func:`fit_codebook`).

All functions are pure (numpy / torch in, numpy / torch out) and deterministic for a given seed.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from evalsuite.errors import UserError


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
    """Index of the nearest entry (Euclidean) for each normal (..., 3) -> (...) int64.

    argmin |n - c|^2 = argmax (n.c - |c|^2 / 2): the largest cosine when the entries have unit length.
    """
    if isinstance(normals, torch.Tensor):
        cb = torch.as_tensor(codebook, dtype=normals.dtype, device=normals.device)
        return (normals @ cb.T - 0.5 * (cb * cb).sum(dim=1)).argmax(dim=-1)
    cb = np.asarray(codebook, dtype=np.float64)
    return (np.asarray(normals, dtype=np.float64) @ cb.T - 0.5 * (cb * cb).sum(axis=1)).argmax(axis=-1)


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


def decode(logits: torch.Tensor, codebook: torch.Tensor, mode: str = "soft") -> torch.Tensor:
    """Per-pixel logits (B, K, H, W) -> unit normals (B, 3, H, W).

    ``soft`` (the reference's ``convert_discrete_to_continuous``): softmax probabilities times the codebook,
    divided by its length (the arg-max entry where that sum is ~0). ``hard``: the arg-max entry, renormalised.
    """
    cb = codebook.to(device=logits.device, dtype=logits.dtype)
    hard = F.normalize(cb, dim=1)[logits.argmax(dim=1)].permute(0, 3, 1, 2)
    if mode == "hard":
        return hard.contiguous()
    if mode != "soft":
        raise ValueError(f"unknown codebook decoding {mode!r}; use hard or soft")
    mean = torch.einsum("bkhw,kc->bchw", logits.softmax(dim=1), cb)
    n = mean.norm(dim=1, keepdim=True)
    return torch.where(n > 1e-6, mean / n.clamp_min(1e-6), hard)


def load_codebook_file(path: str | Path) -> np.ndarray:
    """A codebook (K, 3) float64 from a file, as stored (entries are not renormalised).

    ``.mat``: the reference's ``vocab40.mat`` layout, ``loadmat(f)['vocabs'][0][0]['normals'][0][0]``
    (a cell holding a struct with field ``normals``; ``normals_evaluation_utils.py``), or a file whose only
    K x 3 variable is the codebook. ``.npy``: a K x 3 array. Anything else: text, K rows of 3 numbers.
    """
    p = Path(path)
    if not p.is_file():
        raise UserError(f"surface_normals.codebook_file: no such file {p}")
    try:
        if p.suffix == ".mat":
            cb = _codebook_from_mat(p)
        elif p.suffix == ".npy":
            cb = np.load(p, allow_pickle=False)
        else:
            cb = np.loadtxt(p, ndmin=2)
    except (OSError, ValueError, KeyError, IndexError) as e:
        raise UserError(f"surface_normals.codebook_file {p}: unreadable ({e})") from None
    cb = np.asarray(cb, dtype=np.float64)
    if cb.ndim != 2 or cb.shape[1] != 3 or cb.shape[0] < 2:
        raise UserError(f"surface_normals.codebook_file {p}: expected K x 3 normals, got shape {cb.shape}")
    if not np.isfinite(cb).all() or (np.linalg.norm(cb, axis=1) < 1e-6).any():
        raise UserError(f"surface_normals.codebook_file {p}: entries must be finite, non-zero vectors")
    return cb


def _codebook_from_mat(p: Path) -> np.ndarray:
    import scipy.io

    data = scipy.io.loadmat(p)
    if "vocabs" in data:
        return data["vocabs"][0][0]["normals"][0][0]
    arrays = [k for k, v in data.items() if not k.startswith("__") and isinstance(v, np.ndarray)
              and v.dtype.kind in "fiu" and v.ndim == 2 and v.shape[1] == 3]
    if len(arrays) != 1:
        raise KeyError(f"no 'vocabs' cell and {len(arrays)} K x 3 variables (of {sorted(data)})")
    return data[arrays[0]]


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
