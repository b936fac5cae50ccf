"""PIRL (Misra & van der Maaten, CVPR 2020): the image I and its jigsaw transform I^t (3x3 tiles, each a
random crop inside its cell (gaps), tiles shuffled); f(v_I) = head of the pooled trunk, g(v_I^t) = each
tile through the SAME trunk, per-tile linear, concatenated in the shuffled order, linear to 128-d. A memory
bank m_I of f (momentum 0.5) holds the negatives; NCE-style contrastive losses with T = 0.07:
L = lambda L_NCE(m_I, g(v_I^t)) + (1 - lambda) L_NCE(m_I, f(v_I)), lambda = 0.5, negatives drawn from the
bank (softmax over 1 positive + K negatives, the form PIRL's public implementation uses)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..augment import ViewTransform, basic_view
from ..base import Batch, Method, optim_config
from ..memory import BANK_DEFAULTS, MemoryBank


def jigsaw_tiles(x: torch.Tensor, grid: int = 3, tile_frac: float = 0.85,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(C, H, W) -> (grid*grid, C, t, t) tiles in a random order and the permutation used.
    Each tile is a random t x t crop inside its cell (t = tile_frac * cell), leaving random gaps."""
    c, h, w = x.shape
    cell = min(h, w) // grid
    t = max(1, int(cell * tile_frac))
    tiles = []
    for r in range(grid):
        for q in range(grid):
            dy, dx = torch.randint(0, cell - t + 1, (2,), generator=generator).tolist()
            tiles.append(x[:, r * cell + dy : r * cell + dy + t, q * cell + dx : q * cell + dx + t])
    perm = torch.randperm(grid * grid, generator=generator)
    return torch.stack(tiles)[perm], perm


def contrast_with_bank(query: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor,
                       temperature: float) -> torch.Tensor:
    """-log exp(q.m_I/T) / (exp(q.m_I/T) + sum_k exp(q.m_k/T)); query/positive (B, d), negatives (B, K, d)."""
    pos = (query * positive).sum(1, keepdim=True)
    neg = torch.einsum("bd,bkd->bk", query, negatives)
    logits = torch.cat([pos, neg], 1).float() / temperature
    return F.cross_entropy(logits, torch.zeros(query.shape[0], dtype=torch.long, device=query.device))


class _JigsawView:
    def __init__(self, size: int, grid: int):
        self.crop, self.grid = basic_view(size), grid

    def __call__(self, image):
        tiles, _ = jigsaw_tiles(self.crop(image), self.grid)
        return tiles

    def __repr__(self) -> str:
        return f"Jigsaw({self.grid}x{self.grid}, {self.crop!r})"


class PIRL(Method):
    name = "pirl"
    description = "PIRL: jigsaw view vs original, memory bank of negatives, NCE loss over both heads"
    defaults = {**BANK_DEFAULTS, "n_negatives": 32000, "bank_momentum": 0.5, "lambda_": 0.5, "grid": 3}
    optim = optim_config("sgd", lr=0.12, weight_decay=1e-4)
    augment = "basic"

    def __init__(self, arch, hp=None, **kw):
        super().__init__(arch, hp, **kw)
        d, n_tiles = self.hp["dim"], self.hp["grid"] ** 2
        self.f_head = nn.Linear(self.feat_dim, d)
        self.tile_head = nn.Linear(self.feat_dim, d)
        self.g_head = nn.Linear(d * n_tiles, d)
        self.memory = MemoryBank(max(1, self.num_samples), d, self.hp["bank_momentum"], self.seed + 1)

    def views(self, image_size):
        return ViewTransform([basic_view(image_size), _JigsawView(image_size, self.hp["grid"])], "pirl")

    def training_step(self, batch: Batch):
        x, tiles = batch.views[0], batch.views[1]  # tiles: (B, 9, C, t, t)
        b, n = tiles.shape[:2]
        f = F.normalize(self.f_head(self.embed(x)), dim=1)
        per_tile = self.tile_head(self.embed(tiles.flatten(0, 1))).view(b, n * self.hp["dim"])
        g = F.normalize(self.g_head(per_tile), dim=1)
        m_i = self.memory.get(batch.index)
        k = min(self.hp["n_negatives"], len(self.memory))
        negatives = self.memory.get(self.memory.sample(b, k))
        t, lam = self.hp["temperature"], self.hp["lambda_"]
        loss = lam * contrast_with_bank(g, m_i, negatives, t) + (1 - lam) * contrast_with_bank(f, m_i, negatives, t)
        self._pending = (batch.index, f.detach().float())
        return loss

    def on_after_step(self, trainer) -> None:
        self.memory.update(*self._pending)
