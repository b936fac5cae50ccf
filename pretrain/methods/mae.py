"""MAE (He et al., CVPR 2022): masked autoencoders, ViT trunks only.

Each image's patch tokens (with position embeddings) are shuffled per sample and 75% dropped; the encoder
(the trunk's own timm blocks and final norm) sees the CLS token and the visible 25%; a light decoder (a
linear embedding, a mask token in every dropped position, fixed 2-D sin-cos position embeddings, 8 blocks
of width 512 with 16 heads, a norm and a linear layer to the patch's pixels) reconstructs every patch, and
the loss is the mean squared error on the masked patches only, against each patch's pixels normalised by
its own mean and variance (norm_pix_loss). The encoder's position embeddings are fixed 2-D sin-cos too.
AdamW (betas 0.9, 0.95), lr 1.5e-4 x B/256, weight decay 0.05, 40 warm-up epochs; views: random resized
crop (0.2-1) + flip. The checkpoint holds the encoder (the trunk) only.
Reference: facebookresearch/mae models_mae.py (MaskedAutoencoderViT), main_pretrain.py (optimizer, views),
util/pos_embed.py (sin-cos embeddings).
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from evalsuite.errors import UserError
from evalsuite.trunks import arch_info

from ..augment import ViewTransform, basic_view
from ..base import Batch, Method, optim_config


def sincos_pos_embed(dim: int, h: int, w: int) -> torch.Tensor:
    """(h * w, dim) fixed 2-D sin-cos embedding in row-major patch order: the first half encodes the column,
    the second the row, each as [sin, cos] of the position times 1 / 10000^(k / (dim / 4))."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    rows, cols = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                                indexing="ij")

    def one_d(pos: torch.Tensor) -> torch.Tensor:
        out = pos.reshape(-1, 1) * omega
        return torch.cat([out.sin(), out.cos()], dim=1)

    return torch.cat([one_d(cols), one_d(rows)], dim=1).float()


def random_masking(x: torch.Tensor, mask_ratio: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample random masking of (N, L, D) tokens by argsort of uniform noise: the kept tokens
    (N, int(L (1 - ratio)), D) in shuffled order, the mask (N, L; 1 = dropped) and the indices that undo the
    shuffle."""
    n, length, d = x.shape
    keep = int(length * (1 - mask_ratio))
    shuffle = torch.argsort(torch.rand(n, length, device=x.device), dim=1)
    restore = torch.argsort(shuffle, dim=1)
    kept = torch.gather(x, 1, shuffle[:, :keep, None].expand(-1, -1, d))
    mask = torch.ones(n, length, device=x.device)
    mask[:, :keep] = 0
    return kept, torch.gather(mask, 1, restore), restore


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, L, patch * patch * C) in the trunk's token order (row-major patches, pixels then
    channels inside each), the image zero-padded at the bottom / right to whole patches as timm pads it."""
    n, c, h, w = images.shape
    images = F.pad(images, (0, -w % patch, 0, -h % patch))
    gh, gw = images.shape[2] // patch, images.shape[3] // patch
    x = images.reshape(n, c, gh, patch, gw, patch)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(n, gh * gw, patch * patch * c)


def mae_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, norm_pix: bool = True) -> torch.Tensor:
    """Mean over the masked patches of the per-patch mean squared error; with ``norm_pix`` each target patch
    is normalised by its mean and (unbiased) variance + 1e-6."""
    target = target.float()
    if norm_pix:
        target = (target - target.mean(dim=-1, keepdim=True)) / (target.var(dim=-1, keepdim=True) + 1e-6) ** 0.5
    per_patch = ((pred.float() - target) ** 2).mean(dim=-1)
    return (per_patch * mask).sum() / mask.sum()


class MAE(Method):
    name = "mae"
    description = "MAE: 75% of patches masked, ViT encoder on the rest, light decoder, normalised-pixel loss"
    defaults = {"mask_ratio": 0.75, "norm_pix_loss": True, "decoder_dim": 512, "decoder_depth": 8,
                "decoder_heads": 16}
    optim = optim_config("adamw", lr=1.5e-4, weight_decay=0.05, warmup_epochs=40)
    #: short: a 2-block decoder of width 128 (the paper's ablation finds one block enough for fine-tuning)
    short = {"hp": {"decoder_dim": 128, "decoder_depth": 2, "decoder_heads": 4}}
    augment = "basic"
    n_views = 1
    #: Adam's beta2 (main_pretrain.py: betas=(0.9, 0.95)), set on the optimizer at the start of training
    beta2 = 0.95

    def __init__(self, arch, hp=None, **kw):
        if arch_info(arch)["family"] != "vit":
            raise UserError(f"mae needs a Vision Transformer trunk (--arch vit_tiny_patch16, ...), not {arch}")
        super().__init__(arch, hp, **kw)
        from timm.models.vision_transformer import Block

        hp, dim, patch = self.hp, self.trunk.embed_dim, self.trunk.patch_embed.patch_size[0]
        dec = hp["decoder_dim"]
        self.decoder_embed = nn.Linear(dim, dec)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dec))
        self.decoder_blocks = nn.Sequential(*[Block(dec, hp["decoder_heads"], mlp_ratio=4.0, qkv_bias=True,
                                                    norm_layer=partial(nn.LayerNorm, eps=1e-6))
                                              for _ in range(hp["decoder_depth"])])
        self.decoder_norm = nn.LayerNorm(dec, eps=1e-6)
        self.decoder_pred = nn.Linear(dec, patch * patch * 3)
        self._initialize()

    @torch.no_grad()
    def _initialize(self) -> None:
        """models_mae.py initialize_weights: fixed sin-cos encoder position embeddings (0 for the prefix
        tokens), xavier-uniform linear layers and patch projection, N(0, 0.02) CLS and mask tokens."""
        trunk = self.trunk
        gh, gw = trunk.patch_embed.grid_size
        pos = trunk.pos_embed
        prefix = pos.shape[1] - gh * gw
        pos.zero_()
        pos[0, prefix:] = sincos_pos_embed(pos.shape[-1], gh, gw)
        pos.requires_grad_(False)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        w = trunk.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(trunk.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)

    def views(self, image_size):
        return ViewTransform([basic_view(image_size, scale=(0.2, 1.0))], "mae")

    def on_train_start(self, trainer) -> None:
        for group in trainer.optimizer.param_groups:
            if "betas" in group:
                group["betas"] = (group["betas"][0], self.beta2)

    def forward_encoder(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, int]]:
        """Encoded prefix + visible tokens, the mask, the unshuffle indices and the patch grid."""
        trunk = self.trunk
        tokens = trunk.patch_embed(x)  # (N, h, w, D): the trunk is built with dynamic image sizes
        grid = tuple(tokens.shape[1:3])
        tokens = trunk.norm_pre(trunk._pos_embed(tokens))
        prefix = trunk.num_prefix_tokens
        visible, mask, restore = random_masking(tokens[:, prefix:], self.hp["mask_ratio"])
        latent = trunk.norm(trunk.blocks(torch.cat([tokens[:, :prefix], visible], dim=1)))
        return latent, mask, restore, grid

    def forward_decoder(self, latent: torch.Tensor, restore: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Predicted pixels (N, L, patch * patch * 3) of every patch."""
        prefix = self.trunk.num_prefix_tokens
        y = self.decoder_embed(latent)
        n, length, d = y.shape[0], restore.shape[1], y.shape[2]
        patches = torch.cat([y[:, prefix:], self.mask_token.to(y.dtype).expand(n, length + prefix - y.shape[1], -1)],
                            dim=1)
        patches = torch.gather(patches, 1, restore[..., None].expand(-1, -1, d))
        pos = sincos_pos_embed(d, *grid).to(y.device, y.dtype)
        y = torch.cat([y[:, :prefix], patches + pos], dim=1)  # prefix tokens: position embedding 0
        y = self.decoder_norm(self.decoder_blocks(y))
        return self.decoder_pred(y[:, prefix:])

    def training_step(self, batch: Batch):
        x = batch.views[0]
        latent, mask, restore, grid = self.forward_encoder(x)
        pred = self.forward_decoder(latent, restore, grid)
        target = patchify(x, self.trunk.patch_embed.patch_size[0])
        return mae_loss(pred, target, mask, bool(self.hp["norm_pix_loss"]))
