"""Building blocks shared by the pretext-task methods (``pretrain.methods.{rotnet, jigsaw, ...}``).

Pure functions (tested in ``tests/test_pretrain_pretext.py``):

- puzzles: :func:`hamming_permutations` (Noroozi & Favaro 2016, Alg. 1: greedy selection of permutations
  with maximal Hamming distance), :func:`grid_layout` (cells with random gaps), :func:`crop_jittered`
  (per-channel spatial jitter, a chromatic-aberration counter-measure), :func:`normalize_tiles`
  (per-tile colour normalisation), :func:`color_drop` / :func:`color_project` (Doersch et al. 2015, Sec. 3.1);
- colour: :func:`ab_gamut` (the in-gamut 10x10 ab bins of Zhang et al. 2016),
  :func:`soft_encode` (5 nearest bins, Gaussian sigma 5), :func:`rebalance_weights` (eq. 3-4, lambda 1/2),
  :func:`decode_ab`;
- heads: :class:`DenseHead` (hypercolumn of the last taps -> per-pixel logits), :class:`ImageDecoder`
  (vector -> image), :class:`ConvDiscriminator`, :func:`frozen_call` (an adversary's forward whose parameters
  get no gradient, so generator and discriminator losses can share one optimiser step).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from .augment import ViewTransform, basic_view

# ----------------------------------------------------------------------------------------------- puzzles


@lru_cache(maxsize=8)
def _all_perms(k: int) -> np.ndarray:
    return np.array(list(itertools.permutations(range(k))), dtype=np.int8)


def _onehot_words(perms: np.ndarray) -> np.ndarray:
    """Each permutation as the bit set {pos * k + value} packed into 64-bit words: the number of positions
    where two permutations agree is popcount(a & b)."""
    n, k = perms.shape
    bits = np.arange(k) * k + perms.astype(np.int64)  # (n, k) bit indices < k*k
    words = np.zeros((n, (k * k + 63) // 64), dtype=np.uint64)
    for pos in range(k):
        w, b = np.divmod(bits[:, pos], 64)
        np.bitwise_or.at(words, (np.arange(n), w), np.left_shift(np.uint64(1), b.astype(np.uint64)))
    return words


@lru_cache(maxsize=16)
def _hamming_cached(n: int, k: int, seed: int) -> np.ndarray:
    perms = _all_perms(k)
    total = len(perms)
    if not 1 <= n <= total:
        from evalsuite.errors import UserError

        raise UserError(f"cannot choose {n} distinct permutations of {k} tiles (there are {total})")
    words = _onehot_words(perms)
    first = int(np.random.default_rng(seed).integers(total))
    chosen = [first]
    min_d = np.full(total, k + 1, dtype=np.int16)
    sum_d = np.zeros(total, dtype=np.int64)
    for _ in range(n - 1):
        last = words[chosen[-1]]
        agree = np.zeros(total, dtype=np.int16)
        for w in range(words.shape[1]):
            agree += np.bitwise_count(words[:, w] & last[w]).astype(np.int16)
        d = k - agree
        np.minimum(min_d, d, out=min_d)
        sum_d += d
        # maximise the minimum distance to the set, ties broken by the largest mean distance (Noroozi's
        # criterion), then by the lowest index; already chosen permutations have min_d == 0
        score = min_d.astype(np.int64) * (k * n + 1) + sum_d
        chosen.append(int(np.argmax(score)))
    out = perms[chosen].astype(np.int64)
    out.setflags(write=False)
    return out


def hamming_permutations(n: int, k: int = 9, seed: int = 0) -> np.ndarray:
    """``n`` distinct permutations of ``range(k)`` (n, k), greedily chosen so that each new one has the
    maximal minimum Hamming distance to those already chosen (ties: maximal mean distance), starting from a
    seeded random permutation. N = 100 / 1000 / 2000 as in Noroozi & Favaro 2016 and Goyal et al. 2019."""
    return _hamming_cached(int(n), int(k), int(seed)).copy()


def min_pairwise_hamming(perms: np.ndarray) -> int:
    p = torch.as_tensor(np.asarray(perms))
    d = (p[:, None, :] != p[None, :, :]).sum(-1)
    d.fill_diagonal_(p.shape[1] + 1)
    return int(d.min())


def grid_layout(size: int, grid: int, tile: int, generator: torch.Generator | None = None,
                margin: int = 0) -> list[tuple[int, int]]:
    """Top-left corners of ``grid x grid`` tiles of side ``tile`` in a ``size`` crop: cell (r, q) spans
    [r*cell, (r+1)*cell) with cell = size // grid, and the tile sits at a random offset inside its cell
    (leaving random gaps between tiles), at least ``margin`` pixels from the cell border. Row-major."""
    cell = size // grid
    if tile + 2 * margin > cell:
        raise ValueError(f"tile {tile} + 2*margin {margin} does not fit in a cell of {cell}")
    corners = []
    for r in range(grid):
        for q in range(grid):
            dy, dx = torch.randint(margin, cell - tile - margin + 1, (2,), generator=generator).tolist()
            corners.append((r * cell + dy, q * cell + dx))
    return corners


def crop_jittered(img: torch.Tensor, y: int, x: int, size: int, max_shift: int = 0,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """(C, H, W) -> (C, size, size) crop at (y, x); each colour channel is cut at its own offset
    (dy, dx) in [-max_shift, max_shift] (clamped to the image), so chromatic aberration cannot be used to
    locate the tile (Noroozi & Favaro 2016, Sec. 3.2; Doersch et al. 2015, Sec. 3.1)."""
    c, h, w = img.shape
    if max_shift <= 0:
        return img[:, y : y + size, x : x + size].clone()
    out = []
    for ch in range(c):
        dy, dx = torch.randint(-max_shift, max_shift + 1, (2,), generator=generator).tolist()
        yy, xx = min(max(y + dy, 0), h - size), min(max(x + dx, 0), w - size)
        out.append(img[ch, yy : yy + size, xx : xx + size])
    return torch.stack(out)


def normalize_tiles(tiles: torch.Tensor, eps: float = 1e-2) -> torch.Tensor:
    """Per-tile, per-channel zero mean and unit standard deviation over the last two axes (blocks the
    shortcut of matching low-level colour statistics across tiles)."""
    mean = tiles.mean(dim=(-2, -1), keepdim=True)
    std = tiles.std(dim=(-2, -1), keepdim=True, unbiased=False)
    return (tiles - mean) / std.clamp_min(eps)


def color_drop(patch: torch.Tensor, generator: torch.Generator | None = None,
               noise_ratio: float = 0.01) -> torch.Tensor:
    """Keep one random colour channel of a (C, H, W) patch and replace the other two by Gaussian noise with
    std ``noise_ratio`` x the kept channel's std (Doersch et al. 2015, "colour dropping")."""
    keep = int(torch.randint(0, patch.shape[0], (1,), generator=generator))
    std = patch[keep].std(unbiased=False) * noise_ratio
    out = torch.randn(patch.shape, generator=generator) * std + patch[keep].mean()
    out[keep] = patch[keep]
    return out


GREEN_MAGENTA = torch.tensor([-1.0, 2.0, -1.0])


def color_project(patch: torch.Tensor) -> torch.Tensor:
    """Project out the green-magenta colour axis a = (-1, 2, -1) (Doersch et al. 2015, "projection"):
    x <- (I - a a^T / a^T a) x per pixel, which removes the chromatic-aberration cue."""
    a = GREEN_MAGENTA.to(patch)
    proj = torch.eye(3, dtype=patch.dtype) - torch.outer(a, a) / (a @ a)
    return torch.einsum("ij,jhw->ihw", proj, patch)


class PretextView(ViewTransform):
    """A random crop (``basic_view``, or the pipeline ``crop``) followed by ``fn(crop) -> list of tensors`` (the
    pretext sample, e.g. shuffled tiles and their label)."""

    def __init__(self, size: int, fn: Callable[[torch.Tensor], list[torch.Tensor]], name: str,
                 scale=(0.08, 1.0), info: dict | None = None, crop: Callable | None = None):
        self.crop = basic_view(size, scale=scale) if crop is None else crop
        self.fn, self.info = fn, info or {}
        super().__init__([self.crop], name)

    def __call__(self, image) -> list[torch.Tensor]:
        return self.fn(self.crop(image))

    def describe(self) -> dict:
        return {"preset": self.name, "views": [repr(self.crop)], **self.info}


# ----------------------------------------------------------------------------------------------- colour

@lru_cache(maxsize=4)
def _gamut(step: int, levels: int) -> np.ndarray:
    from evalsuite.colorspace import rgb_to_lab

    g = torch.linspace(0, 1, levels, dtype=torch.float64)
    u, v = (t.reshape(-1) for t in torch.meshgrid(g, g, indexing="ij"))
    faces = []  # the six faces of the RGB cube at full resolution (the ab extremes lie there) ...
    for axis in range(3):
        for val in (0.0, 1.0):
            cols = [u, v]
            cols.insert(axis, torch.full_like(u, val))
            faces.append(torch.stack(cols))
    c = torch.linspace(0, 1, 24, dtype=torch.float64)  # ... plus a coarse interior grid
    faces.append(torch.stack(torch.meshgrid(c, c, c, indexing="ij")).reshape(3, -1))
    ab = rgb_to_lab(torch.cat(faces, 1).unsqueeze(-1)).squeeze(-1)[1:]
    q = torch.unique(torch.round(ab / step).long().t(), dim=0)  # sorted (a, b) grid indices
    return (q * step).numpy().astype(np.float32)


def ab_gamut(step: int = 10, levels: int = 128) -> torch.Tensor:
    """(Q, 2) centres of the ab bins of a ``step`` grid that some sRGB colour quantises to (the in-gamut
    bins of Zhang et al. 2016, Fig. 3), from the sRGB cube's faces sampled at ``levels``^2 each; fixed and
    data-independent.
    With our D65 conversion Q = 262 for the 10-unit grid (the paper's released hull has 313 points; it
    was derived from a wider colour set), a in [-90, 100], b in [-110, 90]."""
    return torch.from_numpy(_gamut(step, levels).copy())


def soft_encode(ab: torch.Tensor, centres: torch.Tensor, k: int = 5, sigma: float = 5.0):
    """ab: (..., 2) -> (indices (..., k), weights (..., k)): the k nearest bin centres, Gaussian-weighted
    (sigma in ab units) and normalised to sum 1 (Zhang et al. 2016, Sec. 2.1 soft-encoding)."""
    d2 = ((ab.unsqueeze(-2).float() - centres.to(ab.device).float()) ** 2).sum(-1)  # (..., Q)
    k = min(k, centres.shape[0])
    dist2, idx = d2.topk(k, dim=-1, largest=False)
    w = torch.softmax(-dist2 / (2 * sigma**2), dim=-1)
    return idx, w


def decode_ab(probs: torch.Tensor, centres: torch.Tensor, mode: str = "mean") -> torch.Tensor:
    """(..., Q) bin distribution -> (..., 2) ab: expectation (``mean``) or the mode (``argmax``)."""
    c = centres.to(probs)
    if mode == "argmax":
        return c[probs.argmax(-1)]
    return probs @ c


def smooth_prior(counts: torch.Tensor, centres: torch.Tensor, sigma: float = 5.0) -> torch.Tensor:
    """Empirical bin distribution smoothed with a Gaussian kernel in ab space, normalised to sum 1."""
    p = counts.double() / counts.sum().clamp_min(1)
    d2 = torch.cdist(centres.double(), centres.double()) ** 2
    g = torch.exp(-d2 / (2 * sigma**2))
    ps = g @ p
    return (ps / ps.sum()).float()


def rebalance_weights(prior: torch.Tensor, lam: float = 0.5) -> torch.Tensor:
    """w proportional to ((1 - lam) p + lam / Q)^-1, normalised so that E_p[w] = sum_q p_q w_q = 1
    (Zhang et al. 2016, eq. 4)."""
    q = prior.numel()
    w = 1.0 / ((1 - lam) * prior.double() + lam / q)
    w = w / (prior.double() * w).sum()
    return w.float()


def lab_of(x: torch.Tensor) -> torch.Tensor:
    """Scaled Lab (L/50 - 1, a/110, b/110) as produced by ``to_input_space(.., 'lab')`` -> raw L, a, b."""
    return torch.stack([(x[:, 0] + 1) * 50, x[:, 1] * 110, x[:, 2] * 110], 1)


def multinomial_ce(logits: torch.Tensor, idx: torch.Tensor, w: torch.Tensor,
                   pixel_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of per-pixel logits (B, Q, h, w) against soft targets given sparsely as (B, h, w, k)
    indices/weights; optional per-pixel weights (B, h, w) (class rebalancing). Mean over pixels."""
    logp = F.log_softmax(logits.float(), dim=1).permute(0, 2, 3, 1)  # (B, h, w, Q)
    nll = -(logp.gather(-1, idx) * w).sum(-1)
    if pixel_weight is not None:
        nll = nll * pixel_weight
    return nll.mean()


# ----------------------------------------------------------------------------------------------- heads


class DenseHead(nn.Module):
    """Hypercolumn head: 1x1 projections of several tap maps, upsampled to the first map's resolution,
    summed, ReLU, 1x1 conv to ``out_ch`` logits per pixel (a light decoder in the spirit of Larsson et al.
    2016 hypercolumns; the trunk taps stay the standard ones)."""

    def __init__(self, in_channels: list[int], out_ch: int, hidden: int = 256):
        super().__init__()
        self.proj = nn.ModuleList(nn.Conv2d(c, hidden, 1) for c in in_channels)
        self.bn = nn.BatchNorm2d(hidden)
        self.out = nn.Conv2d(hidden, out_ch, 1)

    def forward(self, maps: list[torch.Tensor]) -> torch.Tensor:
        size = maps[0].shape[-2:]
        h = sum(F.interpolate(p(m), size=size, mode="bilinear", align_corners=False) if m.shape[-2:] != size
                else p(m) for p, m in zip(self.proj, maps))
        return self.out(F.relu(self.bn(h)))


class ImageDecoder(nn.Module):
    """Vector (B, in_dim) -> image (B, out_ch, size, size): linear to a 4x4 map, ``stages`` x2 upsampling
    conv-BN-ReLU stages (channels halved each time), a final 3x3 conv (DCGAN-style generator / decoder),
    resized bilinearly to the requested ``size`` when 4 * 2^stages differs from it."""

    def __init__(self, in_dim: int, out_ch: int = 3, width: int = 256, stages: int = 4, min_width: int = 32):
        super().__init__()
        self.width = width
        self.fc = nn.Linear(in_dim, width * 16)
        layers: list[nn.Module] = []
        c = width
        for _ in range(stages):
            c2 = max(min_width, c // 2)
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c, c2, 3, padding=1),
                       nn.BatchNorm2d(c2), nn.ReLU(inplace=True)]
            c = c2
        layers.append(nn.Conv2d(c, out_ch, 3, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor, size: int) -> torch.Tensor:
        x = self.net(F.relu(self.fc(z)).view(z.shape[0], self.width, 4, 4))
        if x.shape[-1] != size:
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        return x


class ConvDiscriminator(nn.Module):
    """Small strided-conv critic (no BatchNorm, so a frozen call has no running statistics to update):
    image (B, C, H, W) [+ optional code (B, z_dim), BiGAN's joint discriminator] -> logit (B,)."""

    def __init__(self, in_ch: int = 3, width: int = 64, z_dim: int = 0, hidden: int = 256):
        super().__init__()
        self.x_net = nn.Sequential(
            nn.Conv2d(in_ch, width, 4, 2, 1), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(width, width * 2, 4, 2, 1), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(width * 2, width * 4, 3, 2, 1), nn.LeakyReLU(0.2, inplace=True),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.z_net = (nn.Sequential(nn.Linear(z_dim, hidden), nn.LeakyReLU(0.2, inplace=True))
                      if z_dim else None)
        self.joint = nn.Sequential(nn.Linear(width * 4 + (hidden if z_dim else 0), hidden),
                                   nn.LeakyReLU(0.2, inplace=True), nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        h = self.x_net(x)
        if self.z_net is not None:
            h = torch.cat([h, self.z_net(z)], 1)
        return self.joint(h).squeeze(1)


def frozen_call(module: nn.Module, *args, **kwargs):
    """``module(*args)`` with its parameters detached: gradients flow to the inputs only. Lets the
    generator's loss use the discriminator without updating it, so both losses share one optimiser step."""
    params = {k: v.detach() for k, v in module.named_parameters()}
    params.update(dict(module.named_buffers()))
    return functional_call(module, params, args, kwargs)


def tap_maps(trunk: nn.Module, x: torch.Tensor, n: int = 3) -> list[torch.Tensor]:
    """The last ``n`` tap activations of a trunk (one forward pass), shallow to deep."""
    names = list(trunk.tap_names[-n:])
    out = trunk(x, names)
    return [out[t] for t in names]



# ----------------------------------------------------------------------------------------------- losses


def discriminator_loss(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of a critic's logits with label 1 for ``pos`` and 0 for ``neg``:
    mean softplus(-pos) + mean softplus(neg) (= -log sigmoid(pos) - log(1 - sigmoid(neg)))."""
    return F.softplus(-pos.float()).mean() + F.softplus(neg.float()).mean()


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error over the pixels where ``mask`` (B or 1, 1, H, W) is 1 (all pixels if None)."""
    err = (pred.float() - target.float()) ** 2
    if mask is None:
        return err.mean()
    m = mask.to(err).expand_as(err)
    return (err * m).sum() / m.sum().clamp_min(1)


def normalized_from_unit(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] RGB -> ImageNet-normalised (the ``rgb`` input space)."""
    from evalsuite.colorspace import IMAGENET_MEAN, IMAGENET_STD

    m = torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(IMAGENET_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s
