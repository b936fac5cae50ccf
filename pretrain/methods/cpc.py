"""Contrastive Predictive Coding for images (van den Oord et al. 2018; CPC v2 is ``cpc_v2.py``): the crop is cut
into a g x g grid of overlapping patches (patch = size/4, stride = patch/2, i.e. 7 x 7 as in the paper),
each patch is encoded by the trunk (pooled, linear to ``dim``), an autoregressive context network (masked
convolutions: row i sees rows <= i only) summarises the rows above, and for each offset k = 1..K a linear
W_k predicts the code k rows below; InfoNCE scores the true patch code against every other patch code in
the batch."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..base import Batch, SingleViewMethod, optim_config


def patch_grid(x: torch.Tensor, patch: int, stride: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, g, g, C, patch, patch)."""
    p = x.unfold(2, patch, stride).unfold(3, patch, stride)  # (B, C, g, g, P, P)
    return p.permute(0, 2, 3, 1, 4, 5).contiguous()


class CausalConv(nn.Module):
    """Conv whose output at row i depends on input rows <= i (padding on top only)."""

    def __init__(self, dim: int, kh: int = 3):
        super().__init__()
        self.kh = kh
        self.conv = nn.Conv2d(dim, dim, (kh, 3))

    def forward(self, x):
        return self.conv(F.pad(x, (1, 1, self.kh - 1, 0)))


def row_prediction_loss(preds: torch.Tensor, targets: torch.Tensor, k: int) -> torch.Tensor:
    """InfoNCE of predictions k rows ahead. preds, targets: (B, D, H, W), a prediction made at every position.
    The predictions of rows [0, H-k) are scored (dot product) against all B*H*W targets, the positive being the
    target k rows below in the same column of the same image; mean cross-entropy (CPC v2's pseudo-code, App. A)."""
    b, d, h, w = targets.shape
    keys = targets.permute(0, 2, 3, 1).reshape(-1, d).float()  # (B*H*W, D), index = (b*H + row)*W + col
    pred = preds[:, :, : h - k, :].permute(0, 2, 3, 1).reshape(-1, d).float()
    bi, ri, ci = torch.meshgrid(torch.arange(b), torch.arange(h - k), torch.arange(w), indexing="ij")
    target = ((bi * h + ri + k) * w + ci).reshape(-1).to(targets.device)
    return F.cross_entropy(pred @ keys.t(), target)


def cpc_loss(context: torch.Tensor, codes: torch.Tensor, predictors: nn.ModuleList) -> torch.Tensor:
    """context, codes: (B, D, g, g). For each k, predictions W_k c from rows [0, g-k) of the context are scored
    against all B*g*g codes; the target is the code k rows below. Mean over k of the cross-entropies."""
    g = codes.shape[2]
    losses = [row_prediction_loss(w(context), codes, k) for k, w in enumerate(predictors, start=1) if k < g]
    return torch.stack(losses).mean()


class CPC(SingleViewMethod):
    name = "cpc"
    description = "CPC: patch grid, autoregressive (masked-conv) context, InfoNCE over future patches"
    defaults = {"dim": 256, "pred_steps": 3, "context_layers": 2}
    optim = optim_config("adam", lr=2e-4, weight_decay=0.0)

    def __init__(self, arch, hp=None, **kw):
        super().__init__(arch, hp, **kw)
        d = self.hp["dim"]
        self.proj = nn.Linear(self.feat_dim, d)
        layers: list[nn.Module] = []
        for _ in range(self.hp["context_layers"]):
            layers += [CausalConv(d), nn.ReLU()]
        self.context = nn.Sequential(*layers[:-1])
        self.predictors = nn.ModuleList(nn.Conv2d(d, d, 1) for _ in range(self.hp["pred_steps"]))

    def training_step(self, batch: Batch):
        x = batch.views[0]
        size = x.shape[-1]
        patch = max(4, size // 4)
        grid = patch_grid(x, patch, max(1, patch // 2))
        b, g = grid.shape[:2]
        z = self.proj(self.embed(grid.flatten(0, 2)))  # (B*g*g, D)
        codes = z.view(b, g, g, -1).permute(0, 3, 1, 2)
        return cpc_loss(self.context(codes), codes, self.predictors)
