"""SwAV (Caron et al., NeurIPS 2020): projector MLP to a 128-d unit sphere, K = 3000 prototypes (a linear
layer without bias, re-normalised after every step, frozen for the first ``freeze_prototypes_steps``),
codes from Sinkhorn-Knopp equipartition (eps = 0.05, 3 iterations, over all processes), swapped prediction:
each global crop's code is predicted by the softmax(z . c / T) of every other crop (T = 0.1), multi-crop
(2 x 224 + 6 x 96 in the paper). LARS, lr 0.6 x B/256 (4.8 at 4096), wd 1e-6.

Small batches: the paper adds a queue of each global crop's last ``queue_length`` embeddings (3840 at a batch
of 256, from epoch 15), scored against the current prototypes and stacked under the batch's scores before
Sinkhorn, so the equipartition is over enough samples; only the batch's rows are used as codes. The queue
is per process (Sinkhorn's sums still run over all processes), fills from ``queue_start_steps`` and is used
once full. ``proj_bn`` = False drops the projection head's BN (one of the authors' workarounds against an
early collapse, used by the short recipe).

Epoch-counted variants (solo-learn's CIFAR config, solo/methods/swav.py): ``freeze_prototypes_epochs`` freezes
the prototypes for the first epochs as well, and ``queue_start_epochs`` holds the queue back until that epoch
(it fills from ``queue_start_steps`` all the same, so it is full by then).

``--recipe seer``: SEER (Goyal et al. 2021), SwAV at scale on a RegNetY, as VISSL configures it (``SwAV.seer``):
a 3-layer projection head without BN (``proj_layers``), 16k prototypes, 10 Sinkhorn iterations at eps 0.03,
2 x 224 + 4 x 96 crops, apex-LARC-style LARS on every parameter, wd 1e-5, one epoch with a warm-up of 8k of its
122k steps. docs/pretraining.md lists what the trainer does not reproduce (SyncBN, the final lr)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from evalsuite.errors import UserError

from ..augment import multi_crop
from ..base import SHORT_SGD, Batch, Method, cifar_lars, mlp, optim_config
from ..losses import embedding_std, sinkhorn
from ..memory import Queue

#: SEER's global batch, images (one epoch of IG-1B) and warm-up steps (projects/SEER/MODEL_DOCUMENTATION.md, the
#: released files' warmup8k): the warm-up is 8k of ~122k steps
SEER_BATCH, SEER_IMAGES, SEER_WARMUP_STEPS = 8192, 1_000_000_000, 8000


def swapped_prediction_loss(scores: list[torch.Tensor], codes: list[torch.Tensor], temperature: float) -> torch.Tensor:
    """Mean over the global crops i (with codes q_i) and every other crop v of
    -sum_k q_i[k] log softmax(scores_v / T)[k]."""
    total, terms = 0.0, 0
    for i, q in enumerate(codes):
        for v, s in enumerate(scores):
            if v == i:
                continue
            total = total - (q * F.log_softmax(s.float() / temperature, dim=1)).sum(1).mean()
            terms += 1
    return total / terms


class SwAV(Method):
    name = "swav"
    description = "SwAV: prototypes, Sinkhorn-Knopp codes, swapped prediction, multi-crop"
    defaults = {"proj_hidden": 2048, "proj_layers": 2, "proj_dim": 128, "n_prototypes": 3000, "temperature": 0.1,
                "epsilon": 0.05, "sinkhorn_iters": 3, "n_local": 6, "freeze_prototypes_steps": 313,
                "queue_length": 0, "queue_start_steps": 0, "proj_bn": True, "freeze_prototypes_epochs": 0,
                "queue_start_epochs": 0}
    optim = optim_config("lars", lr=0.6, weight_decay=1e-6)
    #: short: 100 prototypes in 64 dims (K must exceed d, or an embedding orthogonal to every prototype sits
    #: at loss ln K) and the authors' workarounds for an early collapse (lower epsilon, no projector BN, the
    #: two global crops only, no queue); the measurements behind it: docs/pretraining.md, "SwAV's short recipe"
    short = {"hp": {"proj_hidden": 512, "proj_dim": 64, "n_prototypes": 100, "n_local": 0, "epsilon": 0.01,
                    "proj_bn": False, "freeze_prototypes_steps": 20, "queue_length": 0},
             "optim": SHORT_SGD}
    #: solo-learn scripts/pretrain/cifar/swav.yaml: two 32 px views, no local crops (queue_size 3840 from epoch
    #: 50, prototypes frozen for 2 epochs; sk_epsilon 0.05 and sk_iters 3 are solo's defaults)
    cifar = {"hp": {"proj_hidden": 2048, "proj_dim": 128, "n_prototypes": 3000, "temperature": 0.1,
                    "epsilon": 0.05, "sinkhorn_iters": 3, "n_local": 0, "freeze_prototypes_steps": 0,
                    "freeze_prototypes_epochs": 2, "queue_length": 3840, "queue_start_steps": 0,
                    "queue_start_epochs": 50, "proj_bn": True},
             "optim": cifar_lars(lr=0.6, weight_decay=1e-6), "views": "cifar_symmetric"}
    #: SEER's SwAV, from VISSL (facebookresearch/vissl@09270ed): the SEER command of projects/SEER/README.md is
    #: configs/config/pretrain/swav/swav_8node_resnet.yaml + configs/config/pretrain/seer/models/<model>.yaml
    #: (regnet10B: swav_loss num_iters 10, epsilon 0.03, num_prototypes [16000]; weight_decay 1e-5; head [trunk, 8192,
    #: 8192, 256] without BN, as pretrain/swav/heads/d7392_d8192_d8192_d256_proto16k.yaml for RegNetY-128GF) with the
    #: 2021 models' crops (pretrain/swav/transforms/multicrop_6crop_2x224_4x96.yaml). From swav_8node_resnet.yaml:
    #: temperature 0.1, no queue, prototypes frozen 313 iterations, LARC (clip False, trust_coefficient 0.001) on every
    #: parameter (regularize_bn / regularize_bias True: decayed and adapted), momentum 0.9, lr 0.3 x batch / 256. Run
    #: settings: SEER's released RegNetY-128GF (torchvision has no 256GF), 16 images per process, 224 px, one epoch.
    seer = {"hp": {"proj_hidden": 8192, "proj_layers": 3, "proj_dim": 256, "proj_bn": False, "n_prototypes": 16000,
                   "temperature": 0.1, "epsilon": 0.03, "sinkhorn_iters": 10, "n_local": 4,
                   "freeze_prototypes_steps": 313, "queue_length": 0, "queue_start_steps": 0,
                   "freeze_prototypes_epochs": 0, "queue_start_epochs": 0},
            "optim": {"optimizer": "lars", "lr": 0.3, "base_batch_size": 256, "weight_decay": 1e-5, "momentum": 0.9,
                      "lars_eta": 0.001, "lars_clip": False, "lars_trust": "solo", "exclude_bias_norm": False,
                      "warmup_epochs": SEER_WARMUP_STEPS / (SEER_IMAGES / SEER_BATCH)},
            "train": {"arch": "regnet_y_128gf", "batch_size": 16, "epochs": 1, "image_size": 224}}
    augment = "swav"
    n_views = 2

    def __init__(self, arch, hp=None, **kw):
        super().__init__(arch, hp, **kw)
        if self.hp["proj_layers"] < 1:
            raise UserError(f"swav: proj_layers must be at least 1, got {self.hp['proj_layers']}")
        hidden = [self.hp["proj_hidden"]] * (self.hp["proj_layers"] - 1)
        self.projector = mlp([self.feat_dim, *hidden, self.hp["proj_dim"]], bn=bool(self.hp["proj_bn"]))
        self.prototypes = nn.Linear(self.hp["proj_dim"], self.hp["n_prototypes"], bias=False)
        self._normalize_prototypes()
        length = self.hp["queue_length"]
        self.queues = nn.ModuleList([Queue(length, self.hp["proj_dim"]) for _ in range(2)]) if length else None
        self.register_buffer("queued", torch.zeros((), dtype=torch.long))  # embeddings written per queue
        self.current_epoch = 0

    @classmethod
    def recipe_overrides(cls, recipe: str) -> dict:
        """The base recipes, and ``seer``: the :attr:`seer` table (hp, optimizer, run settings; multi-crop views)."""
        out = super().recipe_overrides(recipe)
        if recipe == "seer":
            out.update(hp=dict(cls.seer["hp"]), optim=dict(cls.seer["optim"]), train=dict(cls.seer["train"]))
        return out

    def views(self, image_size):
        if self.recipe_views:
            return super().views(image_size)
        return multi_crop(image_size, n_global=2, n_local=self.hp["n_local"], **self.view_options)

    @classmethod
    def has_colour_views(cls) -> bool:
        return True

    @torch.no_grad()
    def _normalize_prototypes(self) -> None:
        self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=1))

    def training_step(self, batch: Batch):
        z = [F.normalize(self.projector(self.embed(v)), dim=1) for v in batch.views]
        scores = [self.prototypes(e) for e in z]
        codes = [self.codes(s.detach(), i) for i, s in enumerate(scores[:2])]
        self._pending = [e.detach() for e in z[:2]]
        return swapped_prediction_loss(scores, codes, self.hp["temperature"]), {"z_std": embedding_std(z[0])}

    @torch.no_grad()
    def codes(self, scores: torch.Tensor, crop: int) -> torch.Tensor:
        """Sinkhorn codes of one global crop's batch, over the batch stacked under its full queue."""
        n = scores.shape[0]
        if (self.queues is not None and int(self.queued) >= self.hp["queue_length"]
                and self.current_epoch >= self.hp["queue_start_epochs"]):
            scores = torch.cat([self.prototypes(self.queues[crop].items), scores])
        return sinkhorn(scores, self.hp["epsilon"], self.hp["sinkhorn_iters"])[-n:]

    def on_train_start(self, trainer) -> None:
        self.current_epoch = trainer.epoch

    def on_epoch_start(self, trainer, epoch: int) -> None:
        self.current_epoch = epoch

    def on_after_backward(self, trainer) -> None:
        if (trainer.global_step < self.hp["freeze_prototypes_steps"]
                or trainer.epoch < self.hp["freeze_prototypes_epochs"]):
            self.prototypes.weight.grad = None

    def on_after_step(self, trainer) -> None:
        self._normalize_prototypes()
        if self.queues is not None and trainer.global_step >= self.hp["queue_start_steps"]:
            for queue, e in zip(self.queues, self._pending):
                queue.enqueue(e, gather=False)
            self.queued += self._pending[0].shape[0]
