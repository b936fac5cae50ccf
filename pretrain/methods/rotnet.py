"""RotNet (Gidaris et al., ICLR 2018): every image of the batch is fed in its four rotations (0, 90, 180,
270 degrees) and the network classifies which rotation was applied (4-way cross-entropy). The paper's
"all four rotations of each image in the same mini-batch" is the variant that worked best (Sec. 3.3).
Head: a linear classifier on the pooled last tap (the trunk is the standard evalsuite trunk)."""

from __future__ import annotations

import torch
from torch import nn

from ..base import Batch, SingleViewMethod, optim_config
from ..losses import classification_step


def rotate_batch(x: torch.Tensor, k: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, C, H, W) square images -> ((k*B, C, H, W), labels (k*B,)): block r holds every image turned by
    r * 90 degrees counter-clockwise (``torch.rot90`` over (H, W)), with label r."""
    if x.shape[-1] != x.shape[-2]:
        raise ValueError(f"rotations need square inputs, got {tuple(x.shape[-2:])}")
    rots = torch.cat([torch.rot90(x, r, dims=(2, 3)) for r in range(k)])
    labels = torch.arange(k, device=x.device).repeat_interleave(x.shape[0])
    return rots, labels


class RotNet(SingleViewMethod):
    name = "rotnet"
    description = "RotNet: 4-way rotation classification of every image (0/90/180/270)"
    defaults = {"n_rotations": 4}
    optim = optim_config("sgd", lr=0.1, weight_decay=5e-4, base_batch_size=128)
    short = {"optim": {"lr": 0.05}}

    def __init__(self, arch, hp=None, **kw):
        super().__init__(arch, hp, **kw)
        if self.hp["n_rotations"] not in (2, 4):
            from evalsuite.errors import UserError

            raise UserError("rotnet: n_rotations must be 2 (0/180) or 4 (0/90/180/270)")
        self.fc = nn.Linear(self.feat_dim, self.hp["n_rotations"])

    def training_step(self, batch: Batch):
        k = self.hp["n_rotations"]
        x, labels = rotate_batch(batch.views[0], 4)
        if k == 2:  # 0 and 180 degrees only
            keep = (labels == 0) | (labels == 2)
            x, labels = x[keep], labels[keep] // 2
        return classification_step(self.fc(self.embed(x)), labels)
