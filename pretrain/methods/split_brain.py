"""Split-brain autoencoder (Zhang, Isola & Efros, CVPR 2017).

The network is split channel-wise into two disjoint halves: F1 sees the L channel and predicts ab, F2
sees ab and predicts L; the representation is the concatenation [F1, F2] at every layer. Here both
halves live inside ONE standard evalsuite trunk whose convolutions are block-diagonal: output channels
[0, C/2) of every layer read only input channels [0, C/2) of the previous one (and only L at the first
convolution), channels [C/2, C) only the other half (ab at the first convolution). BatchNorm and residual
additions are per channel, so the halves never mix; the checkpoint is an ordinary trunk over the ``lab``
input space whose taps are exactly the concatenated half features. The block structure is kept by masking
the gradients after backward and the weights after each step.

Losses (classification, the paper's best): L -> ab over the in-gamut ab bins (soft-encoded, optional
class rebalancing), ab -> L over ``l_bins`` uniform L bins, per pixel of a hypercolumn head on each half;
the total is their sum.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from evalsuite.trunks import ARCHS

from ..base import Batch, SingleViewMethod, optim_config
from ..pretext import DenseHead, ab_gamut, lab_of, multinomial_ce, tap_maps
from .colorization import ab_targets


def half_masks(trunk: nn.Module, first_in_groups: tuple[int, ...] = (0, 1, 1)) -> dict[str, torch.Tensor]:
    """{conv weight name: 0/1 mask} making every convolution block-diagonal between the two halves.
    A channel c of a C-channel layer belongs to half int(c >= C / 2); input channel i of the first
    convolution (3 channels: L, a, b) to ``first_in_groups[i]``."""
    masks = {}
    for name, mod in trunk.named_modules():
        if isinstance(mod, nn.Conv2d):
            o, i = mod.out_channels, mod.in_channels
            g_out = (torch.arange(o) >= o // 2).long()
            g_in = torch.tensor(first_in_groups) if i == len(first_in_groups) else (torch.arange(i) >= i // 2).long()
            masks[f"{name}.weight"] = (g_out[:, None] == g_in[None, :]).float()[:, :, None, None]
    return masks


def l_targets(lab_scaled: torch.Tensor, out_hw: tuple[int, int], n_bins: int) -> torch.Tensor:
    """Scaled Lab -> the L channel area-pooled to ``out_hw`` and quantised into ``n_bins`` uniform bins of
    [0, 100]: (B, h, w) class indices."""
    L = F.adaptive_avg_pool2d(lab_of(lab_scaled)[:, :1], out_hw)[:, 0]
    return (L / (100 / n_bins)).floor().clamp(0, n_bins - 1).long()


def split_brain_loss(logits_ab: torch.Tensor, ab_idx: torch.Tensor, ab_w: torch.Tensor, logits_l: torch.Tensor,
                     l_idx: torch.Tensor, class_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-channel prediction: soft multinomial CE for L -> ab plus CE for ab -> L."""
    pix = class_weights[ab_idx[..., 0]] if class_weights is not None else None
    return multinomial_ce(logits_ab, ab_idx, ab_w, pix) + F.cross_entropy(logits_l.float(), l_idx)


class SplitBrain(SingleViewMethod):
    name = "split_brain"
    description = "Split-brain autoencoder: L->ab and ab->L halves (block-diagonal trunk), concatenated features"
    defaults = {"l_bins": 50, "soft_k": 5, "sigma": 5.0, "head_hidden": 256}
    optim = optim_config("adam", lr=3e-4, weight_decay=1e-4, base_batch_size=40)
    input_space = "lab"

    def __init__(self, arch, hp=None, **kw):
        super().__init__(arch, hp, **kw)
        self._mask_names = []
        for i, (name, mask) in enumerate(half_masks(self.trunk).items()):
            self.register_buffer(f"half_mask_{i}", mask, persistent=False)
            self._mask_names.append(name)
        self.apply_masks()
        self.register_buffer("centres", ab_gamut())
        chans = [c // 2 for c in ARCHS[arch]["channels"][-3:]]
        self.head_ab = DenseHead(chans, self.centres.shape[0], self.hp["head_hidden"])
        self.head_l = DenseHead(chans, self.hp["l_bins"], self.hp["head_hidden"])

    def _pairs(self):
        params = dict(self.trunk.named_parameters())
        return [(params[n], getattr(self, f"half_mask_{i}")) for i, n in enumerate(self._mask_names)]

    @torch.no_grad()
    def apply_masks(self) -> None:
        for w, m in self._pairs():
            w.mul_(m.to(w))

    def on_after_backward(self, trainer) -> None:
        for w, m in self._pairs():
            if w.grad is not None:
                w.grad.mul_(m.to(w.grad))

    def on_after_step(self, trainer) -> None:
        self.apply_masks()

    def training_step(self, batch: Batch):
        lab = batch.views[0]
        maps = tap_maps(self.trunk, lab)
        half1 = [m[:, : m.shape[1] // 2] for m in maps]  # sees L
        half2 = [m[:, m.shape[1] // 2 :] for m in maps]  # sees ab
        logits_ab, logits_l = self.head_ab(half1), self.head_l(half2)
        hw = tuple(logits_ab.shape[-2:])
        idx, w, _ = ab_targets(lab.float(), hw, self.centres, self.hp["soft_k"], self.hp["sigma"])
        loss = split_brain_loss(logits_ab, idx, w, logits_l, l_targets(lab.float(), hw, self.hp["l_bins"]))
        return loss

    def metadata(self):
        return {**super().metadata(), "pretext": {"halves": "channels [0, C/2) see L, [C/2, C) see ab",
                                                  "ab_bins": int(self.centres.shape[0])}}

