"""DINO (Caron et al., ICCV 2021): self-distillation with no labels, for ViT and convolutional trunks.

Student = trunk + :class:`DINOHead` (3-layer MLP 2048 wide with GELU, an L2-normalised 256-d bottleneck and
a weight-normed last layer to K = 65536 outputs whose norm is fixed); teacher = the same network, an EMA of
the student (momentum 0.996 -> 1 by a cosine schedule), fed only the two global crops. Loss: cross-entropy
between the teacher's centred, sharpened softmax((t - c) / T_t) of each global crop and the student's
log-softmax(s / 0.1) of every other crop; the centre c is an EMA (0.9) of the teacher's batch mean over all
processes, T_t goes linearly from 0.04 to its final value over the warm-up epochs (0.04 and none by
default; the 300-epoch ViT-S run: 0.07 after 30). Multi-crop: 2 x 224 (0.4-1) + 8 x 96 (0.05-0.4).
AdamW, lr 5e-4 x B/256, 10 warm-up epochs, weight decay 0.04 -> 0.4 (cosine), every parameter's gradient
clipped to norm 3, the last layer frozen in the first epoch, stochastic depth 0.1 in a ViT student. The
checkpoint holds the teacher's trunk, the network DINO evaluates and releases (eval_knn.py / eval_linear.py
``--checkpoint_key teacher``); ``checkpoint_trunk=student`` under the ``cifar`` recipe, as solo-learn evaluates.
On a ViT the local crops are a whole number of patches (96/224 of the size, rounded: 96 = 6 x 16 at 224 px; 32 px
at 64 px with 16 px patches rather than 27 px zero-padded to the grid).

The centre starts at zero (DINOLoss's buffer), so the first steps' targets are uncentred and share the component
every image's output has in common; the paper's 10-epoch warm-up keeps the lr negligible until the EMA has caught
up, but a short run's lr is not, and a ViT student then collapses onto that shared component within a few steps.
``center_init=batch`` (the ``short`` recipe) starts the centre at the first batch's teacher mean. The logs
``t_entropy`` and ``t_marginal`` (:func:`entropy_monitors`) tell the two collapses apart.
Reference: facebookresearch/dino main_dino.py (DINOLoss, train_one_epoch), vision_transformer.py (DINOHead),
utils.py (clip_gradients, cancel_gradients_last_layer, cosine_scheduler), eval_knn.py (checkpoint_key).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from evalsuite.errors import UserError
from evalsuite.vit import ViTTaps

from .. import distributed as D
from ..augment import dino_crops
from ..base import Batch, Method, cifar_lars, ema_update, momentum_copy, optim_config, trunk_embedding
from ..losses import embedding_std
from .byol import cosine_momentum
from .swav import swapped_prediction_loss

#: ``center_init``: ``zero`` (DINOLoss's zero buffer) or ``batch``: the first step's teacher mean, so the first
#: steps are not trained towards uncentred targets (module docstring)
CENTER_INITS = ("zero", "batch")


class DINOHead(nn.Module):
    """MLP (GELU) -> L2-normalised bottleneck -> weight-normed linear layer without bias (dino
    vision_transformer.py DINOHead); with ``norm_last_layer`` the last layer's norm g stays 1."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 n_layers: int = 3, norm_last_layer: bool = True):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (n_layers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i in range(len(dims) - 1):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < len(dims) - 2:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        # weight norm written out (W = g v / |v| per output row), as nn.utils.weight_norm with g filled with 1
        self.last_v = nn.Parameter(torch.empty(out_dim, bottleneck_dim))
        nn.init.kaiming_uniform_(self.last_v, a=math.sqrt(5))  # nn.Linear's initialisation
        self.last_g = nn.Parameter(torch.ones(out_dim, 1), requires_grad=not norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(x), dim=-1)
        return F.linear(x, self.last_g * F.normalize(self.last_v, dim=1))


def teacher_probs(teacher: torch.Tensor, center: torch.Tensor, temperature: float) -> torch.Tensor:
    """Centring and sharpening: softmax((t - c) / T_t), no gradient."""
    return F.softmax((teacher.detach().float() - center) / temperature, dim=-1)


def dino_loss(student: list[torch.Tensor], teacher: list[torch.Tensor], center: torch.Tensor,
              teacher_temp: float, student_temp: float) -> torch.Tensor:
    """Mean over the teacher's global crops i and the student's crops v != i of
    -sum_k softmax((t_i - c) / T_t)[k] log softmax(s_v / T_s)[k] (dino main_dino.py DINOLoss.forward)."""
    return swapped_prediction_loss(student, [teacher_probs(t, center, teacher_temp) for t in teacher], student_temp)


def entropy_monitors(probs: torch.Tensor) -> dict[str, float]:
    """Collapse monitors (the paper's "avoiding collapse" study) on the teacher's (B, K) targets: ``t_entropy``,
    the mean entropy of one target (ln K when uniform: the collapse centring alone leads to), and ``t_marginal``, the
    entropy of the batch-mean target (0 when every image gets the same one-hot: the collapse sharpening alone leads
    to); healthy training keeps the first low and the second high."""
    p = probs.detach().float()
    mean = p.mean(0)
    return {"t_entropy": float(-(p * p.clamp_min(1e-30).log()).sum(1).mean()),
            "t_marginal": float(-(mean * mean.clamp_min(1e-30).log()).sum())}


def teacher_temperature(epoch: int, warmup_temp: float, final_temp: float, warmup_epochs: int) -> float:
    """T_t of an epoch: np.linspace(warmup_temp, final_temp, warmup_epochs) during the warm-up, then final."""
    if epoch >= warmup_epochs:
        return final_temp
    return warmup_temp + (final_temp - warmup_temp) * epoch / max(1, warmup_epochs - 1)


def local_crop_size(image_size: int, patch: int | None) -> int:
    """DINO's local crops are 96/224 of the global size; on a ViT the nearest whole number of patches (at least
    one), as 96 = 6 x 16 at 224 px (DINOv2's 98 = 7 x 14), so no crop is zero-padded to the patch grid: 27 px at 64
    px is 32 with 16 px patches, 24 with 8 px ones."""
    size = max(8, int(round(image_size * 96 / 224)))
    return size if patch is None else patch * max(1, round(size / patch))


def multi_crop_forward(fn, views: list[torch.Tensor]) -> list[torch.Tensor]:
    """``fn`` on each run of consecutive same-sized crops in one batch (dino utils.py MultiCropWrapper), so
    the global crops share one forward pass (and BN statistics) and the local ones another."""
    outs: list[torch.Tensor] = []
    start = 0
    while start < len(views):
        end = start + 1
        while end < len(views) and views[end].shape[-2:] == views[start].shape[-2:]:
            end += 1
        outs += list(fn(torch.cat(views[start:end])).chunk(end - start))
        start = end
    return outs


class DINO(Method):
    name = "dino"
    description = "DINO: self-distillation, EMA teacher, centred and sharpened targets, multi-crop"
    defaults = {"out_dim": 65536, "hidden_dim": 2048, "bottleneck_dim": 256, "norm_last_layer": True,
                "n_local": 8, "student_temp": 0.1, "teacher_temp": 0.04, "warmup_teacher_temp": 0.04,
                "warmup_teacher_temp_epochs": 0, "center_momentum": 0.9, "momentum_teacher": 0.996,
                "weight_decay_end": 0.4, "clip_grad": 3.0, "freeze_last_layer": 1, "drop_path_rate": 0.1,
                "center_init": "zero", "checkpoint_trunk": "teacher"}
    optim = optim_config("adamw", lr=5e-4, weight_decay=0.04, warmup_epochs=10)
    #: short: a smaller head, the two global crops only, a sharper teacher (T_t 0.02: the README's advice when the
    #: loss does not decrease), the centre started from the first batch, the output layer trained from the start,
    #: the paper's lr scaling (5e-4 x B/256: SHORT_OPTIM's B/64 collapses a ViT's embedding within 20 steps) and a
    #: 1-epoch warm-up; the measurements: docs/pretraining.md, "DINO's and MAE's short recipes on a ViT"
    short = {"hp": {"out_dim": 4096, "hidden_dim": 1024, "n_local": 0, "teacher_temp": 0.02,
                    "warmup_teacher_temp": 0.02, "freeze_last_layer": 0, "drop_path_rate": 0.0, "center_init": "batch"},
             "optim": {"base_batch_size": 256, "warmup_epochs": 1}}
    #: solo-learn scripts/pretrain/cifar/dino.yaml with solo/methods/dino.py's defaults: head 2048-2048-256 ->
    #: 4096 without BN, T_t 0.07 from the start, tau 0.9995 -> 1, no gradient clipping, the last layer frozen in
    #: epoch 1, two views, LARS with a constant weight decay (no 0.04 -> 0.4 schedule); the student saved, as solo-learn
    #: evaluates it
    cifar = {"hp": {"out_dim": 4096, "hidden_dim": 2048, "bottleneck_dim": 256, "norm_last_layer": True,
                    "n_local": 0, "student_temp": 0.1, "teacher_temp": 0.07, "warmup_teacher_temp": 0.04,
                    "warmup_teacher_temp_epochs": 0, "center_momentum": 0.9, "momentum_teacher": 0.9995,
                    "weight_decay_end": 1e-6, "clip_grad": 0.0, "freeze_last_layer": 1, "drop_path_rate": 0.0,
                    "checkpoint_trunk": "student"},
             "optim": cifar_lars(lr=0.3, weight_decay=1e-6), "views": "cifar_asymmetric"}
    augment = "dino"

    def __init__(self, arch, hp=None, **kw):
        super().__init__(arch, hp, **kw)
        hp = self.hp
        self.head = DINOHead(self.feat_dim, hp["out_dim"], hp["hidden_dim"], hp["bottleneck_dim"],
                             norm_last_layer=bool(hp["norm_last_layer"]))
        self.teacher_trunk = momentum_copy(self.trunk)  # built before stochastic depth: the teacher has none
        self.teacher_head = momentum_copy(self.head)
        if hp["drop_path_rate"] > 0 and isinstance(self.trunk, ViTTaps):
            from timm.layers import DropPath

            depth = len(self.trunk.blocks)
            for i, block in enumerate(self.trunk.blocks):  # linearly increasing rates, as timm / DINO's ViT
                block.drop_path1 = DropPath(hp["drop_path_rate"] * i / max(1, depth - 1))
                block.drop_path2 = DropPath(hp["drop_path_rate"] * i / max(1, depth - 1))
        for key, allowed in (("center_init", CENTER_INITS), ("checkpoint_trunk", ("teacher", "student"))):
            if hp[key] not in allowed:
                raise UserError(f"dino: {key} must be one of {', '.join(allowed)}, not {hp[key]!r}")
        self.register_buffer("center", torch.zeros(1, hp["out_dim"]))
        #: whether the centre holds teacher statistics (False before the first step of a fresh run)
        self.center_ready = False
        self.current_epoch = 0

    def views(self, image_size):
        if self.recipe_views:
            return super().views(image_size)
        patch = self.trunk.patch_embed.patch_size[0] if isinstance(self.trunk, ViTTaps) else None
        return dino_crops(image_size, n_local=self.hp["n_local"], local_size=local_crop_size(image_size, patch),
                          **self.view_options)

    @classmethod
    def has_colour_views(cls) -> bool:
        return True

    def training_step(self, batch: Batch):
        hp = self.hp
        embeddings = multi_crop_forward(self.embed, batch.views)
        student = [self.head(e) for e in embeddings]
        with torch.no_grad():
            teacher = multi_crop_forward(lambda x: self.teacher_head(trunk_embedding(self.teacher_trunk, x)),
                                         batch.views[:2])
        temp = teacher_temperature(self.current_epoch, hp["warmup_teacher_temp"], hp["teacher_temp"],
                                   hp["warmup_teacher_temp_epochs"])
        if not self.center_ready and hp["center_init"] == "batch":
            self.center.copy_(self.teacher_mean(torch.cat(teacher)))
        self.center_ready = True
        targets = [teacher_probs(t, self.center, temp) for t in teacher]
        loss = swapped_prediction_loss(student, targets, hp["student_temp"])  # dino_loss on the computed targets
        self.update_center(torch.cat(teacher))  # after the loss, as DINOLoss.forward
        return loss, {"z_std": embedding_std(embeddings[0]), **entropy_monitors(torch.cat(targets))}

    def trunk_state_dict(self) -> dict[str, torch.Tensor]:
        """``checkpoint_trunk``: the teacher's trunk, the network DINO evaluates and releases (eval_knn.py /
        eval_linear.py ``--checkpoint_key teacher``); the student's for the ``cifar`` recipe, as solo-learn's
        main_linear.py loads its ``backbone.`` weights (the student; ``momentum_backbone.`` is the teacher)."""
        return (self.teacher_trunk if self.hp["checkpoint_trunk"] == "teacher" else self.trunk).state_dict()

    @staticmethod
    @torch.no_grad()
    def teacher_mean(teacher: torch.Tensor) -> torch.Tensor:
        """(1, K) mean of the teacher outputs over every process's batch."""
        n = torch.tensor(float(teacher.shape[0]), device=teacher.device)
        return D.all_reduce_sum(teacher.float().sum(0, keepdim=True)) / D.all_reduce_sum(n)

    @torch.no_grad()
    def update_center(self, teacher: torch.Tensor) -> None:
        """c <- m c + (1 - m) mean of the teacher outputs over every process's batch."""
        m = self.hp["center_momentum"]
        self.center.mul_(m).add_(self.teacher_mean(teacher), alpha=1 - m)

    def on_train_start(self, trainer) -> None:
        self.current_epoch = trainer.epoch
        self.center_ready = trainer.global_step > 0  # a resumed run's centre came with its state

    def on_epoch_start(self, trainer, epoch: int) -> None:
        self.current_epoch = epoch

    def on_after_backward(self, trainer) -> None:
        if self.hp["clip_grad"] > 0:  # each parameter's gradient on its own (dino utils.py clip_gradients)
            for p in self.parameters():
                if p.grad is not None:
                    p.grad.mul_(torch.clamp(self.hp["clip_grad"] / (p.grad.norm() + 1e-6), max=1.0))
        if trainer.epoch < self.hp["freeze_last_layer"]:
            self.head.last_v.grad = self.head.last_g.grad = None
        # weight decay of the decayed group: cosine from the optimizer's value to weight_decay_end
        start, end = trainer.optim_cfg["weight_decay"], self.hp["weight_decay_end"]
        wd = end + (start - end) * (1 + math.cos(math.pi * trainer.progress)) / 2
        trainer.optimizer.param_groups[0]["weight_decay"] = wd

    def on_after_step(self, trainer) -> None:
        m = cosine_momentum(self.hp["momentum_teacher"], trainer.progress)
        ema_update(self.teacher_trunk, self.trunk, m)
        ema_update(self.teacher_head, self.head, m)
