"""The task contract (DESIGN.md) and the context a task runs in.

A task is any object with ``name``, ``description``, ``default_protocol(preset)`` (a
frozen :class:`~evalsuite.protocols.TaskProtocol`) and ``run(ctx) -> list[Result]``,
found by ``evalsuite.registry``. Optional: ``check_environment()`` (raises when this
machine lacks something the task needs), ``plan(ctx) -> TaskPlan`` (what the run will
cost, printed before it starts), ``headline_metrics`` (the metrics of the summary), ``seeded``
(whether ``evalsuite run --seeds`` runs it once per seed: :func:`task_seeded`), ``distributed`` (whether it runs
data-parallel under torchrun: :func:`task_distributed`).
Feature-based tasks call ``ctx.features(...)``, which goes through the cache;
fine-tuning tasks take ``ctx.trunk`` instead.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from .cache import FeatureStore
from .checkpoints import LoadedCheckpoint
from .data import DATA_LAYOUT, ImageDataset, open_dataset
from .errors import BadData, TaskSkipped, UserError
from .features import FeatureExtractor, Transform, protocol_get
from .outputs import MetricOutputs
from .protocols import TaskProtocol
from .results import Result
from .trunks import arch_info, published_comparability


class DataMissing(TaskSkipped):
    """The task's dataset is not under the data root (``--tasks all`` skips such tasks with a note)."""


@runtime_checkable
class Task(Protocol):
    name: str
    description: str

    def default_protocol(self, preset: str) -> TaskProtocol: ...

    def run(self, ctx: TaskContext) -> list[Result]: ...


def task_seeded(task: Task, protocol: TaskProtocol) -> bool:
    """Whether ``evalsuite run --seeds`` runs ``task`` once per seed under ``protocol``: the task's optional
    ``seeded``, a bool or a method of the resolved protocol returning one. True when its result depends on
    ``ctx.seed`` (a probe's init and order, sampled subsets, a trained head) and the protocol does not already
    average over seeds of its own; False for a deterministic task (an exact kNN, the SVMs' cross-validated costs),
    which then runs once, at the first seed. A task that does not say is taken as seeded."""
    seeded = getattr(task, "seeded", True)
    return bool(seeded(protocol) if callable(seeded) else seeded)


def task_distributed(task: Task) -> bool:
    """Whether ``task`` runs data-parallel under ``torchrun`` (its optional ``distributed``, default False): every
    rank of ``evalsuite run`` then runs it in the process group, each doing its share and all computing the same
    records (the linear probes: ``tasks.linear.ddp``). Any other task runs on rank 0 alone."""
    return bool(getattr(task, "distributed", False))


def environment_problem(task: Task) -> str:
    """Why this machine cannot run ``task`` ('' when it can): the task's optional ``check_environment()``
    raises a UserError or ImportError naming what is missing (navigation's headless GL, say)."""
    check = getattr(task, "check_environment", None)
    if check is None:
        return ""
    try:
        check()
    except (ImportError, UserError) as e:
        return str(e)
    return ""


@dataclass
class TaskContext:
    task: str
    checkpoint: LoadedCheckpoint
    preset: str
    protocol: Any  # the task's TaskProtocol (a frozen dataclass)
    data_root: Path
    out_dir: Path
    extractor_factory: Any  # callable() -> FeatureExtractor, built lazily
    device: str = "cpu"
    seed: int = 0
    layers: Sequence[str] | None = None
    progress: bool = True
    run_id: str = ""
    #: the run's cache directory (``--cache-dir``; None = the default cache): tasks keep their own caches
    #: (detection's proposals) under it
    cache_dir: Path | None = None
    _trunk: torch.nn.Module | None = field(default=None, repr=False)
    _extractor: FeatureExtractor | None = field(default=None, repr=False)
    _deviations: list[str] | None = field(default=None, repr=False)

    # ---------------------------------------------------------------- trunk & features

    @property
    def trunk(self) -> torch.nn.Module:
        """A fresh copy of the checkpoint's trunk (tasks that fine-tune may modify it)."""
        if self._trunk is None:
            self._trunk = self.checkpoint.build_trunk()
        return copy.deepcopy(self._trunk)

    @property
    def extractor(self) -> FeatureExtractor:
        if self._extractor is None:
            self._extractor = self.extractor_factory()
        return self._extractor

    def taps(self, preferred: Sequence[str] | None = None) -> list[str]:
        """The taps to evaluate, the one rule every task follows: the protocol's list (``None``: the trunk's
        default taps; a list naming taps this trunk lacks, e.g. ResNet taps on AlexNet or a ViT: the trunk's
        default taps, every tap for convolutional trunks, the last block and ``last4`` for ViTs), restricted to
        ``--layers`` when given (any of the trunk's taps)."""
        info = arch_info(self.checkpoint.arch)
        trunk_taps = list(info["taps"])
        fallback = list(info.get("default_taps", trunk_taps))
        default = list(preferred) if preferred and all(t in trunk_taps for t in preferred) else fallback
        if not self.layers:
            return default
        return [t for t in self.layers if t in default] or list(self.layers)

    def transform(self) -> Transform:
        return Transform.from_protocol(self.protocol, self.checkpoint.metadata)

    def features(
        self, dataset: ImageDataset, taps: Sequence[str], pooling: str | None = None,
        transform: Transform | None = None,
    ) -> dict[str, np.ndarray]:
        return self.extractor.features(
            dataset, taps, pooling or protocol_get(self.protocol, "pooling", "goyal"), transform or self.transform()
        )

    def feature_stores(
        self, dataset: ImageDataset, taps: Sequence[str], pooling: str | None = None,
        transform: Transform | None = None,
    ) -> dict[str, FeatureStore]:
        """The features of :meth:`features` as memory-mapped stores (nothing loaded): for features that may not fit
        the memory budget (``evalsuite.cache.FeatureStore``: ``resident()``, blocks, shuffled batches)."""
        return self.extractor.feature_stores(
            dataset, taps, pooling or protocol_get(self.protocol, "pooling", "goyal"), transform or self.transform()
        )

    # ---------------------------------------------------------------- data

    def dataset_root(self, kind: str, path: str | None = None) -> Path:
        root = self.data_root / (path if path is not None else DATA_LAYOUT.get(kind, kind))
        if not root.exists():
            raise DataMissing(f"{kind} data not found for task {self.task} (set --data-root or --set "
                              f"{self.task}.data_path=...)", root)
        return root

    def open_dataset(self, kind: str, split: str, path: str | None = None, **options) -> ImageDataset:
        return open_dataset(kind, self.dataset_root(kind, path), split, **options)

    def open_splits(self, *splits: str) -> list[ImageDataset]:
        """The named splits of the protocol's ``dataset`` (at its ``data_path``)."""
        p = self.protocol
        return [self.open_dataset(p.dataset, s, protocol_get(p, "data_path")) for s in splits]

    def open_classification_splits(self, train_split: str, val_split: str) -> tuple[ImageDataset, ImageDataset, list]:
        """Two single-label splits with the same class list, and that list (BadData naming the split otherwise)."""
        train, val = self.open_splits(train_split, val_split)
        classes = getattr(train, "classes", None)
        if classes is None or not hasattr(train, "labels"):
            raise BadData(f"{self.protocol.dataset} is not a single-label classification dataset", train.root)
        if list(classes) != list(getattr(val, "classes", [])):
            raise BadData(f"the {train_split} and {val_split} splits have different class lists", val.root)
        return train, val, list(classes)

    # ---------------------------------------------------------------- results

    def result(
        self, dataset: str, split: str, layer: str, metric: str, value: float | None,
        params: dict[str, Any] | None = None, note: str = "", dataset_fingerprint: str = "",
        outputs: MetricOutputs | None = None,
    ) -> Result:
        """A record with the checkpoint, protocol, seed and run id filled in. ``outputs``: the per-test-sample
        arrays ``value`` is computed from (:meth:`evalsuite.outputs.SampleOutputs.metric`); ``evalsuite run``
        attaches their bootstrap interval and writes them beside the results file."""
        if outputs is not None and not isinstance(outputs, MetricOutputs):
            raise TypeError(f"outputs must be a MetricOutputs (SampleOutputs.metric / .mean), got {type(outputs)}")
        ck = self.checkpoint
        merged = {**self.protocol.to_dict(), **(params or {}), **published_comparability(ck.arch)}
        merged.setdefault("feature_precision", self.extractor.precision if self._extractor else None)
        record = Result(
            task=self.task, dataset=dataset, split=split, layer=layer, metric=metric,
            value=None if value is None else float(value),
            checkpoint_id=ck.sha256, checkpoint=ck.spec, checkpoint_format=ck.format, method=ck.method,
            arch=ck.arch, pretrain_data=ck.pretrain_data, checkpoint_meta=ck.metadata,
            checkpoint_name=ck.name or ck.spec, checkpoint_load=ck.load_info, protocol=self.preset,
            params=merged, seed=self.seed, note=note, dataset_fingerprint=dataset_fingerprint, run_id=self.run_id,
            deviations=self.deviations() + (["arch"] if merged.get("comparable_to_published") is False
                                            and "arch" not in self.deviations() else []),
        )
        resolved = json.dumps(self.protocol.to_dict(), sort_keys=True, default=str)
        record.protocol_hash = hashlib.sha256(resolved.encode()).hexdigest()
        tuned = list(self.protocol.tuned_on_test()) if hasattr(self.protocol, "tuned_on_test") else []
        record.tuned_on_test, record.tuned_on_test_params = bool(tuned), tuned
        record.pending_outputs = outputs
        return record

    def deviations(self) -> list[str]:
        """Fields where this run's protocol differs from the published reference (see evalsuite.conformance),
        and ``arch`` when the trunk is not the benchmark's (AlexNet). :meth:`result` also adds ``arch`` to a record
        whose params say ``comparable_to_published: False`` (a ViT given a head the published protocol has not)."""
        if self._deviations is None:
            from . import registry
            from .conformance import deviations

            not_comparable = ["arch"] if published_comparability(self.checkpoint.arch) else []
            self._deviations = deviations(registry.get_task(self.task), self.protocol, self.preset) + not_comparable
        return list(self._deviations)
