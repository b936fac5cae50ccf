"""A VOC-like dataset with given labels, and a real TaskContext whose datasets and features are handed in
(everything else -- protocol and ``--set`` overrides, taps, transform, pooling specs, results -- is the real
thing), shared by the SVM task tests."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from evalsuite.task import TaskContext
from tests.helpers import make_context

CLASSES = [f"c{j}" for j in range(4)]


class FakeVOC:
    """What the SVM tasks read of a VOC split: its classes, split name, (N, K) label matrix in {1, -1, 0}."""

    def __init__(self, split, labels):
        self.split, self.classes, self.root = split, list(CLASSES), Path("/fake")
        self.label_matrix = np.asarray(labels, dtype=np.int8)

    def __len__(self):
        return len(self.label_matrix)

    def fingerprint(self):
        return "fp"


@dataclasses.dataclass
class HandedDataContext(TaskContext):
    """A TaskContext that opens the given datasets and serves the given features instead of extracting them."""

    datasets: dict[str, Any] = dataclasses.field(default_factory=dict)  # split -> dataset
    handed_features: dict[str, dict[str, np.ndarray]] = dataclasses.field(default_factory=dict)  # split -> tap -> x

    def open_dataset(self, kind, split, path=None, **options):
        return self.datasets[split]

    def features(self, dataset, taps, pooling=None, transform=None):
        return {t: self.handed_features[dataset.split][t] for t in taps}


def handed_context(task: str, out: Path, train: FakeVOC, test: FakeVOC, feats: dict[str, dict[str, np.ndarray]],
                   overrides: Sequence[str] = ()) -> HandedDataContext:
    """``tests.helpers.make_context`` for ``task`` (quick preset, random ResNet-18) with ``overrides``, reading
    ``train`` / ``test`` and ``feats`` (split -> tap -> features; taps must be the trunk's, e.g. res4, res5)."""
    ctx = make_context(task, out, out / "out", overrides=overrides)
    real = {f.name: getattr(ctx, f.name) for f in dataclasses.fields(TaskContext) if f.init}
    return HandedDataContext(**real, datasets={train.split: train, test.split: test}, handed_features=feats)
