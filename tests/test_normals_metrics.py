"""Angular-error metrics, the pooled accumulator, ground-truth checks and the codebook, on analytic cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from evalsuite.errors import BadData
from tasks.surface_normals import codebook as cbl
from tasks.surface_normals.metrics import (
    ErrorAccumulator,
    angular_errors_deg,
    metric_names,
    summarize_errors,
    validate_ground_truth,
)


def unit(v):
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def test_perfect_prediction_is_zero_degrees():
    rng = np.random.default_rng(0)
    gt = unit(rng.normal(size=(5, 7, 3)))
    e = angular_errors_deg(gt, gt)
    assert e.shape == (35,)
    assert np.abs(e).max() < 1e-6
    s = summarize_errors(e)
    assert s["median_angle_error_deg"] < 1e-6 and s["pct_within_11.25deg"] == 100.0


def test_known_angles_and_unnormalised_predictions():
    gt = np.array([[0, 0, -1.0], [0, 0, -1.0], [0, 0, -1.0], [0, 0, -1.0]])
    pred = np.array([[0, 0, -5.0],                # same direction, length 5 -> 0 deg
                     [1, 0, 0.0],                  # 90 deg
                     [1, 0, -1.0],                 # 45 deg
                     [0, 0, 1.0]])                 # 180 deg
    np.testing.assert_allclose(angular_errors_deg(pred, gt), [0, 90, 45, 180], atol=1e-9)


def test_small_angles_are_accurate():
    # 1e-4 degrees: arccos(dot) in float64 loses this; atan2 keeps it
    t = math.radians(1e-4)
    e = angular_errors_deg(np.array([[math.sin(t), 0, math.cos(t)]]), np.array([[0, 0, 1.0]]))
    assert e[0] == pytest.approx(1e-4, rel=1e-6)


def test_constant_90_degree_error_and_threshold_counting():
    gt = np.tile([0, -1.0, 0], (4, 4, 1))
    pred = np.tile([0, 0, -1.0], (4, 4, 1))
    s = summarize_errors(angular_errors_deg(pred, gt))
    assert s["mean_angle_error_deg"] == pytest.approx(90) and s["median_angle_error_deg"] == pytest.approx(90)
    assert s["rmse_angle_error_deg"] == pytest.approx(90)
    assert s["pct_within_11.25deg"] == s["pct_within_22.5deg"] == s["pct_within_30deg"] == 0.0
    # errors 5, 15, 25, 35 deg (hand-made): thresholds are strict "<", like the literature's tables
    e = np.array([5.0, 15.0, 25.0, 35.0, 11.25])
    s = summarize_errors(e)
    assert s["pct_within_11.25deg"] == pytest.approx(20.0)   # 5 only (11.25 is not < 11.25)
    assert s["pct_within_22.5deg"] == pytest.approx(60.0)    # 5, 15, 11.25
    assert s["pct_within_30deg"] == pytest.approx(80.0)
    assert s["mean_angle_error_deg"] == pytest.approx(np.mean(e))
    assert s["rmse_angle_error_deg"] == pytest.approx(math.sqrt(np.mean(e**2)))
    assert s["median_angle_error_deg"] == 15.0
    assert list(s) == metric_names()


def test_masked_pixels_are_ignored_even_if_nan():
    gt = np.tile([0, 0, -1.0], (3, 3, 1))
    pred = gt.copy()
    pred[0, 0] = [1, 0, 0]          # 90 deg, but masked out
    pred[1, 1] = [np.nan] * 3       # garbage, masked out
    gt[2, 2] = [np.nan] * 3
    mask = np.ones((3, 3), bool)
    mask[0, 0] = mask[1, 1] = mask[2, 2] = False
    e = angular_errors_deg(pred, gt, mask)
    assert e.shape == (6,) and np.abs(e).max() < 1e-6
    with pytest.raises(ValueError, match="zero-length or non-finite"):
        angular_errors_deg(pred, gt)


def test_accumulator_pools_pixels_not_images():
    rng = np.random.default_rng(1)
    a, b = rng.uniform(0, 60, 1001), rng.uniform(0, 10, 10)   # a big image and a tiny one
    acc = ErrorAccumulator()
    acc.add(a)
    acc.add(b)
    pooled = np.concatenate([a, b])
    ref = summarize_errors(pooled)
    got = acc.summary()
    for k in ref:
        tol = acc.bin_deg if k == "median_angle_error_deg" else 1e-9
        assert got[k] == pytest.approx(ref[k], abs=tol), k
    # per-image averaging would give a very different mean: the pooled one is dominated by the big image
    assert abs(got["mean_angle_error_deg"] - (a.mean() + b.mean()) / 2) > 5
    even = ErrorAccumulator()
    even.add(np.array([1.0, 2.0, 3.0, 10.0]))
    assert even.median() == pytest.approx(2.5, abs=even.bin_deg)


def test_ground_truth_checks_name_the_sample():
    n = np.tile(np.array([0, 0, -1.0], np.float32), (4, 5, 1))
    m = np.ones((4, 5), bool)
    out, mask = validate_ground_truth(n * 1.05, m, "s1")           # within tolerance: renormalised
    np.testing.assert_allclose(np.linalg.norm(out, axis=-1), 1.0, atol=1e-6)
    n2 = n.copy()
    n2[0, 0] = np.nan
    m2 = m.copy()
    m2[0, 0] = False
    out, mask = validate_ground_truth(n2, m2, "s2")                 # NaN outside the mask: fine, zeroed
    assert np.isfinite(out).all() and not mask[0, 0] and out[0, 0].tolist() == [0, 0, 0]
    with pytest.raises(BadData, match="NaN/Inf") as e:
        validate_ground_truth(n2, m, "sample-7")
    assert "sample-7" in str(e.value)
    with pytest.raises(BadData, match="not unit length"):
        validate_ground_truth(n * 2, m, "s")
    with pytest.raises(BadData, match="no valid pixel"):
        validate_ground_truth(n, np.zeros_like(m), "s")
    with pytest.raises(BadData, match="does not match"):
        validate_ground_truth(n, np.ones((5, 4), bool), "s")
    with pytest.raises(BadData, match="RGB image is 8x10"):
        validate_ground_truth(n, m, "s", image_hw=(8, 10))


def test_real_fixture_normals_decode_to_unit_vectors(fixtures_dir):
    """The NYUv2 sample: n = v/255*2-1 with (R,G,B) = (z,y,x); known regions from the fixture's README."""
    v = np.asarray(Image.open(fixtures_dir / "nyuv2_mini" / "sample" / "normal.png").convert("RGB"), np.float64)
    xyz = (v / 255 * 2 - 1)[..., ::-1]
    assert xyz.shape == (480, 640, 3)
    out, mask = validate_ground_truth(xyz, np.ones(xyz.shape[:2], bool), "nyuv2_mini/normal.png")
    assert mask.all()
    # a table top faces up (-y): the decoded raw value (R,G,B) = (110, 0, 127) -> (x,y,z) = (0.0, -1.0, -0.14)
    table = unit([127 / 255 * 2 - 1, -1.0, 110 / 255 * 2 - 1])
    wall = unit([97 / 255 * 2 - 1, 138 / 255 * 2 - 1, 3 / 255 * 2 - 1])
    frac_up = np.mean(angular_errors_deg(out, np.broadcast_to(table, out.shape)) < 10)
    frac_wall = np.mean(angular_errors_deg(out, np.broadcast_to(wall, out.shape)) < 10)
    assert frac_up > 0.02 and frac_wall > 0.05
    # normals point toward the camera (z < 0) almost everywhere
    assert np.mean(out[..., 2] < 0.05) > 0.95


def test_codebook_recovers_clusters_and_round_trips():
    rng = np.random.default_rng(0)
    axes = unit([[0, 0, -1], [0, -1, 0], [1, 0, 0], [-1, 0, 0], [0, 1, 0], [1, -1, -1]])
    pts = unit(np.repeat(axes, 400, axis=0) + rng.normal(scale=0.05, size=(2400, 3)))
    cb = cbl.fit_codebook(pts, k=6, seed=0)
    assert cb.shape == (6, 3) and cb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(cb, axis=1), 1.0, atol=1e-5)
    # every true axis has a centre within 2 deg
    ang = np.degrees(np.arccos(np.clip(axes @ cb.T.astype(np.float64), -1, 1)))
    assert ang.min(axis=1).max() < 2.0
    # round trip: normal -> cluster -> centre is within that cluster's radius, and the assigned
    # cluster is the nearest one (brute force)
    held = unit(np.repeat(axes, 50, axis=0) + rng.normal(scale=0.05, size=(300, 3)))
    radius = cbl.cluster_radius_deg(pts, cb)
    a = cbl.assign(held, cb)
    brute = np.array([np.argmin([np.degrees(np.arccos(np.clip(h @ c, -1, 1))) for c in cb]) for h in held])
    assert (a == brute).all()
    back = angular_errors_deg(cb[a], held)
    assert (back <= radius[a] + 3.0).all() and back.max() < 20
    # determinism
    np.testing.assert_array_equal(cb, cbl.fit_codebook(pts, k=6, seed=0))


def spherical_kmeans_numpy(x, init, iters=100):
    """Lloyd's spherical k-means in float64: assign by largest cosine, centre = renormalised mean."""
    c = init.copy()
    for _ in range(iters):
        a = (x @ c.T).argmax(axis=1)
        c = unit(np.stack([x[a == j].sum(axis=0) for j in range(len(c))]))
    return c


def test_codebook_is_a_spherical_kmeans_fixed_point_sorted_by_size():
    rng = np.random.default_rng(3)
    centres = unit(rng.normal(size=(8, 3)))
    sizes = [900, 700, 500, 400, 300, 200, 150, 100]
    pts = unit(np.repeat(centres, sizes, axis=0) + rng.normal(scale=0.15, size=(sum(sizes), 3)))
    cb = cbl.fit_codebook(pts, k=8, seed=1, iters=50).astype(np.float64)
    np.testing.assert_allclose(np.linalg.norm(cb, axis=1), 1.0, atol=1e-6)
    # every centre is the normalised mean of the unit vectors nearest to it (brute force, float64)
    a = (pts @ cb.T).argmax(axis=1)
    means = unit(np.stack([pts[a == j].sum(axis=0) for j in range(8)]))
    np.testing.assert_allclose(cb, means, atol=1e-5)
    counts = np.bincount(a, minlength=8)
    assert (np.diff(counts) <= 0).all() and counts.min() > 0         # largest cluster first, none empty
    # the same as a plain numpy spherical k-means from the same k-means++ seeds
    ref = spherical_kmeans_numpy(pts, cbl.kmeans_pp_init(pts, 8, np.random.default_rng(1)))
    match = (cb @ ref.T).argmax(axis=1)
    assert sorted(match) == list(range(8))
    np.testing.assert_allclose(cb, ref[match], atol=1e-5)              # faiss works in float32


def reference_soft_decode(logits: np.ndarray, codebook: np.ndarray) -> np.ndarray:
    """normals_evaluation_utils.py NormalsConverter.convert_discrete_to_continuous on softmax probabilities
    (float64): probs @ codebook, divided by (row norm + float64 eps)."""
    z = logits - logits.max(axis=0, keepdims=True)
    probs = np.exp(z) / np.exp(z).sum(axis=0, keepdims=True)                 # (K, H, W)
    k, h, w = probs.shape
    m = probs.reshape(k, -1).T @ codebook
    m = m / (np.linalg.norm(m, axis=1) + np.finfo(np.float64).eps)[:, None]
    return m.reshape(h, w, 3)


def test_soft_decoding_is_the_reference_conversion():
    rng = np.random.default_rng(0)
    codebook = rng.normal(size=(40, 3)) * rng.uniform(0.5, 1.5, size=(40, 1))   # entries used as stored
    logits = rng.normal(scale=3.0, size=(40, 6, 7))
    got = cbl.decode(torch.from_numpy(logits)[None], torch.from_numpy(codebook), "soft")[0].permute(1, 2, 0)
    np.testing.assert_allclose(got.numpy(), reference_soft_decode(logits, codebook), atol=1e-12)
    hard = cbl.decode(torch.from_numpy(logits)[None], torch.from_numpy(codebook), "hard")[0].permute(1, 2, 0)
    assert angular_errors_deg(hard.numpy(), reference_soft_decode(logits, codebook)).mean() > 5   # not the same
    assert cbl.decode(torch.from_numpy(logits)[None], torch.from_numpy(codebook)).equal(
        cbl.decode(torch.from_numpy(logits)[None], torch.from_numpy(codebook), "soft"))      # soft by default


def test_assignment_is_euclidean_as_the_reference_labels():
    """make_SN_labels.py: sklearn pairwise_distances_argmin_min against the codebook as stored (not unit)."""
    from sklearn.metrics import pairwise_distances_argmin_min

    rng = np.random.default_rng(1)
    codebook = unit(rng.normal(size=(40, 3))) * rng.uniform(0.3, 1.7, size=(40, 1))
    normals = unit(rng.normal(size=(5000, 3)))
    expected, _ = pairwise_distances_argmin_min(normals, codebook)
    np.testing.assert_array_equal(cbl.assign(normals, codebook), expected)
    np.testing.assert_array_equal(cbl.assign(torch.from_numpy(normals), torch.from_numpy(codebook)).numpy(), expected)
    assert (cbl.assign(normals, unit(codebook)) != expected).any()           # the cosine would differ


def test_codebook_decoding_hard_and_soft():
    cb = torch.tensor([[0, 0, -1.0], [0, -1.0, 0], [1.0, 0, 0]])
    logits = torch.full((1, 3, 2, 2), -20.0)
    logits[0, 1, 0, 0] = 20.0            # confident: floor
    logits[0, 0, 1, 1] = 0.0             # tie between entries 0 and 1 at pixel (1,1)
    logits[0, 1, 1, 1] = 0.0
    hard = cbl.decode(logits, cb, "hard")
    assert hard.shape == (1, 3, 2, 2)
    assert hard[0, :, 0, 0].tolist() == [0, -1, 0]
    soft = cbl.decode(logits, cb, "soft")
    np.testing.assert_allclose(soft.norm(dim=1).numpy(), 1.0, atol=1e-6)
    np.testing.assert_allclose(soft[0, :, 1, 1].numpy(), unit([0, -1, -1]), atol=1e-6)   # 45 deg between
    np.testing.assert_allclose(soft[0, :, 0, 0].numpy(), [0, -1, 0], atol=1e-6)
    with pytest.raises(ValueError):
        cbl.decode(logits, cb, "median")
