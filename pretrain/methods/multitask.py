"""Multi-task self-supervision (Doersch & Zisserman, ICCV 2017), the naive shared-trunk network of its Fig. 1a: one
trunk, one head per task, each task on its own inputs, the weighted task losses summed. Tasks: relative position
(``pretrain.methods.relative_position``: centre + neighbour patch pair, gap, jitter, colour dropping, 8-way
classification) and colorization (``pretrain.methods.colorization``: L in, class-rebalanced ab-bin distribution
out). Both are the single-task methods themselves, sharing this trunk: their heads, inputs, losses and the
colorization prior (estimated at the start of training) are theirs, and their hyper-parameters are set as
``--set relative_position.hidden=...`` / ``--set colorization.prior=...``; ``<task>_weight`` weighs each loss.

Every image gives both tasks' inputs from independent crops: the colorization crop (views[0], RGB in [0, 1],
converted to Lab in the step) and the relative-position pair and label (views[1], views[2]).

Deviations (recorded): the heads sit where the single-task methods put them (relative position on the pooled res5,
colorization on the last three taps), not all on block 3 of a ResNet-101; the paper's lasso-regularised
per-task combination of block-3 layers (Fig. 1b) and its input harmonisation are left out; the optimiser is
relative position's (SGD lr 0.01, weight decay 5e-4), not the paper's distributed asynchronous training. The
checkpoint's input space is ``rgb``: the trunk saw normalised RGB patches (relative position) and gray L images
(colorization), and is evaluated on ImageNet-normalised RGB.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from evalsuite.trunks import arch_info

from ..augment import ViewTransform
from ..base import Batch, Method
from .colorization import Colorization
from .relative_position import RelativePosition

TASKS: dict[str, type[Method]] = {"relative_position": RelativePosition, "colorization": Colorization}


class MultitaskViews(ViewTransform):
    """Each task's own view of the image, concatenated: colorization's crop, then relative position's pair and
    label."""

    def __init__(self, colorization: ViewTransform, relative_position: ViewTransform):
        self.parts = {"colorization": colorization, "relative_position": relative_position}
        super().__init__([], "multitask")

    def __call__(self, image) -> list[torch.Tensor]:
        return [*self.parts["colorization"](image), *self.parts["relative_position"](image)]

    def __len__(self) -> int:
        return 3

    def describe(self) -> dict:
        return {"preset": self.name, **{task: view.describe() for task, view in self.parts.items()}}


class Multitask(Method):
    name = "multitask"
    description = "Multi-task (Doersch & Zisserman): shared trunk, relative-position and colorization heads, " \
                  "weighted sum of the losses"
    defaults: dict[str, Any] = {**{f"{t}_weight": 1.0 for t in TASKS},
                                **{f"{t}.{k}": v for t, cls in TASKS.items() for k, v in cls.defaults.items()}}
    optim = RelativePosition.optim

    def __init__(self, arch, hp=None, **kw):
        super().__init__(arch, hp, **kw)
        if arch_info(arch)["family"] == "vit":
            from evalsuite.errors import UserError

            raise UserError("multitask needs a convolutional trunk (colorization's head reads its last three maps)")
        self.tasks = nn.ModuleDict()
        for task, cls in TASKS.items():
            sub_hp = {k.split(".", 1)[1]: v for k, v in self.hp.items() if k.startswith(task + ".")}
            method = cls(arch, sub_hp, num_samples=self.num_samples, num_classes=self.num_classes, seed=self.seed)
            method.trunk = self.trunk  # one shared trunk; the task's own (unused) copy is dropped
            self.tasks[task] = method

    def views(self, image_size):
        return MultitaskViews(self.tasks["colorization"].views(image_size),
                              self.tasks["relative_position"].views(image_size))

    def preprocess(self, x):
        return x  # each task converts its own views in the step (patches are normalised in the loader)

    def on_train_start(self, trainer) -> None:
        self.tasks["colorization"].on_train_start(trainer)  # the ab prior from views[0], the colorization crops

    def training_step(self, batch: Batch):
        col = self.tasks["colorization"]
        col_batch = Batch([col.preprocess(batch.views[0])], batch.index, batch.target)
        rp_batch = Batch(batch.views[1:3], batch.index, batch.target)
        col_loss = col.training_step(col_batch)
        rp_loss, rp_logs = self.tasks["relative_position"].training_step(rp_batch)
        loss = self.hp["relative_position_weight"] * rp_loss + self.hp["colorization_weight"] * col_loss
        return loss, {"relative_position_loss": float(rp_loss.detach()), "relative_position_acc": rp_logs["acc"],
                      "colorization_loss": float(col_loss.detach())}

    def metadata(self):
        return {**super().metadata(), "pretext": {"ab_bins": int(self.tasks["colorization"].centres.shape[0]),
                                                  "prior": self.hp["colorization.prior"]},
                "multitask": {"tasks": list(TASKS), "lasso": False, "harmonized_inputs": False}}
