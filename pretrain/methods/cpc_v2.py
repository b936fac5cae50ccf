"""CPC v2 (Henaff et al., ICML 2020, "Data-Efficient Image Recognition with Contrastive Predictive Coding"):
CPC v1 (``cpc.py``) with the changes of the paper's Sec. 4.1 and the pseudo-code and pipeline of its App. A.

- Data (per image, in the loader): the image resized to ``resize_frac`` x size square (300 for a 260 crop), a random
  ``size`` crop (and v1's horizontal flip), cut into a ``grid`` x ``grid`` grid of patches of ``patch_frac`` x size
  (6 x 6 patches of 80 px, stride 36, at 260 px). With ``patch_aug`` every patch is augmented on its own
  (:class:`PatchAugment`), in App. A.2's order: two random AutoAugment operations (Cubuk et al. 2018, torchvision's
  RandAugment list at its default magnitude), elastic deformation + shear with p ``elastic`` = 0.2, the Inception
  colour distortion (Szegedy et al. 2014) with p ``colour_jitter`` = 0.8, grey-scale with p ``gray`` = 0.25.
  Off by default, each a switch: v1's per-patch spatial jitter (``subcrop`` = 60/64: a random 60 x 60 sub-crop
  of a 64 px patch padded back) and Sec. 4.1's colour dropping (``colour_drop``: keep one random channel).
- Model: each patch through the trunk, mean-pooled (the latents z, ``feat_dim`` wide: no projection). For each of
  ``directions`` directions (top-down, bottom-up, left-right, right-left; Sec. 4.1 "predicting lengths and
  directions") its own context network (:class:`PixelCNNContext`, App. A's ``pixelCNN``: 5 masked residual blocks
  with a 256-wide bottleneck), its own 1x1 target projection to ``target_dim`` = 64 and one 1x1 predictor per
  offset, scaled by ``emb_scale`` = 0.1. A direction is the top-down task on the latent grid rotated by 90 degree
  steps (:data:`DIRECTIONS`).
- Loss (:func:`direction_losses`, App. A's ``CPC``): for offsets k = ``steps_to_ignore`` + 1 .. ``steps_to_predict``
  (k = 3 only, the reference's defaults: the first patch that does not overlap the context's rows), InfoNCE
  of each prediction against every patch of every image of the batch (other locations and other images);
  summed over k, averaged over the directions.

Deviations (docs/pretraining.md, "CPC v2"): the trunk keeps its BatchNorm (the paper's layer normalisation would
be another evaluated architecture: every task builds and loads the standard torchvision ResNet); the trunk is
any of ours (ResNet-161 in the paper); App. A.2's colour-histogram augmentation (De Fauw et al. 2018) is left
out and its elastic/shear use torchvision's primitives; negatives are not gathered across processes; the
``paper`` optimiser is CPC v1's (Adam, lr 2e-4, no weight decay): the v2 paper's own values were not in any
source we could read.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms import v2 as T

from evalsuite.errors import UserError

from ..augment import resized_crop_view
from ..base import Batch, Method, optim_config
from ..pretext import PretextView, color_drop
from .cpc import patch_grid, row_prediction_loss

#: direction name -> number of 90-degree rotations (torch.rot90 over the grid's rows and columns) that turn it
#: into the top-down task: after k = 1 the rows are the original columns from the right, so "below" is "left"
DIRECTIONS = {"top_down": 0, "bottom_up": 2, "left_right": 3, "right_left": 1}
#: AutoAugment's shear range (magnitude 0.3, i.e. atan(0.3) = 16.7 degrees), used for App. A.2's shearing
SHEAR_DEGREES = 16.7


def grid_geometry(size: int, grid: int, patch_frac: float) -> tuple[int, int]:
    """(patch, stride) in pixels of a ``grid`` x ``grid`` patch grid over a ``size`` crop: patches of
    ``patch_frac`` x size, evenly spaced to fit (80 px at stride 36 for 6 x 6 over 260 px)."""
    patch = max(1, round(size * patch_frac))
    stride = (size - patch) // (grid - 1) if grid > 1 else 0
    if stride < 1:
        raise UserError(f"cpc_v2: a {grid} x {grid} grid of {patch} px patches does not fit a {size} px crop")
    return patch, stride


def subcrop_pad(patch: torch.Tensor, side: int, fill: float = 0.5) -> torch.Tensor:
    """A random ``side`` x ``side`` sub-crop of a (C, P, P) patch padded back to P (centred, ``fill``): CPC v1's
    per-patch spatial jitter (60 x 60 sub-crops of the 64 px patches)."""
    c, p, _ = patch.shape
    y, x = torch.randint(0, p - side + 1, (2,)).tolist()
    out = torch.full_like(patch, fill)
    o = (p - side) // 2
    out[:, o : o + side, o : o + side] = patch[:, y : y + side, x : x + side]
    return out


class PatchAugment:
    """CPC v2's augmentation of one (C, P, P) patch in [0, 1] (App. A.2, with the switches of the module
    docstring); random draws from torch's global generator, which the trainer seeds per image."""

    def __init__(self, patch: int, hp: dict):
        s = patch / 80  # torchvision's elastic defaults (alpha 50, sigma 5) at the paper's 80 px patches
        self.hp = hp
        self.side = max(1, round(patch * hp["subcrop"]))
        self.autoaugment = T.RandAugment(num_ops=hp["autoaugment_ops"]) if hp["autoaugment_ops"] > 0 else None
        self.elastic = T.Compose([T.ElasticTransform(alpha=50.0 * s, sigma=5.0 * s),
                                  T.RandomAffine(0, shear=(-SHEAR_DEGREES, SHEAR_DEGREES) * 2)])
        # the Inception colour distortion (TF-slim inception_preprocessing.distort_color ranges, brightness as
        # torchvision's factor rather than TF's additive delta), in a random order
        self.jitter = T.ColorJitter(brightness=32 / 255, contrast=0.5, saturation=0.5, hue=0.2)
        self.gray = T.Grayscale(num_output_channels=3)

    def _maybe(self, p: float) -> bool:
        return p > 0 and float(torch.rand(())) < p

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        hp = self.hp
        if self.side < x.shape[-1]:
            x = subcrop_pad(x, self.side)
        if self.autoaugment is not None:
            x = self.autoaugment(x)
        if self._maybe(hp["elastic"]):
            x = self.elastic(x)
        if self._maybe(hp["colour_jitter"]):
            x = self.jitter(x)
        if self._maybe(hp["colour_drop"]):
            x = color_drop(x)
        if self._maybe(hp["gray"]):
            x = self.gray(x)
        return x.clamp(0, 1)

    def __repr__(self) -> str:
        keys = ("subcrop", "autoaugment_ops", "elastic", "colour_jitter", "colour_drop", "gray")
        return "PatchAugment(" + ", ".join(f"{k}={self.hp[k]}" for k in keys) + ")"


def augment_patches(patches: torch.Tensor, augment) -> torch.Tensor:
    """(N, C, P, P) -> each patch through ``augment`` on its own (its own random draws)."""
    return torch.stack([augment(p) for p in patches])


class PixelCNNContext(nn.Module):
    """App. A's ``pixelCNN``: ``blocks`` residual blocks of 1x1 conv to ``width`` + ReLU, 1x3 conv, one row of zero
    padding on top and a 2x1 valid conv + ReLU, 1x1 conv back to ``dim``; ReLU at the end. The output at row i
    depends on input rows <= i only."""

    def __init__(self, dim: int, width: int = 256, blocks: int = 5):
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(dim, width, 1), nn.ReLU(inplace=True),
                          nn.Conv2d(width, width, (1, 3), padding=(0, 1)), nn.ZeroPad2d((0, 0, 1, 0)),
                          nn.Conv2d(width, width, (2, 1)), nn.ReLU(inplace=True), nn.Conv2d(width, dim, 1))
            for _ in range(blocks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block(x)
        return F.relu(x)


class DirectionHead(nn.Module):
    """One prediction direction: its context network, target projection and one predictor per offset."""

    def __init__(self, dim: int, width: int, blocks: int, target_dim: int, n_offsets: int):
        super().__init__()
        self.context = PixelCNNContext(dim, width, blocks)
        self.target = nn.Conv2d(dim, target_dim, 1)
        self.predictors = nn.ModuleList(nn.Conv2d(dim, target_dim, 1) for _ in range(n_offsets))


def direction_losses(latents: torch.Tensor, heads, directions, offsets, emb_scale: float) -> torch.Tensor:
    """latents (B, D, g, g); one head per name in ``directions``. Per direction: the grid rotated so that the
    direction runs top-down, context and targets from the rotated grid, and the sum over the offsets k of
    :func:`row_prediction_loss` (predictions x ``emb_scale``). Returns the (len(directions),) losses."""
    out = []
    for name, head in zip(directions, heads):
        z = torch.rot90(latents, DIRECTIONS[name], dims=(2, 3))
        context, targets = head.context(z), head.target(z)
        out.append(sum(row_prediction_loss(w(context) * emb_scale, targets, k)
                       for w, k in zip(head.predictors, offsets)))
    return torch.stack(out)


def check_settings(hp: dict) -> None:
    """Refuse settings the model cannot run with, in one line each."""
    if not 1 <= hp["directions"] <= len(DIRECTIONS):
        raise UserError(f"cpc_v2: directions must be 1..{len(DIRECTIONS)} (top-down, bottom-up, left-right, "
                        f"right-left in that order), not {hp['directions']}")
    if not 0 <= hp["steps_to_ignore"] < hp["steps_to_predict"] < hp["grid"]:
        raise UserError("cpc_v2: need 0 <= steps_to_ignore < steps_to_predict < grid, got "
                        f"{hp['steps_to_ignore']}, {hp['steps_to_predict']}, {hp['grid']}")
    if not 0 < hp["subcrop"] <= 1:
        raise UserError(f"cpc_v2: subcrop is a fraction of the patch in (0, 1], not {hp['subcrop']}")


class CPCV2(Method):
    name = "cpc_v2"
    description = ("CPC v2: per-patch augmentation, PixelCNN context and InfoNCE in four directions "
                   "(top-down, bottom-up, left-right, right-left)")
    defaults = {"directions": 4, "grid": 6, "patch_frac": 80 / 260, "resize_frac": 300 / 260, "flip": True,
                "context_width": 256, "context_blocks": 5, "target_dim": 64, "emb_scale": 0.1,
                "steps_to_ignore": 2, "steps_to_predict": 3, "patch_aug": True, "subcrop": 1.0,
                "autoaugment_ops": 2, "elastic": 0.2, "colour_jitter": 0.8, "colour_drop": 0.0, "gray": 0.25}
    optim = optim_config("adam", lr=2e-4, weight_decay=0.0)  # CPC v1's: see the module docstring
    n_views = 1

    def __init__(self, arch, hp=None, **kw):
        super().__init__(arch, hp, **kw)
        hp = self.hp
        check_settings(hp)
        #: the prediction directions, in DIRECTIONS' order, and the offsets k (rows ahead)
        self.directions = list(DIRECTIONS)[: hp["directions"]]
        self.offsets = list(range(hp["steps_to_ignore"] + 1, hp["steps_to_predict"] + 1))
        self.heads = nn.ModuleList(
            DirectionHead(self.feat_dim, hp["context_width"], hp["context_blocks"], hp["target_dim"],
                          len(self.offsets)) for _ in self.directions)

    def views(self, image_size):
        hp = self.hp
        patch, stride = grid_geometry(image_size, hp["grid"], hp["patch_frac"])
        augment = PatchAugment(patch, hp) if hp["patch_aug"] else None
        g = hp["grid"]

        def fn(crop):
            grid = patch_grid(crop[None], patch, stride)[0, :g, :g]  # (g, g, C, P, P)
            if augment is not None:
                grid = augment_patches(grid.flatten(0, 1), augment).view(grid.shape)
            return [grid]

        crop = resized_crop_view(image_size, max(image_size, round(image_size * hp["resize_frac"])), hp["flip"])
        return PretextView(image_size, fn, "cpc_v2", crop=crop,
                           info={"grid": g, "patch": patch, "stride": stride, "patch_augment": repr(augment)})

    def training_step(self, batch: Batch):
        x = batch.views[0]  # (B, g, g, C, P, P), normalised by preprocess
        b, g = x.shape[:2]
        z = self.embed(x.flatten(0, 2)).view(b, g, g, -1).permute(0, 3, 1, 2)  # latents (B, D, g, g)
        losses = direction_losses(z, self.heads, self.directions, self.offsets, self.hp["emb_scale"])
        return losses.mean(), {name: float(v) for name, v in zip(self.directions, losses.detach())}

    def metadata(self):
        return {**super().metadata(),
                "cpc_v2": {"directions": self.directions, "offsets": self.offsets,
                           "normalisation": "batch (the trunk's BatchNorm; the paper's layer norm is not used)"}}
