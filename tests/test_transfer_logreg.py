"""tasks/transfer: the batched logistic-regression path against scikit-learn (and cyanure), the reference
protocol's grid / split / choice, the per-dataset metrics, and few-shot episodes against slow loops."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from tasks.transfer import fewshot, metrics
from tasks.transfer.logreg import (
    _basis,
    _lagrange,
    _Problems,
    _to_rotated,
    fit_path,
    gradient,
    objective,
    reference_costs,
    reference_val_split,
    select_and_refit,
    select_index,
)
from tasks.transfer.reference import SklearnPath, cyanure_available, cyanure_path


def _data(n=150, d=6, k=3, seed=0, offset=2.0):
    """Overlapping classes, uncentred, unevenly scaled features (what the centring/rotation must undo)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    x = rng.normal(size=(n, d)) + offset
    x[:, :k] += 1.5 * np.eye(k)[y]
    x *= np.linspace(0.3, 3.0, d)
    return x.astype(np.float64), y


def _sklearn(x, y, C):
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(C=C, tol=1e-10, max_iter=5000).fit(x, y)
    return clf.coef_.T, clf.intercept_ - clf.intercept_.mean()


def test_gradient_matches_finite_differences():
    x, y = _data(40, 4, 3)
    rng = np.random.default_rng(1)
    w, b, C = rng.normal(size=(4, 3)) * 0.3, rng.normal(size=3) * 0.3, 0.7
    gw, gb = gradient(x, y, w, b, C)
    eps = 1e-6
    for idx in [(0, 0), (2, 1), (3, 2)]:
        e = np.zeros_like(w)
        e[idx] = eps
        fd = (objective(x, y, w + e, b, C) - objective(x, y, w - e, b, C)) / (2 * eps)
        assert fd == pytest.approx(gw[idx], rel=1e-6, abs=1e-8)
    e = np.array([0, eps, 0])
    assert (objective(x, y, w, b + e, C) - objective(x, y, w, b - e, C)) / (2 * eps) == pytest.approx(gb[1], rel=1e-6)


@pytest.mark.parametrize("n,d", [(150, 6), (20, 30)])  # covariance route, and n < d (the span of the rows)
def test_path_matches_sklearn_objective_and_coefficients(n, d):
    x, y = _data(n, d, 3)
    cs = [1e-3, 0.1, 10.0]
    path = fit_path(x, y, cs, dtype="float64", tol=1e-9, max_iter=3000)
    assert path.converged.all() and path.coef.shape == (1, 3, d, 3)
    for j, c in enumerate(cs):
        w_sk, b_sk = _sklearn(x, y, c)
        f_ours, f_sk = objective(x, y, path.coef[0, j], path.intercept[0, j], c), objective(x, y, w_sk, b_sk, c)
        assert f_ours == pytest.approx(f_sk, rel=1e-9)
        # both stop where f no longer moves (scipy's ftol): ~1e-12 in f leaves ~sqrt(2 C 1e-12) in flat directions
        scale = np.abs(w_sk).max()
        np.testing.assert_allclose(path.coef[0, j], w_sk, atol=1e-4 * scale)
        np.testing.assert_allclose(path.intercept[0, j], b_sk, atol=1e-4 * max(1.0, np.abs(b_sk).max()))


def test_float32_path_reaches_sklearn_tolerance():
    x, y = _data(150, 6, 3)
    path = fit_path(x.astype(np.float32), y, [0.1, 10.0], dtype="float32", tol=1e-4)
    assert path.converged.all()
    for j, c in enumerate([0.1, 10.0]):
        gw, gb = gradient(x, y, path.coef[0, j], path.intercept[0, j], c)
        assert max(np.abs(gw).max(), np.abs(gb).max()) / len(y) <= 2e-4  # float32 product rounding on top of tol
        w_sk, b_sk = _sklearn(x, y, c)
        assert objective(x, y, path.coef[0, j], path.intercept[0, j], c) == pytest.approx(
            objective(x, y, w_sk, b_sk, c), rel=1e-4)


def test_float32_stall_is_finished_in_float64():
    """A tolerance float32 products cannot reach: the problem stalls, is finished with float64 products on the
    float32-rounded rotated features, and lands on scikit-learn's minimiser to that rounding."""
    x, y = _data(150, 6, 3)
    path = fit_path(x.astype(np.float32), y, [10.0], dtype="float32", tol=1e-9, max_iter=3000)
    assert path.float64_polish.all() and path.converged.all()
    w_sk, b_sk = _sklearn(x, y, 10.0)
    assert objective(x, y, path.coef[0, 0], path.intercept[0, 0], 10.0) == pytest.approx(
        objective(x, y, w_sk, b_sk, 10.0), rel=1e-9)
    np.testing.assert_allclose(path.coef[0, 0], w_sk, atol=1e-4 * np.abs(w_sk).max())


def test_two_class_columns_are_the_reference_softmax():
    """Each label column is the reference's two-class softmax at C == scikit-learn's binomial model at 2C."""
    from sklearn.linear_model import LogisticRegression

    x, y3 = _data(120, 5, 3)
    y = np.stack([(y3 == 0), (y3 == 2)], axis=1).astype(int)
    path = fit_path(x, y, [0.5], classes=np.array([0, 1]), dtype="float64", tol=1e-10, max_iter=3000)
    s = path.positive_score(x)[:, :, 0]  # (n, T)
    for t in range(2):
        sk = LogisticRegression(C=1.0, tol=1e-10, max_iter=20000).fit(x, y[:, t])
        np.testing.assert_allclose(s[:, t], sk.decision_function(x), atol=1e-5)
    ref = SklearnPath(max_iter=20000, tol=1e-10)(x, y, [0.5], classes=np.array([0, 1]))
    np.testing.assert_allclose(ref.positive_score(x), path.positive_score(x), atol=1e-5)


def test_warm_start_equals_cold_start():
    x, y = _data(150, 6, 3)
    cs = [1e-2, 1e-1, 1.0, 10.0]
    cold = fit_path(x, y, cs, dtype="float64", tol=1e-9, block=None)
    warm = fit_path(x, y, cs, dtype="float64", tol=1e-9, block=1)
    np.testing.assert_allclose(warm.coef, cold.coef, atol=1e-5 * np.abs(cold.coef).max())
    assert warm.n_iter[0, 1:].sum() < cold.n_iter[0, 1:].sum()  # the path helps
    again = fit_path(x, y, [10.0], dtype="float64", tol=1e-6, init=(cold.coef[:, 3], cold.intercept[:, 3]))
    assert again.n_iter.max() <= 1 and again.converged.all()


def test_extrapolated_warm_starts_land_on_the_cold_solutions():
    """Blocks of 3 start from the path extrapolated through three solved values (or the last solution): the same
    minimisers as every value solved from zero at once; the extrapolation weights reproduce a quadratic."""
    t = np.array([0.0, -1.0, -2.5])
    np.testing.assert_allclose(_lagrange(t, np.array([1.0, 2.0])).T @ (t**2 - 3 * t + 1), [-1.0, -1.0], atol=1e-12)
    x, y = _data(150, 6, 3)
    cs = reference_costs(11)
    cold = fit_path(x, y, cs, dtype="float64", tol=1e-9, block=None)
    warm = fit_path(x, y, cs, dtype="float64", tol=1e-9, block=3)
    assert warm.converged.all() and cold.converged.all()
    np.testing.assert_allclose(warm.coef, cold.coef, atol=1e-5 * np.abs(cold.coef).max())
    assert warm.n_iter.sum() < cold.n_iter.sum()


def test_value_and_gradient_with_saturated_softmax():
    """Logit gaps beyond 50 (where the exponentials are floored at exp(-50) to keep subnormals out of the
    products): the batched objective and gradient still equal the float64 numpy ones."""
    x, y = _data(60, 4, 3)
    rng = np.random.default_rng(2)
    coef, icpt, C = 30.0 * rng.normal(size=(4, 3)), rng.normal(size=3), 0.5
    basis = _basis(x, torch.float64, "cpu")
    prob = _Problems(basis, torch.as_tensor(y[:, None]), 3)
    w = _to_rotated(torch.as_tensor(coef[None]), torch.as_tensor(icpt[None]), basis)  # (r1, 1, K)
    f, g, _ = prob.value_grad(w, torch.zeros(1, dtype=torch.long), torch.tensor([1.0 / C], dtype=torch.float64))
    z = x @ coef + icpt
    assert (z.max(1)[:, None] - z > 50).any()  # saturated rows present
    assert float(f[0]) == pytest.approx(objective(x, y, coef, icpt, C), rel=1e-12)
    gw, gb = gradient(x, y, coef, icpt, C)
    g_orig = basis.v.numpy() @ g[:-1, 0].numpy() + basis.mean.numpy()[:, None] * g[-1, 0].numpy()[None]
    np.testing.assert_allclose(g_orig, gw, rtol=1e-10, atol=1e-9 * np.abs(gw).max())
    np.testing.assert_allclose(g[-1, 0].numpy(), gb, atol=1e-9 * np.abs(gw).max())


def test_same_chosen_C_as_sklearn_on_a_grid():
    x, y = _data(300, 6, 3, seed=3)
    split = [(x[:150], y[:150]), (x[150:200], y[150:200]), (x[200:], y[200:])]
    cs = reference_costs(12)
    ours = select_and_refit(*split, cs, "mean_per_class", dtype="float64", tol=1e-8)
    ref = select_and_refit(*split, cs, "mean_per_class", fit=SklearnPath(max_iter=20000, tol=1e-8))
    np.testing.assert_allclose(ours.val_scores, ref.val_scores)
    assert ours.chosen == ref.chosen == select_index(list(ours.val_scores), list(cs))
    assert ours.test_score == pytest.approx(ref.test_score)
    assert ours.refit.coef.shape[1] == 1 and ours.C == cs[ours.chosen]


@pytest.mark.skipif(not cyanure_available(), reason="cyanure not installed")
def test_cyanure_reference_agrees():
    x, y = _data(120, 5, 3)
    ours = fit_path(x, y, [0.3], dtype="float64", tol=1e-9)
    cy = cyanure_path(x, y, [0.3], tol=1e-10, max_iter=5000)
    np.testing.assert_allclose(cy.coef, ours.coef, atol=1e-4 * np.abs(ours.coef).max())


def test_reference_grid_split_and_choice():
    cs = reference_costs()
    assert len(cs) == 45 and cs[0] == pytest.approx(1e6, rel=1e-6) and cs[-1] == pytest.approx(1e-5, rel=1e-6)
    # C values printed in ssl-transfer's run_linear.sh (1 / float32 weight decays, bit for bit)
    for c in (10000.000252621256, 999.999952502551, 1000000.0025247572, 9.99999985098839, 0.3162277621819913):
        assert np.min(np.abs(cs / c - 1)) < 1e-15
    np.random.seed(0)
    idx = list(range(50))
    np.random.shuffle(idx)
    tr, va = reference_val_split(50)
    assert va.tolist() == idx[:10] and tr.tolist() == idx[10:]
    # ties go to the larger C (the reference walks C downwards, keeps strict improvements); NaN never wins
    assert select_index([50.0, 60.0, 60.0, float("nan")], [1e-3, 1e-2, 1e-1, 1.0]) == 2
    assert select_index([0.0, 0.0], [1.0, 2.0]) == 1


def test_metrics_by_hand():
    assert metrics.top1([0, 1, 2, 2], [0, 1, 1, 2]) == 75.0
    # class 0: 1/1, class 1: 1/1, class 2: 1/2 -> mean 5/6
    assert metrics.mean_per_class_accuracy([0, 1, 2, 2], [0, 1, 1, 2]) == pytest.approx(100 * 5 / 6)
    assert np.isnan(metrics.mean_per_class_accuracy([0, 0, 1], [0, 3, 1]))  # predicted label 3 never true: 0/0
    # ranking + - + - -: precision at recall 0.5 is 1, at recall 1 is 2/3 -> 6 points at 1 (t <= 0.5), 5 at 2/3
    assert metrics.voc07_11point_ap([1, 0, 1, 0, 0], [5, 4, 3, 2, 1]) == pytest.approx((6 + 5 * 2 / 3) / 11)
    # a tie between a positive and a negative is one threshold (precision 1/2 at recall 1); t = 0 always counts 1
    assert metrics.voc07_11point_ap([1, 0], [1.0, 1.0]) == pytest.approx((1 + 10 * 0.5) / 11)
    mean, ci = metrics.mean_ci95([40.0, 60.0])
    assert mean == 50.0 and ci == pytest.approx(1.96 * 10 / np.sqrt(2))


def test_11point_ap_matches_the_reference_formula():
    from sklearn.metrics import precision_recall_curve

    rng = np.random.default_rng(0)
    for _ in range(5):
        y = rng.integers(0, 2, 60)
        s = np.round(rng.normal(size=60) + y, 1)  # rounded: ties
        prec, rec, _ = precision_recall_curve(y, s)
        ref = sum((np.max(prec[rec >= t]) if np.sum(rec >= t) else 0) / 11.0 for t in np.linspace(0, 1, 11))
        assert metrics.voc07_11point_ap(y, s) == pytest.approx(ref)


def test_episodes_are_seeded_and_disjoint():
    labels = np.repeat(np.arange(8), 25)
    labels[:20] = 99  # class 0 keeps 5 rows, too few for 5 + 15: left out; 99 has 20
    a = fewshot.sample_episodes(labels, 5, 5, 15, 30, seed=1)
    b = fewshot.sample_episodes(labels, 5, 5, 15, 30, seed=1)
    c = fewshot.sample_episodes(labels, 5, 5, 15, 30, seed=2)
    assert np.array_equal(a.support, b.support) and np.array_equal(a.query, b.query)
    assert not np.array_equal(a.support, c.support)
    assert 0 not in a.eligible and 99 in a.eligible
    for e in range(30):
        assert len(set(a.classes[e])) == 5
        assert not set(a.support[e].ravel()) & set(a.query[e].ravel())
        for j, cls in enumerate(a.classes[e]):
            assert (labels[a.support[e, j]] == cls).all() and (labels[a.query[e, j]] == cls).all()
            assert len(set(a.support[e, j]) | set(a.query[e, j])) == 20
    with pytest.raises(Exception, match="need 5 classes"):
        fewshot.sample_episodes(labels, 5, 20, 15, 3)


def test_prototype_accuracy_matches_a_slow_loop():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(6), 12)
    feats = (rng.normal(size=(72, 4)) + 0.8 * rng.normal(size=(6, 4))[labels]).astype(np.float32)
    res = fewshot.evaluate(feats, labels, n_way=3, k_shot=2, n_query=4, n_episodes=20, seed=0)
    ep = res.episodes
    slow = []
    for e in range(20):
        protos = feats[ep.support[e]].mean(1)  # (way, D)
        correct = sum(int(np.argmin(((feats[q] - protos) ** 2).sum(1)) == j) for j in range(3) for q in ep.query[e, j])
        slow.append(100.0 * correct / 12)
    np.testing.assert_allclose(res.accuracies, slow)
    assert res.mean == pytest.approx(np.mean(slow)) and res.ci95 == pytest.approx(1.96 * np.std(slow) / np.sqrt(20))


def test_linear_probe_matches_torch_sgd_per_episode():
    """The batched SGD is CD-FSL's loop: nn.Linear + CrossEntropyLoss + torch.optim.SGD, episode by episode,
    fed the same initial weights and the same per-epoch permutations."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(5), 8)
    feats = torch.as_tensor(rng.normal(size=(40, 6)), dtype=torch.float32)
    ep = fewshot.sample_episodes(labels, 3, 3, 2, 4, seed=0)
    epochs = 3
    ours = fewshot.linear_probe_logits(feats, ep, seed=5, epochs=epochs)
    # replay the random numbers in the order linear_probe_logits draws them
    gen = torch.Generator().manual_seed(5)
    w0 = (torch.rand(4, 6, 3, generator=gen) * 2 - 1) / 6 ** 0.5
    b0 = (torch.rand(4, 3, generator=gen) * 2 - 1) / 6 ** 0.5
    prng = np.random.default_rng(5)
    perms = [[prng.permutation(9) for _ in range(4)] for _ in range(epochs)]
    y = torch.arange(3).repeat_interleave(3)
    for e in range(4):
        lin = torch.nn.Linear(6, 3)
        with torch.no_grad():
            lin.weight.copy_(w0[e].T)
            lin.bias.copy_(b0[e])
        opt = torch.optim.SGD(lin.parameters(), lr=0.01, momentum=0.9, dampening=0.9, weight_decay=0.001)
        xs = feats[torch.as_tensor(ep.support[e].reshape(-1))]
        for ep_i in range(epochs):
            for j in range(0, 9, 4):
                sel = torch.as_tensor(perms[ep_i][e][j:j + 4])
                opt.zero_grad()
                torch.nn.functional.cross_entropy(lin(xs[sel]), y[sel]).backward()
                opt.step()
        with torch.no_grad():
            slow = lin(feats[torch.as_tensor(ep.query[e].reshape(-1))])
        torch.testing.assert_close(ours[e], slow, atol=1e-5, rtol=1e-5)


def test_select_and_refit_voc_map():
    x, y3 = _data(240, 6, 3, seed=4)
    y = np.stack([(y3 == 0), (y3 == 1), (y3 == 2)], axis=1).astype(int)
    split = [(x[:120], y[:120]), (x[120:160], y[120:160]), (x[160:], y[160:])]
    cs = reference_costs(6)
    ours = select_and_refit(*split, cs, "map11", dtype="float64", tol=1e-8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = select_and_refit(*split, cs, "map11", fit=SklearnPath(max_iter=20000, tol=1e-8))
    np.testing.assert_allclose(ours.val_scores, ref.val_scores)
    assert ours.chosen == ref.chosen and ours.test_score == pytest.approx(ref.test_score)
    assert 0 < ours.test_score <= 100
