"""Label-free representation quality from the spectrum and geometry of cached features, per tap.

For each tap: the features (the protocol's pooling, global average by default) of a seeded sample of
``num_images`` images of one split, through the feature cache, then (:mod:`tasks.spectrum.metrics`)

- ``rankme``: RankMe (Garrido et al. 2023), the effective rank of the feature matrix: the headline metric;
- ``alpha_req``: alpha-ReQ (Agrawal et al. 2022), the power-law decay exponent of the covariance eigenspectrum (the
  fit's R^2 and the eigenvalues fitted are in the record's params);
- ``uniformity``: Wang & Isola 2020's log mean exp(-t ||x - y||^2) over all pairs of L2-normalised features (of a
  seeded ``uniformity_images`` of the sample: the pairs cost N^2 x D; lower is more uniform);
- ``alignment``: Wang & Isola 2020's mean ||f(x) - f(x')||^alpha between the L2-normalised features of each image
  and of a second, deterministic view of it (``alignment_view``: the mirrored image by default; lower is better).
  ``alignment_view=none`` skips it and its second extraction.

Presets: ``goyal19`` follows the papers (25,600 training images, eps 1e-7, the alpha fit over eigenvalues 10-99,
t = 2, alpha = 2) with DINO's kNN transform (none of the papers fixes one); ``quick``: 64 px, 512 images. The
metrics have no VISSL or DINO version: ``vissl`` and ``dino21`` are refused.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from evalsuite.data import Subset
from evalsuite.errors import BadData, UserError
from evalsuite.features import check_features
from evalsuite.plan import TaskPlan
from evalsuite.protocols import FeatureTaskProtocol, Interpolation, Pooling, ResizeMode, preset_changes
from evalsuite.results import Result
from evalsuite.task import TaskContext
from tasks.spectrum import metrics as M
from tasks.spectrum.conformance import CONFORMANCE
from tasks.spectrum.views import describe_view, view_transform

AlignmentView = Literal["hflip", "goyal19", "vissl", "dino21", "none"]


@dataclass(frozen=True)
class SpectrumProtocol(FeatureTaskProtocol):
    """The ``goyal19`` values: the papers' settings (see :mod:`tasks.spectrum.conformance`)."""

    layers: tuple[str, ...] | None = None  # every tap of the trunk
    pooling: Pooling = "avg"
    resize_mode: ResizeMode = "center_crop"
    resize: int | None = 256
    interpolation: Interpolation = "bilinear"
    num_images: int = 25600  # a seeded sample of the split; all of it when smaller
    rankme_eps: float = M.RANKME_EPS
    alpha_fit_start: int = 10  # 0-based eigenvalue indices [start, stop) of the power-law fit
    alpha_fit_stop: int = 100
    uniformity_t: float = 2.0
    uniformity_images: int = 4096  # pairs of a seeded sample of the sample: N^2 / 2 pairs cost N^2 x D
    alignment_alpha: float = 2.0
    alignment_view: AlignmentView = "hflip"


#: each preset as its changes to the goyal19 values (no VISSL or DINO version of these metrics)
_PRESET_CHANGES: dict[str, dict[str, Any]] = {
    "goyal19": {},
    "quick": {"image_size": 64, "resize": None, "num_images": 512},
}


def sample_indices(n: int, k: int, seed: int) -> np.ndarray:
    """Ascending indices of ``k`` of ``n`` samples drawn without replacement by a generator seeded with ``seed``;
    every index when ``k >= n``."""
    if k >= n:
        return np.arange(n, dtype=np.int64)
    return np.sort(np.random.default_rng([int(seed), n, k]).choice(n, size=k, replace=False)).astype(np.int64)


def tap_metrics(x: np.ndarray, y: np.ndarray | None, p: SpectrumProtocol,
                seed: int) -> list[tuple[str, float | None, str, dict]]:
    """``(metric, value, note, extra params)`` of one tap's features ``x`` (and ``y``, the second view's)."""
    rank = M.rankme(x, p.rankme_eps)
    out = [("rankme", rank, "" if np.isfinite(rank) else "every feature is zero: no spectrum", {})]
    eig = M.covariance_eigenvalues(x)
    lo, hi = M.alpha_fit_range(eig, p.alpha_fit_start, p.alpha_fit_stop)
    if hi - lo < 2:
        out.append(("alpha_req", None, f"the features of {len(x)} images have {hi} non-zero covariance eigenvalues: "
                                       f"too few to fit from index {lo}", {}))
    else:
        fit = M.powerlaw_fit(eig, lo, hi)
        out.append(("alpha_req", fit.alpha, "", {"alpha_fit_range": [fit.start, fit.stop], "alpha_fit_r2": fit.r2}))
    pairs = sample_indices(len(x), p.uniformity_images, seed)
    out.append(("uniformity", M.uniformity(x[pairs], p.uniformity_t), "", {"uniformity_images_used": len(pairs)}))
    if y is not None:
        out.append(("alignment", M.alignment(x, y, p.alignment_alpha), "", {}))
    return out


class SpectrumTask:
    name = "spectrum"
    description = ("label-free representation quality per tap: RankMe, alpha-ReQ, and Wang & Isola's uniformity "
                   "and alignment, on a seeded sample of cached features")
    headline_metrics = ("rankme",)
    lower_is_better = ("uniformity", "alignment")
    conformance = CONFORMANCE
    # the image sample (a split larger than num_images), the uniformity pairs and an augmented alignment view
    seeded = True

    def default_protocol(self, preset: str) -> SpectrumProtocol:
        return SpectrumProtocol(**preset_changes(_PRESET_CHANGES, preset, self.name))

    def run(self, ctx: TaskContext) -> list[Result]:
        p: SpectrumProtocol = ctx.protocol
        for name in ("num_images", "uniformity_images"):
            if getattr(p, name) < 2:
                raise UserError(f"spectrum.{name} must be at least 2, got {getattr(p, name)}")
        (data,) = ctx.open_splits(p.train_split)
        if len(data) < 2:
            raise BadData(f"spectrum needs at least 2 images, the {p.train_split} split has {len(data)}", data.root)
        idx = sample_indices(len(data), p.num_images, ctx.seed)
        sample = Subset(data, idx)
        taps = ctx.taps(p.layers)
        transform = ctx.transform()
        specs = ctx.extractor.pool_specs(taps, p.pooling, transform)
        feats = ctx.features(sample, taps, pooling=p.pooling, transform=transform)
        second = None
        if p.alignment_view != "none":
            second = ctx.features(sample, taps, pooling=p.pooling,
                                  transform=view_transform(transform, p.alignment_view, ctx.seed))
        common = {
            "images_sampled": len(sample), "images_in_split": len(data),
            "subsample": "all images" if len(idx) == len(data) else f"seeded sample (seed {ctx.seed})",
            "sample_sha256": hashlib.sha256(idx.tobytes()).hexdigest(), "transform": transform.to_dict(),
            "view": None if second is None else describe_view(p.alignment_view),
        }
        out: list[Result] = []
        for tap in taps:
            x = np.asarray(feats.pop(tap), dtype=np.float64)
            check_features(x, f"{p.train_split} {tap} features", data.root)
            y = None
            if second is not None:
                y = np.asarray(second.pop(tap), dtype=np.float64)
                check_features(y, f"{p.train_split} {tap} features of the {p.alignment_view} view", data.root)
            params = {**common, "feature_dim": int(x.shape[1]), "pool_op": specs[tap].op}
            for metric, value, note, extra in tap_metrics(x, y, p, ctx.seed):
                out.append(ctx.result(p.dataset, p.train_split, tap, metric, value, params={**params, **extra},
                                      note=note, dataset_fingerprint=sample.fingerprint()))
        return out

    def plan(self, ctx: TaskContext) -> TaskPlan:
        """The sample's features, twice with the alignment view."""
        p: SpectrumProtocol = ctx.protocol
        (data,) = ctx.open_splits(p.train_split)
        n = min(len(data), p.num_images) * (1 if p.alignment_view == "none" else 2)
        return TaskPlan(images={p.train_split: n}, image_size=p.image_size,
                        note="" if p.alignment_view == "none" else f"x2: the {p.alignment_view} view")


task = SpectrumTask()
