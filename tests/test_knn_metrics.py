"""kNN voting and retrieval metrics against hand values, scikit-learn and a DINO-style re-implementation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.metrics import average_precision_score
from sklearn.model_selection import train_test_split
from sklearn.neighbors import KNeighborsClassifier

from evalsuite.features import l2_normalize
from tasks.knn import metrics as M
from tasks.knn.search import SearchConfig, search


def normalize_(x: np.ndarray) -> np.ndarray:
    """The kNN task's normalisation: F.normalize semantics, in place."""
    return l2_normalize(x, 1e-12, clamp=True, inplace=True)


def test_weighted_vote_by_hand():
    sims = np.array([[0.9, 0.8, 0.1]])
    labels = np.array([[1, 0, 1]])
    scores = M.weighted_vote(sims, labels, num_classes=3, temperature=0.1)
    assert scores[0].tolist() == pytest.approx([math.exp(8), math.exp(9) + math.exp(1), 0.0])


def test_weighted_vote_can_disagree_with_the_majority():
    # two lukewarm neighbours of class 0 against one very close neighbour of class 1
    sims = np.array([[0.95, 0.5, 0.45]])
    labels = np.array([[1, 0, 0]])
    weighted = M.weighted_vote(sims, labels, 2, temperature=0.07)
    majority = M.majority_vote(labels, 2)
    assert M.rank_classes(weighted)[0, 0] == 1
    assert M.rank_classes(majority)[0, 0] == 0 and majority[0].tolist() == [2.0, 1.0]
    # a large temperature flattens the weights towards the majority vote
    assert M.rank_classes(M.weighted_vote(sims, labels, 2, temperature=100.0))[0, 0] == 0


def dino_knn_top(sims, nb_labels, labels, num_classes, T):
    """DINO eval_knn.py's voting, re-implemented in torch: one-hot x exp(sim/T), summed, sorted."""
    s, y = torch.as_tensor(sims, dtype=torch.float64), torch.as_tensor(nb_labels)
    one_hot = torch.zeros(y.shape[0] * y.shape[1], num_classes, dtype=torch.float64)
    one_hot.scatter_(1, y.reshape(-1, 1), 1)
    probs = (one_hot.view(y.shape[0], -1, num_classes) * (s / T).exp().view(y.shape[0], -1, 1)).sum(1)
    pred = torch.sort(probs, dim=1, descending=True, stable=True).indices
    t = torch.as_tensor(labels)
    return tuple((pred[:, :n] == t[:, None]).any(1).double().mean().item() for n in (1, 5))


def test_weighted_vote_matches_dino_reimplementation():
    rng = np.random.default_rng(0)
    bank = normalize_(rng.standard_normal((300, 16)).astype(np.float32))
    ybank = rng.integers(0, 10, 300)
    q = normalize_(rng.standard_normal((50, 16)).astype(np.float32))
    yq = rng.integers(0, 10, 50)
    nb = search(q, bank, 20)
    acc = M.topk_accuracy(M.weighted_vote(nb.scores, ybank[nb.ids], 10, 0.07), yq, (1, 5))
    ref1, ref5 = dino_knn_top(nb.scores, ybank[nb.ids], yq, 10, 0.07)
    assert acc[1] == pytest.approx(ref1) and acc[5] == pytest.approx(ref5)


def test_majority_vote_matches_sklearn_including_label_ties():
    rng = np.random.default_rng(3)
    xtr, ytr = rng.standard_normal((200, 5)), rng.integers(0, 4, 200)
    xte = rng.standard_normal((120, 5))
    k = 4  # even k over 4 classes: vote ties happen; sklearn and we both pick the smallest label
    nb = search(xte.astype(np.float32), xtr.astype(np.float32), k, SearchConfig(metric="l2"))
    counts = M.majority_vote(ytr[nb.ids], 4)
    assert (np.sort(counts, axis=1)[:, -1] == np.sort(counts, axis=1)[:, -2]).any()  # ties really occur
    ours = M.rank_classes(counts)[:, 0]
    sk = KNeighborsClassifier(n_neighbors=k, algorithm="brute").fit(xtr, ytr).predict(xte)
    np.testing.assert_array_equal(ours, sk)


def test_topk_accuracy_ties_rank_lower_class_first():
    scores = np.array([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0]])
    assert M.rank_classes(scores).tolist() == [[1, 2, 0, 3], [0, 1, 2, 3]]
    assert M.topk_accuracy(scores, np.array([2, 0]), (1, 2)) == {1: 0.5, 2: 1.0}
    assert M.topk_accuracy(scores, np.array([1, 3]), (1, 3)) == {1: 0.5, 3: 0.5}


def test_vote_rejects_bad_labels_and_temperature():
    with pytest.raises(ValueError, match="temperature"):
        M.vote_weights(np.zeros((1, 2)), 0.0)
    with pytest.raises(ValueError, match="neighbour labels must lie in"):
        M.majority_vote(np.array([[0, 5]]), 3)


def test_full_ranking_ap_equals_sklearn():
    rng = np.random.default_rng(4)
    for _ in range(5):
        s = rng.standard_normal(60)
        y = rng.random(60) < 0.3
        order = np.argsort(-s)
        ap = M.average_precision(y[order][None, :], np.array([y.sum()]))[0]
        assert ap == pytest.approx(average_precision_score(y, s))


def test_truncated_ap_precision_recall_by_hand():
    rel = np.array([[1, 0, 1, 0], [0, 0, 0, 0], [0, 1, 0, 0]], bool)
    nrel = np.array([3, 0, 1])
    ap = M.average_precision(rel, nrel)
    assert ap[0] == pytest.approx((1 + 2 / 3) / 3)  # normaliser min(R=3, K=4) = 3
    assert math.isnan(ap[1])  # no relevant entry at all: excluded from the mean
    assert ap[2] == pytest.approx(0.5)
    assert M.mean_average_precision(rel, nrel) == pytest.approx(((1 + 2 / 3) / 3 + 0.5) / 2)
    # R larger than the depth: normalised by the depth (a perfect top-2 list scores 1)
    assert M.average_precision(np.array([[1, 1]], bool), np.array([10]))[0] == pytest.approx(1.0)
    assert M.precision_at_k(rel, (1, 4)) == {1: pytest.approx(1 / 3), 4: pytest.approx((2 / 4 + 0 + 1 / 4) / 3)}
    assert M.recall_at_k(rel, nrel, (1, 4)) == {1: pytest.approx((1 / 3 + 0) / 2), 4: pytest.approx((2 / 3 + 1) / 2)}


def test_relevance_and_counts_single_and_multilabel():
    assert M.relevance_single(np.array([1, 2]), np.array([[1, 2, 1], [2, 2, 0]])).tolist() == [
        [True, False, True], [True, True, False]]
    assert M.num_relevant_single(np.array([1, 2]), np.array([0, 1, 1, 2])).tolist() == [2, 1]
    assert M.num_relevant_single(np.array([1, 1]), np.array([1, 1, 0]), exclude_self=True).tolist() == [1, 1]
    bank = np.array([[1, 0, 0], [0, 1, 1], [0, 0, 0], [1, 1, 0]], bool)
    query = np.array([[0, 0, 1], [1, 1, 0]], bool)
    ids = np.array([[3, 1, 2], [2, 0, 1]])
    assert M.relevance_multi(query, bank, ids).tolist() == [[False, True, False], [False, True, True]]
    assert M.num_relevant_multi(query, bank).tolist() == [1, 3]
    # leave-one-out within the bank: each sample with a positive label stops counting itself
    assert M.num_relevant_multi(bank, bank, exclude_self=True).tolist() == [1, 1, 0, 2]


def test_multilabel_vote_and_class_mean_ap_ignore_difficult():
    sims = np.array([[0.5, 0.2], [0.9, 0.1]])
    pos = np.array([[[1, 0], [1, 1]], [[0, 1], [0, 0]]], float)
    scores = M.multilabel_vote(sims, pos, 0.5)
    assert scores[0].tolist() == pytest.approx([math.exp(1) + math.exp(0.4), math.exp(0.4)])
    assert scores[1].tolist() == pytest.approx([0.0, math.exp(1.8)])
    assert M.multilabel_vote(sims, pos, None)[0].tolist() == [2.0, 1.0]
    rng = np.random.default_rng(5)
    lm = rng.choice([-1, 0, 1], size=(40, 3), p=[0.5, 0.2, 0.3])
    sc = rng.random((40, 3))
    m, per = M.class_mean_ap(sc, lm)
    ref = [average_precision_score(lm[lm[:, c] != 0, c] > 0, sc[lm[:, c] != 0, c]) for c in range(3)]
    assert per == pytest.approx(ref) and m == pytest.approx(np.mean(ref))


def test_digits_raw_pixels_weighted_knn_is_accurate():
    """Real data: scikit-learn's 8x8 digits, raw pixels, DINO's vote (k=20, T=0.07) -> >95% top-1."""
    x, y = load_digits(return_X_y=True)
    xtr, xte, ytr, yte = train_test_split(x.astype(np.float32), y, test_size=0.3, random_state=0, stratify=y)
    bank, q = normalize_(np.ascontiguousarray(xtr)), normalize_(np.ascontiguousarray(xte))
    nb = search(q, bank, 20)
    acc = M.topk_accuracy(M.weighted_vote(nb.scores, ytr[nb.ids], 10, 0.07), yte, (1, 5))
    assert acc[1] > 0.95 and acc[5] > 0.99
    maj = M.topk_accuracy(M.majority_vote(ytr[nb.ids], 10), yte, (1,))
    assert maj[1] > 0.93
    # retrieval: the nearest raw-pixel neighbour is usually the same digit
    rel = M.relevance_single(yte, ytr[nb.ids])
    assert M.precision_at_k(rel, (1,))[1] > 0.95
