"""Bounded-memory feature stores (evalsuite.cache.FeatureStore) and the tasks' streamed paths: block reads and
shuffled epochs against the loaded matrix, streamed linear-probe training against in-memory training, sharded kNN
against the single-array search (ties included), and peak memory on a store larger than the budget."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch

from evalsuite.cache import CorruptEntry, FeatureCache, format_size, parse_size, shuffle_windows
from evalsuite.errors import UserError
from tasks.knn.search import SearchConfig, StoredBank, normalize_rows, open_bank, search, search_memory
from tasks.linear.probe import ProbeConfig, epoch_order, train_linear_probe
from tests.helpers import write_feature_store

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


def write_store(x: np.ndarray, root: Path, shard_rows: int, budget: str | int = "1G"):
    return write_feature_store(x, root, shard_rows, budget)


def test_sizes_parse_and_print():
    assert parse_size("64M") == 64 * 2**20 and parse_size("1.5GB") == 1_500_000_000 and parse_size(4096) == 4096
    assert parse_size("512MiB") == 512 * 2**20 and format_size(3 * 2**30 // 2) == "1.5 GiB"
    for bad in ("lots", "-1G", "0"):
        with pytest.raises(UserError):
            parse_size(bad)


def test_the_budget_comes_from_the_flag_or_the_environment(monkeypatch, capsys):
    from evalsuite.cli import _parser

    assert _parser().parse_args(["run", "--checkpoint", "c", "--memory-budget", "16G"]).memory_budget == 16 * 2**30
    with pytest.raises(SystemExit) as e:
        _parser().parse_args(["run", "--checkpoint", "c", "--memory-budget", "lots"])
    assert e.value.code == 2 and "cannot read the memory size 'lots'" in capsys.readouterr().err
    monkeypatch.setenv("EVALSUITE_MEMORY_BUDGET", "96M")
    assert FeatureCache("unused").memory_budget == 96 * 2**20
    assert FeatureCache("unused", memory_budget="1G").memory_budget == 2**30
    monkeypatch.delenv("EVALSUITE_MEMORY_BUDGET")
    assert FeatureCache("unused").memory_budget == 4 * 2**30


def test_store_reads_rows_like_the_loaded_matrix_and_verifies_checksums(tmp_path):
    x = np.random.default_rng(0).standard_normal((1000, 12)).astype(np.float16)
    store = write_store(x, tmp_path, 64)
    assert store.shape == (1000, 12) and store.dtype == np.float16 and store.nbytes == x.nbytes
    np.testing.assert_array_equal(store.load(), store.entry.load())
    np.testing.assert_array_equal(store[130:700], x[130:700])  # across shard boundaries
    idx = np.array([999, 0, 64, 63, 500, 500, -1])
    np.testing.assert_array_equal(store[idx], x[idx])
    np.testing.assert_array_equal(store[5], x[5])
    blocks = list(store.blocks(300, np.float32))
    assert [lo for lo, _ in blocks] == [0, 300, 600, 900] and blocks[-1][1].dtype == np.float32
    np.testing.assert_array_equal(np.concatenate([b for _, b in blocks]), x.astype(np.float32))
    # a flipped byte in one shard: open() refuses the entry by its checksum
    shard = store.files[7]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(CorruptEntry, match="checksum mismatch in shard_00007"):
        store.entry.open()


@pytest.mark.parametrize("buffer_rows", [1, 150, 400, 10_000])
def test_every_row_comes_exactly_once_per_epoch_within_the_buffer(tmp_path, buffer_rows):
    x = np.random.default_rng(1).standard_normal((1000, 4)).astype(np.float16)
    x[:, 0] = np.arange(1000)  # row ids in the data (exact in float16 up to 2048)
    store = write_store(x, tmp_path, 64)  # 15 shards of 64 rows and one of 40
    windows = shuffle_windows(store.shard_ranges(), buffer_rows, seed=3, epoch=2)
    order = np.concatenate([ids for _, ids in windows])
    np.testing.assert_array_equal(np.sort(order), np.arange(1000))  # a permutation: every row once
    for shards, ids in windows:  # a window is whole shards, at most buffer_rows rows unless one shard is larger
        rows = np.concatenate([np.arange(*store.shard_ranges()[i]) for i in shards])
        np.testing.assert_array_equal(np.sort(ids), rows)
        assert len(ids) <= max(buffer_rows, 64)
    # the batches: that order cut into batches of 32, the incomplete last one dropped; rows as stored
    batches = list(store.shuffled_batches(32, seed=3, epoch=2, buffer_rows=buffer_rows))
    assert len(batches) == 1000 // 32 and all(len(i) == 32 for i, _ in batches)
    got = np.concatenate([i for i, _ in batches])
    np.testing.assert_array_equal(got, order[:len(got)])
    for ids, rows in batches:
        np.testing.assert_array_equal(rows, x[ids])
    # seeded: the same epoch again is the same order, another epoch another one
    again = np.concatenate([ids for _, ids in shuffle_windows(store.shard_ranges(), buffer_rows, 3, 2)])
    other = np.concatenate([ids for _, ids in shuffle_windows(store.shard_ranges(), buffer_rows, 3, 3)])
    assert np.array_equal(again, order) and not np.array_equal(other, order)
    if buffer_rows < 1000:  # shuffled at the level of shards: the first window is not simply the first rows
        assert windows[0][0] != list(range(len(windows[0][0])))


def test_a_buffer_of_every_row_is_the_in_memory_epoch_order():
    ranges = [(lo, min(700, lo + 64)) for lo in range(0, 700, 64)]
    for epoch in range(3):
        (shards, ids), = shuffle_windows(ranges, 700, seed=5, epoch=epoch)
        np.testing.assert_array_equal(ids, epoch_order(700, 5, epoch))


def labelled_features(n: int = 600, dim: int = 24, classes: int = 5, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    x = (rng.standard_normal((n, dim)) + 2.0 * rng.standard_normal((classes, dim))[y]).astype(np.float16)
    return x, y


def test_streamed_training_equals_in_memory_training(tmp_path):
    x, y = labelled_features()
    store = write_store(x, tmp_path, 64)
    config = ProbeConfig(epochs=3, batch_size=32, lr=0.05, lr_milestones=(2,), bn="feature", seed=7)
    memory = train_linear_probe(x, y, 5, config, progress=False)
    assert memory.stream is None
    # a shuffle buffer of every row: the in-memory batches, so the same weights, bit for bit
    streamed = train_linear_probe(store, y, 5, config, progress=False, stream=True, shuffle_buffer=len(x))
    assert streamed.stream["shuffle_buffer_rows"] == 600 and "600-row shuffle buffer" in streamed.order
    for (name, a), b in zip(memory.model.state_dict().items(), streamed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert streamed.history == memory.history
    # a smaller buffer is another (recorded) order: other weights, every row still seen once per epoch
    small = train_linear_probe(store, y, 5, config, progress=False, stream=True, shuffle_buffer=100)
    assert not torch.equal(small.model.fc.weight, memory.model.fc.weight)
    assert small.iters_per_epoch == memory.iters_per_epoch and "100-row" in small.order


def test_the_probe_streams_only_beyond_the_budget_and_refuses_when_nothing_fits(tmp_path, capsys):
    x, y = labelled_features()
    config = ProbeConfig(epochs=1, batch_size=32, bn="none")
    fits = write_store(x, tmp_path / "a", 64, budget=x.nbytes)
    assert train_linear_probe(fits, y, 5, config, progress=False).stream is None  # loaded: it fits
    small = write_store(x, tmp_path / "b", 64, budget=x.nbytes - 1)
    fit = train_linear_probe(small, y, 5, config, progress=False)
    assert fit.stream is not None and fit.stream["memory_estimate"] < x.nbytes
    assert "streamed from the cache, memory estimate" in capsys.readouterr().err
    tiny = write_store(x, tmp_path / "c", 64, budget=2048)
    with pytest.raises(UserError, match="beyond the memory budget 2.0 KiB") as e:
        train_linear_probe(tiny, y, 5, config, progress=False)
    assert "\n" not in str(e.value)


def brute_force(q: np.ndarray, b: np.ndarray, k: int, exclude_self: bool = False):
    """Reference: float64 inner products, ordered by score then ascending index."""
    s = q.astype(np.float64) @ b.astype(np.float64).T
    key = -s
    if exclude_self:
        key[np.arange(len(q)), np.arange(len(q))] = np.inf
    order = np.lexsort((np.broadcast_to(np.arange(len(b)), s.shape), key), axis=-1)[:, :k]
    return np.take_along_axis(s, order, 1), order


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_sharded_knn_equals_the_single_array_search_exactly(tmp_path, metric):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((4097, 256)).astype(np.float16)  # 4 blocks of 1024 and a last row joining the 4th
    x[1500:1540] = x[7]  # 41 equal rows: ties at every cut-off of the queries below
    store = write_store(x, tmp_path, 300)
    bank = normalize_rows(x.astype(np.float32))
    q = normalize_rows(rng.standard_normal((600, 256)).astype(np.float32))
    q[:12] = bank[7]
    config = SearchConfig(metric=metric, chunk_size=512)  # BLAS-sized chunks (FAISS multiplies 512 x 256 at once)
    single = search(q, bank, 20, config)
    assert single.info["tie_rows_recomputed"] >= 12
    for block_rows in (1024, 2048):
        sharded = search(q, StoredBank(store, block_rows), 20, config)
        assert sharded.info["bank_blocks"] == -(-4096 // block_rows)
        np.testing.assert_array_equal(sharded.ids, single.ids)
        np.testing.assert_array_equal(sharded.scores, single.scores)
        assert sharded.info["tie_rows_recomputed"] == single.info["tie_rows_recomputed"]
    if metric == "ip":  # 41 equal rows, the lower bank index first: row 7, then 1500, 1501, ...
        assert (single.ids[:12] == np.r_[7, 1500:1519]).all()


def test_sharded_leave_one_out_with_integer_ties_matches_brute_force(tmp_path):
    rng = np.random.default_rng(3)
    x = rng.integers(-2, 3, (1100, 6)).astype(np.float16)  # integer features: exact scores, many ties
    store = write_store(x, tmp_path, 100)
    bank = x.astype(np.float32)
    config = SearchConfig(chunk_size=256)
    single = search(bank, bank, 9, config, exclude_self=True)
    sharded = search(bank, StoredBank(store, 1024, normalize=False), 9, config, exclude_self=True)
    np.testing.assert_array_equal(sharded.ids, single.ids)
    np.testing.assert_array_equal(sharded.scores, single.scores)
    s_ref, i_ref = brute_force(bank, bank, 9, exclude_self=True)
    np.testing.assert_array_equal(sharded.ids, i_ref)
    np.testing.assert_array_equal(sharded.scores, s_ref.astype(np.float32))


def test_open_bank_keeps_what_fits_streams_the_rest_and_refuses_in_one_line(tmp_path, capsys):
    x = np.random.default_rng(4).standard_normal((3000, 64)).astype(np.float16)
    config = SearchConfig()
    roomy = open_bank(write_store(x, tmp_path / "a", 256, budget="64M"), 100, 10, config, desc="knn res5")
    np.testing.assert_array_equal(roomy, normalize_rows(x.astype(np.float32)))
    assert "knn res5: memory estimate" in capsys.readouterr().err
    tight = open_bank(write_store(x, tmp_path / "b", 256, budget=2_000_000), 100, 10, config, desc="knn res5")
    assert isinstance(tight, StoredBank) and tight.block_rows == 1024  # the whole search needs about 3.2 MB
    assert "streamed in 3 blocks of 1024 rows" in capsys.readouterr().err
    shard = tight.store.shard_rows * tight.store.row_bytes
    assert search_memory(3000, 100, 64, 10, config, 1024, shard_bytes=shard)["total"] <= 2_000_000
    with pytest.raises(UserError, match=r"knn res5: an exact search streamed in 1024-row blocks needs about") as e:
        open_bank(write_store(x, tmp_path / "c", 256, budget=100_000), 100, 10, config, desc="knn res5")
    assert "\n" not in str(e.value)
    # an approximate index holds its own copy of the bank: built from the streamed bank when that copy fits,
    # refused in one line when it does not (tests/test_knn_streamed_index.py builds and searches one)
    ivf = SearchConfig(index="ivf", nlist=16, ivf_train_size=500)
    assert isinstance(open_bank(write_store(x, tmp_path / "d", 256, budget=2_600_000), 100, 10, ivf), StoredBank)
    with pytest.raises(UserError, match=r"the ivf index built from the bank streamed in 1024-row blocks needs about "
                                        r".*an approximate index holds every bank vector in memory \(773\.4 KiB\)"):
        open_bank(write_store(x, tmp_path / "e", 256, budget=1_000_000), 100, 10, ivf)


# ---------------------------------------------------------------------------- peak memory, in a fresh process


def _rss_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(field)


def rss_child(root: str, rows: int, dim: int, budget: str) -> None:
    """Write a store of ``rows`` x ``dim`` fp16 shard by shard, then open it (checksums), train one streamed probe
    epoch and run one streamed kNN search on it; print, per step, the resident memory before it and the peak
    during it (JSON), each peak measured from a reset of the kernel's peak mark."""
    from evalsuite.cache import FeatureCache

    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    # warm-up: the libraries' own buffers (BLAS, autograd, FAISS) belong to the baseline, not to the features
    w = np.random.default_rng(0).standard_normal((2048, dim)).astype(np.float32)
    faiss.knn(w[:200], w, 11)
    config = ProbeConfig(epochs=1, batch_size=256, bn="none")
    train_linear_probe(w.astype(np.float16), np.arange(2048) % 10, 10, config, progress=False)
    del w
    cache = FeatureCache(root, shard_rows=512, memory_budget=budget)
    entry = cache.entry({"test": "rss"}, rows)
    entry.prepare()
    base = np.random.default_rng(0).standard_normal((512, dim)).astype(np.float16)
    for i in range(entry.num_shards):  # distinct shards, cheaply (no fsync: a test store)
        lo, hi = entry.shard_range(i)
        np.save(entry.shard_path(i), base[:hi - lo] + np.float16(i % 97 / 8))
    entry.finalize()
    steps: dict[str, tuple[int, int]] = {}

    def step(name, fn):
        before = _rss_bytes("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:  # VmHWM back to the current RSS
            f.write("5")
        out = fn()
        steps[name] = (before, _rss_bytes("VmHWM"))
        return out

    store = step("open", lambda: entry.open(memory_budget=cache.memory_budget))  # checksums read in pieces
    fit = step("probe", lambda: train_linear_probe(store, np.arange(rows) % 10, 10, config, progress=False))
    queries = normalize_rows(np.random.default_rng(1).standard_normal((4, dim)).astype(np.float32))
    nb = step("knn", lambda: search(queries, open_bank(store, len(queries), 10, SearchConfig(), desc="rss"), 10))
    print(json.dumps({"store": store.nbytes, "budget": cache.memory_budget, "steps": steps,
                      "streamed": fit.stream is not None, "blocks": nb.info.get("bank_blocks")}))


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's peak-RSS reset")
def test_memory_stays_within_the_budget_on_a_store_larger_than_it(tmp_path):
    code = (f"from tests.test_feature_store import rss_child; "
            f"rss_child({str(tmp_path / 'cache')!r}, 50_000, 2048, '64M')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["store"] > 3 * r["budget"]  # 200 MB of features, a 64 MiB budget
    assert r["streamed"] and r["blocks"] > 1  # both the probe and the kNN bank were streamed
    for name, (before, peak) in r["steps"].items():
        assert peak - before < r["budget"], f"{name}: peak RSS grew by {(peak - before) / 2**20:.1f} MiB"
