"""Nearest-class-centroid accuracy on frozen features: the suite's built-in sanity task.

For each tap: L2-normalise train and test features, average the train features of
each class, assign each test sample to the class whose centroid has the highest
cosine similarity, report top-1 accuracy. Needs no solver and no tuning, so it
proves the checkpoint -> features -> result loop end to end on any classification
dataset the suite reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from evalsuite.errors import BadData
from evalsuite.features import l2_normalize
from evalsuite.outputs import SampleOutputs
from evalsuite.plan import TaskPlan
from evalsuite.protocols import FeatureTaskProtocol, Pooling, preset_changes
from evalsuite.results import Result
from evalsuite.task import TaskContext
from tasks.knn.conformance import CENTROID_CONFORMANCE


def centroid_predictions(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray) -> np.ndarray:
    """The class of the nearest class centroid under cosine similarity, per test sample (pure function)."""
    tr, te = l2_normalize(train_x), l2_normalize(test_x)
    classes = np.unique(train_y)
    centroids = np.stack([tr[train_y == c].mean(axis=0) for c in classes])
    centroids = l2_normalize(centroids)
    return classes[np.argmax(te @ centroids.T, axis=1)]


def centroid_accuracy(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray) -> float:
    """Top-1 accuracy of the nearest class centroid under cosine similarity (pure function)."""
    return float((centroid_predictions(train_x, train_y, test_x) == test_y).mean())


@dataclass(frozen=True)
class CentroidProtocol(FeatureTaskProtocol):
    """The ``goyal19`` / ``vissl`` values (``quick``: 64 px). Pinned by tests/regression: keep names and values."""

    test_split: str = "val"
    pooling: Pooling = "avg"


#: each preset as its changes to the goyal19 values (no published protocol: dino21 is refused)
_PRESET_CHANGES: dict[str, dict[str, Any]] = {"goyal19": {}, "vissl": {}, "quick": {"image_size": 64}}


class CentroidTask:
    name = "centroid"
    description = "nearest-class-centroid top-1 on frozen features (sanity task, any ImageFolder-like data)"
    headline_metrics = ("top1",)
    conformance = CENTROID_CONFORMANCE  # knn's package: its CONFORMANCE is knn's
    seeded = False  # class means of every train image: nothing random

    def default_protocol(self, preset: str) -> CentroidProtocol:
        return CentroidProtocol(**preset_changes(_PRESET_CHANGES, preset, self.name))

    def run(self, ctx: TaskContext) -> list[Result]:
        p: CentroidProtocol = ctx.protocol
        train, test = ctx.open_splits(p.train_split, p.test_split)
        if getattr(train, "classes", None) != getattr(test, "classes", None):
            raise BadData("train and test splits have different class folders", test.root)
        taps = ctx.taps(p.layers)
        ftr = ctx.features(train, taps)
        fte = ctx.features(test, taps)
        out = []
        for tap in taps:
            pred = centroid_predictions(ftr[tap], train.labels, fte[tap])
            correct = pred == np.asarray(test.labels)
            samples = SampleOutputs({"targets": test.labels, "pred": pred, "top1": correct})
            out.append(ctx.result(train.kind, p.test_split, tap, "top1", 100.0 * float(correct.mean()),
                                  params={"num_train": len(train), "num_test": len(test),
                                          "feature_dim": int(ftr[tap].shape[1])},
                                  dataset_fingerprint=test.fingerprint(), outputs=samples.mean("top1")))
        return out

    def plan(self, ctx: TaskContext) -> TaskPlan:
        """Features of both splits at the protocol's size."""
        p: CentroidProtocol = ctx.protocol
        return TaskPlan.of_splits(p, ctx.open_splits(p.train_split, p.test_split))


task = CentroidTask()
