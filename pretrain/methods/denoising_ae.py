"""Denoising autoencoder (Vincent et al., ICML 2008 / JMLR 2010): corrupt the input, reconstruct the clean
image. Corruptions: ``masking`` (each pixel set to the mean, 0 after normalisation, with probability
``level``, all channels together), ``gaussian`` (additive N(0, level^2) in normalised units) or
``salt_pepper`` (each pixel to the min or max of the image with probability ``level``). Encoder: the trunk
(pooled last tap); decoder: fc + up-convs to the input size; loss: mean squared error over all pixels."""

from __future__ import annotations

import torch

from ..base import Batch, SingleViewMethod, optim_config
from ..pretext import ImageDecoder, masked_mse

CORRUPTIONS = ("masking", "gaussian", "salt_pepper")


def corrupt(x: torch.Tensor, kind: str = "masking", level: float = 0.25,
            generator: torch.Generator | None = None) -> torch.Tensor:
    """Corrupted copy of a (B, C, H, W) batch (see module docstring)."""
    b, c, h, w = x.shape
    if kind == "masking":
        keep = (torch.rand(b, 1, h, w, generator=generator) >= level).to(x)
        return x * keep
    if kind == "gaussian":
        return x + torch.randn(x.shape, generator=generator).to(x) * level
    if kind == "salt_pepper":
        u = torch.rand(b, 1, h, w, generator=generator).to(x.device)
        lo = x.amin(dim=(1, 2, 3), keepdim=True).expand_as(x)
        hi = x.amax(dim=(1, 2, 3), keepdim=True).expand_as(x)
        out = torch.where((u < level / 2).expand_as(x), lo, x)
        return torch.where(((u >= level / 2) & (u < level)).expand_as(x), hi, out)
    raise ValueError(f"unknown corruption {kind!r}; choose one of {', '.join(CORRUPTIONS)}")


class DenoisingAE(SingleViewMethod):
    name = "denoising_ae"
    description = "Denoising autoencoder: corrupt the input, reconstruct the clean image (MSE)"
    defaults = {"corruption": "masking", "level": 0.25, "decoder_width": 256, "decoder_stages": 4}
    optim = optim_config("adam", lr=1e-3, weight_decay=0.0)

    def __init__(self, arch, hp=None, **kw):
        super().__init__(arch, hp, **kw)
        if self.hp["corruption"] not in CORRUPTIONS:
            from evalsuite.errors import UserError

            raise UserError(f"denoising_ae: corruption must be one of {', '.join(CORRUPTIONS)}")
        self.decoder = ImageDecoder(self.feat_dim, 3, self.hp["decoder_width"], self.hp["decoder_stages"])

    def training_step(self, batch: Batch):
        x = batch.views[0]
        noisy = corrupt(x, self.hp["corruption"], self.hp["level"])
        return masked_mse(self.decoder(self.embed(noisy), x.shape[-1]), x)
