"""Colorful image colorization (Zhang, Isola & Efros, ECCV 2016) as a pretext task.

The trunk sees only the lightness: the L channel (scaled as ``evalsuite.colorspace``: L/50 - 1) repeated
on three channels, which is exactly the ``gray`` input space, so the checkpoint records
``input_space = "gray"`` and ``evalsuite.features`` feeds gray images at evaluation time. A hypercolumn
head on the last three taps predicts, per pixel of the shallowest of them (1/4 - 1/8 of the input),
a distribution over the Q in-gamut ab bins (``pretrain.pretext.ab_gamut``, grid 10). Targets are
soft-encoded (5 nearest bins, Gaussian sigma 5) from the ab channels area-downsampled to the head's
resolution; the multinomial cross-entropy is weighted per pixel by the class-rebalancing weight of the
pixel's nearest bin, w ~ ((1 - lambda) p~ + lambda / Q)^-1 with E_p~[w] = 1 and lambda = 1/2 (eq. 2-4),
where p~ is the Gaussian-smoothed ab distribution estimated from ``prior_images`` training images at the
start of training (``prior = "data"``) or uniform (``prior = "uniform"``, no rebalancing).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from evalsuite.colorspace import rgb_to_lab, to_input_space

from ..base import Batch, SingleViewMethod, optim_config
from ..pretext import (
    DenseHead,
    ab_gamut,
    lab_of,
    multinomial_ce,
    rebalance_weights,
    smooth_prior,
    soft_encode,
    tap_maps,
)


def ab_targets(lab_scaled: torch.Tensor, out_hw: tuple[int, int], centres: torch.Tensor, k: int = 5,
               sigma: float = 5.0):
    """Scaled Lab (B, 3, H, W) -> soft targets of the ab channels area-pooled to ``out_hw``:
    (idx (B, h, w, k), weights (B, h, w, k), nearest bin (B, h, w))."""
    ab = F.adaptive_avg_pool2d(lab_of(lab_scaled)[:, 1:], out_hw).permute(0, 2, 3, 1)
    idx, w = soft_encode(ab, centres, k, sigma)
    return idx, w, idx[..., 0]


def colorization_loss(logits: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, nearest: torch.Tensor,
                      class_weights: torch.Tensor | None) -> torch.Tensor:
    """Class-rebalanced multinomial cross-entropy (Zhang et al. 2016, eq. 2): mean over pixels of
    v(nearest bin) * -sum_q z_q log p_q."""
    pix = class_weights[nearest] if class_weights is not None else None
    return multinomial_ce(logits, idx, w, pix)


class Colorization(SingleViewMethod):
    name = "colorization"
    description = "Colorization: L in, per-pixel distribution over quantised ab bins out, class rebalancing"
    defaults = {"soft_k": 5, "sigma": 5.0, "rebalance_lambda": 0.5, "prior": "data", "prior_images": 512,
                "head_hidden": 256}
    optim = optim_config("adam", lr=3e-4, weight_decay=1e-3, base_batch_size=40)
    short = {"hp": {"prior_images": 256}, "optim": {"lr": 1e-3, "base_batch_size": 64}}
    input_space = "gray"

    def __init__(self, arch, hp=None, **kw):
        super().__init__(arch, hp, **kw)
        if self.hp["prior"] not in ("data", "uniform"):
            from evalsuite.errors import UserError

            raise UserError("colorization: prior must be 'data' or 'uniform'")
        centres = ab_gamut()
        self.register_buffer("centres", centres)
        q = centres.shape[0]
        self.register_buffer("class_weights", torch.ones(q))
        chans = _tap_channels(self.trunk)
        self.head = DenseHead(chans, q, self.hp["head_hidden"])

    def preprocess(self, x):
        return to_input_space(x, "lab")  # the trunk gets the L channel only (see gray_input)

    @staticmethod
    def gray_input(lab_scaled: torch.Tensor) -> torch.Tensor:
        """Scaled Lab -> the ``gray`` input space (scaled L on three channels)."""
        return lab_scaled[:, :1].expand(-1, 3, -1, -1)

    @torch.no_grad()
    def estimate_prior(self, images: list[torch.Tensor]) -> torch.Tensor:
        """Smoothed ab-bin distribution of RGB images in [0, 1] (hard nearest-bin counts, sigma smoothing)."""
        counts = torch.zeros(self.centres.shape[0], dtype=torch.float64)
        for img in images:
            ab = rgb_to_lab(img.float())[1:].permute(1, 2, 0).reshape(-1, 2)
            near = ((ab[:, None, :] - self.centres.cpu()[None]) ** 2).sum(-1).argmin(1)
            counts += torch.bincount(near, minlength=counts.numel()).double()
        return smooth_prior(counts, self.centres.cpu(), self.hp["sigma"])

    def on_train_start(self, trainer) -> None:
        if self.hp["prior"] != "data":
            return
        ds = trainer.dataset
        n = min(len(ds), self.hp["prior_images"])
        picks = torch.linspace(0, len(ds) - 1, n).long().tolist()
        prior = self.estimate_prior([ds[i][0][0] for i in picks])
        self.class_weights.copy_(rebalance_weights(prior, self.hp["rebalance_lambda"]).to(self.class_weights))

    def training_step(self, batch: Batch):
        lab = batch.views[0]
        logits = self.head(tap_maps(self.trunk, self.gray_input(lab)))
        idx, w, nearest = ab_targets(lab.float(), tuple(logits.shape[-2:]), self.centres, self.hp["soft_k"],
                                     self.hp["sigma"])
        return colorization_loss(logits, idx, w, nearest, self.class_weights)

    def metadata(self):
        return {**super().metadata(), "pretext": {"ab_bins": int(self.centres.shape[0]), "prior": self.hp["prior"]}}


def _tap_channels(trunk) -> list[int]:
    from evalsuite.trunks import ARCHS

    return list(ARCHS[trunk.arch]["channels"][-3:])
