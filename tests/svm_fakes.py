"""Stand-ins for a TaskContext and a VOC dataset, shared by the SVM task tests (features handed in directly)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np

from evalsuite.results import Result

CLASSES = [f"c{j}" for j in range(4)]


class FakeVOC:
    def __init__(self, split, labels):
        self.split, self.classes, self.root = split, list(CLASSES), Path("/fake")
        self.label_matrix = np.asarray(labels, dtype=np.int8)

    def __len__(self):
        return len(self.label_matrix)

    def fingerprint(self):
        return "fp"


class FakeCtx:
    """Just what the SVM tasks use of a TaskContext, with features handed in directly."""

    def __init__(self, protocol, train, test, feats, seed=0):
        self.protocol, self.seed, self.device, self.progress, self.layers = protocol, seed, "cpu", False, None
        self._data = {protocol["train_split"]: train, protocol["test_split"]: test}
        self._feats = feats
        self.extractor = SimpleNamespace(trunk=SimpleNamespace(tap_names=list(feats[protocol["train_split"]])),
                                         pool_specs=lambda taps, pooling, t: {
                                             tap: SimpleNamespace(op="none", out_shape=(3,)) for tap in taps})

    def open_dataset(self, kind, split, path=None):
        return self._data[split]

    def taps(self, default):
        return list(default)

    def transform(self):
        return SimpleNamespace(to_dict=lambda: {"size": 224})

    def features(self, dataset, taps, pooling=None, transform=None):
        return {t: self._feats[dataset.split][t] for t in taps}

    def result(self, dataset, split, layer, metric, value, params=None, note="", dataset_fingerprint=""):
        return Result(task="t", dataset=dataset, split=split, layer=layer, metric=metric, value=value,
                      params={**self.protocol, **(params or {})}, note=note)
