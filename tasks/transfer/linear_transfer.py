"""Many-dataset linear transfer (Ericsson, Gouk & Hospedales, CVPR 2021; ssl-transfer ``linear.py``).

For each dataset of the protocol's ``datasets`` (default: the eleven of the paper) and each tap:

1. features of the dataset's train, val and test splits (:func:`evalsuite.data.transfer.open_transfer`: the
   official val, or the reference's seeded 20 % of train) through the feature cache, with the reference's
   transform: Resize(224, bicubic) of the shorter side, CenterCrop(224), ImageNet normalisation; the ResNet's
   global-average-pooled last stage (its ``model.avgpool`` output: ``res5`` averaged), used as they are (no
   normalisation, no standardisation);
2. :func:`tasks.transfer.logreg.select_and_refit`: L2 multinomial logistic regression for every C of the grid
   ``C = 1 / wd`` for ``wd`` in ``torch.logspace(-6, 5, wd_values)`` fitted on train and scored on val with the
   dataset's metric, the first strictly best C walking downwards chosen, the refit on train + val scored on test;
3. one record per (dataset, tap): the test score in the dataset's metric (``top1``, ``mean_per_class`` or
   ``map11``: ``TRANSFER_DATASETS``), with the chosen C and the whole validation curve in its params, and the
   per-test-image arrays behind it (so a bootstrap interval and paired comparisons work: the ``mean``,
   ``mean_per_class`` and ``map_voc11`` statistics of :mod:`evalsuite.stats`).

Then one summary record per tap: ``dataset="all"``, metric ``mean``, the mean of the per-dataset scores over the
datasets that ran (their names in ``params["datasets"]``; the average rank across checkpoints is the leaderboard's).
A dataset whose folder is absent is skipped with a note (all absent: the task is skipped); a broken one fails.

Presets: ``ericsson21`` (the reference; the task has no goyal19, vissl or dino21 version) and ``quick`` (64 px,
``wd_values=12``: every fourth value of the 45-value grid, at most 1000 images per split). The fidelity of each
field is in :mod:`tasks.transfer.conformance`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from evalsuite.console import note
from evalsuite.data import Subset
from evalsuite.data.transfer import TRANSFER_DATASETS, open_transfer, transfer_spec
from evalsuite.errors import UserError
from evalsuite.features import check_features
from evalsuite.outputs import MetricOutputs, SampleOutputs
from evalsuite.plan import TaskPlan
from evalsuite.protocols import Interpolation, Pooling, ResizeMode, TaskProtocol, preset_changes
from evalsuite.results import Result
from evalsuite.task import DataMissing, TaskContext
from tasks.transfer.conformance import LINEAR_CONFORMANCE
from tasks.transfer.logreg import TransferFit, reference_costs, select_and_refit

LINEAR_DATASETS = tuple(name for name, spec in TRANSFER_DATASETS.items() if spec.protocol == "linear")
SUMMARY_DATASET, SUMMARY_METRIC = "all", "mean"
#: the per-sample statistic (evalsuite.stats) behind each dataset metric
STATISTIC = {"top1": "mean", "mean_per_class": "mean_per_class", "map11": "map_voc11"}


@dataclass(frozen=True)
class LinearTransferProtocol(TaskProtocol):
    """The ``ericsson21`` values: ssl-transfer ``linear.py`` (see :mod:`tasks.transfer.conformance`)."""

    datasets: tuple[str, ...] = LINEAR_DATASETS
    data_path: str | None = None  # the folder holding the datasets, relative to --data-root; None: the data root
    layers: tuple[str, ...] | None = ("res5",)
    pooling: Pooling = "avg"
    image_size: int = 224
    resize_mode: ResizeMode = "center_crop"
    resize: int | None = 224
    interpolation: Interpolation = "bicubic"
    wd_values: int = 45  # C = 1 / wd for wd in torch.logspace(-6, 5, wd_values)
    max_images: int | None = None  # a seeded subset of at most this many images per split (None: every image)
    solver: Literal["torch", "sklearn"] = "torch"
    dtype: Literal["float32", "float64"] = "float32"
    tol: float = 1e-4
    max_iter: int = 1000
    block: int = 3


#: each preset as its changes to the ericsson21 values
_PRESET_CHANGES: dict[str, dict[str, Any]] = {
    "ericsson21": {},
    "quick": {"image_size": 64, "resize": 64, "wd_values": 12, "max_images": 1000},
}


class LinearTransferTask:
    name = "linear_transfer"
    description = ("logistic regression on frozen features over 11 transfer datasets (Ericsson et al. 2021): C "
                   "chosen on val, refit on train+val; per-dataset metric and the mean")
    headline_metrics = (SUMMARY_METRIC,)
    base_preset = "ericsson21"
    conformance = LINEAR_CONFORMANCE

    def default_protocol(self, preset: str) -> LinearTransferProtocol:
        return LinearTransferProtocol(**preset_changes(_PRESET_CHANGES, preset, self.name))

    def run(self, ctx: TaskContext) -> list[Result]:
        p: LinearTransferProtocol = ctx.protocol
        check_protocol(p)
        taps = ctx.taps(p.layers)
        results: list[Result] = []
        per_tap: dict[str, dict[str, float | None]] = {tap: {} for tap in taps}
        skipped: dict[str, str] = {}
        for name in p.datasets:
            try:
                splits = open_splits(ctx, name)
            except DataMissing as e:
                skipped[name] = str(e)
                continue
            for r in run_dataset(ctx, name, splits, taps):
                per_tap[r.layer][name] = r.value
                results.append(r)
        if skipped:
            note(f"{self.name}: skipped {len(skipped)} dataset(s) without data under {ctx.data_root}: "
                 f"{', '.join(skipped)}")
        if not results:
            raise DataMissing(f"none of the transfer datasets {', '.join(p.datasets)} is under the data root "
                              f"(evalsuite data synth --kind transfer writes small stand-ins)", ctx.data_root)
        results += [summary_record(ctx, tap, per_tap[tap], skipped) for tap in taps]
        return results

    def plan(self, ctx: TaskContext) -> TaskPlan:
        """Every image of each present dataset's train, val and test splits (at most ``max_images`` each)."""
        p: LinearTransferProtocol = ctx.protocol
        images = {}
        for name in p.datasets:
            try:
                for split, ds in open_splits(ctx, name).items():
                    images[f"{name}/{split}"] = len(ds)
            except DataMissing:
                continue
        if not images:
            raise DataMissing(f"none of the transfer datasets {', '.join(p.datasets)} is under the data root",
                              ctx.data_root)
        return TaskPlan(images=images, image_size=p.image_size, feature_dims=feature_dims(ctx))


def feature_dims(ctx: TaskContext) -> dict[str, int]:
    """tap -> cached dims per image (the plan's cache estimate; the runner fills it in for FeatureTaskProtocols)."""
    p = ctx.protocol
    specs = ctx.extractor.pool_specs(ctx.taps(p.layers), p.pooling, ctx.transform())
    return {tap: spec.dim for tap, spec in specs.items()}


def check_protocol(p: LinearTransferProtocol) -> None:
    unknown = [d for d in p.datasets if d not in LINEAR_DATASETS]
    if unknown or not p.datasets:
        raise UserError(f"linear_transfer.datasets: {', '.join(unknown) or 'none given'}; choose from "
                        f"{', '.join(LINEAR_DATASETS)}")
    if p.wd_values < 1 or (p.max_images is not None and p.max_images < 2):
        raise UserError(f"linear_transfer: wd_values must be >= 1 and max_images >= 2, got {p.wd_values} and "
                        f"{p.max_images}")


def dataset_root(ctx: TaskContext, name: str) -> Path:
    """The dataset's folder (``DataMissing`` when absent): ``<data root>[/<data_path>]/<its layout>``."""
    layout = transfer_spec(name).layout
    path = ctx.protocol.data_path
    return ctx.dataset_root(name, None if path is None else str(Path(path) / layout))


def sample_rows(n: int, k: int | None, seed: int) -> np.ndarray | None:
    """Ascending indices of a seeded sample of ``k`` of ``n`` rows; None when every row is kept."""
    if k is None or k >= n:
        return None
    return np.sort(np.random.default_rng([int(seed), n, k]).choice(n, size=k, replace=False)).astype(np.int64)


def open_splits(ctx: TaskContext, name: str) -> dict[str, Any]:
    """train / val / test of ``name`` (the reference's split rules), each cut to ``max_images`` when set."""
    root = dataset_root(ctx, name)
    out = {}
    for split in ("train", "val", "test"):
        ds = open_transfer(name, root, split)
        rows = sample_rows(len(ds), ctx.protocol.max_images, ctx.seed)
        out[split] = ds if rows is None else Subset(ds, rows, split)
    return out


def labels_of(ds: Any, metric: str) -> np.ndarray:
    """Class indices (n,), or for ``map11`` the VOC label matrix (n, 20) of 1 / -1 / 0, through any Subset."""
    if isinstance(ds, Subset) and not hasattr(ds, "labels"):
        return labels_of(ds.dataset, metric)[ds.indices]
    return np.asarray(ds.label_matrix if metric == "map11" else ds.labels)


def _fit_options(p: LinearTransferProtocol, device: str) -> dict[str, Any]:
    if p.solver == "sklearn":
        from tasks.transfer.reference import SklearnPath

        return {"fit": SklearnPath(max_iter=p.max_iter, tol=p.tol)}
    return {"device": device, "dtype": p.dtype, "tol": p.tol, "max_iter": p.max_iter, "block": p.block}


def _finite_or_none(v: float) -> float | None:
    return float(v) if math.isfinite(v) else None


def test_outputs(fit: TransferFit, x_test: np.ndarray, y_test: np.ndarray, device: str) -> tuple[SampleOutputs,
                                                                                                   MetricOutputs]:
    """The per-test-image arrays of the refit behind the test score, and the statistic over them."""
    if fit.metric == "map11":
        samples = SampleOutputs({"scores": fit.refit.positive_score(x_test, device)[:, :, 0], "labels": y_test})
        return samples, samples.metric("map_voc11", scores="scores", labels="labels")
    pred = fit.refit.predict(x_test, device)[:, 0, 0]
    samples = SampleOutputs({"targets": y_test, "pred": pred, "correct": pred == y_test})
    if fit.metric == "top1":
        return samples, samples.mean("correct")
    return samples, samples.metric("mean_per_class", targets="targets", pred="pred")


def run_dataset(ctx: TaskContext, name: str, splits: dict[str, Any], taps: list[str]) -> list[Result]:
    """The records of one dataset, one per tap."""
    p: LinearTransferProtocol = ctx.protocol
    spec = transfer_spec(name)
    transform = ctx.transform()
    feats = {s: ctx.features(ds, taps, pooling=p.pooling, transform=transform) for s, ds in splits.items()}
    labels = {s: labels_of(ds, spec.metric) for s, ds in splits.items()}
    costs = reference_costs(p.wd_values)
    out = []
    for tap in taps:
        x = {}
        for s in splits:
            x[s] = np.asarray(feats[s].pop(tap), dtype=np.float32)
            check_features(x[s], f"{name} {s} {tap} features", splits[s].root)
        ytr, yva, yte = (labels[s] if spec.metric != "map11" else (labels[s] == 1).astype(np.int64)
                         for s in ("train", "val", "test"))
        fit = select_and_refit((x["train"], ytr), (x["val"], yva), (x["test"], yte), costs, spec.metric,
                               **_fit_options(p, ctx.device))
        _, outputs = test_outputs(fit, x["test"], labels["test"], ctx.device)
        value = _finite_or_none(fit.test_score)
        params = {
            "C": fit.C, "C_index": int(fit.chosen), "val_metric": spec.metric,
            "val_curve": [[float(c), _finite_or_none(v)] for c, v in zip(fit.Cs, fit.val_scores)],
            "val_split": spec.val, "num_train": len(splits["train"]), "num_val": len(splits["val"]),
            "num_test": len(splits["test"]), "num_classes": len(class_names(splits["test"])),
            "feature_dim": int(x["test"].shape[1]), "not_converged": fit.not_converged,
            "float64_polish": int(np.sum(fit.path.float64_polish)) + int(np.sum(fit.refit.float64_polish)),
            "iterations": int(np.sum(fit.path.n_iter)) + int(np.sum(fit.refit.n_iter)),
            "transform": transform.to_dict(), "device": ctx.device,
        }
        note_text = "" if value is not None else (
            f"the {spec.metric} test score is undefined (a predicted class never occurs in the test set, or a "
            "class has no test positive)")
        out.append(ctx.result(name, "test", tap, spec.metric, value, params=params, note=note_text,
                              dataset_fingerprint=splits["test"].fingerprint(), outputs=outputs))
    return out


def class_names(ds: Any) -> list:
    """The class list of a split, through any Subset (VOC2007: its 20 classes)."""
    classes = getattr(ds, "classes", None)
    return list(classes) if classes is not None else class_names(ds.dataset)


def summary_record(ctx: TaskContext, tap: str, values: dict[str, float | None], skipped: dict[str, str]) -> Result:
    """The mean over the datasets that gave a value at ``tap`` (which ones: ``params["datasets"]``)."""
    ran = {k: v for k, v in values.items() if v is not None}
    mean = float(np.mean(list(ran.values()))) if ran else None
    undefined = sorted(set(values) - set(ran))
    text = [f"mean of {len(ran)} dataset(s)"] + ([f"without a value: {', '.join(undefined)}"] if undefined else []) \
        + ([f"skipped (no data): {', '.join(skipped)}"] if skipped else [])
    return ctx.result(SUMMARY_DATASET, "test", tap, SUMMARY_METRIC, mean,
                      params={"datasets": sorted(ran), "per_dataset": values, "datasets_without_value": undefined,
                              "datasets_skipped": skipped, "num_datasets": len(ran)},
                      note="; ".join(text))


task = LinearTransferTask()
