"""Shared fixtures: the real fixtures in tests/fixtures, a private feature cache, tiny synthetic data."""

from __future__ import annotations

import os
from pathlib import Path

# Set before torch loads OpenMP: with two pytest workers on two cores, spinning OpenMP threads slow each other
# down several times over (inherited by the CLI subprocesses the tests start).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

# One torch thread per test process: tiny tensors gain nothing from more, OpenMP spinning across
# threads slowed the suite down several times on 2 cores, and `make test` runs one pytest-xdist
# worker per core instead. Tests that measure threading set it themselves.
torch.set_num_threads(1)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The tests marked ``slow`` first: pytest-xdist deals tests out in this order, so the long ones start at
    once on both workers and the short ones fill in behind them instead of one long test finishing alone."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture
def one_thread():
    """torch and FAISS on one thread for the test (exact-equality searches compare runs thread for thread)."""
    import faiss

    before, fb = torch.get_num_threads(), faiss.omp_get_max_threads()
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    yield
    torch.set_num_threads(before)
    faiss.omp_set_num_threads(fb)


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """The small real fixtures inside the repository (VOC2007 8 images, NYUv2 sample, split lists).

    Provenance and licences: ``tests/fixtures/PROVENANCE.md``. Tests never look outside the repository.
    """
    return REPO / "tests" / "fixtures"


@pytest.fixture()
def cache_dir(tmp_path: Path, monkeypatch) -> Path:
    """A private feature cache for one test (also exported as $EVALSUITE_CACHE for the CLI)."""
    d = tmp_path / "cache"
    monkeypatch.setenv("EVALSUITE_CACHE", str(d))
    return d


@pytest.fixture(scope="session")
def tiny_imagefolder(tmp_path_factory) -> Path:
    """A data root with a small synthetic ImageFolder: 8 classes x 6 train / 3 val images, 32 px."""
    from evalsuite.data.synthetic import write_imagefolder

    root = tmp_path_factory.mktemp("data")
    write_imagefolder(root / "imagefolder", seed=0, per_class=6, size=32)
    return root


@pytest.fixture(scope="session")
def synthetic_voc(tmp_path_factory) -> Path:
    """A data root with a small synthetic VOC2007 (60 trainval / 40 test images, 40 px)."""
    from evalsuite.data.synth_voc import write_voc2007

    root = tmp_path_factory.mktemp("vocdata")
    write_voc2007(root, seed=0, image_size=40, n_trainval=60, n_test=40)
    return root


@pytest.fixture(scope="session")
def random_init():
    """``random_init(arch)``: the state dict of ``random:<arch>`` (seed 0), the untrained trunk a trained checkpoint
    must differ from; built once per arch and test process (read-only: do not modify the tensors)."""
    from evalsuite.checkpoints import load_checkpoint

    built: dict[str, dict[str, torch.Tensor]] = {}

    def get(arch: str) -> dict[str, torch.Tensor]:
        if arch not in built:
            built[arch] = load_checkpoint(f"random:{arch}").build_trunk().state_dict()
        return built[arch]

    return get
