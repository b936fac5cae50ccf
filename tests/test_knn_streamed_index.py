"""Approximate kNN indexes at scale (tasks.knn.search): IVF's k-means trained on a seeded sample of the size FAISS's
guideline gives, the index filled block by block from a bank streamed from its feature store (never read whole),
its recall against the exact search recorded, and the build cost estimated by hand."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from evalsuite.cache import FeatureStore
from evalsuite.errors import UserError
from tasks.knn.search import (
    SearchConfig,
    StoredBank,
    exact_search,
    ivf_build_flops,
    ivf_nlist,
    ivf_train_rows,
    normalize_rows,
    search,
)
from tests.helpers import write_feature_store

pytestmark = pytest.mark.usefixtures("one_thread")


def write_store(x: np.ndarray, root: Path, shard_rows: int = 256) -> FeatureStore:
    return write_feature_store(x, root, shard_rows, fields={"test": "bank"})


def test_ivf_training_size_and_cost_follow_the_faiss_guideline():
    cfg = SearchConfig(index="ivf")
    # nlist: 4 sqrt(N), at most N // 39
    assert ivf_nlist(1_000_000, cfg) == 4000 and ivf_nlist(1000, cfg) == 25 and ivf_nlist(10, cfg) == 1
    assert ivf_nlist(1_000_000, SearchConfig(index="ivf", nlist=1024)) == 1024
    # training rows: max(39 nlist, 50,000), capped at 256 nlist and N; or as set
    assert ivf_train_rows(1_000_000, 4000, cfg) == 156_000  # 39 x 4000
    assert ivf_train_rows(1_000_000, 1024, cfg) == 50_000
    assert ivf_train_rows(1_000_000, 100, cfg) == 25_600  # 256 x 100
    assert ivf_train_rows(3000, 16, cfg) == 3000
    assert ivf_train_rows(1_000_000, 1024, SearchConfig(index="ivf", ivf_train_size=80_000)) == 80_000
    # k-means: 10 assignments of 50,000 rows to 1024 centroids; then every one of 1M rows assigned once (2 flops/MAC)
    f = ivf_build_flops(1_000_000, 2048, 1024, 50_000, 10)
    assert f["train"] == 2 * 10 * 50_000 * 1024 * 2048 and f["add"] == 2 * 1_000_000 * 1024 * 2048
    with pytest.raises(UserError, match="ivf_train_size"):
        SearchConfig(index="ivf", ivf_train_size=0)


def test_ivf_from_a_streamed_bank_reads_it_block_by_block_and_probing_every_cell_is_exact(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5000, 32)).astype(np.float16)  # no clusters: one cell of 16 misses neighbours
    q = normalize_rows(x[:300].astype(np.float32) + rng.standard_normal((300, 32)).astype(np.float32) * 0.1)
    store = write_store(x, tmp_path)
    bank = StoredBank(store, 1024)
    reads: list[int] = []
    real_read, real_take = FeatureStore.read, FeatureStore.take

    def read(self, lo, hi, dtype=None, out=None):
        reads.append(hi - lo)
        return real_read(self, lo, hi, dtype, out)

    def take(self, idx):
        reads.append(len(idx))
        return real_take(self, idx)

    monkeypatch.setattr(FeatureStore, "read", read)
    monkeypatch.setattr(FeatureStore, "take", take)
    every = search(q, bank, 10, SearchConfig(index="ivf", nlist=16, nprobe=16, ivf_train_size=800,
                                             recall_queries=100))
    # the bank is never read whole: 800 sampled rows for k-means, then blocks of at most 1024 rows
    assert max(reads) == 1024 and sum(reads) == 5000 + 800 + 5000  # the recall's exact search reads it again
    monkeypatch.setattr(FeatureStore, "read", real_read)
    monkeypatch.setattr(FeatureStore, "take", real_take)
    exact = exact_search(q, normalize_rows(x.astype(np.float32)), 10)
    np.testing.assert_array_equal(every.ids, exact.ids)  # every cell probed: the exact neighbours
    assert every.info["recall_vs_exact"] == 1.0 and every.info["ivf_train_size"] == 800
    assert every.info["nlist"] == 16 and every.info["bank_blocks"] == 5 and every.info["kmeans_niter"] == 10
    # one cell probed of 16: approximate, and the recorded recall is the one measured against the exact search
    one = search(q, bank, 10, SearchConfig(index="ivf", nlist=16, nprobe=1, recall_queries=300))
    recall = np.mean([len(np.intersect1d(a, b)) / 10 for a, b in zip(one.ids, exact.ids, strict=True)])
    assert one.info["recall_vs_exact"] == pytest.approx(recall) and 0.2 < recall < 1.0
    assert one.info["ivf_train_size"] == 4096  # 256 x 16: the most FAISS's k-means would use
    # HNSW is filled block by block too
    hnsw = search(q, bank, 10, SearchConfig(index="hnsw", hnsw_m=16, ef_search=64, recall_queries=100))
    assert hnsw.info["recall_vs_exact"] > 0.9
