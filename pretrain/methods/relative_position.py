"""Context prediction / relative patch position (Doersch, Gupta & Efros, ICCV 2015).

Data (per image, in the loader): a centre patch and one of its 8 neighbours on a 3 x 3 layout with a gap
of ``gap_frac`` x patch between patches (48 px for 96 px patches in the paper) and an independent random
jitter of up to ``jitter_frac`` x patch (7 px) per patch, so that boundary continuation cannot solve the
task. Chromatic-aberration counter-measure (Sec. 3.1): ``colour = "drop"`` keeps one random colour
channel per patch and replaces the other two by low-variance Gaussian noise, ``"project"`` removes the
green-magenta axis; each patch is then mean/std normalised. Network: the same trunk on both patches,
pooled, concatenated, two fc layers, 8-way classification of the neighbour position.

Labels (row-major around the centre, :data:`OFFSETS`): 0 = up-left, 1 = up, 2 = up-right, 3 = left,
4 = right, 5 = down-left, 6 = down, 7 = down-right.
"""

from __future__ import annotations

import torch
from torch import nn

from ..base import Batch, Method, optim_config
from ..losses import classification_step
from ..pretext import PretextView, color_drop, color_project, normalize_tiles

#: (dy, dx) in units of patch + gap, for labels 0..7
OFFSETS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))


def patch_geometry(size: int, gap_frac: float = 0.5, jitter_frac: float = 7 / 96) -> tuple[int, int, int]:
    """(patch, gap, jitter) in pixels for a ``size`` crop that holds the 3 x 3 layout with its jitter:
    3 p + 2 g + 2 j <= size."""
    p = int(size / (3 + 2 * gap_frac + 2 * jitter_frac))
    g, j = int(round(gap_frac * p)), int(round(jitter_frac * p))
    while p > 1 and 3 * p + 2 * g + 2 * j > size:
        p -= 1
        g, j = int(round(gap_frac * p)), int(round(jitter_frac * p))
    return p, g, j


def patch_pair(img: torch.Tensor, label: int, gap_frac: float = 0.5, jitter_frac: float = 7 / 96,
               generator: torch.Generator | None = None) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
    """Cut (centre, neighbour ``label``) from a (C, S, S) crop: returns (pair (2, C, p, p), centre corner,
    neighbour corner). Nominal corners are (j + r (p + g), j + q (p + g)); each patch moves by its own
    jitter in [-j, j]^2."""
    size = min(img.shape[-2:])
    p, g, j = patch_geometry(size, gap_frac, jitter_frac)
    step = p + g
    centre0 = j + step  # nominal top-left of the centre cell
    dy, dx = OFFSETS[label]
    corners = []
    for oy, ox in ((0, 0), (dy, dx)):
        jy, jx = torch.randint(-j, j + 1, (2,), generator=generator).tolist()
        corners.append((centre0 + oy * step + jy, centre0 + ox * step + jx))
    pair = torch.stack([img[:, y : y + p, x : x + p] for y, x in corners])
    return pair, corners[0], corners[1]


def position_label(centre: tuple[int, int], neighbour: tuple[int, int]) -> int:
    """The label of the neighbour's direction from the centre: an axis counts as displaced when its
    displacement exceeds half of the largest one (jitter moves the other axis by at most 2j << p + g)."""
    dy, dx = neighbour[0] - centre[0], neighbour[1] - centre[1]
    half = max(abs(dy), abs(dx)) / 2
    sy = (dy > half) - (dy < -half)
    sx = (dx > half) - (dx < -half)
    return OFFSETS.index((sy, sx))


class RelativePosition(Method):
    name = "relative_position"
    description = "Context prediction (Doersch et al.): centre + 1 of 8 neighbours, gaps, jitter, " \
                  "colour dropping, 8-way position classification"
    defaults = {"gap_frac": 0.5, "jitter_frac": 7 / 96, "colour": "drop", "hidden": 4096,
                "crop_scale_min": 0.3}
    optim = optim_config("sgd", lr=0.01, weight_decay=5e-4)
    augment = "relative_position"
    n_views = 2

    def __init__(self, arch, hp=None, **kw):
        super().__init__(arch, hp, **kw)
        if self.hp["colour"] not in ("drop", "project", "none"):
            from evalsuite.errors import UserError

            raise UserError("relative_position: colour must be drop, project or none")
        h = self.hp["hidden"]
        self.pair_fc = nn.Sequential(nn.Linear(self.feat_dim, h // 2), nn.ReLU(inplace=True))
        self.classifier = nn.Sequential(nn.Linear(h, h), nn.ReLU(inplace=True), nn.Linear(h, 8))

    def views(self, image_size):
        hp = self.hp

        def fn(crop):
            label = int(torch.randint(0, 8, ()))
            pair, _, _ = patch_pair(crop, label, hp["gap_frac"], hp["jitter_frac"])
            if hp["colour"] == "drop":
                pair = torch.stack([color_drop(q) for q in pair])
            elif hp["colour"] == "project":
                pair = torch.stack([color_project(q) for q in pair])
            return [normalize_tiles(pair), torch.tensor(label)]

        p, g, j = patch_geometry(image_size, hp["gap_frac"], hp["jitter_frac"])
        return PretextView(image_size, fn, "relative_position", scale=(hp["crop_scale_min"], 1.0),
                           info={"patch": p, "gap": g, "jitter": j, "colour": hp["colour"]})

    def preprocess(self, x):
        return x  # patches are normalised per patch in the loader; the label view is an index

    def training_step(self, batch: Batch):
        pair, labels = batch.views[0], batch.views[1]  # (B, 2, C, p, p), (B,)
        b = pair.shape[0]
        codes = self.pair_fc(self.embed(pair.flatten(0, 1))).view(b, -1)
        return classification_step(self.classifier(codes), labels)
