"""SimSiam (Chen & He, CVPR 2021): 3-layer projector with BN (the output BN without affine, as the official
code), bottleneck predictor (2048 -> 512 -> 2048), symmetric negative cosine with stop-gradient on
the target branch, no momentum encoder. SGD lr 0.05 x B/256, wd 1e-4, predictor at a fixed lr.
``proj_layers`` 2 is the paper's CIFAR projector (its appendix: two layers instead of ImageNet's three);
``pred_lr_scale`` multiplies the predictor's lr (1 in the paper)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..base import Batch, Method, cifar_sgd, mlp, optim_config
from ..losses import embedding_std


def simsiam_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """D(p, z) = -cos(p, stopgrad(z)), averaged over the batch."""
    return -F.cosine_similarity(p.float(), z.detach().float(), dim=1).mean()


class SimSiam(Method):
    name = "simsiam"
    description = "SimSiam: stop-gradient, predictor, no EMA, symmetric negative cosine"
    defaults = {"proj_dim": 2048, "pred_hidden": 512, "fix_pred_lr": True, "proj_layers": 3,
                "pred_lr_scale": 1.0}
    optim = optim_config("sgd", lr=0.05, weight_decay=1e-4)
    #: solo-learn scripts/pretrain/cifar/simsiam.yaml (its temperature: 0.2 is read by no SimSiam code)
    cifar = {"hp": {"proj_dim": 2048, "pred_hidden": 512, "fix_pred_lr": True},
             "optim": cifar_sgd(lr=0.5, weight_decay=1e-5), "views": "cifar_symmetric_weak"}
    augment = "simclr"

    def __init__(self, arch, hp=None, **kw):
        super().__init__(arch, hp, **kw)
        d = self.hp["proj_dim"]
        self.projector = mlp([self.feat_dim] + [d] * self.hp["proj_layers"], last_bn=True, last_affine=False)
        self.predictor = mlp([d, self.hp["pred_hidden"], d])

    def training_step(self, batch: Batch):
        z1 = self.projector(self.embed(batch.views[0]))
        z2 = self.projector(self.embed(batch.views[1]))
        p1, p2 = self.predictor(z1), self.predictor(z2)
        return 0.5 * (simsiam_loss(p1, z2) + simsiam_loss(p2, z1)), {"z_std": embedding_std(z1)}

    def param_groups(self):
        groups = super().param_groups()
        if not self.hp["fix_pred_lr"] and self.hp["pred_lr_scale"] == 1.0:
            return groups
        pred = {id(p) for p in self.predictor.parameters()}
        for g in groups:
            g["params"] = [p for p in g["params"] if id(p) not in pred]
        return groups + [{"params": list(self.predictor.parameters()), "fixed_lr": self.hp["fix_pred_lr"],
                          "lr_scale": float(self.hp["pred_lr_scale"])}]
