"""SimCLR (Chen et al., ICML 2020): two augmented views, a 2-layer projection MLP, NT-Xent over the 2N-2
other views of the global batch, negatives gathered across processes with gradient
(``pretrain.losses.nt_xent``). LARS, lr 0.3 x B/256, weight decay 1e-6, 10 warm-up epochs, T = 0.5
(0.1 for very large batches). ``proj_bn`` False drops the projector's BN (solo-learn's SimCLR projector:
Linear-ReLU-Linear).

``loss`` selects the objective of the paper's loss comparison (Sec. 5.1, Tables 2 and 4, App. B.10):
``nt_xent`` (the default), ``nt_logistic`` (uses ``temperature``) or ``margin_triplet`` (uses ``margin``), the
last two against the other view's negatives only and, with ``semi_hard``, on each anchor's semi-hard negative."""

from __future__ import annotations

from ..base import SHORT_SGD, Batch, Method, cifar_lars, mlp, optim_config
from ..losses import embedding_std, margin_triplet, nt_logistic, nt_xent

LOSSES = ("nt_xent", "nt_logistic", "margin_triplet")


class SimCLR(Method):
    name = "simclr"
    description = "SimCLR: NT-Xent over two views, projection MLP, negatives gathered with gradient"
    defaults = {"temperature": 0.5, "proj_hidden": 2048, "proj_dim": 128, "proj_bn": True, "loss": "nt_xent",
                "semi_hard": False, "margin": 0.4}
    optim = optim_config("lars", lr=0.3, weight_decay=1e-6, warmup_epochs=10)
    short = {"hp": {"temperature": 0.2, "proj_hidden": 512}, "optim": SHORT_SGD}
    #: solo-learn scripts/pretrain/cifar/simclr.yaml (solo/methods/simclr.py)
    cifar = {"hp": {"temperature": 0.2, "proj_hidden": 2048, "proj_dim": 256, "proj_bn": False},
             "optim": cifar_lars(lr=0.4, weight_decay=1e-4), "views": "cifar_symmetric"}
    augment = "simclr"

    def __init__(self, arch, hp=None, **kw):
        super().__init__(arch, hp, **kw)
        from evalsuite.errors import UserError

        if self.hp["loss"] not in LOSSES:
            raise UserError(f"simclr: loss must be one of {', '.join(LOSSES)}, got {self.hp['loss']!r}")
        if self.hp["semi_hard"] and self.hp["loss"] == "nt_xent":
            raise UserError("simclr: semi_hard applies to nt_logistic and margin_triplet (NT-Xent weighs its "
                            "negatives by their hardness itself)")
        self.projector = mlp([self.feat_dim, self.hp["proj_hidden"], self.hp["proj_dim"]], bn=bool(self.hp["proj_bn"]))

    def training_step(self, batch: Batch):
        z1 = self.projector(self.embed(batch.views[0]))
        z2 = self.projector(self.embed(batch.views[1]))
        hp = self.hp
        if hp["loss"] == "nt_logistic":
            loss = nt_logistic(z1, z2, hp["temperature"], semi_hard=hp["semi_hard"])
        elif hp["loss"] == "margin_triplet":
            loss = margin_triplet(z1, z2, hp["margin"], semi_hard=hp["semi_hard"])
        else:
            loss = nt_xent(z1, z2, hp["temperature"])
        return loss, {"z_std": embedding_std(z1)}
