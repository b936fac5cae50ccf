"""Cross-domain few-shot episodes on frozen features (CD-FSL, Guo et al. 2020, as Ericsson et al. 2021 run it in
ssl-transfer ``few_shot.py``).

For each dataset (default the CD-FSL four: EuroSAT, ISIC, ChestX, CropDisease; ``folders`` adds any
``<class>/<image>`` ImageFolder under the data root), each shot count and each tap:

1. features of every image of the dataset (its one pool, the ``test`` split of
   :func:`evalsuite.data.transfer.open_transfer`) through the feature cache, with CD-FSL's evaluation transform:
   the whole image resized to 257 x 257 (``Scale([int(224 * 1.15)] * 2)``, bilinear), CenterCrop(224), ImageNet
   normalisation; the ResNet's global-average-pooled last stage (eval mode: ``FewShotTester.evaluate`` calls
   ``protonet.eval()``, which reaches the backbone);
2. ``episodes`` seeded ``n_way``-way ``k``-shot episodes with ``n_query`` queries per class
   (:func:`tasks.transfer.fewshot.sample_episodes`, seed ``--seed``), one classifier per episode: ``prototype``
   (ssl-transfer's ProtoNet, the default) or ``linear`` (CD-FSL's frozen-backbone ``nn.Linear``);
3. one record per (dataset, shots, tap): metric ``accuracy``, the mean episode accuracy in percent, ``params["shots"]``
   (the leaderboard's variant ``shots=k``), the references' ``1.96 std / sqrt(episodes)`` in ``params["ci95"]``;
   the per-episode accuracies (and each episode's rows, so two runs pair episode by episode) are its per-sample
   outputs under the ``episode_mean`` statistic, whose interval is that same normal one (the record's ``ci_*``).

A shot count the dataset cannot fill (fewer than ``n_way`` classes with ``k + n_query`` images) gives a record
without a value and a note; an absent dataset is skipped with a note (all absent: the task is skipped).

Presets: ``ericsson21`` (the reference) and ``quick`` (64 px, 1 and 5 shots, 100 episodes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from evalsuite.console import note
from evalsuite.data import open_dataset
from evalsuite.data.transfer import TRANSFER_DATASETS, open_transfer, transfer_spec
from evalsuite.errors import UserError
from evalsuite.features import check_features
from evalsuite.outputs import SampleOutputs
from evalsuite.plan import TaskPlan
from evalsuite.protocols import Interpolation, Pooling, ResizeMode, TaskProtocol, preset_changes
from evalsuite.results import Result
from evalsuite.task import DataMissing, TaskContext
from tasks.transfer import fewshot
from tasks.transfer.conformance import FEWSHOT_CONFORMANCE
from tasks.transfer.linear_transfer import feature_dims

FEWSHOT_DATASETS = tuple(name for name, spec in TRANSFER_DATASETS.items() if spec.protocol == "fewshot")
METRIC = "accuracy"


@dataclass(frozen=True)
class FewShotProtocol(TaskProtocol):
    """The ``ericsson21`` values: ssl-transfer ``few_shot.py`` with CD-FSL's episodes (tasks.transfer.conformance)."""

    datasets: tuple[str, ...] = FEWSHOT_DATASETS
    folders: tuple[str, ...] = ()  # <class>/<image> pools under --data-root, recorded as imagefolder:<path>
    data_path: str | None = None  # the folder holding the datasets, relative to --data-root; None: the data root
    layers: tuple[str, ...] | None = ("res5",)
    pooling: Pooling = "avg"
    image_size: int = 224
    resize_mode: ResizeMode = "square_center_crop"
    resize: int | None = 257  # int(224 * 1.15)
    interpolation: Interpolation = "bilinear"
    n_way: int = 5
    shots: tuple[int, ...] = (1, 5, 20, 50)
    n_query: int = 15
    episodes: int = 600
    classifier: Literal["prototype", "linear"] = "prototype"
    linear_epochs: int = 100
    linear_batch_size: int = 4
    linear_lr: float = 0.01
    linear_momentum: float = 0.9
    linear_dampening: float = 0.9
    linear_weight_decay: float = 1e-3


#: each preset as its changes to the ericsson21 values
_PRESET_CHANGES: dict[str, dict[str, Any]] = {
    "ericsson21": {},
    "quick": {"image_size": 64, "resize": 73, "shots": (1, 5), "episodes": 100},
}


class FewShotTask:
    name = "fewshot"
    description = ("n-way k-shot episodes on frozen features (CD-FSL: EuroSAT, ISIC, ChestX, CropDisease; "
                   "ProtoNet or linear), mean accuracy with its 95% interval")
    headline_metrics = (METRIC,)
    base_preset = "ericsson21"
    conformance = FEWSHOT_CONFORMANCE

    def default_protocol(self, preset: str) -> FewShotProtocol:
        return FewShotProtocol(**preset_changes(_PRESET_CHANGES, preset, self.name))

    def run(self, ctx: TaskContext) -> list[Result]:
        p: FewShotProtocol = ctx.protocol
        check_protocol(p)
        taps = ctx.taps(p.layers)
        results: list[Result] = []
        skipped = []
        for name in [*p.datasets, *(f"imagefolder:{f}" for f in p.folders)]:
            try:
                pool = open_pool(ctx, name)
            except DataMissing:
                skipped.append(name)
                continue
            results += run_dataset(ctx, name, pool, taps)
        if skipped:
            note(f"{self.name}: skipped {len(skipped)} dataset(s) without data under {ctx.data_root}: "
                 f"{', '.join(skipped)}")
        if not results:
            raise DataMissing("none of the few-shot datasets is under the data root (evalsuite data synth --kind "
                              "transfer writes small stand-ins)", ctx.data_root)
        return results

    def plan(self, ctx: TaskContext) -> TaskPlan:
        """Every image of each present pool through the trunk once; the episodes run on cached features."""
        p: FewShotProtocol = ctx.protocol
        images = {}
        for name in [*p.datasets, *(f"imagefolder:{f}" for f in p.folders)]:
            try:
                images[name] = len(open_pool(ctx, name))
            except DataMissing:
                continue
        if not images:
            raise DataMissing("none of the few-shot datasets is under the data root", ctx.data_root)
        return TaskPlan(images=images, image_size=p.image_size, feature_dims=feature_dims(ctx))


def check_protocol(p: FewShotProtocol) -> None:
    unknown = [d for d in p.datasets if d not in FEWSHOT_DATASETS]
    if unknown:
        raise UserError(f"fewshot.datasets: unknown {', '.join(unknown)}; choose from {', '.join(FEWSHOT_DATASETS)} "
                        "(any other pool: fewshot.folders)")
    if not (p.datasets or p.folders):
        raise UserError("fewshot: no dataset given (fewshot.datasets or fewshot.folders)")
    if p.n_way < 2 or p.n_query < 1 or p.episodes < 1 or not p.shots or min(p.shots) < 1:
        raise UserError(f"fewshot: needs n_way >= 2, n_query >= 1, episodes >= 1 and shots >= 1, got n_way "
                        f"{p.n_way}, n_query {p.n_query}, episodes {p.episodes}, shots {list(p.shots)}")


def open_pool(ctx: TaskContext, name: str) -> Any:
    """The images episodes are drawn from: a CD-FSL set's one split, or an ImageFolder's classes (``DataMissing``
    when the folder is absent)."""
    path = ctx.protocol.data_path
    if name.startswith("imagefolder:"):
        root = ctx.dataset_root("imagefolder", name.split(":", 1)[1])
        return open_dataset("imagefolder", root, "")
    layout = transfer_spec(name).layout
    root = ctx.dataset_root(name, None if path is None else f"{path}/{layout}")
    return open_transfer(name, root, "test")


def episode_rows(episodes: fewshot.Episodes) -> np.ndarray:
    """(E, n_way * (k + q)) the rows each episode drew, support then query: what pairs two runs' episodes."""
    e = len(episodes.classes)
    return np.concatenate([episodes.support.reshape(e, -1), episodes.query.reshape(e, -1)], axis=1)


def run_dataset(ctx: TaskContext, name: str, pool: Any, taps: list[str]) -> list[Result]:
    """The records of one pool: one per (shots, tap)."""
    p: FewShotProtocol = ctx.protocol
    transform = ctx.transform()
    feats = ctx.features(pool, taps, pooling=p.pooling, transform=transform)
    labels = np.asarray(pool.labels)
    linear = {"epochs": p.linear_epochs, "batch_size": p.linear_batch_size, "lr": p.linear_lr,
              "momentum": p.linear_momentum, "dampening": p.linear_dampening, "weight_decay": p.linear_weight_decay}
    out = []
    for tap in taps:
        x = np.asarray(feats.pop(tap), dtype=np.float32)
        check_features(x, f"{name} {tap} features", pool.root)
        for k in p.shots:
            params = {"shots": int(k), "n_way": p.n_way, "n_query": p.n_query, "num_images": len(pool),
                      "num_classes": len(np.unique(labels)), "feature_dim": int(x.shape[1]),
                      "transform": transform.to_dict(), "device": ctx.device}
            try:
                res = fewshot.evaluate(x, labels, n_way=p.n_way, k_shot=k, n_query=p.n_query, n_episodes=p.episodes,
                                       classifier=p.classifier, seed=ctx.seed, device=ctx.device,
                                       **(linear if p.classifier == "linear" else {}))
            except UserError as e:  # too few images per class for this shot count
                out.append(ctx.result(name, "test", tap, METRIC, None, params=params, note=f"{k}-shot skipped: {e}",
                                      dataset_fingerprint=pool.fingerprint()))
                continue
            samples = SampleOutputs({"accuracy": res.accuracies, "episodes": episode_rows(res.episodes)})
            params.update({"ci95": res.ci95, "std": float(np.std(res.accuracies)),
                           "eligible_classes": len(res.episodes.eligible)})
            out.append(ctx.result(name, "test", tap, METRIC, res.mean, params=params,
                                  dataset_fingerprint=pool.fingerprint(),
                                  outputs=samples.metric("episode_mean", scale=1.0, values="accuracy")))
    return out


task = FewShotTask()
