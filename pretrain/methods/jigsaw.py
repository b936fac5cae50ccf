"""Jigsaw puzzles (Noroozi & Favaro, ECCV 2016; Goyal et al. 2019 scaling study).

Data (per image, in the loader): a random crop of ``image_size`` is cut into a 3 x 3 grid of cells; each
tile is a random ``tile_frac`` x cell crop inside its cell (random gaps between tiles, 64 of 75 px in the
paper), each colour channel cut with its own spatial jitter of up to ``channel_jitter`` x tile px (against
chromatic aberration), the whole puzzle grayscale with probability ``gray_prob`` (30 %), and each tile
normalised to zero mean / unit std per channel (so tiles cannot be matched by low-level statistics). The
tiles are shuffled by one of N permutations chosen by maximal Hamming distance
(``pretrain.pretext.hamming_permutations``; N = 100 / 1000 / 2000 in the scaling study) and the label is
its index. Network: the SAME trunk on every tile (siamese "context-free network"), pooled, per-tile fc,
the 9 tile codes concatenated in the shuffled order, fc -> N-way permutation classification.
"""

from __future__ import annotations

import torch
from torch import nn

from ..base import Batch, Method, optim_config
from ..losses import classification_step
from ..pretext import (
    PretextView,
    crop_jittered,
    grid_layout,
    hamming_permutations,
    min_pairwise_hamming,
    normalize_tiles,
)


def jigsaw_puzzle(img: torch.Tensor, perms: torch.Tensor, grid: int = 3, tile_frac: float = 64 / 75,
                  channel_jitter: float = 2 / 64, gray_prob: float = 0.3, normalize: bool = True,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, list]:
    """One puzzle from a (3, S, S) crop in [0, 1]: returns (tiles (grid^2, 3, t, t) in shuffled order,
    label (index into ``perms``), the row-major top-left corners of the tiles before shuffling).
    ``tiles[i]`` is the tile of cell ``perms[label][i]``."""
    size = min(img.shape[-2:])
    cell = size // grid
    t = max(1, int(round(cell * tile_frac)))
    corners = grid_layout(size, grid, t, generator)
    if gray_prob > 0 and float(torch.rand((), generator=generator)) < gray_prob:
        img = (0.299 * img[0] + 0.587 * img[1] + 0.114 * img[2]).expand(3, -1, -1)
    shift = int(round(channel_jitter * t))
    tiles = torch.stack([crop_jittered(img, y, x, t, shift, generator) for y, x in corners])
    if normalize:
        tiles = normalize_tiles(tiles)
    label = int(torch.randint(0, perms.shape[0], (), generator=generator))
    return tiles[perms[label]], torch.tensor(label), corners


class Jigsaw(Method):
    name = "jigsaw"
    description = "Jigsaw: 3x3 shuffled tiles (gaps, jitter, per-tile normalisation), maximal-Hamming " \
                  "permutation set, shared trunk per tile, permutation classification"
    defaults = {"n_permutations": 1000, "grid": 3, "tile_frac": 64 / 75, "channel_jitter": 2 / 64,
                "gray_prob": 0.3, "tile_dim": 512, "hidden": 1024, "perm_seed": 0, "crop_scale_min": 0.3}
    optim = optim_config("sgd", lr=0.01, weight_decay=5e-4)
    short = {"hp": {"n_permutations": 100, "tile_dim": 256, "hidden": 512}, "optim": {"lr": 0.05}}
    augment = "jigsaw"
    n_views = 2

    def __init__(self, arch, hp=None, **kw):
        super().__init__(arch, hp, **kw)
        g = self.hp["grid"]
        perms = hamming_permutations(self.hp["n_permutations"], g * g, self.hp["perm_seed"])
        self.register_buffer("perms", torch.as_tensor(perms, dtype=torch.long))
        self.tile_fc = nn.Sequential(nn.Linear(self.feat_dim, self.hp["tile_dim"]), nn.ReLU(inplace=True))
        self.classifier = nn.Sequential(nn.Linear(g * g * self.hp["tile_dim"], self.hp["hidden"]),
                                        nn.ReLU(inplace=True), nn.Linear(self.hp["hidden"], len(perms)))

    def views(self, image_size):
        hp, perms = self.hp, self.perms.cpu()

        def fn(crop):
            tiles, label, _ = jigsaw_puzzle(crop, perms, hp["grid"], hp["tile_frac"], hp["channel_jitter"],
                                            hp["gray_prob"])
            return [tiles, label]

        return PretextView(image_size, fn, "jigsaw", scale=(hp["crop_scale_min"], 1.0),
                           info={"grid": hp["grid"], "n_permutations": len(perms)})

    def preprocess(self, x):
        return x  # tiles are normalised per tile in the loader; the label view is an index

    def training_step(self, batch: Batch):
        tiles, labels = batch.views[0], batch.views[1]  # (B, 9, 3, t, t), (B,)
        b, n = tiles.shape[:2]
        codes = self.tile_fc(self.embed(tiles.flatten(0, 1))).view(b, -1)
        return classification_step(self.classifier(codes), labels)

    def metadata(self):
        return {**super().metadata(), "pretext": {"n_permutations": int(self.perms.shape[0]),
                                                  "min_hamming": min_pairwise_hamming(self.perms.cpu().numpy()),
                                                  "tile_normalisation": "per-tile mean/std"}}
