"""Ego-motion equivariance (Jayaraman & Grauman, ICCV 2015, "Learning image representations tied to ego-motion"):
features that change predictably with the camera's motion.

Motion classes (``on_train_start``, as the paper discretises KITTI's ego-motion by k-means over its yaw and forward
motions): the (forward, turn) of every frame pair of the training sequences at most ``max_gap`` frames apart
(either direction), each dimension divided by its standard deviation, clustered by k-means (Lloyd,
``kmeans_iters``, seeded) into ``n_motions`` classes g; a pair's class is its nearest centre
(:func:`motion_classes`).

Data (per example, ``EquivarianceSampler``): a frame a and two distinct partners b, c within ``max_gap`` frames of
it (either direction), with the motions a -> b and a -> c (``evalsuite.data.video.relative_pose``).

Network and loss: the trunk's pooled embedding and a linear layer to z (``dim``); one learned ``dim`` x ``dim``
map M_g per class (initialised to the identity). ``pretrain.losses.equivariance_loss`` (the contrastive loss of
M_g z(x) against z(y), margin ``margin``) over: (a, b) under g_ab and (a, c) under g_ac pulled together; (a, c)
under g_ab and (a, b) under g_ac pushed apart when the two motions' classes differ; (a, b') under g_ab pushed apart,
with b' the b frame of the next example in the batch (another sequence, or the same one more than ``max_gap``
frames from a). The paper adds this to a supervised classification loss; here it trains alone (docs).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from evalsuite.data.video import relative_pose
from evalsuite.errors import UserError

from ..base import Batch, optim_config
from ..losses import equivariance_loss
from ..video import VideoMethod, VideoSampler, read_frames
from .kmeans_init import kmeans

#: the motion dimensions clustered: forward and turn of (forward, left, turn)
CLUSTER_DIMS = (0, 2)


def motion_classes(motion: torch.Tensor, scale: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """The class of each (..., 3) motion: the nearest of ``centroids`` (G, 2) to its (forward, turn) / ``scale``
    (the first of equally near ones). Long (...)."""
    x = motion[..., list(CLUSTER_DIMS)].float() / scale
    d = torch.cdist(x.reshape(-1, 2), centroids.float())
    return d.argmin(1).view(motion.shape[:-1])


def pair_motions(poses: np.ndarray, max_gap: int) -> np.ndarray:
    """(forward, left, turn) of every ordered pair (a, a + k) of a sequence, 1 <= |k| <= max_gap: (M, 3)."""
    n = len(poses)
    a, b = [], []
    for k in range(1, max_gap + 1):
        first = np.arange(n - k)
        a += [first, first + k]
        b += [first + k, first]
    return relative_pose(poses[np.concatenate(a)], poses[np.concatenate(b)]) if a else np.zeros((0, 3))


class EquivarianceSampler(VideoSampler):
    """Frames (a, b, c), b and c distinct and within ``max_gap`` of a (at a sequence's end with ``max_gap`` 1: the
    two nearest frames on one side): keys ``frames`` (3, 3, S, S), ``motion`` (2, 3) the motions a -> b and
    a -> c, ``time`` (3,)."""

    name = "equivariance_pairs"

    def __init__(self, image_size: int, max_gap: int = 1, crop_scale_min: float = 1.0):
        super().__init__(image_size, crop_scale_min, flip=False)  # a flip would mirror the motion
        self.max_gap = int(max_gap)

    @property
    def min_frames(self) -> int:
        return 3  # a and two partners

    def draw(self, dataset, video: int, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        n = dataset.info(video).num_frames
        a = int(rng.integers(n))
        near = [f for f in range(a - self.max_gap, a + self.max_gap + 1) if f != a and 0 <= f < n]
        if len(near) < 2:
            near = [f for f in (a + 1, a + 2, a - 1, a - 2) if 0 <= f < n][:2]
        b, c = (int(f) for f in rng.choice(near, size=2, replace=False))
        poses = dataset.poses(video)
        return {"frames": self.crop(read_frames(dataset, video, [a, b, c]), rng),
                "motion": torch.tensor(relative_pose(poses[[a, a]], poses[[b, c]]), dtype=torch.float32),
                "time": torch.tensor([a, b, c])}

    def settings(self) -> dict:
        return {"max_gap": self.max_gap}


class EgomotionEquivariance(VideoMethod):
    name = "egomotion_equivariance"
    description = "ego-motion equivariance: a learned linear map per discretised motion carries a frame's " \
                  "embedding onto the next frame's (contrastive loss against other motions)"
    data_kinds = ("egomotion",)
    defaults = {"n_motions": 6, "max_gap": 1, "dim": 128, "margin": 1.0, "kmeans_iters": 20, "crop_scale_min": 1.0}
    optim = optim_config("sgd", lr=0.01, weight_decay=5e-4, base_batch_size=128)
    short = {"hp": {"max_gap": 2, "dim": 64}, "optim": {"lr": 0.05}}

    def __init__(self, arch, hp=None, **kw):
        super().__init__(arch, hp, **kw)
        hp = self.hp
        if hp["n_motions"] < 2 or hp["max_gap"] < 1 or hp["dim"] < 1 or hp["margin"] <= 0 or hp["kmeans_iters"] < 1:
            raise UserError("egomotion_equivariance: needs n_motions >= 2, max_gap >= 1, dim >= 1, margin > 0, "
                            "kmeans_iters >= 1")
        self.head = nn.Linear(self.feat_dim, hp["dim"])
        self.maps = nn.Parameter(torch.eye(hp["dim"]).repeat(hp["n_motions"], 1, 1))
        self.register_buffer("motion_scale", torch.ones(2))
        self.register_buffer("centroids", torch.zeros(hp["n_motions"], 2))
        self.class_counts: list[int] = []

    def sampler(self, image_size):
        return EquivarianceSampler(image_size, self.hp["max_gap"], self.hp["crop_scale_min"])

    @torch.no_grad()
    def on_train_start(self, trainer) -> None:
        hp, data = self.hp, trainer.data
        motions = np.concatenate([pair_motions(data.poses(i), hp["max_gap"]) for i in range(trainer.n_images)])
        if len(motions) < 2:
            raise UserError("egomotion_equivariance: the training sequences have fewer than 2 frame pairs")
        x = torch.from_numpy(motions[:, list(CLUSTER_DIMS)]).float()
        scale = x.std(0, unbiased=False).clamp_min(1e-8)
        k = min(hp["n_motions"], len(x))
        centroids = kmeans(x / scale, k, hp["kmeans_iters"], torch.Generator().manual_seed(self.seed))
        if k < hp["n_motions"]:  # copies of the first centre never win a tie: those classes stay unused
            centroids = torch.cat([centroids, centroids[:1].expand(hp["n_motions"] - k, -1)])
        self.motion_scale.copy_(scale)
        self.centroids.copy_(centroids)
        classes = motion_classes(torch.from_numpy(motions), scale, centroids)
        self.class_counts = torch.bincount(classes, minlength=hp["n_motions"]).tolist()

    def training_step(self, batch: Batch):
        frames, motion, t, video = batch.extra["frames"], batch.extra["motion"], batch.extra["time"], batch.index
        n = frames.shape[0]
        z = self.head(self.embed(frames.flatten(0, 1))).view(n, 3, -1)
        za, zb, zc = z.unbind(1)
        g = motion_classes(motion, self.motion_scale, self.centroids)
        g_ab, g_ac = g.unbind(1)
        differ = (g_ab != g_ac).float()
        far = ((video != video.roll(-1)) | ((t[:, 0] - t[:, 1].roll(-1)).abs() > self.hp["max_gap"])).float()
        ones = torch.ones(n, device=z.device)
        loss = equivariance_loss(
            torch.cat([za] * 5), torch.cat([zb, zc, zc, zb, zb.roll(-1, 0)]), self.maps,
            torch.cat([g_ab, g_ac, g_ab, g_ac, g_ab]), torch.cat([ones, ones, 0 * ones, 0 * ones, 0 * ones]),
            self.hp["margin"], weight=torch.cat([ones, ones, differ, differ, far]))
        with torch.no_grad():
            pred = torch.einsum("bij,bj->bi", self.maps[g_ab].float(), za.float())
            logs = {"d_pos": float((pred - zb.float()).norm(dim=1).mean()),
                    "d_neg": float((pred - zb.roll(-1, 0).float()).norm(dim=1).mean())}
        return loss, logs

    def metadata(self) -> dict:
        scale = self.motion_scale.cpu()
        return {**super().metadata(), "egomotion_equivariance": {
            "cluster_dims": ["forward", "turn"], "motion_scale": [round(float(s), 6) for s in scale],
            "centroids": [[round(float(v), 6) for v in c * scale] for c in self.centroids.cpu()],
            "pairs_per_class": self.class_counts}}
