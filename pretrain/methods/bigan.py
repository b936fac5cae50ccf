"""BiGAN / adversarial feature learning (Donahue, Krahenbuhl & Darrell, ICLR 2017).

An encoder E (the trunk, pooled, linear to ``z_dim``), a generator G (z -> image, DCGAN-style up-convs,
sigmoid to [0, 1] then ImageNet normalisation so fakes live where real inputs do) and a joint
discriminator D(x, z) (conv branch on x, MLP on z, MLP on both). D learns to tell (x, E(x)) from
(G(z), z), z ~ U(-1, 1)^d; E and G are trained with the swapped labels (the "inverted" non-saturating
objective of the paper's implementation). All three share one optimiser step: D's loss sees detached
E(x), G(z); the E/G loss sees D through :func:`pretrain.pretext.frozen_call` (D gets no gradient from it).
"""

from __future__ import annotations

import torch
from torch import nn

from ..base import Batch, SingleViewMethod, optim_config
from ..pretext import ConvDiscriminator, ImageDecoder, discriminator_loss, frozen_call, normalized_from_unit


def bigan_losses(d_enc: torch.Tensor, d_gen: torch.Tensor, d_enc_frozen: torch.Tensor,
                 d_gen_frozen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(discriminator loss, encoder+generator loss) from D's logits on (x, E(x)) and (G(z), z):
    D: label 1 for encoder pairs, 0 for generator pairs; E/G: the labels swapped."""
    return discriminator_loss(d_enc, d_gen), discriminator_loss(d_gen_frozen, d_enc_frozen)


class BiGAN(SingleViewMethod):
    name = "bigan"
    description = "BiGAN: encoder + generator + joint discriminator on (x, z) pairs"
    defaults = {"z_dim": 200, "gen_width": 256, "gen_stages": 4, "disc_width": 64, "disc_hidden": 512}
    optim = optim_config("adam", lr=2e-4, weight_decay=0.0, momentum=0.5, base_batch_size=128)

    def __init__(self, arch, hp=None, **kw):
        super().__init__(arch, hp, **kw)
        z = self.hp["z_dim"]
        self.enc_head = nn.Linear(self.feat_dim, z)
        self.generator = ImageDecoder(z, 3, self.hp["gen_width"], self.hp["gen_stages"])
        self.disc = ConvDiscriminator(3, self.hp["disc_width"], z_dim=z, hidden=self.hp["disc_hidden"])

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.enc_head(self.embed(x))

    def generate(self, z: torch.Tensor, size: int) -> torch.Tensor:
        return normalized_from_unit(torch.sigmoid(self.generator(z, size)))

    def training_step(self, batch: Batch):
        x = batch.views[0]
        z = torch.rand(x.shape[0], self.hp["z_dim"], device=x.device) * 2 - 1
        ex, gz = self.encode(x), self.generate(z, x.shape[-1])
        loss_d, loss_eg = bigan_losses(self.disc(x, ex.detach()), self.disc(gz.detach(), z),
                                       frozen_call(self.disc, x, ex), frozen_call(self.disc, gz, z))
        return loss_d + loss_eg, {"d": float(loss_d.detach()), "eg": float(loss_eg.detach())}
