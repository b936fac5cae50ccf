"""Surface-normal metrics as pure functions (NYUv2 protocol of Fouhey et al. 2013 / Wang et al. 2015,
used unchanged by Goyal et al. 2019).

For every valid ground-truth pixel the error is the angle between the predicted and the true normal,
in degrees. The errors of *all valid pixels of the whole test set* are pooled (not averaged per image)
and summarised as mean, median and RMSE angle, and the percentage of pixels whose error is below
11.25, 22.5 and 30 degrees.

The angle is computed as ``atan2(|p x g|, p . g)`` on unit vectors, which stays accurate near 0 and
180 degrees where ``arccos`` loses precision.

Ground truth is checked here (:func:`validate_ground_truth`) so that every reader and task refuses the
same things: a mask of the wrong shape, a mask with no valid pixel, non-finite or far-from-unit normals
inside the mask. Non-finite values *outside* the mask are ignored (real NYUv2 normals have holes there).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from evalsuite.errors import BadData
from evalsuite.outputs import MetricOutputs, SampleOutputs
from evalsuite.stats import histogram_median

THRESHOLDS_DEG = (11.25, 22.5, 30.0)
#: tolerated |norm - 1| of a ground-truth normal before it is refused (8-bit PNG normals are not exactly unit)
UNIT_TOLERANCE = 0.1
#: histogram resolution of the pooled median (the mean, RMSE and threshold percentages are exact); per image, kept
#: as the record's per-sample outputs (654 NYUv2 images x 18001 bins: about 4.5 MB deflated)
MEDIAN_BIN_DEG = 0.01


def metric_names() -> list[str]:
    """Result-record metric names, in reporting order (matching ``references/surface_normals_nyuv2.csv``)."""
    return ["mean_angle_error_deg", "median_angle_error_deg", "rmse_angle_error_deg",
            *[f"pct_within_{_fmt(t)}deg" for t in THRESHOLDS_DEG]]


def _fmt(t: float) -> str:
    return f"{t:g}"


def normalize(v: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Unit vectors along the last axis; zero vectors stay zero."""
    v = np.asarray(v, dtype=np.float64)
    n = np.linalg.norm(v, axis=-1, keepdims=True)
    return np.where(n > eps, v / np.maximum(n, eps), 0.0)


def angular_errors_deg(pred: np.ndarray, gt: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Per-pixel angle in degrees between ``pred`` and ``gt`` (both (..., 3)), over ``mask`` if given.

    ``pred`` is normalised first (a network's raw output need not be unit length); a zero-length
    prediction has no direction and is refused. Returns a 1-D float64 array of the selected pixels.
    """
    pred = np.asarray(pred, dtype=np.float64)
    gt = np.asarray(gt, dtype=np.float64)
    if pred.shape != gt.shape or pred.shape[-1] != 3:
        raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} must both be (..., 3)")
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != gt.shape[:-1]:
            raise ValueError(f"mask {mask.shape} does not match normals {gt.shape[:-1]}")
        pred, gt = pred[mask], gt[mask]
    else:
        pred, gt = pred.reshape(-1, 3), gt.reshape(-1, 3)
    pn = np.linalg.norm(pred, axis=-1)
    if pred.size and (not np.isfinite(pn).all() or (pn <= 1e-12).any()):
        raise ValueError("prediction has zero-length or non-finite normals on valid pixels")
    p = pred / pn[:, None]
    g = normalize(gt)
    cross = np.linalg.norm(np.cross(p, g), axis=-1)
    dot = np.sum(p * g, axis=-1)
    return np.degrees(np.arctan2(cross, dot))


def summarize_errors(errors_deg: np.ndarray) -> dict[str, float]:
    """Mean, median, RMSE and % within each threshold of a pooled 1-D array of angles (exact)."""
    e = np.asarray(errors_deg, dtype=np.float64).ravel()
    if e.size == 0:
        raise ValueError("no valid pixels to score")
    out = {"mean_angle_error_deg": float(e.mean()), "median_angle_error_deg": float(np.median(e)),
           "rmse_angle_error_deg": float(np.sqrt(np.mean(e**2)))}
    for t in THRESHOLDS_DEG:
        out[f"pct_within_{_fmt(t)}deg"] = float(100.0 * np.mean(e < t))
    return out


@dataclass
class ErrorAccumulator:
    """Pools angular errors over a whole test set without keeping every pixel, one row of sums per image.

    Counts, sums and threshold counts are exact; the median comes from per-image histograms with
    ``MEDIAN_BIN_DEG`` bins (:func:`evalsuite.stats.histogram_median`: numpy's median, each middle value
    interpolated linearly inside its bin, so within one bin of ``numpy.median`` of the pooled errors). 654 NYUv2
    test images x 307,200 pixels would otherwise need 1.6 GB of float64. The per-image rows
    (:meth:`sample_arrays`) are the record's per-sample outputs: each metric of a resample of the test images is
    recomputed from them exactly as :meth:`summary` computes it (docs/uncertainty.md).
    """

    bin_deg: float = MEDIAN_BIN_DEG
    pixels: list[int] = field(default_factory=list)
    sums: list[float] = field(default_factory=list)
    sq_sums: list[float] = field(default_factory=list)
    below: list[list[int]] = field(default_factory=list)
    hists: list[np.ndarray] = field(default_factory=list)

    @property
    def bins(self) -> int:
        return int(round(180.0 / self.bin_deg)) + 1

    @property
    def count(self) -> int:
        return int(sum(self.pixels))

    def add(self, errors_deg: np.ndarray) -> None:
        """The errors of one image (an image without a valid pixel adds nothing)."""
        e = np.asarray(errors_deg, dtype=np.float64).ravel()
        if e.size == 0:
            return
        self.pixels.append(int(e.size))
        self.sums.append(float(e.sum()))
        self.sq_sums.append(float(np.sum(e**2)))
        self.below.append([int(np.count_nonzero(e < t)) for t in THRESHOLDS_DEG])
        idx = np.clip((e / self.bin_deg).astype(np.int64), 0, self.bins - 1)
        self.hists.append(np.bincount(idx, minlength=self.bins).astype(np.int32))

    def median(self) -> float:
        total = np.sum(self.hists, axis=0, dtype=np.int64)
        return float(histogram_median(total[None], self.bin_deg, np.ones((1, 1)))[0])

    def summary(self) -> dict[str, float]:
        n = self.count
        if n == 0:
            raise ValueError("no valid pixels to score")
        out = {"mean_angle_error_deg": float(np.sum(self.sums)) / n, "median_angle_error_deg": self.median(),
               "rmse_angle_error_deg": float(np.sqrt(np.sum(self.sq_sums) / n))}
        below = np.sum(self.below, axis=0)
        for j, t in enumerate(THRESHOLDS_DEG):
            out[f"pct_within_{_fmt(t)}deg"] = 100.0 * int(below[j]) / n
        return out

    def sample_arrays(self) -> dict[str, np.ndarray]:
        """Per-image arrays: valid ``pixels``, ``mean_error_deg``, ``mean_sq_error_deg2``, ``within_<t>deg``
        (fractions), ``hist`` (images, bins) of the errors and its ``bin_deg`` (0-d)."""
        px = np.asarray(self.pixels, np.float64)
        below = np.asarray(self.below, np.float64).reshape(len(px), len(THRESHOLDS_DEG))
        return {"pixels": np.asarray(self.pixels, np.int64), "mean_error_deg": np.asarray(self.sums) / px,
                "mean_sq_error_deg2": np.asarray(self.sq_sums) / px,
                **{f"within_{_fmt(t)}deg": below[:, j] / px for j, t in enumerate(THRESHOLDS_DEG)},
                "hist": np.stack(self.hists) if self.hists else np.zeros((0, self.bins), np.int32),
                "bin_deg": np.asarray(self.bin_deg)}


def metric_outputs(samples: SampleOutputs) -> dict[str, MetricOutputs]:
    """Each metric's statistic over the arrays of :meth:`ErrorAccumulator.sample_arrays`: pixel-weighted means of
    the per-image values (the pooled mean, % within), the root of one (RMSE), the median of the summed histograms."""
    out = {"mean_angle_error_deg": samples.metric("weighted_mean", 1.0, values="mean_error_deg", weights="pixels"),
           "median_angle_error_deg": samples.metric("median_hist", 1.0, hist="hist", bin_width="bin_deg"),
           "rmse_angle_error_deg": samples.metric("root_weighted_mean", 1.0, values="mean_sq_error_deg2",
                                                  weights="pixels")}
    for t in THRESHOLDS_DEG:
        out[f"pct_within_{_fmt(t)}deg"] = samples.metric("weighted_mean", 100.0, values=f"within_{_fmt(t)}deg",
                                                          weights="pixels")
    return out


def validate_ground_truth(normals: np.ndarray, mask: np.ndarray, source: str,
                          image_hw: tuple[int, int] | None = None,
                          unit_tolerance: float = UNIT_TOLERANCE) -> tuple[np.ndarray, np.ndarray]:
    """Check one sample's ground truth and return (unit normals float32 (H,W,3) with 0 outside the mask,
    mask bool (H,W)). Raises :class:`BadData` naming ``source`` (the sample) on:

    - normals not (H, W, 3), a mask not (H, W), or an image whose size differs from the normals';
    - a mask with no valid pixel;
    - non-finite normals inside the mask;
    - normals inside the mask whose length differs from 1 by more than ``unit_tolerance``
      (those within the tolerance are renormalised).
    """
    n = np.asarray(normals)
    m = np.asarray(mask)
    if n.ndim != 3 or n.shape[-1] != 3:
        raise BadData(f"surface normals must be (H, W, 3), got {n.shape}", source)
    if m.shape != n.shape[:2]:
        raise BadData(f"valid mask {m.shape} does not match the normals {n.shape[:2]}", source)
    if image_hw is not None and tuple(image_hw) != tuple(n.shape[:2]):
        raise BadData(f"RGB image is {image_hw[0]}x{image_hw[1]} (HxW) but its normals are "
                      f"{n.shape[0]}x{n.shape[1]}", source)
    m = m.astype(bool)
    if not m.any():
        raise BadData("valid mask has no valid pixel", source)
    inside = n[m].astype(np.float64)
    if not np.isfinite(inside).all():
        bad = int((~np.isfinite(inside).all(axis=1)).sum())
        raise BadData(f"{bad} valid pixel(s) have NaN/Inf normals", source)
    norms = np.linalg.norm(inside, axis=1)
    off = np.abs(norms - 1.0) > unit_tolerance
    if off.any():
        raise BadData(f"{int(off.sum())} valid pixel(s) have normals that are not unit length "
                      f"(norms {norms.min():.3g}..{norms.max():.3g}, tolerance {unit_tolerance})", source)
    out = np.zeros(n.shape, dtype=np.float32)
    out[m] = (inside / norms[:, None]).astype(np.float32)
    return out, m
