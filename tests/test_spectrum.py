"""The spectrum task: RankMe, alpha-ReQ, uniformity and alignment against values known by construction or computed by
slow independent loops, the views and the sample, and the task's records on a tiny context."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image, ImageOps

from evalsuite.data import Subset, open_dataset
from evalsuite.errors import UserError
from evalsuite.features import Transform
from tasks.spectrum import metrics as M
from tasks.spectrum.task import sample_indices
from tasks.spectrum.task import task as spectrum
from tasks.spectrum.views import HFlipTransform, view_transform
from tests.helpers import make_context


def _orthonormal(rng, n: int, k: int, centred: bool = False) -> np.ndarray:
    a = rng.standard_normal((n, k))
    if centred:
        a -= a.mean(axis=0)  # columns orthogonal to the ones vector: centring leaves the matrix as it is
    return np.linalg.qr(a)[0]


@pytest.mark.parametrize("n, d", [(200, 64), (30, 64)])  # the Gram matrix of the columns, then of the rows
def test_rankme_of_a_rank_k_matrix_with_equal_singular_values_is_k(n, d) -> None:
    rng = np.random.default_rng(0)
    k = 7
    x = 3.0 * _orthonormal(rng, n, k) @ _orthonormal(rng, d, k).T
    assert M.rankme(x, eps=0.0) == pytest.approx(k, abs=1e-6)
    assert M.rankme(x) == pytest.approx(k, rel=2e-3)  # the paper's eps adds a little for every zero singular value


def test_rankme_matches_the_formula_on_numpy_svd() -> None:
    x = np.random.default_rng(1).standard_normal((120, 40)) * np.linspace(3, 0.1, 40)
    s = np.linalg.svd(x, compute_uv=False)
    p = s / np.abs(s).sum() + 1e-7
    assert M.rankme(x) == pytest.approx(math.exp(-(p * np.log(p)).sum()), rel=1e-9)
    assert M.singular_values(x) == pytest.approx(s, rel=1e-7)


def test_alpha_req_recovers_the_exponent_of_a_power_law_covariance_spectrum() -> None:
    rng = np.random.default_rng(2)
    n, d, alpha = 300, 150, 1.3
    lam = np.arange(1, d + 1, dtype=np.float64) ** -alpha  # covariance eigenvalues
    x = _orthonormal(rng, n, d, centred=True) * np.sqrt((n - 1) * lam) @ _orthonormal(rng, d, d).T + 5.0
    assert M.covariance_eigenvalues(x) == pytest.approx(lam, rel=1e-6)
    fit = M.alpha_req(x)
    assert fit.alpha == pytest.approx(alpha, abs=1e-6) and fit.r2 == pytest.approx(1.0, abs=1e-9)
    assert (fit.start, fit.stop) == (10, 100)


def test_the_power_law_fit_is_reptrix_weighted_least_squares() -> None:
    """On a noisy spectrum: numpy's polyfit with weights sqrt(1/rank) on the residuals is the same weighted fit."""
    rng = np.random.default_rng(3)
    lam = np.arange(1, 201, dtype=np.float64) ** -0.9 * np.exp(rng.normal(0, 0.2, 200))
    fit = M.powerlaw_fit(lam, 10, 100)
    rank = np.arange(11, 101)
    slope, intercept = np.polyfit(np.log(rank), np.log(lam[10:100]), 1, w=np.sqrt(1.0 / rank))
    assert fit.alpha == pytest.approx(-slope, rel=1e-9) and fit.intercept == pytest.approx(intercept, rel=1e-9)
    x = np.random.default_rng(6).standard_normal((48, 512))
    x[:, :100] = 0.0  # dead units
    eig = M.covariance_eigenvalues(x)
    assert M.alpha_fit_range(eig, 10, 100) == (10, 47)  # 48 centred samples have 47 non-zero eigenvalues
    assert M.alpha_fit_range(eig[:30], 10, 100) == (10, 30)
    assert M.alpha_req(x).stop == 47
    x[:, 100:] = np.tile(x[:, 100:110], 42)[:, :412]  # ten distinct directions
    assert M.alpha_req(x, 0, 100).stop == 10
    with pytest.raises(ValueError):
        M.powerlaw_fit(lam[:50], 10, 100)


def _slow_normalize(v):
    norm = math.sqrt(sum(a * a for a in v))
    return [a / norm for a in v]


def test_uniformity_and_alignment_against_slow_loops() -> None:
    rng = np.random.default_rng(4)
    x, y = rng.standard_normal((23, 5)), rng.standard_normal((23, 5))
    xs = [_slow_normalize(list(r)) for r in x]
    ys = [_slow_normalize(list(r)) for r in y]
    terms = [math.exp(-2.0 * sum((a - b) ** 2 for a, b in zip(xs[i], xs[j])))
             for i in range(len(xs)) for j in range(i + 1, len(xs))]
    want = math.log(sum(terms) / len(terms))
    assert M.uniformity(x) == pytest.approx(want, rel=1e-10)
    assert M.uniformity(x, block=4) == pytest.approx(want, rel=1e-10)  # row blocks, uneven last block
    want_t = math.log(sum(t ** 0.5 for t in terms) / len(terms))  # t = 1: each term exp(-d^2)
    assert M.uniformity(x, t=1.0, block=5) == pytest.approx(want_t, rel=1e-10)
    for a in (2.0, 1.0):
        slow = sum(math.sqrt(sum((p - q) ** 2 for p, q in zip(u, v))) ** a for u, v in zip(xs, ys)) / len(xs)
        assert M.alignment(x, y, a) == pytest.approx(slow, rel=1e-10)
    assert M.alignment(x, 3.0 * x) == pytest.approx(0.0, abs=1e-12)


def test_the_sample_is_seeded_sorted_and_everything_when_small() -> None:
    a = sample_indices(100, 10, seed=0)
    assert list(a) == sorted(set(a)) and len(a) == 10 and a.max() < 100
    assert np.array_equal(a, sample_indices(100, 10, seed=0))
    assert not np.array_equal(a, sample_indices(100, 10, seed=1))
    assert np.array_equal(sample_indices(5, 10, seed=0), np.arange(5))


def test_a_subset_is_its_own_cache_entry(tiny_imagefolder) -> None:
    data = open_dataset("imagefolder", tiny_imagefolder / "imagefolder", "train")
    sub = Subset(data, [3, 1])
    assert len(sub) == 2 and sub.ids == [data.ids[3], data.ids[1]] and sub.image_path(0) == data.image_path(3)
    prints = {data.fingerprint(), sub.fingerprint(), Subset(data, [1, 3]).fingerprint()}
    assert len(prints) == 3 and Subset(data, [3, 1]).fingerprint() == sub.fingerprint()


def test_the_hflip_view_is_the_mirrored_image_under_its_own_cache_key() -> None:
    image = Image.fromarray(np.random.default_rng(5).integers(0, 255, (20, 30, 3), dtype=np.uint8))
    base = Transform(size=16, mode="center_crop", resize=18)
    view = view_transform(base, "hflip", seed=0)
    assert isinstance(view, HFlipTransform)
    assert np.array_equal(view(image).numpy(), base(ImageOps.mirror(image)).numpy())
    assert view.to_dict() == {**base.to_dict(), "hflip": True}
    assert view_transform(base, "vissl", seed=0).to_dict()["recipe"] == "vissl"


def test_presets_without_a_published_version_are_refused() -> None:
    assert spectrum.default_protocol("goyal19").num_images == 25600
    assert spectrum.default_protocol("quick").image_size == 64
    for preset in ("vissl", "dino21"):
        with pytest.raises(UserError, match=f"spectrum has no {preset} protocol"):
            spectrum.default_protocol(preset)


def test_the_task_records_every_metric_per_tap(tiny_imagefolder, tmp_path) -> None:
    ctx = make_context("spectrum", tiny_imagefolder, tmp_path / "out", layers=["res4", "res5"],
                       overrides=["spectrum.image_size=32", "spectrum.num_images=40"])
    records = spectrum.run(ctx)
    assert [(r.layer, r.metric) for r in records] == [
        (t, m) for t in ("res4", "res5") for m in ("rankme", "alpha_req", "uniformity", "alignment")]
    assert all(r.value is not None and math.isfinite(r.value) for r in records)
    # the same numbers from the sample's features, computed here through the context
    data = open_dataset("imagefolder", tiny_imagefolder / "imagefolder", "train")
    sample = Subset(data, sample_indices(len(data), 40, ctx.seed))
    feats = ctx.features(sample, ["res5"])
    flipped = ctx.features(sample, ["res5"], transform=HFlipTransform.of(ctx.transform()))
    got = {r.metric: r for r in records if r.layer == "res5"}
    assert got["rankme"].value == pytest.approx(M.rankme(feats["res5"]), rel=1e-9)
    assert got["uniformity"].value == pytest.approx(M.uniformity(feats["res5"]), rel=1e-9)
    assert got["alignment"].value == pytest.approx(M.alignment(feats["res5"], flipped["res5"]), rel=1e-9)
    assert 0 < got["alignment"].value < 4 and got["rankme"].value > 1
    p = got["rankme"].params
    assert p["images_sampled"] == 40 and p["images_in_split"] == 48 and p["subsample"] == "seeded sample (seed 0)"
    assert got["alpha_req"].params["alpha_fit_range"] == [10, 39] and "mirrored" in p["view"]
    assert got["rankme"].dataset_fingerprint == sample.fingerprint()


def test_no_alignment_view_means_no_second_extraction(tiny_imagefolder, tmp_path) -> None:
    ctx = make_context("spectrum", tiny_imagefolder, tmp_path / "out", layers=["res5"],
                       overrides=["spectrum.image_size=32", "spectrum.alignment_view=none"])
    records = spectrum.run(ctx)
    assert [r.metric for r in records] == ["rankme", "alpha_req", "uniformity"]
    assert ctx.extractor.stats["extracted_images"] == 48
