"""AMDIM (Bachman, Hjelm & Buchwalter, NeurIPS 2019; Philip-Bachman/amdim-public): two views of an image share a
horizontal flip and are cropped (0.3-1, aspect 0.7-1.4, bicubic), colour-jittered (0.4/0.4/0.4/0.2, p 0.8) and
grayed (p 0.2) independently (datasets.py TransformsImageNet128). Each view gives a global vector and local
vectors at two scales, all mapped to ``n_rkhs`` dimensions by AMDIM's residual 1x1 "fake RKHS" blocks
(model.py FakeRKHSConvNet); three global/local predictions run in both directions (costs.py LossMultiNCE):
global -> the other view's coarse map ("1t5"), global -> its finer map ("1t7"), one random location of the coarse
map -> its coarse map ("5t5"), each an NCE over the batch's other images (:func:`pretrain.losses.amdim_nce`,
scores / sqrt(n_rkhs) soft-clipped by tanh at ``tclip``), plus ``score_reg`` x the mean squared raw score.
Adam (beta1 0.8) lr 2e-4 at a batch of 200, weight decay 1e-5, 500 warm-up updates (task_self_supervised.py).

On our trunks (a deviation from AMDIM's own encoder, whose 1x1 / 5x5 / 7x7 maps come from a network with
constrained receptive fields): the coarse map is res5, the finer one res4, and the global vector is the
res5 average (through its own fake-RKHS block, where AMDIM's encoder ends in an n_rkhs-channel 1x1 layer). The
map sizes are what the input size gives (4 x 4 and 8 x 8 at 128 px; the task names keep AMDIM's). Negatives are
gathered from every process with gradient (the reference's DataParallel sees the whole batch on one device). Not
reproduced: the online linear/MLP classifiers on the labels (evaluation only, detached from the encoder), the
step learning-rate schedule (the trainer's cosine), the warm-up counted in updates (0.078 ImageNet epochs at a batch
of 200, as ``warmup_epochs``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms import v2 as T

from evalsuite.trunks import arch_info

from .. import distributed as D
from ..augment import ViewTransform
from ..base import Batch, Method, optim_config
from ..losses import amdim_nce


class FakeRKHS(nn.Module):
    """AMDIM's FakeRKHSConvNet: 1x1 conv -> ReLU -> 1x1 conv, plus a 1x1 shortcut that starts near the identity
    when it widens, then BN: (B, C, H, W) -> (B, n_out, H, W). (The reference's optional inner BN is off.)"""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.conv1 = nn.Conv2d(n_in, n_out, 1, bias=False)
        self.conv2 = nn.Conv2d(n_out, n_out, 1, bias=False)
        self.shortcut = nn.Conv2d(n_in, n_out, 1, bias=True)
        self.bn_out = nn.BatchNorm2d(n_out)
        if n_out >= n_in:
            with torch.no_grad():
                w = torch.empty(n_out, n_in).uniform_(-0.01, 0.01)
                w[torch.arange(n_in), torch.arange(n_in)] = 1.0
                self.shortcut.weight.copy_(w[:, :, None, None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn_out(self.conv2(F.relu(self.conv1(x))) + self.shortcut(x))


class AMDIMViews(ViewTransform):
    """One horizontal flip shared by both views, then an independent crop, colour jitter and grayscale each."""

    def __init__(self, size: int):
        one = lambda: T.Compose([  # noqa: E731
            T.RandomResizedCrop(size, scale=(0.3, 1.0), ratio=(0.7, 1.4), interpolation=T.InterpolationMode.BICUBIC,
                                antialias=True),
            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.2)], p=0.8), T.RandomGrayscale(p=0.2),
            T.ToImage(), T.ToDtype(torch.float32, scale=True)])
        super().__init__([one(), one()], "amdim")
        self.flip = T.RandomHorizontalFlip()

    def __call__(self, image) -> list[torch.Tensor]:
        return super().__call__(self.flip(image))


class AMDIM(Method):
    name = "amdim"
    description = "AMDIM: global and multi-scale local InfoNCE between two views (res5/res4 maps), tanh-clipped"
    defaults = {"n_rkhs": 1024, "tclip": 20.0, "score_reg": 0.04}
    optim = optim_config("adam", lr=2e-4, weight_decay=1e-5, momentum=0.8,
                         warmup_epochs=round(500 * 200 / 1281167, 3), base_batch_size=200)

    def __init__(self, arch, hp=None, **kw):
        super().__init__(arch, hp, **kw)
        info = arch_info(arch)
        if info["family"] != "resnet":
            from evalsuite.errors import UserError

            raise UserError(f"amdim needs a ResNet trunk (its res4/res5 maps are the local features), not {arch}")
        c4, c5 = info["channels"][-2:]
        n = self.hp["n_rkhs"]
        self.rkhs_1, self.rkhs_5, self.rkhs_7 = FakeRKHS(c5, n), FakeRKHS(c5, n), FakeRKHS(c4, n)

    def views(self, image_size):
        return AMDIMViews(image_size)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(global (B, n), coarse map (B, n, H5, W5), finer map (B, n, H4, W4)) in float32."""
        taps = self.trunk(x, ["res4", "res5"])
        res4, res5 = taps["res4"].float(), taps["res5"].float()
        r1 = self.rkhs_1(res5.mean(dim=(2, 3), keepdim=True)).flatten(1)
        return r1, self.rkhs_5(res5), self.rkhs_7(res4)

    def training_step(self, batch: Batch):
        r1a, r5a, r7a = self.encode(batch.views[0])
        r1b, r5b, r7b = self.encode(batch.views[1])
        n = r1a.shape[0]
        pos = torch.arange(n, device=r1a.device) + D.rank() * n
        trg = {name: D.gather_with_grad(t.flatten(2)) for name, t in
               (("5a", r5a), ("7a", r7a), ("5b", r5b), ("7b", r7b))}
        losses, regs = {}, []
        for task, (src_a, src_b, key) in {"1t5": (r1a, r1b, "5"), "1t7": (r1a, r1b, "7"),
                                          "5t5": (random_location(r5a), random_location(r5b), "5")}.items():
            la, ra = amdim_nce(src_a, trg[key + "b"], pos, self.hp["tclip"])
            lb, rb = amdim_nce(src_b, trg[key + "a"], pos, self.hp["tclip"])
            losses[task] = 0.5 * (la + lb)
            regs += [ra, rb]
        reg = 0.5 * self.hp["score_reg"] * sum(regs)
        loss = losses["1t5"] + losses["1t7"] + losses["5t5"] + reg
        return loss, {f"g2l_{k}": float(v.detach()) for k, v in losses.items()} | {"lgt_reg": float(reg.detach())}


def random_location(maps: torch.Tensor) -> torch.Tensor:
    """One uniformly drawn location of each sample's (B, n, H, W) map: (B, n) (costs.py _sample_src_ftr)."""
    b, c, h, w = maps.shape
    idx = torch.randint(0, h * w, (b,), device=maps.device)
    return maps.flatten(2)[torch.arange(b, device=maps.device), :, idx]

