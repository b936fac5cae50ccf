"""FAISS search vs an independent brute-force reference: ids, scores, ties, leave-one-out, approximate recall."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from evalsuite.errors import BadFeatures, UserError
from evalsuite.features import l2_normalize
from tasks.knn.search import SearchConfig, recall_at_k_ids, search, sort_rows


def normalize_(x: np.ndarray) -> np.ndarray:
    """The kNN task's normalisation: F.normalize semantics, in place."""
    return l2_normalize(x, 1e-12, clamp=True, inplace=True)


pytestmark = pytest.mark.usefixtures("one_thread")


def brute_force(q: np.ndarray, b: np.ndarray, k: int, metric: str = "ip", exclude_self: bool = False):
    """Reference: full score matrix in float64, order by score then ascending index."""
    q64, b64 = q.astype(np.float64), b.astype(np.float64)
    if metric == "ip":
        s = q64 @ b64.T
        key = -s
    else:
        s = ((q64[:, None, :] - b64[None, :, :]) ** 2).sum(-1)
        key = s.copy()
    if exclude_self:
        key[np.arange(len(q)), np.arange(len(q))] = np.inf
    idx = np.broadcast_to(np.arange(len(b)), s.shape)
    order = np.lexsort((idx, key), axis=-1)[:, :k]
    return np.take_along_axis(s, order, 1), order


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_flat_search_equals_brute_force_on_random_data(metric):
    rng = np.random.default_rng(0)
    bank = normalize_(rng.standard_normal((500, 24)).astype(np.float32))
    q = normalize_(rng.standard_normal((61, 24)).astype(np.float32))
    nb = search(q, bank, 17, SearchConfig(metric=metric, chunk_size=7))  # chunks smaller than Q, ragged last
    s_ref, i_ref = brute_force(q, bank, 17, metric)
    np.testing.assert_array_equal(nb.ids, i_ref)
    np.testing.assert_allclose(nb.scores, s_ref, atol=1e-5)
    assert nb.ids.dtype == np.int64 and nb.scores.dtype == np.float32 and nb.scores.shape == (61, 17)


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_exact_ties_are_broken_by_lower_bank_index(metric):
    # integer features: many exactly equal scores, also across the k-th position
    rng = np.random.default_rng(1)
    bank = rng.integers(-2, 3, (800, 6)).astype(np.float32)
    q = rng.integers(-2, 3, (90, 6)).astype(np.float32)
    nb = search(q, bank, 9, SearchConfig(metric=metric, chunk_size=32))
    s_ref, i_ref = brute_force(q, bank, 9, metric)
    np.testing.assert_array_equal(nb.ids, i_ref)
    np.testing.assert_array_equal(nb.scores, s_ref.astype(np.float32))
    if metric == "ip":
        # FAISS alone picks an unspecified member of a tie at the cut-off; those rows were recomputed
        assert nb.info["tie_rows_recomputed"] > 0
    again = search(q, bank, 9, SearchConfig(metric=metric, chunk_size=5))
    np.testing.assert_array_equal(again.ids, nb.ids)  # chunking does not change anything


def test_sort_rows_orders_by_score_then_index():
    s = np.array([[0.5, 0.9, 0.5, 0.9]], np.float32)
    i = np.array([[7, 4, 2, 1]])
    s2, i2 = sort_rows(s, i, "ip")
    assert i2.tolist() == [[1, 4, 2, 7]] and s2[0].tolist() == pytest.approx([0.9, 0.9, 0.5, 0.5])
    s3, i3 = sort_rows(s, i, "l2")
    assert i3.tolist() == [[2, 7, 1, 4]]


def test_leave_one_out_excludes_the_query_but_keeps_its_duplicates():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((40, 8)).astype(np.float32)
    x[30] = x[3]  # an exact duplicate of sample 3
    normalize_(x)
    nb = search(x, x, 5, SearchConfig(chunk_size=16), exclude_self=True)
    assert not (nb.ids == np.arange(40)[:, None]).any()
    assert nb.ids[3, 0] == 30 and nb.ids[30, 0] == 3  # the duplicate is the best neighbour, score 1
    assert nb.scores[3, 0] == pytest.approx(1.0, abs=1e-6)
    s_ref, i_ref = brute_force(x, x, 5, "ip", exclude_self=True)
    np.testing.assert_array_equal(nb.ids, i_ref)
    # k = N - 1 is the whole bank minus the query
    full = search(x, x, 39, exclude_self=True)
    assert sorted(full.ids[0].tolist()) == list(range(1, 40))


def clustered(n, d, centres, seed):
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centres, d)).astype(np.float32) * 3
    return normalize_(c[rng.integers(0, centres, n)] + rng.standard_normal((n, d)).astype(np.float32))


def test_ivf_probing_every_cell_is_exact_and_recall_is_measured():
    bank, q = clustered(2000, 16, 20, 0), clustered(100, 16, 20, 1)
    exact = search(q, bank, 10)
    full = search(q, bank, 10, SearchConfig(index="ivf", nlist=16, nprobe=16, recall_queries=100))
    np.testing.assert_array_equal(full.ids, exact.ids)
    assert full.info["recall_vs_exact"] == 1.0 and full.info["nlist"] == 16

    one = search(q, bank, 10, SearchConfig(index="ivf", nlist=32, nprobe=1, recall_queries=100))
    independent = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(one.ids, exact.ids, strict=True)])
    assert one.info["recall_vs_exact"] == pytest.approx(independent)
    assert one.info["recall_vs_exact"] < 1.0  # a single probed cell misses neighbours across cell borders


def test_hnsw_reaches_high_recall_and_reports_it():
    bank, q = clustered(1500, 16, 10, 3), clustered(80, 16, 10, 4)
    nb = search(q, bank, 10, SearchConfig(index="hnsw", hnsw_m=16, ef_search=64, recall_queries=50, seed=1))
    assert nb.info["recall_queries"] == 50
    assert 0.9 <= nb.info["recall_vs_exact"] <= 1.0
    exact = search(q, bank, 10)
    overall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(nb.ids, exact.ids, strict=True)])
    assert overall >= 0.9


def test_recall_at_k_ids_hand_values():
    exact = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    approx = np.array([[4, 3, 9, -1], [5, 6, 7, 8]])  # 2/4 and 4/4; -1 (no hit) never counts
    assert recall_at_k_ids(approx, exact) == pytest.approx(0.75)


def test_knn_normalisation_is_torch_f_normalize_in_place():
    x = np.array([[3.0, 4.0], [0.0, 0.0], [1e-8, 0.0]], np.float32)
    expected = torch.nn.functional.normalize(torch.from_numpy(x.copy()), dim=1).numpy()
    out = normalize_(x)
    assert out is x
    np.testing.assert_allclose(x[:2], [[0.6, 0.8], [0.0, 0.0]])  # all-zero rows stay zero
    np.testing.assert_allclose(x, expected, rtol=1e-6)


def test_bad_input_gives_clear_errors():
    rng = np.random.default_rng(0)
    bank = rng.standard_normal((10, 4)).astype(np.float32)
    with pytest.raises(BadFeatures, match="dimension mismatch: queries have 3 dims, the bank has 4"):
        search(bank[:, :3].copy(), bank, 2)
    with pytest.raises(UserError, match="k=11 is larger than the bank \\(10 candidates\\)"):
        search(bank, bank, 11)
    with pytest.raises(UserError, match="k=10 is larger than the bank \\(9 candidates \\(leave-one-out"):
        search(bank, bank, 10, exclude_self=True)
    with pytest.raises(UserError, match="k=0"):
        search(bank, bank, 0)
    with pytest.raises(UserError, match="unknown kNN index 'lsh'"):
        SearchConfig(index="lsh")
