"""Context encoder (Pathak et al., CVPR 2016): a region of the image is removed (filled with the mean, 0
after normalisation) - the central square (``mask = "center"``, half the side, 1/4 of the pixels) or random
blocks covering ``coverage`` of the image (``"random"``, the paper's random-region variant with rectangles
instead of segmentation shapes) - the trunk encodes the context, a decoder (fc from the pooled code + up-convs)
reconstructs the image, and the loss is lambda_rec * L2 over the removed region + lambda_adv * adversarial
(a conv discriminator on the completed image vs the real one; 0.999 / 0.001 as in the paper, adv 0
disables it). Generator and discriminator losses share one optimiser step: the discriminator's term sees
detached completions, the generator's sees the discriminator through :func:`pretrain.pretext.frozen_call`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..base import Batch, SingleViewMethod, optim_config
from ..pretext import ConvDiscriminator, ImageDecoder, discriminator_loss, frozen_call, masked_mse


def center_mask(size: int, frac: float = 0.5) -> torch.Tensor:
    """(1, 1, size, size) mask, 1 on the central square of side round(frac * size)."""
    s = max(1, int(round(frac * size)))
    o = (size - s) // 2
    m = torch.zeros(1, 1, size, size)
    m[..., o : o + s, o : o + s] = 1
    return m


def random_block_mask(n: int, size: int, coverage: float = 0.25, max_frac: float = 0.5,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """(n, 1, size, size) masks: random rectangles (sides up to ``max_frac`` x size) added until at least
    ``coverage`` of each image is removed."""
    masks = torch.zeros(n, 1, size, size)
    hi = max(2, int(max_frac * size))
    for b in range(n):
        while masks[b].mean() < coverage:
            h, w = torch.randint(1, hi + 1, (2,), generator=generator).tolist()
            y = int(torch.randint(0, size - h + 1, (), generator=generator))
            x = int(torch.randint(0, size - w + 1, (), generator=generator))
            masks[b, 0, y : y + h, x : x + w] = 1
    return masks


def context_encoder_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, d_fake: torch.Tensor | None,
                         rec_weight: float = 0.999, adv_weight: float = 0.001) -> torch.Tensor:
    """lambda_rec * mean squared error over the removed region + lambda_adv * -log D(completion)."""
    loss = rec_weight * masked_mse(pred, target, mask)
    if d_fake is not None and adv_weight > 0:
        loss = loss + adv_weight * F.softplus(-d_fake.float()).mean()
    return loss


class Inpainting(SingleViewMethod):
    name = "inpainting"
    description = "Context encoder: masked centre / random region, L2 reconstruction (+ adversarial)"
    defaults = {"mask": "center", "mask_frac": 0.5, "coverage": 0.25, "rec_weight": 0.999, "adv_weight": 0.001,
                "decoder_width": 256, "decoder_stages": 4, "disc_width": 64}
    optim = optim_config("adam", lr=2e-4, weight_decay=0.0, base_batch_size=64)

    def __init__(self, arch, hp=None, **kw):
        super().__init__(arch, hp, **kw)
        if self.hp["mask"] not in ("center", "random"):
            from evalsuite.errors import UserError

            raise UserError("inpainting: mask must be 'center' or 'random'")
        self.decoder = ImageDecoder(self.feat_dim, 3, self.hp["decoder_width"], self.hp["decoder_stages"])
        self.disc = ConvDiscriminator(3, self.hp["disc_width"]) if self.hp["adv_weight"] > 0 else None

    def masks(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-1]
        if self.hp["mask"] == "center":
            return center_mask(size, self.hp["mask_frac"]).to(x).expand(x.shape[0], -1, -1, -1)
        return random_block_mask(x.shape[0], size, self.hp["coverage"]).to(x)

    def training_step(self, batch: Batch):
        x = batch.views[0]
        mask = self.masks(x)
        pred = self.decoder(self.embed(x * (1 - mask)), x.shape[-1])
        completion = x * (1 - mask) + pred * mask
        d_fake = None
        loss_d = torch.zeros((), device=x.device)
        if self.disc is not None:
            d_fake = frozen_call(self.disc, completion)
            loss_d = discriminator_loss(self.disc(x), self.disc(completion.detach()))
        rec = masked_mse(pred, x, mask)
        loss = context_encoder_loss(pred, x, mask, d_fake, self.hp["rec_weight"], self.hp["adv_weight"]) + loss_d
        return loss, {"rec": float(rec.detach()), "d": float(loss_d.detach())}
