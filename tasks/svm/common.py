"""What voc07_svm and lowshot_svm share: the protocol fields, the benchmark's cost grids and presets, and the
feature checks and normalisation before the SVMs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from evalsuite.errors import BadData, BadFeatures
from evalsuite.features import check_features, l2_normalize
from evalsuite.protocols import FeatureTaskProtocol, Interpolation, ResizeMode
from tasks.svm.solver import SVMConfig

DEFAULT_LAYERS: tuple[str, ...] = ("conv1", "res2", "res3", "res4", "res5")
# fair_self_supervision_benchmark README / scripts: --costs_list "1e-7,...,100" and svm_helper.parse_cost_list
# appends 0.5**4 .. 0.5**19: 26 costs, in this order (np.argmax ties go to the earliest).
GOYAL19_COSTS: tuple[float, ...] = ((1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0, 100.0)
                                    + tuple(0.5**n for n in range(4, 20)))
# VISSL configs/config/benchmark/{linear_image_classification,low_shot_transfer}/voc07/*svm*.yaml
VISSL_COSTS: tuple[float, ...] = (0.01, 0.1, 1.0, 2.0, 5.0, 10.0, 15.0, 20.0, 50.0, 100.0, 1000.0)


@dataclass(frozen=True)
class SVMTaskProtocol(FeatureTaskProtocol):
    """The fields both SVM tasks have: data, taps, transform, normalisation, cost grid, solver (goyal19 values)."""

    dataset: str = "voc2007"
    train_split: str = "trainval"
    test_split: str = "test"
    layers: tuple[str, ...] | None = DEFAULT_LAYERS
    # fair_ssb data_input.py: scale (shorter side 256), then global_resize (224 x 224), both cv2.resize INTER_LINEAR
    resize_mode: ResizeMode = "scale_square"
    resize: int | None = 256
    interpolation: Interpolation = "cv2_bilinear"
    normalize: Literal["l2", "none"] | None = "l2"
    normalize_eps: float = 1e-5
    costs: tuple[float, ...] = GOYAL19_COSTS
    undefined_ap: Literal["nan", "exclude"] = "nan"  # a class without positives: no mAP, or the mAP without it
    svm: SVMConfig = field(default_factory=SVMConfig)


# what each preset changes in the fields above
SHARED_PRESET_CHANGES: dict[str, dict[str, Any]] = {
    "goyal19": {},
    # VISSL's PIL Resize(256) + Resize([224, 224]) and its nn.AvgPool2d (padding counted)
    "vissl": {"costs": VISSL_COSTS, "interpolation": "bilinear", "pooling": "vissl"},
    "quick": {"image_size": 64, "resize_mode": "square", "resize": None, "interpolation": "bilinear",
              "costs": (0.01, 0.1, 1.0, 10.0), "undefined_ap": "exclude"},
}


def check_svm_features(x: np.ndarray, what: str, source: Any = None) -> None:
    """:func:`evalsuite.features.check_features`, plus what an SVM needs on top: not every image with the same
    feature vector (nothing to rank by)."""
    check_features(x, what, source)
    if x.shape[0] > 1 and not (x != x[:1]).any():
        raise BadFeatures(f"{what}: every image has the same feature vector (all zero?); an SVM cannot rank them",
                          source)


def normalize(x: np.ndarray, protocol: SVMTaskProtocol) -> np.ndarray:
    """The benchmark's ``normalize_features`` (x / (||x|| + eps), row-wise, float64), or float64 as is."""
    if protocol.normalize == "l2":
        return l2_normalize(x, protocol.normalize_eps, dtype=np.float64)
    if protocol.normalize in (None, "none"):
        return np.asarray(x, dtype=np.float64)
    raise BadData(f"unknown normalize {protocol.normalize!r}; use l2 or none")


def prepare_features(x: np.ndarray, protocol: SVMTaskProtocol, tap: str, dataset) -> np.ndarray:
    """One split's features of one tap, checked and normalised for the SVMs."""
    check_svm_features(x, f"{tap} features of {protocol.dataset} {dataset.split}", dataset.root)
    return normalize(x, protocol)
