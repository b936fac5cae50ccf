"""tasks.svm.solver: the batched torch solver against scikit-learn's LinearSVC and cyanure; the metrics; the
SVM feature checks and normalisation (tasks.svm.common)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score
from sklearn.model_selection import cross_val_score
from sklearn.svm import LinearSVC

from evalsuite.errors import BadFeatures, UserError
from evalsuite.features import l2_normalize
from evalsuite.protocols import apply_overrides, parse_overrides
from tasks.svm import common
from tasks.svm import solver as svm
from tasks.svm.solver import SVMConfig, newton
from tasks.svm.voc07 import task as voc07_task


def benchmark_l2(x):
    """The benchmark's normalize_features: x / (||x|| + 1e-5) in float64."""
    return l2_normalize(x, 1e-5, dtype=np.float64)


def make_problem(n, d, seed=0):
    rng = np.random.default_rng(seed)
    y = np.where(rng.random(n) < 0.3, 1, -1)
    x = rng.normal(size=(n, d)) + 0.6 * y[:, None] * (np.arange(d) < 3)
    return benchmark_l2(x), y


@pytest.mark.parametrize("n,d", [(150, 20), (60, 200)])  # primal path, and the sample-span (Gram) path
def test_torch_matches_sklearn_and_cyanure(n, d):
    x, y = make_problem(n, d)
    x_test, y_test = make_problem(80, d, seed=1)
    costs = np.array([1e-3, 0.1, 1.0, 10.0])
    ys = np.repeat(y[:, None], len(costs), axis=1)
    ys[:7, 1] = 0  # rows left out of one problem
    cfg = SVMConfig()
    ours = svm.solve(x, ys, costs, cfg)
    ref = svm.solve(x, ys, costs, SVMConfig(backend="sklearn", sklearn_tol=1e-8, sklearn_max_iter=100000))
    cy = svm.solve(x, ys, costs, SVMConfig(backend="cyanure"))
    assert ours.converged.all()
    for p, c in enumerate(costs):
        f_ours = svm.svm_objective(x, ys[:, p], ours.w_aug(p, 1.0), c, cfg)
        f_ref = svm.svm_objective(x, ys[:, p], ref.w_aug(p, 1.0), c, cfg)
        f_cy = svm.svm_objective(x, ys[:, p], cy.w_aug(p, 1.0), c, cfg)
        assert f_ours <= f_ref * (1 + 1e-7) + 1e-12
        assert f_ours == pytest.approx(f_ref, rel=1e-6)
        assert f_ours == pytest.approx(f_cy, rel=1e-5)
        s_ours, s_ref = ours.decision(x_test)[:, p], ref.decision(x_test)[:, p]
        np.testing.assert_allclose(s_ours, s_ref, atol=1e-4 * max(1.0, np.abs(s_ref).max()))
        assert svm.voc_ap(y_test, s_ours) == pytest.approx(svm.voc_ap(y_test, s_ref), abs=1e-6)


# fair_ssb tools/svm/train_svm_kfold.py and train_svm_low_shot.py: LinearSVC(C=cost, class_weight={1: 2, -1: 1},
# intercept_scaling=1.0, verbose=1, penalty='l2', loss='squared_hinge', tol=0.0001, dual=True, max_iter=2000)
# (verbose only prints; mmselfsup's copy passes 0)
BENCHMARK_LINEARSVC = {"class_weight": {1: 2, -1: 1}, "intercept_scaling": 1.0, "penalty": "l2",
                       "loss": "squared_hinge", "tol": 1e-4, "dual": True, "max_iter": 2000,
                       "fit_intercept": True, "multi_class": "ovr"}


def test_sklearn_backend_is_the_benchmarks_linearsvc_call(monkeypatch):
    """svm.backend=sklearn at the goyal19 settings constructs LinearSVC with the benchmark's arguments and
    returns its model bit for bit (same seed), stopped at max_iter=2000 like the reference."""
    import sklearn.svm

    seen = []

    class Spy(LinearSVC):
        def fit(self, x, y):
            seen.append(self.get_params())
            return super().fit(x, y)

    monkeypatch.setattr(sklearn.svm, "LinearSVC", Spy)
    config = voc07_task.default_protocol("goyal19").svm.replace(backend="sklearn")
    x, y = make_problem(120, 10, seed=3)
    sol = svm.solve(x, y[:, None], np.array([0.5]), config)
    (params,) = seen
    assert {key: params[key] for key in BENCHMARK_LINEARSVC} == BENCHMARK_LINEARSVC
    assert params["C"] == 0.5 and params["verbose"] == 0 and params["random_state"] == 0
    clf = LinearSVC(C=0.5, **BENCHMARK_LINEARSVC, random_state=0).fit(x, y)
    assert (sol.weight[0] == clf.coef_[0]).all() and sol.bias[0] == clf.intercept_[0]
    # an unconverged reference fit is reported as such (max_iter reached)
    hard = svm.solve(x, y[:, None], np.array([1e4]), config.replace(sklearn_max_iter=3))
    assert not hard.converged[0] and hard.iterations[0] == 3


def test_float32_and_one_class_problems():
    x, y = make_problem(100, 15, seed=4)
    ys = np.stack([y, -np.ones_like(y), np.ones_like(y)], 1)  # a problem with no positives, one with no negatives
    costs = np.array([1.0, 1.0, 0.1])
    f64 = svm.solve(x, ys, costs, SVMConfig(dtype="float64", tol=1e-8))
    f32 = svm.solve(x, ys, costs, SVMConfig(dtype="float32", tol=1e-4))
    np.testing.assert_allclose(f32.decision(x)[:, 0], f64.decision(x)[:, 0], atol=2e-3)
    from scipy.optimize import minimize

    cfg = SVMConfig()
    for p in (1, 2):  # one class only (no positives / no negatives): check optimality independently (L-BFGS)
        opt = minimize(lambda w, p=p: svm.svm_objective(x, ys[:, p], w, costs[p], cfg), np.zeros(x.shape[1] + 1),
                       method="L-BFGS-B", options={"gtol": 1e-10, "ftol": 1e-14, "maxiter": 10000})
        ours = svm.svm_objective(x, ys[:, p], f64.w_aug(p, 1.0), costs[p], cfg)
        assert ours <= opt.fun * (1 + 1e-8)
        assert np.sign(f64.decision(x)[:, p]).tolist() == [ys[0, p]] * len(x) or costs[p] < 1
        ref = svm.solve(x, ys[:, p:p + 1], costs[p:p + 1], SVMConfig(backend="sklearn"))  # LinearSVC refuses
        assert svm.svm_objective(x, ys[:, p], ref.w_aug(0, 1.0), costs[p], cfg) == pytest.approx(ours)


def test_cv_sweep_equals_the_benchmark_loop():
    """Re-run fair_self_supervision_benchmark's train_svm_kfold logic with sklearn and compare."""
    rng = np.random.default_rng(5)
    n, d, k = 90, 12, 3
    x = benchmark_l2(rng.normal(size=(n, d)))
    labels = np.where(x[:, :k] + 0.8 * rng.normal(size=(n, k)) > 0.3, 1, -1).astype(np.int8)
    costs = [1e-4, 0.01, 1.0, 100.0]
    res = svm.cv_sweep(x, labels, costs, 3, SVMConfig())
    for j in range(k):
        ref = []
        for c in costs:
            clf = LinearSVC(C=c, class_weight={1: 2, -1: 1}, intercept_scaling=1.0, penalty="l2",
                            loss="squared_hinge", tol=1e-8, dual=True, max_iter=100000)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ref.append(cross_val_score(clf, x, labels[:, j], cv=3, scoring="average_precision").mean())
        np.testing.assert_allclose(res.mean_cv_ap[j], ref, atol=1e-6)
        assert res.chosen[j] == int(np.argmax(ref))


def test_cost_selection_finds_the_large_cost_when_the_small_one_ranks_by_a_nuisance():
    """Tiny C gives w ~ class-mean difference, dominated here by a noisy feature; a large C finds the
    clean small-margin separator. CV must pick the large cost, and a test AP near 1 follows."""
    rng = np.random.default_rng(6)

    def data(n):
        y = np.where(rng.random(n) < 0.4, 1, -1)
        x = np.stack([0.1 * y + 0.01 * rng.normal(size=n), 1.0 * y + 5.0 * rng.normal(size=n)], 1)
        return x, y

    x, y = data(300)
    res = svm.cv_sweep(x, y[:, None].astype(np.int8), [1e-7, 100.0], 3, SVMConfig())
    assert res.chosen_costs == [100.0]
    assert res.mean_cv_ap[0, 1] > 0.99 > 0.9 > res.mean_cv_ap[0, 0]
    xt, yt = data(200)
    assert svm.voc_ap(yt, res.final.decision(xt)[:, 0]) > 0.99


def reference_voc_ap(labels, scores):
    """The benchmark's get_precision_recall + calculate_ap, loop for loop (ignore rows removed first)."""
    keep = [i for i in range(len(labels)) if labels[i] != 0]
    t = np.array([1.0 if labels[i] > 0 else 0.0 for i in keep])
    s = np.array([scores[i] for i in keep], dtype=np.float64)
    ind = np.argsort(s, kind="stable")[::-1]
    tp = np.array([t[i] for i in ind])
    fp = 1.0 - tp
    prec = np.cumsum(tp) / (np.cumsum(tp) + np.cumsum(fp))
    rec = np.cumsum(tp) / t.sum()
    mrec = [0.0, *rec, 1.0]
    mpre = [0.0, *prec, 0.0]
    for i in range(len(mpre) - 2, -1, -1):
        mpre[i] = max(mpre[i], mpre[i + 1])
    return sum((mrec[i] - mrec[i - 1]) * mpre[i] for i in range(1, len(mrec)) if mrec[i] != mrec[i - 1])


def test_voc_ap_hand_cases():
    # ranked P N P N: precisions 1, 1/2, 2/3, 1/2 at recalls .5 .5 1 1 -> .5 * 1 + .5 * 2/3
    assert svm.voc_ap(np.array([1, -1, 1, -1]), np.array([0.9, 0.8, 0.7, 0.1])) == pytest.approx(5 / 6)
    # an ignored image at the top changes nothing
    assert svm.voc_ap(np.array([0, 1, -1, 1, -1]), np.array([5, 0.9, 0.8, 0.7, 0.1])) == pytest.approx(5 / 6)
    # a tie: the later index ranks first (reverse of a stable ascending sort) -> N then P -> AP 1/2
    assert svm.voc_ap(np.array([1, -1]), np.array([0.5, 0.5])) == pytest.approx(0.5)
    assert svm.voc_ap(np.array([-1, 1]), np.array([0.5, 0.5])) == pytest.approx(1.0)
    # monotone precision: N P P -> precision at the recall steps is max(1/2, 2/3) = 2/3 for both
    assert svm.voc_ap(np.array([-1, 1, 1]), np.array([3.0, 2.0, 1.0])) == pytest.approx(2 / 3)
    assert np.isnan(svm.voc_ap(np.array([-1, -1, 0]), np.array([1.0, 2.0, 3.0])))  # no positive
    assert np.isnan(svm.voc_ap(np.array([0, 0]), np.array([1.0, 2.0])))  # all ignored


def test_voc_ap_matches_the_benchmark_loop_and_differs_from_sklearn_ap():
    rng = np.random.default_rng(7)
    for _ in range(20):
        labels = rng.choice([1, -1, 0], size=60, p=[0.3, 0.6, 0.1])
        labels[0] = 1
        scores = np.round(rng.normal(size=60), 1)  # coarse: many ties
        assert svm.voc_ap(labels, scores) == pytest.approx(reference_voc_ap(labels, scores), abs=1e-12)
    labels = np.array([-1, 1, 1, -1, 1])
    scores = np.array([5.0, 4.0, 3.0, 2.0, 1.0])
    # sklearn's (non-interpolated) AP differs: the metric used for test is the benchmark's, not sklearn's
    assert svm.voc_ap(labels, scores) != pytest.approx(average_precision_score(labels > 0, scores))


def test_cv_average_precision_is_sklearns():
    rng = np.random.default_rng(8)
    y = np.where(rng.random(50) < 0.4, 1, -1)
    s = rng.normal(size=50)
    assert svm.cv_average_precision(y, s) == pytest.approx(average_precision_score(y > 0, s))
    assert svm.cv_average_precision(-np.ones(5), s[:5]) == 0.0  # what sklearn's scorer gives a positive-free fold


def test_stratified_folds_match_sklearn():
    from sklearn.model_selection import StratifiedKFold

    y = np.array([1, 0, 0, 1, 0, 0, 1, 0, 0, 0, 1, 0], dtype=bool)
    folds = svm.stratified_folds(y, 3)
    for f, (_, test) in enumerate(StratifiedKFold(3).split(np.zeros(len(y)), y)):
        assert (np.nonzero(folds == f)[0] == test).all()


def test_bad_features_and_settings():
    x = np.ones((4, 3))
    with pytest.raises(BadFeatures, match="same feature vector"):
        common.check_svm_features(np.zeros((4, 3)), "res5 features")
    x[2, 1] = np.nan
    with pytest.raises(BadFeatures, match="NaN"):
        common.check_svm_features(x, "res5 features")
    protocols = {"voc07_svm": voc07_task.default_protocol("quick")}
    with pytest.raises(UserError, match="did you mean voc07_svm.svm.backend"):
        apply_overrides(protocols, parse_overrides(["voc07_svm.svm.bakend=torch"]))
    chosen = apply_overrides(protocols, parse_overrides(["voc07_svm.svm.backend=sklearn"]))["voc07_svm"].svm
    assert chosen == SVMConfig(backend="sklearn")
    with pytest.raises(UserError, match="only available with svm.backend=sklearn"):
        SVMConfig(loss="hinge")
    with pytest.raises(UserError, match="costs must be positive"):
        svm.solve(np.eye(3), np.ones((3, 1)), np.array([0.0]), SVMConfig())


def test_l2_normalize_is_the_benchmarks():
    x = np.array([[3.0, 4.0], [0.0, 0.0]], dtype=np.float16)
    out = common.normalize(x, voc07_task.default_protocol("goyal19"))
    assert out.dtype == np.float64
    np.testing.assert_allclose(out[0], [3 / (5 + 1e-5), 4 / (5 + 1e-5)])
    assert (out[1] == 0).all()


def test_finite_mean_policies():
    assert svm.finite_mean([0.5, 0.7], "nan") == (pytest.approx(0.6), [])
    assert svm.finite_mean([0.5, float("nan")], "nan") == (None, [1])
    assert svm.finite_mean([0.5, float("nan")], "exclude") == (0.5, [1])


def reference_objectives(x, ys, costs, cfg):
    """Each problem solved alone by LinearSVC to a tight tolerance (our objective, float64)."""
    ref = svm.solve(x, ys, costs, SVMConfig(backend="sklearn", sklearn_tol=1e-10, sklearn_max_iter=200000))
    return np.array([svm.svm_objective(x, ys[:, p], ref.w_aug(p, 1.0), costs[p], cfg) for p in range(len(costs))])


def path_problem(n=120, d=30, seed=11):
    """Two label columns (one with rows left out) x a cost path spanning easy (tiny C) to hard (large C)."""
    x, y = make_problem(n, d, seed=seed)
    costs_path = np.array([1e-4, 1e-2, 0.1, 1.0, 10.0, 100.0])
    y2 = y.copy()
    y2[: n // 3] = 0  # a CV-style fold left out
    ys = np.concatenate([np.repeat(y[:, None], len(costs_path), 1), np.repeat(y2[:, None], len(costs_path), 1)], 1)
    costs = np.tile(costs_path, 2)
    order = np.random.default_rng(seed).permutation(len(costs))  # problems in no particular order
    return x, ys[:, order], costs[order]


def objectives(x, ys, costs, sol, cfg):
    return np.array([svm.svm_objective(x, ys[:, p], sol.w_aug(p, 1.0), costs[p], cfg) for p in range(len(costs))])


@pytest.mark.parametrize("direct", ["never", "always", "auto"])
def test_warm_started_path_equals_cold_solves(direct):
    """Solving each cost path in increasing order from the previous solution reaches the same optima as
    independent cold starts, and both match LinearSVC run per problem to a tight tolerance."""
    x, ys, costs = path_problem()
    cfg = SVMConfig(dtype="float64", tol=1e-9, direct_steps=direct)
    warm = svm.solve(x, ys, costs, cfg)
    cold = svm.solve(x, ys, costs, SVMConfig(dtype="float64", tol=1e-9, direct_steps=direct, warm_start=False))
    assert warm.converged.all() and cold.converged.all()
    f_warm, f_cold, f_ref = objectives(x, ys, costs, warm, cfg), objectives(x, ys, costs, cold, cfg), \
        reference_objectives(x, ys, costs, cfg)
    np.testing.assert_allclose(f_warm, f_cold, rtol=1e-9)
    assert (f_warm <= f_ref * (1 + 1e-9)).all()
    np.testing.assert_allclose(f_warm, f_ref, rtol=1e-6)
    np.testing.assert_allclose(warm.decision(x), cold.decision(x), atol=1e-6)
    # the warm path needs fewer Newton steps in total than cold starts
    assert warm.iterations.sum() < cold.iterations.sum()


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_mixed_easy_and_hard_problems_all_converge(dtype):
    """Per-problem convergence masks: a batch mixing trivial problems (tiny C), hard ones (large C on
    nearly separable data), an empty one (no rows) and one-class ones; each stops on its own test and
    every one reaches LinearSVC's optimum."""
    rng = np.random.default_rng(12)
    n, d = 150, 40
    y = np.where(rng.random(n) < 0.3, 1, -1)
    x = benchmark_l2(rng.normal(size=(n, d)) + 1.5 * y[:, None] * (np.arange(d) < 2))
    cols, costs = [], []
    for c in (1e-6, 1e-3, 1.0, 100.0, 1000.0):
        cols.append(y)
        costs.append(c)
    sub = y.copy()
    sub[::2] = 0
    cols += [sub, np.where(np.arange(n) < 40, -1, 0), np.zeros(n, dtype=int)]
    costs += [50.0, 10.0, 1.0]
    ys, costs = np.stack(cols, 1), np.array(costs)
    tol = 1e-9 if dtype == "float64" else 1e-6  # 1e-5 is too loose at C = 1000 (0.2 % in the objective)
    cfg = SVMConfig(dtype=dtype, tol=tol, warm_start=False)  # one batch, no cost path
    sol = svm.solve(x, ys, costs, cfg)
    assert sol.converged.all()
    assert sol.iterations[0] < sol.iterations[4]  # the easy problem left the batch early
    f = objectives(x, ys, costs, sol, cfg)
    assert f[-1] == 0.0 and (sol.weight[-1] == 0).all() and sol.bias[-1] == 0.0  # no rows: w = 0
    two_class = [0, 1, 2, 3, 4, 5]
    f_ref = reference_objectives(x, ys[:, two_class], costs[two_class], cfg)
    np.testing.assert_allclose(f[two_class], f_ref, rtol=1e-7 if dtype == "float64" else 2e-4)
    # the one-class problem: check optimality against L-BFGS on the same objective
    from scipy.optimize import minimize

    opt = minimize(lambda w: svm.svm_objective(x, ys[:, 6], w, costs[6], cfg), np.zeros(d + 1), method="L-BFGS-B",
                   options={"gtol": 1e-12, "ftol": 1e-15, "maxiter": 20000})
    assert f[6] == pytest.approx(opt.fun, rel=1e-6 if dtype == "float64" else 1e-4)


@pytest.mark.parametrize("n,d", [(120, 30), (50, 120)])  # primal coordinates, and the sample span
def test_chunking_gives_the_same_results(n, d):
    x, ys, costs = path_problem(n, d, seed=13)
    whole = svm.solve(x, ys, costs, SVMConfig(dtype="float64", tol=1e-9))
    for chunk in (1, 3):
        part = svm.solve(x, ys, costs, SVMConfig(dtype="float64", tol=1e-9, max_problems=chunk))
        np.testing.assert_allclose(part.weight, whole.weight, rtol=1e-7, atol=1e-9)
        np.testing.assert_allclose(part.bias, whole.bias, rtol=1e-7, atol=1e-9)
    # the memory rule: per-problem state bounded by memory_fraction x the float32 feature matrix
    assert newton._slot_count(5011, 2049, 2048, SVMConfig()) == 5011 * 2048 * 4 // (14 * 5011 * 4)
    assert newton._slot_count(5011, 2049, 2048, SVMConfig(max_problems=10)) == 10


def test_scores_from_margins_equal_the_decision_values():
    """cv_sweep scores the held-out rows from the solver's margins (z v) without building every weight vector."""
    x, ys, costs = path_problem(90, 20, seed=14)
    for d_extra in (0, 100):  # primal, then span coordinates (D + 1 > N)
        xx = np.hstack([x, benchmark_l2(np.random.default_rng(1).normal(size=(len(x), d_extra)))]) if d_extra else x
        keep = np.array([0, 5])
        sol, scores, conv = svm.solve_with_scores(xx, ys, costs, SVMConfig(dtype="float64"), keep=keep)
        full = svm.solve(xx, ys, costs, SVMConfig(dtype="float64"))
        np.testing.assert_allclose(scores, full.decision(xx), atol=1e-8)
        np.testing.assert_allclose(sol.weight, full.weight[keep], atol=1e-10)
        assert conv.shape == (len(costs),) and conv.all()


def test_trapezoid_row_blocks_equal_the_dense_triangular_factor():
    """The span route keeps its Cholesky factor as trapezoid row blocks; products and the back-substitution
    equal dense torch on the full triangular matrix, and the blocks hold about (k + 1) / 2k of it."""
    rng = np.random.default_rng(3)
    n = 37
    a = rng.normal(size=(n, 60))
    low = torch.linalg.cholesky(torch.as_tensor(a @ a.T + np.eye(n)))
    rows = newton._Rows.lower(low, torch.float64, parts=4)
    d, u = torch.as_tensor(rng.normal(size=(n, 3))), torch.as_tensor(rng.normal(size=(n, 3)))
    torch.testing.assert_close(rows @ d, low @ d)
    torch.testing.assert_close(rows.T @ u, low.T @ u)
    torch.testing.assert_close(rows.solve_upper_t(d), torch.linalg.solve_triangular(low.T, d, upper=True))
    stored = sum(b.numel() for _, b in rows.blocks)
    assert n * n / 2 < stored < n * n * 0.7


def test_gram_as_trapezoid_blocks_gathers_any_active_set():
    """The direct steps' K_AA comes from the Gram matrix kept as lower trapezoid blocks (symmetric: only
    the lower part of each row block is read, then mirrored); it equals (z z^T)[A][:, A] exactly."""
    rng = np.random.default_rng(4)
    z = torch.as_tensor(rng.normal(size=(29, 11)))
    gram = newton._Rows.gram_lower(z, parts=5)
    full = z @ z.T
    for rows in (torch.arange(29), torch.tensor([0, 3, 4, 17, 28]), torch.tensor([12]), torch.tensor([5, 6, 7, 8])):
        torch.testing.assert_close(gram.sym_gather(rows), full[rows[:, None], rows])
        # what the Cholesky reads: the lower triangle alone
        torch.testing.assert_close(gram.sym_gather(rows, mirror=False).tril(), full[rows[:, None], rows].tril())
    assert sum(b.numel() for _, b in gram.blocks) < 0.7 * 29 * 29


@pytest.mark.parametrize("precond_rank", [0, 4])
def test_cg_directions_solve_the_newton_system(precond_rank):
    """_pcg run to a tight residual returns s = -H^-1 g and e = z s for each problem's
    H = I + 2C z^T diag(act) z, with and without the preconditioner (no aliasing of residual and direction)."""
    rng = np.random.default_rng(8)
    n, r, p = 40, 9, 3
    z = torch.as_tensor(rng.normal(size=(n, r)))
    act = torch.as_tensor((rng.random((n, p)) < 0.6) * rng.choice([1.0, 2.0], size=(n, p)))
    cost = torch.tensor([0.1, 1.0, 30.0], dtype=torch.float64)
    g = torch.as_tensor(rng.normal(size=(r, p)))
    pre = newton._Precond.build(z, precond_rank) if precond_rank else None
    s, e, its = newton._pcg(z, pre, act, cost, g, torch.full((p,), 1e-12, dtype=torch.float64), max_cg=200)
    for j in range(p):
        h = torch.eye(r, dtype=torch.float64) + 2 * cost[j] * z.T @ (act[:, j:j + 1] * z)
        torch.testing.assert_close(s[:, j], torch.linalg.solve(h, -g[:, j]), rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(e, z @ s)
    assert (its <= 3 * r).all()  # CG in exact arithmetic needs at most r steps


def test_cv_sweep_keeps_the_chosen_refits_only_and_they_equal_a_direct_solve():
    """Refits whose cost can no longer win the CV are dropped as the folds finish; the chosen ones are
    kept and equal solving that class at that cost on all its rows."""
    rng = np.random.default_rng(9)
    n, d, k = 120, 15, 4
    x = benchmark_l2(rng.normal(size=(n, d)))
    labels = np.where(x[:, :k] + 0.7 * rng.normal(size=(n, k)) > 0.4, 1, -1).astype(np.int8)
    labels[::7, 1] = 0  # rows left out of class 1
    costs = [1e-5, 1e-3, 0.03, 0.3, 1.0, 3.0, 30.0, 300.0]
    cfg = SVMConfig(dtype="float64", tol=1e-9)
    res = svm.cv_sweep(x, labels, costs, 3, cfg)
    assert np.isfinite(res.final.weight).all() and np.isfinite(res.final.bias).all()
    ref = svm.solve(x, labels, np.array(res.chosen_costs), cfg)
    np.testing.assert_allclose(res.final.weight, ref.weight, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(res.final.bias, ref.bias, rtol=1e-6, atol=1e-8)
    np.testing.assert_array_equal(res.chosen, np.argmax(res.mean_cv_ap, axis=1))
