"""The heads of several taps trained in one pass over the data (tasks.linear.probe.train_linear_probes) against each
head trained alone (in memory and streamed, resumed), every store read once per epoch, the lockstep reader's split
of each batch over ranks, and data-parallel training (2 gloo processes with torchrun's environment) against one
process on the global batch."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from evalsuite.cache import FeatureStore, lockstep_batches, shuffle_windows
from tasks.linear.probe import ProbeConfig, train_linear_probe, train_linear_probes
from tests.helpers import torchrun_processes, write_feature_store

CLASSES = 4
DIMS = {"a": 12, "b": 8}  # a: BatchNorm over 4 channels x 3 positions; b: one statistic per dimension
CHANNELS = {"a": 4, "b": None}

pytestmark = pytest.mark.usefixtures("one_thread")


def taps_features(n: int = 200, seed: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Two taps' fp16 features of the same labelled rows (class-dependent means, an offset BatchNorm removes)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, CLASSES, n)
    xs = {t: (rng.standard_normal((n, d)) + 1.5 * rng.standard_normal((CLASSES, d))[y] + 2.0).astype(np.float16)
          for t, d in DIMS.items()}
    return xs, y


def write_store(x: np.ndarray, root: Path, tap: str, shard_rows: int = 32, budget: int | str = "1G") -> FeatureStore:
    return write_feature_store(x, root, shard_rows, budget, fields={"tap": tap})


CONFIG = ProbeConfig(epochs=3, batch_size=32, lr=0.05, lr_milestones=(2,), bn="channel", bn_affine=True, seed=5)


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module, atol: float = 0.0) -> None:
    for (name, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        if atol == 0:
            assert torch.equal(va, vb), name
        else:
            torch.testing.assert_close(va.double(), vb.double(), atol=atol, rtol=0, msg=name)


def test_one_pass_equals_each_head_trained_alone_in_memory():
    xs, y = taps_features()
    fits = train_linear_probes(xs, y, CLASSES, CONFIG, channels=CHANNELS, progress=False)
    for tap, x in xs.items():
        alone = train_linear_probe(x, y, CLASSES, CONFIG, channels=CHANNELS[tap], progress=False)
        assert_same_weights(fits[tap].model, alone.model)
        assert fits[tap].history == alone.history
        assert fits[tap].heads == ("a", "b") and alone.heads == ("",)
    assert fits["a"].pass_record() == {"heads": ["a", "b"], "reads_per_epoch": 1, "world_size": 1,
                                       "batch_split": None}


def test_streamed_one_pass_reads_each_store_once_per_epoch_and_equals_each_head_alone(tmp_path, monkeypatch):
    xs, y = taps_features()
    stores = {t: write_store(x, tmp_path, t) for t, x in xs.items()}
    reads: list[tuple[str, int, int]] = []
    real_read = FeatureStore.read

    def spy(self, lo, hi, dtype=None, out=None):
        reads.append((self.entry.fields["tap"], lo, hi))
        return real_read(self, lo, hi, dtype, out)

    monkeypatch.setattr(FeatureStore, "read", spy)
    fits = train_linear_probes(stores, y, CLASSES, CONFIG, channels=CHANNELS, progress=False, stream=True,
                               shuffle_buffer=70)
    # every epoch reads each tap's shards once (200 rows in 32-row shards): one read of the data for both heads.
    # Rows past the 6 batches of 32 are dropped: a last window holding only those is not read at all.
    ranges = stores["a"].shard_ranges()
    expected = []
    for epoch in range(3):
        offset = 0
        for shards, ids in shuffle_windows(ranges, 70, CONFIG.seed, epoch):
            expected += [ranges[i] for i in shards] if offset < 6 * 32 else []
            offset += len(ids)
    assert len(expected) >= 3 * 6
    for tap in DIMS:
        assert sorted((lo, hi) for t, lo, hi in reads if t == tap) == sorted(expected)
    monkeypatch.setattr(FeatureStore, "read", real_read)
    assert fits["a"].stream["heads"] == 2 and "70-row shuffle buffer" in fits["a"].order
    for tap in DIMS:  # each head alone, streamed with the same buffer: the same batches, the same weights
        alone = train_linear_probe(stores[tap], y, CLASSES, CONFIG, channels=CHANNELS[tap], progress=False,
                                   stream=True, shuffle_buffer=70)
        assert_same_weights(fits[tap].model, alone.model)
        assert fits[tap].history == alone.history
    # a buffer of every row is the in-memory order: streamed one pass == in-memory one pass, bit for bit
    whole = train_linear_probes(stores, y, CLASSES, CONFIG, channels=CHANNELS, progress=False, stream=True,
                                shuffle_buffer=200)
    memory = train_linear_probes(xs, y, CLASSES, CONFIG, channels=CHANNELS, progress=False)
    for tap in DIMS:
        assert_same_weights(whole[tap].model, memory[tap].model)


def test_the_taps_are_streamed_when_together_they_exceed_the_budget(tmp_path, capsys):
    xs, y = taps_features(n=2000)
    budget = xs["a"].nbytes + xs["b"].nbytes - 1  # each tap fits alone, both together do not
    stores = {t: write_store(x, tmp_path, t, budget=budget) for t, x in xs.items()}
    config = ProbeConfig(epochs=1, batch_size=32, bn="none")
    assert train_linear_probe(stores["a"], y, CLASSES, config, progress=False).stream is None
    fits = train_linear_probes(stores, y, CLASSES, config, progress=False)
    assert fits["a"].stream is not None and fits["a"].stream["heads"] == 2
    assert "2 heads, one read of each batch for all" in capsys.readouterr().err
    with pytest.raises(Exception, match="all streamed or all in memory"):
        train_linear_probes({"a": stores["a"], "b": xs["b"]}, y, CLASSES, config, progress=False, stream=True)


def test_heads_resume_from_their_own_states_to_the_uninterrupted_weights(tmp_path):
    xs, y = taps_features(seed=1)
    full = train_linear_probes(xs, y, CLASSES, CONFIG, channels=CHANNELS, progress=False)
    states = {t: tmp_path / f"{t}.pt" for t in DIMS}
    settings = {t: {"tap": t} for t in DIMS}

    def stop(epoch, records):
        assert set(records) == set(DIMS)
        if epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_linear_probes(xs, y, CLASSES, CONFIG, channels=CHANNELS, state_paths=states, settings=settings,
                            progress=False, on_epoch_end=stop)
    states["a"].unlink()  # head a starts over, head b resumes at epoch 2 and waits for it
    resumed = train_linear_probes(xs, y, CLASSES, CONFIG, channels=CHANNELS, state_paths=states, settings=settings,
                                  progress=False)
    assert (resumed["a"].resumed_from_epoch, resumed["b"].resumed_from_epoch) == (0, 2)
    for tap in DIMS:
        assert_same_weights(resumed[tap].model, full[tap].model)
        assert [h["loss"] for h in resumed[tap].history] == [h["loss"] for h in full[tap].history]


def test_ranks_read_disjoint_shares_of_every_batch(tmp_path):
    xs, y = taps_features(n=150)
    stores = [write_store(xs[t], tmp_path, t, shard_rows=16) for t in DIMS]
    one = list(lockstep_batches(stores, 32, seed=3, epoch=1, buffer_rows=40))
    parts = [list(lockstep_batches(stores, 32, seed=3, epoch=1, buffer_rows=40, rank=r, world=3)) for r in range(3)]
    assert len(one) == 150 // 32 and all(len(p) == len(one) for p in parts)
    for b, (ids, rows) in enumerate(one):
        for r in range(3):
            ids_r, rows_r = parts[r][b]
            np.testing.assert_array_equal(ids_r, ids[r::3])  # batch[rank::world]
            for t, x in zip(DIMS, rows_r, strict=True):
                np.testing.assert_array_equal(x, xs[t][ids_r])
        np.testing.assert_array_equal(np.sort(np.concatenate([parts[r][b][0] for r in range(3)])), np.sort(ids))
        for t, x in zip(DIMS, rows, strict=True):
            np.testing.assert_array_equal(x, xs[t][ids])


WORKER = textwrap.dedent(r"""
    import json, sys
    from pathlib import Path
    import numpy as np
    import torch
    import torch.distributed as dist
    from contextlib import ExitStack
    torch.set_num_threads(1)
    from evalsuite.distributed import process_group
    group = ExitStack()
    group.enter_context(process_group("cpu"))
    from evalsuite.cache import FeatureCache
    from tasks.linear.probe import ProbeConfig, train_linear_probes
    root, cfg = Path(sys.argv[1]), json.loads(sys.argv[2])
    cfg["lr_milestones"] = tuple(cfg["lr_milestones"])
    config = ProbeConfig(**cfg)
    data = np.load(root / "data.npz")
    xs, y = {"a": data["a"], "b": data["b"]}, data["y"]
    channels = {"a": 4, "b": None}
    cache = FeatureCache(root / "cache", shard_rows=32)
    stores = {t: cache.entry({"tap": t}, len(y)).open() for t in xs}
    r = dist.get_rank()
    memory = train_linear_probes(xs, y, 4, config, channels=channels, progress=False)
    streamed = train_linear_probes(stores, y, 4, config, channels=channels, progress=False, stream=True,
                                   shuffle_buffer=70)
    for mode, fits in (("memory", memory), ("streamed", streamed)):
        torch.save({t: f.model.state_dict() for t, f in fits.items()}, root / f"{mode}{r}.pt")
        (root / f"{mode}{r}.json").write_text(json.dumps({t: [f.history, f.pass_record()] for t, f in fits.items()}))
    group.close()
""")


@pytest.mark.slow
def test_ddp_on_two_gloo_processes_equals_one_process_on_the_global_batch(tmp_path):
    xs, y = taps_features(n=160, seed=2)
    np.savez(tmp_path / "data.npz", a=xs["a"], b=xs["b"], y=y)
    stores = {t: write_store(x, tmp_path / "cache", t) for t, x in xs.items()}
    (tmp_path / "worker.py").write_text(WORKER)
    torchrun_processes([sys.executable, str(tmp_path / "worker.py"), str(tmp_path), json.dumps(CONFIG.to_dict())],
                       cwd=tmp_path)
    reference = {"memory": train_linear_probes(xs, y, CLASSES, CONFIG, channels=CHANNELS, progress=False),
                 "streamed": train_linear_probes(stores, y, CLASSES, CONFIG, channels=CHANNELS, progress=False,
                                                 stream=True, shuffle_buffer=70)}
    for mode, fits in reference.items():
        for r in range(2):
            weights = torch.load(tmp_path / f"{mode}{r}.pt", weights_only=True)
            records = json.loads((tmp_path / f"{mode}{r}.json").read_text())
            for tap, fit in fits.items():
                model = type(fit.model)(DIMS[tap], CLASSES, CHANNELS[tap], "channel", affine=True)
                model.load_state_dict(weights[tap])
                assert_same_weights(model, fit.model, atol=2e-5)  # BN statistics and gradients summed over ranks
                history, one_pass = records[tap]
                assert [h["loss"] for h in history] == pytest.approx([h["loss"] for h in fit.history], abs=1e-5)
                assert one_pass["world_size"] == 2 and one_pass["heads"] == ["a", "b"]
