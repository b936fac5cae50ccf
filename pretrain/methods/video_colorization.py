"""Tracking emerges by colorizing videos (Vondrick, Shrivastava, Fathi, Guadarrama & Murphy, ECCV 2018): colour a
gray target frame by pointing into coloured reference frames of the same video.

The authors released no code; where the paper leaves a detail open this follows the KakaoBrain reimplementation
(wbaek/tracking_via_colorization: bin/train_colorizer.py, networks/colorizer.py, networks/resnet_colorizer.py,
bin/clustering.py, configs/basic.yaml).

Data (per example, ``ColourCopySampler``): ``n_ref`` (3) reference frames and the target frame after them,
``stride`` frames apart, one crop for all.

Colours: the ab channels of Lab quantised into ``colours`` (16) clusters, fitted at the start of training on the ab
values of ``kmeans_examples`` training examples (at most ``kmeans_pixels`` pixels) by scikit-learn's KMeans, as the
reimplementation's bin/clustering.py; each frame's ab is averaged over the cells of the embedding map and assigned
its nearest cluster (the reimplementation resizes the frame to the map's size first).

Network: the trunk sees the frames' lightness (the ``gray`` input space: L repeated on three channels, as
``pretrain.methods.colorization``); a per-pixel embedding of ``dim`` (64) channels: for a ResNet the hypercolumn
head of the last three taps at the third-to-last tap's resolution (stride 8: the paper's 32 x 32 map of a 256 px
frame), for a ViT a 1x1 conv on the last block's patch tokens. Every target pixel attends over all reference pixels
(softmax of the embeddings' dot products / ``temperature``, 1 in training) and takes their colour distribution;
cross-entropy on its own colour (``pretrain.losses.colour_copy_loss``). Optimiser: Adam lr 1e-3 at batch 32, L2
weight decay 2e-4.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from evalsuite.colorspace import rgb_to_lab, to_input_space
from evalsuite.errors import UserError
from evalsuite.trunks import arch_info
from evalsuite.vit import ViTTaps, patch_grid

from ..base import Batch, optim_config
from ..losses import colour_copy_loss
from ..pretext import DenseHead, lab_of, tap_maps
from ..video import VideoMethod, VideoSampler, read_frames


def quantize_ab(ab: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """Nearest colour cluster of ab values (..., 2, h, w) among ``centres`` (K, 2): int64 (..., h, w)."""
    d2 = ((ab.unsqueeze(-4) - centres.to(ab).view(-1, 2, 1, 1)) ** 2).sum(-3)  # (..., K, h, w)
    return d2.argmin(-3)


def fit_colours(ab: np.ndarray, k: int, seed: int) -> np.ndarray:
    """k-means of ab values (N, 2) into ``k`` clusters as the KakaoBrain reimplementation's bin/clustering.py
    (scikit-learn's KMeans: k-means++ seeding, 10 restarts, at most 300 iterations): centres (k, 2) float32,
    largest cluster first."""
    from sklearn.cluster import KMeans

    x = np.asarray(ab, dtype=np.float64)
    if len(np.unique(x, axis=0)) < k:
        raise UserError(f"video_colorization: the training frames have fewer than {k} distinct colours; lower colours")
    km = KMeans(k, init="k-means++", n_init=10, max_iter=300, random_state=seed).fit(x)
    sizes = np.bincount(km.labels_, minlength=k)
    return km.cluster_centers_[np.argsort(-sizes, kind="stable")].astype(np.float32)


class ColourCopySampler(VideoSampler):
    """``n_ref`` reference frames then the target: ``frames`` (n_ref + 1, 3, S, S), ``time`` (n_ref + 1,)."""

    name = "colour_copy"

    def __init__(self, image_size: int, n_ref: int = 3, stride: int = 1, crop_scale_min: float = 1.0,
                 flip: bool = False):
        super().__init__(image_size, crop_scale_min, flip)
        self.n_ref, self.stride = int(n_ref), int(stride)

    @property
    def min_frames(self) -> int:
        return self.n_ref * self.stride + 1

    def draw(self, dataset, video: int, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        n = dataset.info(video).num_frames
        t0 = int(rng.integers(0, n - self.n_ref * self.stride))
        t = [t0 + k * self.stride for k in range(self.n_ref + 1)]
        return {"frames": self.crop(read_frames(dataset, video, t), rng), "time": torch.tensor(t)}

    def settings(self) -> dict:
        return {"n_ref": self.n_ref, "stride": self.stride}


class VideoColorization(VideoMethod):
    name = "video_colorization"
    description = "colorizing videos: colour a gray target frame by attention over the quantised colours of " \
                  "reference frames (cross-entropy)"
    defaults = {"n_ref": 3, "stride": 1, "colours": 16, "dim": 64, "temperature": 1.0, "head_hidden": 256,
                "kmeans_examples": 256, "kmeans_pixels": 100000, "crop_scale_min": 1.0,
                "flip": False}
    optim = optim_config("adam", lr=1e-3, weight_decay=2e-4, base_batch_size=32)
    short = {"hp": {"kmeans_examples": 64, "kmeans_pixels": 20000}}
    input_space = "gray"

    def __init__(self, arch, hp=None, **kw):
        super().__init__(arch, hp, **kw)
        hp = self.hp
        if not (hp["n_ref"] >= 1 and hp["stride"] >= 1 and hp["colours"] >= 2 and hp["temperature"] > 0
                and hp["kmeans_examples"] >= 1):
            raise UserError("video_colorization: needs n_ref >= 1, stride >= 1, colours >= 2, temperature > 0, "
                            "kmeans_examples >= 1")
        self.vit = isinstance(self.trunk, ViTTaps)
        if self.vit:
            self.head = nn.Conv2d(self.feat_dim, hp["dim"], 1)
        else:
            self.head = DenseHead(list(arch_info(arch)["channels"][-3:]), hp["dim"], hp["head_hidden"])
        self.register_buffer("centres", torch.zeros(hp["colours"], 2))
        self.register_buffer("fitted", torch.tensor(False))

    def sampler(self, image_size):
        hp = self.hp
        return ColourCopySampler(image_size, hp["n_ref"], hp["stride"], hp["crop_scale_min"], hp["flip"])

    def preprocess(self, x):
        return to_input_space(x, "lab")  # the trunk gets the L channel only (embed), ab gives the colours

    @torch.no_grad()
    def on_train_start(self, trainer) -> None:
        if bool(self.fitted):  # resumed: the clusters came with the state
            return
        ds, hp = trainer.dataset, self.hp
        n = min(len(ds), hp["kmeans_examples"])
        picks = torch.linspace(0, len(ds) - 1, n).long().tolist()
        ab = torch.cat([rgb_to_lab(ds[i][0]["frames"].float())[:, 1:].permute(0, 2, 3, 1).reshape(-1, 2)
                        for i in picks])
        keep = torch.randperm(ab.shape[0], generator=torch.Generator().manual_seed(self.seed))[:hp["kmeans_pixels"]]
        centres = fit_colours(ab[keep].numpy(), hp["colours"], self.seed)
        self.centres.copy_(torch.from_numpy(centres).to(self.centres))
        self.fitted.fill_(True)

    def embed_map(self, gray: torch.Tensor) -> torch.Tensor:
        """Gray frames in the input space (N, 3, H, W) -> per-pixel embeddings (N, dim, h, w)."""
        if self.vit:
            tap = f"block{len(self.trunk.blocks) - 1}"
            return self.head(patch_grid(self.trunk(gray, [tap])[tap], self.trunk.num_prefix_tokens))
        return self.head(tap_maps(self.trunk, gray, 3))

    def training_step(self, batch: Batch):
        lab = batch.extra["frames"]  # (B, n_ref + 1, 3, S, S) scaled Lab
        b, f = lab.shape[:2]
        x = lab.flatten(0, 1)
        emb = self.embed_map(x[:, :1].expand(-1, 3, -1, -1)).float()  # the gray input space: L on three channels
        d, h, w = emb.shape[1:]
        ab = F.adaptive_avg_pool2d(lab_of(x.float())[:, 1:], (h, w))
        colours = quantize_ab(ab, self.centres).view(b, f, h * w)
        emb = emb.view(b, f, d, h * w).transpose(2, 3)  # (B, F, hw, d)
        loss, logs = colour_copy_loss(emb[:, -1], emb[:, :-1].flatten(1, 2), colours[:, -1],
                                      colours[:, :-1].flatten(1), self.hp["temperature"])
        return loss, logs

    def metadata(self) -> dict[str, Any]:
        return {**super().metadata(), "colour_clusters": [[round(float(v), 3) for v in c] for c in self.centres]}
