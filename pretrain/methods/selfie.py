"""Selfie: self-supervised pretraining for image embedding (Trinh, Luong & Le, 2019).

The image is cut into a ``grid`` x ``grid`` set of non-overlapping patches; every patch is encoded by the
patch network (the trunk, pooled, linear to ``dim``). ``n_masked`` random positions are masked out: the
visible patches' codes plus their position embeddings go through an attention-pooling network (a small
Transformer with a learned summary token u0) whose summary u, plus the position embedding of a masked
location, is the query for that location. The query must pick the right patch among the masked patches of
the same image (the other masked patches are the distractors): cross-entropy over the n_masked candidates
with logits q_i . h_j / sqrt(dim) (the scaling of dot-product attention; unscaled logits diverge early).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..base import Batch, SingleViewMethod, optim_config


def image_patches(x: torch.Tensor, grid: int) -> torch.Tensor:
    """(B, C, S, S) -> (B, grid*grid, C, p, p) non-overlapping row-major patches, p = S // grid."""
    p = x.shape[-1] // grid
    t = x.unfold(2, p, p).unfold(3, p, p)[:, :, :grid, :grid]  # (B, C, g, g, p, p)
    return t.permute(0, 2, 3, 1, 4, 5).reshape(x.shape[0], grid * grid, x.shape[1], p, p)


def choose_masked(b: int, n_patches: int, n_masked: int, device=None,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Random (masked (B, M), visible (B, P - M)) position indices per image."""
    order = torch.rand(b, n_patches, generator=generator).argsort(1).to(device)
    return order[:, :n_masked], order[:, n_masked:]


def selfie_loss(queries: torch.Tensor, candidates: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """queries, candidates (B, M, d): query i's right answer is candidate i of the same image; cross-entropy
    over the M candidates with dot-product logits (times ``scale``)."""
    logits = torch.einsum("bid,bjd->bij", queries.float(), candidates.float()) * scale
    target = torch.arange(queries.shape[1], device=queries.device).expand(queries.shape[0], -1)
    return F.cross_entropy(logits.flatten(0, 1), target.flatten())


class Selfie(SingleViewMethod):
    name = "selfie"
    description = "Selfie: masked patches, attention pooling of visible ones, pick the right patch among distractors"
    defaults = {"grid": 4, "n_masked": 4, "dim": 256, "heads": 4, "layers": 3}
    optim = optim_config("sgd", lr=0.1, weight_decay=1e-4)

    def __init__(self, arch, hp=None, **kw):
        super().__init__(arch, hp, **kw)
        g, d, m = self.hp["grid"], self.hp["dim"], self.hp["n_masked"]
        if not 1 <= m < g * g:
            from evalsuite.errors import UserError

            raise UserError(f"selfie: n_masked must be in [1, {g * g - 1}]")
        self.proj = nn.Linear(self.feat_dim, d)
        self.pos = nn.Parameter(torch.randn(g * g, d) * 0.02)
        self.u0 = nn.Parameter(torch.zeros(1, 1, d))
        layer = nn.TransformerEncoderLayer(d, self.hp["heads"], 2 * d, dropout=0.0, batch_first=True,
                                           norm_first=True)  # pre-LN: stable from the first steps
        self.attention = nn.TransformerEncoder(layer, self.hp["layers"], enable_nested_tensor=False)

    def training_step(self, batch: Batch):
        x = batch.views[0]
        b = x.shape[0]
        patches = image_patches(x, self.hp["grid"])
        h = self.proj(self.embed(patches.flatten(0, 1))).view(b, patches.shape[1], -1)
        masked, visible = choose_masked(b, patches.shape[1], self.hp["n_masked"], x.device)
        take = lambda t, i: t.gather(1, i.unsqueeze(-1).expand(-1, -1, t.shape[-1]))  # noqa: E731
        pos = self.pos.unsqueeze(0).expand(b, -1, -1)
        tokens = torch.cat([self.u0.expand(b, -1, -1), take(h, visible) + take(pos, visible)], 1)
        u = self.attention(tokens)[:, :1]  # (B, 1, d) summary of the visible patches
        queries = u + take(pos, masked)
        return selfie_loss(queries, take(h, masked), queries.shape[-1] ** -0.5)
