"""CMC (Tian et al., ECCV 2020), two-view L / ab version: one encoder for the L channel, one for ab (CIE Lab),
each with a 128-d head; memory banks of both views' features (momentum 0.5); contrastive loss across views,
L_{L,ab} = contrast(f_L, bank_ab) + contrast(f_ab, bank_L) with K sampled negatives, T = 0.07 (the
softmax-over-K+1 "NCE-softmax" form). The checkpoint stores the L encoder, whose 1-channel conv1 is turned
into the 3-channel conv of the ``gray`` input space (L repeated on 3 channels) by dividing by 3, an exact
conversion; evaluation therefore feeds L only (input_space = gray)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from evalsuite.colorspace import to_input_space
from evalsuite.trunks import build_trunk

from ..base import Batch, SingleViewMethod, optim_config
from ..memory import BANK_DEFAULTS, MemoryBank
from .pirl import contrast_with_bank


def first_conv_name(trunk: nn.Module) -> str:
    return "conv1" if hasattr(trunk, "conv1") else "features.0"


def set_in_channels(trunk: nn.Module, in_ch: int) -> None:
    """Replace the first convolution by one with ``in_ch`` input channels (same geometry)."""
    name = first_conv_name(trunk)
    old = trunk.get_submodule(name)
    new = nn.Conv2d(in_ch, old.out_channels, old.kernel_size, old.stride, old.padding, bias=old.bias is not None)
    parent, _, leaf = name.rpartition(".")
    setattr(trunk.get_submodule(parent) if parent else trunk, leaf, new)


class CMC(SingleViewMethod):
    name = "cmc"
    description = "CMC: L and ab views, one encoder each, contrastive loss across views with memory banks"
    defaults = {**BANK_DEFAULTS, "nce_k": 4096, "bank_momentum": 0.5}
    optim = optim_config("sgd", lr=0.03, weight_decay=1e-4)
    input_space = "gray"

    def __init__(self, arch, hp=None, **kw):
        super().__init__(arch, hp, **kw)
        set_in_channels(self.trunk, 1)
        self.trunk_ab = build_trunk(arch)
        set_in_channels(self.trunk_ab, 2)
        d = self.hp["dim"]
        self.head_l, self.head_ab = nn.Linear(self.feat_dim, d), nn.Linear(self.feat_dim, d)
        n = max(1, self.num_samples)
        self.bank_l = MemoryBank(n, d, self.hp["bank_momentum"], self.seed + 1)
        self.bank_ab = MemoryBank(n, d, self.hp["bank_momentum"], self.seed + 2)

    def preprocess(self, x):
        return to_input_space(x, "lab")  # (L/50-1, a/110, b/110)

    def training_step(self, batch: Batch):
        x = batch.views[0]
        f_l = F.normalize(self.head_l(self.embed(x[:, :1])), dim=1)
        last = self.trunk_ab.tap_names[-1]
        f_ab = F.normalize(self.head_ab(self.trunk_ab(x[:, 1:], [last])[last].float().mean(dim=(2, 3))), dim=1)
        b = x.shape[0]
        k = min(self.hp["nce_k"], len(self.bank_l))
        noise = self.bank_l.sample(b, k)
        t = self.hp["temperature"]
        loss = (contrast_with_bank(f_l, self.bank_ab.get(batch.index), self.bank_ab.get(noise), t)
                + contrast_with_bank(f_ab, self.bank_l.get(batch.index), self.bank_l.get(noise), t))
        self._pending = (batch.index, f_l.detach().float(), f_ab.detach().float())
        return loss

    def on_after_step(self, trainer) -> None:
        idx, f_l, f_ab = self._pending
        self.bank_l.update(idx, f_l)
        self.bank_ab.update(idx, f_ab)

    def trunk_state_dict(self):
        state = dict(self.trunk.state_dict())
        key = first_conv_name(self.trunk) + ".weight"
        state[key] = state[key].repeat(1, 3, 1, 1) / 3  # conv(L repeated x3, W/3 x3) == conv(L, W)
        return state
