"""Linear probe on frozen, cached features: BatchNorm + Linear, trained with SGD.

The head of the Goyal et al. 2019 linear benchmark (fair_self_supervision_benchmark's
``*_finetune_linear`` models, VISSL's ``eval_mlp``): the pooled tap activation goes
through a BatchNorm, then one fully connected layer, trained with softmax cross-entropy by
SGD with Nesterov momentum 0.9, weight decay on the linear weight and bias (never on
BatchNorm's scale/shift), and a step learning-rate schedule (x ``lr_gamma`` at each milestone).
fair_ssb: BatchNorm without scale/shift, weights ~ N(0, 0.01^2), zero bias (``bn_affine=False``,
``init="gaussian"``); VISSL's ``eval_mlp``: ``nn.BatchNorm2d`` with scale/shift and PyTorch's
default ``nn.Linear`` init (``bn_affine=True``, ``init="pytorch_default"``).
DINO's ``eval_linear.py`` ``LinearClassifier``: no BatchNorm (``bn="none"``), N(0, 0.01^2) weights and zero bias,
SGD with momentum 0.9 and no weight decay, ``lr`` scaled by batch / 256 (``lr_base_batch=256``) and
``CosineAnnealingLR(epochs, eta_min=0)`` stepped once per epoch (``lr_schedule="cosine"``).

BatchNorm modes (``bn``):
- ``channel`` (the benchmark's): statistics per channel of the pooled C x g x g map,
  shared across the g x g grid (Caffe2 SpatialBN / ``nn.BatchNorm2d``), so the
  features' row layout must be C-major (what ``evalsuite.trunks.pool_features`` writes);
- ``feature``: one statistic per feature dimension (``nn.BatchNorm1d`` on the flat vector);
- ``none``: no normalisation.

Features are the (N, D) arrays of the feature cache (fp16; fp32 beyond fp16's range); each mini-batch is
sliced and converted to float32 on its own, so no float32 copy of the matrix is ever made. Training may read
K matrices of the same rows (K augmented views of every image, :class:`EpochViews`): epoch e reads view e mod K.
Batches are a seeded permutation per epoch (``epoch_order``), so an interrupted run
resumes from its last per-epoch state (``evalsuite.io.ResumeState``: other settings or other
features are refused naming them, an unreadable state is reported and ignored) and ends with
the same weights as an uninterrupted one. Metrics (``topk_accuracy``) are pure functions.

Features beyond the memory budget (an ``evalsuite.cache.FeatureStore`` that does not fit, see ``resident()``)
are never loaded: each epoch streams them from the cache's memory-mapped shards in the order of
``evalsuite.cache.shuffle_windows`` (shards in a seeded order, rows permuted within a shuffle buffer of
``shuffle_buffer`` rows, by default what half the budget holds), with the same batch size, iteration count, schedule
and resume. With a buffer holding every row that order is ``epoch_order`` itself, so streamed training gives the
weights in-memory training gives (tests/test_feature_store.py); with a smaller buffer each batch mixes the rows of
fewer shards, and the order used is recorded (``ProbeFit.order``). Features that fit are loaded and trained on
exactly as before.

One pass for many heads (:func:`train_linear_probes`): the heads of every tap of a task train on the same rows in the
same batch order, so each epoch reads every batch once (the taps' stores in lockstep, one shuffle buffer each) and
updates every head with it; each head keeps its own model, optimiser and resume state and ends with the weights
of training it alone. Under ``torchrun`` each rank reads its share of every batch and the ranks sum BatchNorm
statistics and gradients (:mod:`tasks.linear.ddp`).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from evalsuite.cache import FeatureStore, default_buffer_rows, format_size, lockstep_batches, stream_memory
from evalsuite.console import note
from evalsuite.console import progress as progress_bar
from evalsuite.distributed import rank_and_world
from evalsuite.errors import BadData, BadFeatures, UserError
from evalsuite.features import check_features
from evalsuite.io import ResumeState
from tasks.linear.ddp import all_reduce_grads, synced_batch_norm

BN_MODES = ("channel", "feature", "none")
INITS = ("gaussian", "pytorch_default")
LR_SCHEDULES = ("step", "cosine")


@dataclass(frozen=True)
class ProbeHyperParameters:
    """The probe's training fields, shared by :class:`ProbeConfig` and the task protocol (goyal19 values)."""

    epochs: float = 14
    batch_size: int = 256
    lr: float = 0.01
    lr_milestones: tuple[float, ...] = (4, 8, 12)
    lr_gamma: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-4
    bn: Literal["channel", "feature", "none"] = "channel"
    bn_eps: float = 1e-5
    bn_momentum: float = 0.1
    bn_affine: bool = False
    init: Literal["gaussian", "pytorch_default"] = "gaussian"
    init_std: float = 0.01
    # step: x lr_gamma at each of lr_milestones; cosine: lr (1 + cos(pi e / epochs)) / 2 in epoch e (milestones unused)
    lr_schedule: Literal["step", "cosine"] = "step"
    lr_base_batch: int | None = None  # None: lr as given; N: lr is for batch N, scaled by batch_size / N


@dataclass(frozen=True)
class ProbeConfig(ProbeHyperParameters):
    """Every hyper-parameter of one probe fit (all recorded with the result)."""

    seed: int = 0

    def __post_init__(self):
        if self.bn not in BN_MODES:
            raise UserError(f"unknown probe bn mode {self.bn!r}; choose one of {', '.join(BN_MODES)}")
        if self.init not in INITS:
            raise UserError(f"unknown probe init {self.init!r}; choose one of {', '.join(INITS)}")
        if not self.epochs > 0:
            raise UserError(f"probe epochs must be positive, got {self.epochs}")
        if int(self.batch_size) < 1:
            raise UserError(f"probe batch_size must be >= 1, got {self.batch_size}")
        if not self.lr > 0:
            raise UserError(f"probe lr must be positive, got {self.lr}")
        if list(self.lr_milestones) != sorted(self.lr_milestones):
            raise UserError(f"lr_milestones must be increasing, got {list(self.lr_milestones)}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise UserError(f"unknown lr_schedule {self.lr_schedule!r}; choose one of {', '.join(LR_SCHEDULES)}")
        if self.lr_base_batch is not None and int(self.lr_base_batch) < 1:
            raise UserError(f"lr_base_batch must be >= 1 or none, got {self.lr_base_batch}")

    @property
    def scaled_lr(self) -> float:
        """The schedule's peak lr: ``lr`` x batch_size / lr_base_batch (the linear scaling rule) or ``lr``."""
        return self.lr * self.batch_size / self.lr_base_batch if self.lr_base_batch else self.lr

    @classmethod
    def from_protocol(cls, protocol: Any, seed: int = 0) -> ProbeConfig:
        """The solver fields of a task protocol (same names), with the run's seed."""
        names = [f for f in ProbeHyperParameters.__dataclass_fields__ if hasattr(protocol, f)]
        kwargs = {f: getattr(protocol, f) for f in names}
        if "lr_milestones" in kwargs:
            kwargs["lr_milestones"] = tuple(float(m) for m in kwargs["lr_milestones"])
        return cls(**kwargs, seed=int(seed))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["lr_milestones"] = list(self.lr_milestones)
        return d


# ---------------------------------------------------------------------------- the model


class LinearProbe(nn.Module):
    """BatchNorm (with a learnt scale/shift only when ``affine``) on the flat features, then
    ``nn.Linear(dim, num_classes)``."""

    def __init__(self, dim: int, num_classes: int, channels: int | None = None, bn: str = "channel",
                 eps: float = 1e-5, momentum: float = 0.1, affine: bool = False):
        super().__init__()
        if bn not in BN_MODES:
            raise UserError(f"unknown probe bn mode {bn!r}; choose one of {', '.join(BN_MODES)}")
        self.dim, self.num_classes, self.mode = dim, num_classes, bn
        if bn == "channel":
            channels = channels or dim
            if dim % channels:
                raise BadFeatures(f"feature dim {dim} is not a multiple of the tap's {channels} channels")
            self.channels = channels
            self.bn: nn.Module | None = nn.BatchNorm1d(channels, eps=eps, momentum=momentum, affine=affine)
        elif bn == "feature":
            self.channels = dim
            self.bn = nn.BatchNorm1d(dim, eps=eps, momentum=momentum, affine=affine)
        else:
            self.channels = dim
            self.bn = None
        self.fc = nn.Linear(dim, num_classes)
        self.sync_stats = False  # data-parallel training: batch statistics over every rank's rows (tasks.linear.ddp)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        if self.bn is None:
            return x
        bn = synced_batch_norm if self.sync_stats and self.training else (lambda m, t: m(t))
        if self.mode == "channel":
            # (N, C*L) -> (N, C, L): BatchNorm1d over (N, L) per channel == BatchNorm2d on the C x g x g map.
            return bn(self.bn, x.reshape(x.shape[0], self.channels, -1)).reshape(x.shape[0], -1)
        return bn(self.bn, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.normalize(x))


def build_probe(dim: int, num_classes: int, config: ProbeConfig, channels: int | None = None) -> LinearProbe:
    """A probe initialised as ``config.init`` says, seeded by ``config.seed``: ``gaussian`` (fair_ssb's
    ``GaussianFill(std=init_std)`` weights, zero bias) or ``pytorch_default`` (``nn.Linear.reset_parameters``:
    weight and bias ~ U(-1/sqrt(dim), 1/sqrt(dim)), which VISSL's ``eval_mlp`` keeps)."""
    model = LinearProbe(dim, num_classes, channels, config.bn, config.bn_eps, config.bn_momentum, config.bn_affine)
    if config.init == "gaussian":
        gen = torch.Generator().manual_seed(int(config.seed))
        with torch.no_grad():
            model.fc.weight.copy_(torch.randn(model.fc.weight.shape, generator=gen) * config.init_std)
            model.fc.bias.zero_()
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(config.seed))
            model.fc.reset_parameters()
    return model


def param_groups(model: LinearProbe, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on the linear weight and bias, none on BatchNorm's scale/shift (fair_ssb
    ``WEIGHT_DECAY_BN: 0.0``; VISSL ``regularize_bn: False``, ``regularize_bias: True``)."""
    groups = [{"params": list(model.fc.parameters()), "weight_decay": weight_decay}]
    bn = list(model.bn.parameters()) if model.bn is not None else []
    if bn:
        groups.append({"params": bn, "weight_decay": 0.0})
    return groups


# ---------------------------------------------------------------------------- schedule and order


def iterations_per_epoch(n: int, batch_size: int) -> int:
    """Full batches per epoch (an incomplete last one is dropped); one batch of all rows if n < batch."""
    return max(1, n // batch_size)


def total_iterations(n: int, config: ProbeConfig) -> int:
    return max(1, int(round(config.epochs * iterations_per_epoch(n, config.batch_size))))


def num_epochs(n: int, config: ProbeConfig) -> int:
    """Epochs the fit runs (the last one may stop early): ceil(total iterations / iterations per epoch)."""
    return math.ceil(total_iterations(n, config) / iterations_per_epoch(n, config.batch_size))


def lr_at(iteration: int, iters_per_epoch: int, config: ProbeConfig) -> float:
    """Step schedule: ``scaled_lr * gamma^k`` with k the number of milestones (in epochs) already reached.
    Cosine: ``scaled_lr * (1 + cos(pi * e / epochs)) / 2`` in epoch e = iteration // iters_per_epoch, as DINO's
    ``CosineAnnealingLR(optimizer, epochs, eta_min=0)`` stepped after every epoch gives it."""
    if config.lr_schedule == "cosine":
        epoch = iteration // iters_per_epoch
        return float(config.scaled_lr * (1 + math.cos(math.pi * epoch / config.epochs)) / 2)
    steps = sum(iteration >= int(round(m * iters_per_epoch)) for m in config.lr_milestones)
    return float(config.scaled_lr * config.lr_gamma**steps)


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """One epoch's order: a permutation seeded by (seed, epoch) alone, so resuming needs no RNG state."""
    return np.random.default_rng([int(seed), int(epoch)]).permutation(n)


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    order = epoch_order(n, seed, epoch)
    bs = min(batch_size, n)
    return [order[i * bs:(i + 1) * bs] for i in range(iterations_per_epoch(n, batch_size))]


# ---------------------------------------------------------------------------- input checks


def check_labels(y: np.ndarray, n: int, num_classes: int, what: str = "labels",
                 path: str | Path | None = None) -> np.ndarray:
    """One integer class index in 0..num_classes-1 per feature row (an empty split is refused), as int64."""
    y = np.asarray(y)
    if y.ndim != 1 or y.shape[0] != n:
        raise BadData(f"{what}: expected {n} labels, got shape {tuple(y.shape)}", path)
    if n == 0:
        raise BadData(f"{what}: the split is empty (0 samples)", path)
    if not np.issubdtype(y.dtype, np.integer):
        raise BadData(f"{what} must be integers, got {y.dtype}", path)
    bad = (y < 0) | (y >= num_classes)
    if bad.any():
        i = int(np.nonzero(bad)[0][0])
        raise BadData(f"{what}: label {int(y[i])} at sample {i} is outside the class range "
                      f"0..{num_classes - 1}", path)
    return y.astype(np.int64, copy=False)


# ---------------------------------------------------------------------------- metrics (pure)


def topk_hits(logits: np.ndarray, labels: np.ndarray, ks: Sequence[int] = (1, 5)) -> dict[int, np.ndarray]:
    """Per sample and k, whether its true class is among the k highest scores (the per-sample outputs).

    A sample counts for top-k when fewer than k classes score strictly higher than
    its true class (ties are resolved in its favour, so the result does not depend on
    a sort order). ``k`` larger than the number of classes counts every sample.
    """
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if logits.ndim != 2 or logits.shape[0] != labels.shape[0]:
        raise ValueError(f"logits {logits.shape} and labels {labels.shape} do not match")
    if logits.shape[0] == 0:
        raise ValueError("no samples to score")
    true = logits[np.arange(len(labels)), labels]
    rank = (logits > true[:, None]).sum(axis=1)
    return {int(k): rank < k for k in ks}


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, ks: Sequence[int] = (1, 5)) -> dict[int, float]:
    """Fraction of samples whose true class is among the k highest scores, for each k (:func:`topk_hits`)."""
    return {k: float(hits.mean()) for k, hits in topk_hits(logits, labels, ks).items()}


def cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Mean softmax cross-entropy (natural log) of float logits."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-logp[np.arange(len(labels)), np.asarray(labels)].mean())


# ---------------------------------------------------------------------------- training


IN_MEMORY_ORDER = "numpy default_rng([seed, epoch]).permutation"


def streamed_order(buffer_rows: int) -> str:
    return (f"streamed from the cache: shards in default_rng([seed, epoch, 1]) order, {buffer_rows}-row shuffle "
            f"buffer permuted by default_rng([seed, epoch]) (evalsuite.cache.shuffle_windows)")


class FeatureStream:
    """Mini-batches of an fp16 / fp32 (N, D) matrix as float32 tensors on ``device``.

    On CUDA the matrix is uploaded once when it fits in a quarter of free memory;
    otherwise (and on CPU) each batch is sliced from the host array and converted alone.
    A :class:`~evalsuite.cache.FeatureStore` (features beyond the memory budget) is never loaded: :func:`pass_batches`
    streams it in the store's shuffled order with a ``buffer_rows`` shuffle buffer, each batch checked as it comes.
    """

    def __init__(self, x: np.ndarray | FeatureStore, device: torch.device, buffer_rows: int | None = None,
                 what: str = "train features", source=None):
        self.x, self.device = x, device
        self.streamed = isinstance(x, FeatureStore)
        self.buffer_rows, self.what, self.source = buffer_rows, what, source
        self.on_device: torch.Tensor | None = None
        if device.type == "cuda" and not self.streamed:
            free, _ = torch.cuda.mem_get_info(device)
            if x.nbytes < free // 4:
                self.on_device = torch.from_numpy(np.ascontiguousarray(x)).to(device)

    def __len__(self) -> int:
        return self.x.shape[0]

    def batch(self, idx: np.ndarray) -> torch.Tensor:
        if self.on_device is not None:
            return self.on_device[torch.from_numpy(idx).to(self.device)].float()
        return torch.from_numpy(self.x[idx]).to(self.device, non_blocking=True).float()

    def range(self, lo: int, hi: int) -> torch.Tensor:
        if self.on_device is not None:
            return self.on_device[lo:hi].float()
        return torch.from_numpy(self.x[lo:hi]).to(self.device).float()


def pass_batches(streams: Sequence[FeatureStream], batch_size: int, seed: int, epoch: int, rank: int = 0,
                 world: int = 1) -> Iterator[tuple[np.ndarray, list[torch.Tensor]]]:
    """One epoch's ``(row indices, [float32 batch of each stream])``, every stream's rows in the same order (one read
    of the data for all heads): :func:`epoch_batches` in memory, ``evalsuite.cache.lockstep_batches`` when streamed
    (the same batches when the buffer holds every row). With ``world`` > 1: this rank's share ``batch[rank::world]``
    of every batch, the only rows it reads."""
    if not streams[0].streamed:
        for idx in epoch_batches(len(streams[0]), batch_size, seed, epoch):
            local = idx[rank::world]
            yield local, [s.batch(local) for s in streams]
        return
    batches = lockstep_batches([s.x for s in streams], batch_size, seed, epoch, streams[0].buffer_rows, rank, world)
    for b, (idx, rows) in enumerate(batches):
        xs = []
        for s, r in zip(streams, rows, strict=True):
            check_features(r, f"{s.what} (streamed batch {b + 1} of epoch {epoch + 1})", s.source)
            xs.append(torch.from_numpy(r).to(s.device, non_blocking=True).float())
        yield idx, xs


def _check_store(x: FeatureStore, what: str, source) -> None:
    """check_features on a store, read in pieces well inside its memory budget."""
    check_features(x, what, source, chunk_bytes=max(x.row_bytes, min(1 << 26, x.memory_budget // 8)))


class EpochViews:
    """K training matrices of the same rows and labels (K augmented views of every image); epoch e reads view
    e mod K. A view is an (N, D) array or feature store, or a function returning one, called when the view is
    first read; only the view in use is held. Whether a store is loaded or streamed is decided for all the heads
    of a pass together (:func:`open_views`)."""

    def __init__(self, views: np.ndarray | FeatureStore | Sequence[Any], source=None, what: str = "train features"):
        self.sources = [views] if isinstance(views, np.ndarray | FeatureStore) else list(views)
        if not self.sources:
            raise BadFeatures(f"no {what} (0 views)", source)
        self.source, self.what = source, what
        self.shape: tuple[int, ...] | None = None
        self._view, self._x, self._checked = -1, None, False

    def __len__(self) -> int:
        return len(self.sources)

    def view_of(self, epoch: int) -> int:
        return epoch % len(self.sources)

    def raw(self, view: int) -> np.ndarray | FeatureStore:
        """View ``view`` as given (a function called once per switch to the view; a store not loaded)."""
        if view != self._view:
            x = self.sources[view]
            self._view, self._x, self._checked = view, x() if callable(x) else x, False
        return self._x

    def use(self, view: int, x: np.ndarray | FeatureStore) -> np.ndarray | FeatureStore:
        """``x`` (view ``view``, loaded or not) checked: finite (a streamed store: batch by batch as it is read),
        2-D, and the shape of every other view."""
        self._x = x
        if not self._checked:
            what = self.what if len(self.sources) == 1 else f"{self.what} (view {view})"
            if not isinstance(x, FeatureStore):
                check_features(x, what, self.source)
            if self.shape is not None and tuple(x.shape) != self.shape:
                raise BadFeatures(f"{what} have shape {tuple(x.shape)}, view 0 has {self.shape}", self.source)
            self.shape, self._checked = tuple(x.shape), True
        return x


def open_views(views: Mapping[str, EpochViews], view: int, stream: bool | None) -> dict[str, np.ndarray | FeatureStore]:
    """Every head's view ``view``, checked; feature stores are loaded when together they fit the (smallest) memory
    budget (``stream=None``), else all streamed in one order (``stream=True``); ``stream=False`` loads them."""
    raw = {name: v.raw(view) for name, v in views.items()}
    stores = [x for x in raw.values() if isinstance(x, FeatureStore)]
    if stores:
        load = stream is False or (stream is None and sum(s.nbytes for s in stores)
                                   <= min(s.memory_budget for s in stores))
        if load:
            raw = {name: x.load() if isinstance(x, FeatureStore) else x for name, x in raw.items()}
        elif len(stores) < len(raw):
            raise UserError("heads trained in one pass are all streamed or all in memory: give every head a "
                            "feature store or every head an array")
    return {name: views[name].use(view, x) for name, x in raw.items()}


@dataclass
class ProbeFit:
    model: LinearProbe
    config: ProbeConfig
    history: list[dict[str, float]] = field(default_factory=list)
    iters_per_epoch: int = 0
    total_iterations: int = 0
    resumed_from_epoch: int = 0
    views: int = 1  # training matrices read in turn (augmented views); 1: the same features every epoch
    order: str = IN_MEMORY_ORDER  # how each epoch's batches were drawn
    stream: dict[str, Any] | None = None  # streamed training: budget, shuffle buffer, memory estimate
    heads: tuple[str, ...] = ()  # the heads trained in the same pass (one read of each batch for all of them)
    world_size: int = 1  # ranks the batches were split over (torchrun)

    @property
    def epochs_run(self) -> int:
        return len(self.history)

    def loss_summary(self) -> dict[str, Any]:
        losses = [h["loss"] for h in self.history]
        return {
            "loss_per_epoch": [round(v, 6) for v in losses],
            "lr_per_epoch": [h["lr"] for h in self.history],
            "loss_first": round(losses[0], 6) if losses else None,
            "loss_final": round(losses[-1], 6) if losses else None,
            "loss_min": round(min(losses), 6) if losses else None,
        }

    def pass_record(self) -> dict[str, Any]:
        """What a record says of the pass: the heads that shared each read of the data, and the ranks."""
        return {"heads": list(self.heads), "reads_per_epoch": 1, "world_size": self.world_size,
                "batch_split": "batch[rank::world], BatchNorm statistics and gradients summed over ranks"
                if self.world_size > 1 else None}


def features_fingerprint(features: np.ndarray, labels: np.ndarray, rows: int = 64) -> str:
    """A cheap fingerprint of a fit's data: shape, dtype, ``rows`` evenly spaced rows and every label
    (a resume onto other features or labels is refused; hashing a Places205 matrix whole would take minutes)."""
    h = hashlib.sha256(f"{features.shape}|{features.dtype}".encode())
    h.update(np.ascontiguousarray(features[np.linspace(0, len(features) - 1, rows).astype(np.int64)]).tobytes())
    h.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    return h.hexdigest()[:16]


def train_linear_probe(
    features: np.ndarray | FeatureStore | Sequence[np.ndarray | FeatureStore | Callable[[], Any]],
    labels: np.ndarray,
    num_classes: int,
    config: ProbeConfig,
    *,
    channels: int | None = None,
    state_path: str | Path | None = None,
    settings: Mapping[str, Any] | None = None,
    on_epoch_end: Callable[[int, dict[str, float]], None] | None = None,
    evaluate: Callable[[LinearProbe], Mapping[str, float]] | None = None,
    **kwargs: Any,
) -> ProbeFit:
    """Fit one probe on fp16 / fp32 (N, D) ``features`` (or on K such views in turn, see :class:`EpochViews`):
    :func:`train_linear_probes` with one head (the same arguments, for that head alone)."""
    callback = None if on_epoch_end is None else (lambda epoch, records: on_epoch_end(epoch, records[""]))
    fits = train_linear_probes(
        {"": features}, labels, num_classes, config, channels={"": channels},
        state_paths=None if state_path is None else {"": state_path},
        settings=None if settings is None else {"": settings}, on_epoch_end=callback,
        evaluate=None if evaluate is None else {"": evaluate}, **kwargs)
    return fits[""]


@dataclass
class _Head:
    """One head of a pass: its features, model, optimiser, fit record and resume state."""

    name: str
    views: EpochViews
    model: LinearProbe
    opt: torch.optim.Optimizer
    fit: ProbeFit
    resume: ResumeState | None = None
    start: int = 0
    evaluate: Callable[[LinearProbe], Mapping[str, float]] | None = None
    loss_sum: torch.Tensor | float = 0.0  # this epoch's summed loss (float64 on the device once added to)
    seen: int = 0

    def label(self, desc: str) -> str:
        return f"{desc} {self.name}" if self.name else desc


def train_linear_probes(
    features: Mapping[str, np.ndarray | FeatureStore | Sequence[np.ndarray | FeatureStore | Callable[[], Any]]],
    labels: np.ndarray,
    num_classes: int,
    config: ProbeConfig,
    *,
    channels: Mapping[str, int | None] | None = None,
    device: str | torch.device = "cpu",
    state_paths: Mapping[str, str | Path] | None = None,
    settings: Mapping[str, Mapping[str, Any]] | None = None,
    progress: bool = True,
    desc: str = "linear probe",
    on_epoch_end: Callable[[int, dict[str, dict[str, float]]], None] | None = None,
    evaluate: Mapping[str, Callable[[LinearProbe], Mapping[str, float]]] | None = None,
    source: str | Path | None = None,
    shuffle_buffer: int | None = None,
    stream: bool | None = None,
) -> dict[str, ProbeFit]:
    """Fit one probe per head (e.g. per tap) on the same rows and ``labels``, all in one pass over the data: each
    epoch reads every batch once and updates every head with it. ``features[name]`` is that head's (N, D) matrix,
    feature store, or K views of them (:class:`EpochViews`; every head has the same K).

    Every head has its own model, optimiser and resume state, and the same config (seed, schedule, batch order) as
    it would alone, so each head's weights are those of training it alone (``tests/test_probe_one_pass.py``).
    Feature stores are loaded when together they fit the memory budget, else streamed in lockstep
    (``evalsuite.cache.lockstep_batches``: one shuffle buffer of ``shuffle_buffer`` rows per head, by default what
    half the budget holds for all heads together, so a streamed head alone would default to a larger buffer and
    another order); ``stream=True`` / ``False`` streams / loads them whatever their size.

    Each head's state (model, optimiser, loss history) is rewritten atomically after every epoch at
    ``state_paths[name]``; its settings are ``settings[name]`` (the caller's provenance: checkpoint, tap, ...) plus
    the solver config, the class count, the number of views and the fingerprint of its view 0; a state with other
    settings is refused (UserError naming them). A head resumed further than another is not updated until the
    others reach its epoch. ``evaluate[name](model)`` (e.g. the val split's accuracies) runs after every epoch and
    its values join that epoch's history record. ``on_epoch_end(epoch, {name: record})`` runs after the states
    are written.

    Under ``torchrun`` (an initialised process group) each rank reads its share of every batch and the ranks'
    BatchNorm statistics and gradients are summed (:mod:`tasks.linear.ddp`): the weights of one process on the
    whole batch, within float rounding; rank 0 writes the states.
    """
    if not features:
        raise BadFeatures("no training features (0 heads)", source)
    rank, world = rank_and_world()
    dev = torch.device(device)
    names = list(features)
    multi = len(names) > 1
    views = {name: EpochViews(features[name], source, f"train features {name}" if multi else "train features")
             for name in names}
    if len({len(v) for v in views.values()}) > 1:
        raise BadFeatures(f"every head needs the same number of views, got {[len(v) for v in views.values()]}",
                          source)
    n = views[names[0]].raw(0).shape[0]
    labels = check_labels(labels, n, num_classes, "train labels", source)  # refuses 0 rows
    first = open_views(views, 0, stream)
    for name, x in first.items():
        if x.shape[0] != n:
            raise BadFeatures(f"train features {name} have {x.shape[0]} rows, {names[0]} has {n}", source)
    if world > 1 and min(config.batch_size, n) < world:
        raise UserError(f"{desc}: a batch of {min(config.batch_size, n)} rows cannot be split over {world} ranks")
    ipe = iterations_per_epoch(n, config.batch_size)
    total = total_iterations(n, config)
    epochs = num_epochs(n, config)
    heads: list[_Head] = []
    for name in names:
        model = build_probe(first[name].shape[1], num_classes, config, (channels or {}).get(name)).to(dev)
        model.sync_stats = world > 1
        opt = torch.optim.SGD(param_groups(model, config.weight_decay), lr=config.lr, momentum=config.momentum,
                              nesterov=config.nesterov, weight_decay=config.weight_decay)
        fit = ProbeFit(model, config, [], ipe, total, views=len(views[name]), heads=tuple(names), world_size=world)
        heads.append(_Head(name, views[name], model, opt, fit, evaluate=(evaluate or {}).get(name)))
    plan = None
    if isinstance(first[names[0]], FeatureStore):
        plan = plan_stream([first[h.name] for h in heads], [h.model for h in heads], config.batch_size,
                           shuffle_buffer, desc, world, announce=rank == 0)
        for h in heads:
            h.fit.stream, h.fit.order = plan, streamed_order(plan["shuffle_buffer_rows"])
    for h in heads:
        if state_paths is None or state_paths.get(h.name) is None:
            continue
        streamed = {"order": h.fit.order} if plan else {}  # in-memory states keep their old settings
        h.resume = ResumeState(state_paths[h.name],
                               {**((settings or {}).get(h.name) or {}), "config": config.to_dict(),
                                "num_classes": num_classes, "channels": (channels or {}).get(h.name),
                                "views": len(h.views), "evaluated_each_epoch": h.evaluate is not None,
                                "features": features_fingerprint(first[h.name], labels), **streamed},
                               what="linear probe")
        state = h.resume.load()
        if state is not None:
            h.model.load_state_dict(state["model"])
            h.opt.load_state_dict(state["optimizer"])
            h.fit.history = list(state["history"])
            h.start = h.fit.resumed_from_epoch = int(state["epoch"])
    start = min(h.start for h in heads)
    streams: dict[str, FeatureStream] = {}
    stream_view = -1
    y_all = torch.from_numpy(labels)
    bs_global = min(config.batch_size, n)
    bar = progress_bar(range(start, epochs), desc=desc, unit="epoch", enabled=progress and rank == 0,
                       initial=start, total=epochs)
    for epoch in bar:
        active = [h for h in heads if h.start <= epoch]
        view = heads[0].views.view_of(epoch)
        if view != stream_view:
            stream_view = view
            xs = first if view == 0 and epoch == start else open_views(views, view, stream)
            buffer = plan["shuffle_buffer_rows"] if plan else None
            streams = {name: FeatureStream(x, dev, buffer, views[name].what, source) for name, x in xs.items()}
            first = {}  # view 0's matrices are held by the streams alone
        for h in active:
            h.model.train()
            h.loss_sum, h.seen = 0.0, 0
        for b, (idx, xs) in enumerate(pass_batches([streams[h.name] for h in active], config.batch_size,
                                                   config.seed, epoch, rank, world)):
            it = epoch * ipe + b
            if it >= total:
                break
            lr = lr_at(it, ipe, config)
            y = y_all[idx].to(dev, non_blocking=True)
            losses = []
            for h, x in zip(active, xs, strict=True):
                for g in h.opt.param_groups:
                    g["lr"] = lr
                if world == 1:
                    loss = F.cross_entropy(h.model(x), y)
                else:  # this rank's part of the global batch's mean loss
                    loss = F.cross_entropy(h.model(x), y, reduction="sum") / bs_global
                h.opt.zero_grad(set_to_none=True)
                loss.backward()
                if world == 1:
                    h.opt.step()
                losses.append(loss.detach().double())
            if world > 1:  # the global batch's gradients, then the same step on every rank
                losses = [torch.tensor(v, dtype=torch.float64)
                          for v in all_reduce_grads([h.model for h in active], losses)]
                for h in active:
                    h.opt.step()
            for h, loss in zip(active, losses, strict=True):
                h.loss_sum += loss * bs_global
                h.seen += bs_global
        records = {}
        for h in active:
            mean_loss = float(h.loss_sum) / max(h.seen, 1)
            if not math.isfinite(mean_loss):
                raise BadFeatures(f"{h.label(desc)}: training loss became {mean_loss} in epoch {epoch + 1} "
                                  f"(lr {config.lr} too high for these features?)", source)
            record = {"epoch": epoch + 1, "loss": mean_loss, "lr": lr_at(epoch * ipe, ipe, config)}
            if len(h.views) > 1:
                record["view"] = stream_view
            if h.evaluate is not None:
                record.update(h.evaluate(h.model))
            h.fit.history.append(record)
            if h.resume is not None and rank == 0:
                h.resume.save({"epoch": epoch + 1, "model": h.model.state_dict(), "optimizer": h.opt.state_dict(),
                               "history": h.fit.history})
            records[h.name] = record
        bar.set_postfix({f"loss {name}" if name else "loss": f"{r['loss']:.4f}" for name, r in records.items()},
                        lr=f"{lr_at(epoch * ipe, ipe, config):.2g}")
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, records)
    bar.close()
    for h in heads:
        h.model.eval()
    return {h.name: h.fit for h in heads}


def plan_stream(stores: Sequence[FeatureStore], models: Sequence[LinearProbe], batch_size: int,
                shuffle_buffer: int | None, desc: str, world: int = 1, announce: bool = True) -> dict[str, Any]:
    """The shuffle buffer and memory estimate of streamed training of one head per store in one pass (printed when
    ``announce``); UserError in one line when the budget cannot hold them. With ``world`` ranks the estimate is one
    rank's (its share of the buffer and of a batch); the buffer, and so the order, is the same for any world."""
    first = stores[0]
    # a window is at least one shard, whatever the buffer
    buffer_rows = min(len(first), max(first.shard_rows,
                                      int(shuffle_buffer or default_buffer_rows(stores, batch_size))))
    parts = stream_memory([s.dim for s in stores], [s.itemsize for s in stores], buffer_rows, first.shard_rows,
                          batch_size, world)
    parts.pop("total")
    # weights, grads, momentum of every head
    parts["model"] = 3 * sum(p.numel() * p.element_size() for m in models for p in m.parameters())
    # one head's step at a time: the normalised batch, its gradient, one more float32
    parts["training_step"] = 3 * -(-batch_size // world) * max(s.dim for s in stores) * 4
    total, budget = sum(parts.values()), min(s.memory_budget for s in stores)
    nbytes = sum(s.nbytes for s in stores)
    described = ", ".join(f"{k.replace('_', ' ')} {format_size(v)}" for k, v in parts.items())
    heads = f"; {len(stores)} heads, one read of each batch for all" if len(stores) > 1 else ""
    ranks = f"; per rank of {world}" if world > 1 else ""
    if total > budget:
        lower = " or lower shuffle_buffer" if shuffle_buffer else ""
        raise UserError(f"{desc}: streaming the {format_size(nbytes)} training features needs about "
                        f"{format_size(total)} ({described}{heads}{ranks}), beyond the memory budget "
                        f"{format_size(budget)}; raise --memory-budget / EVALSUITE_MEMORY_BUDGET{lower}")
    if announce:
        note(f"{desc}: training features of {format_size(nbytes)} streamed from the cache, memory estimate "
             f"{format_size(total)} within the budget {format_size(budget)} ({described}{heads}{ranks})")
    return {"memory_budget": budget, "shuffle_buffer_rows": buffer_rows, "memory_estimate": total,
            "features_bytes": nbytes, "shard_rows": first.shard_rows, "heads": len(stores), "world_size": world}


@torch.no_grad()
def predict_logits(model: LinearProbe, features: np.ndarray | FeatureStore, batch_size: int = 1024,
                   device: str | torch.device | None = None) -> np.ndarray:
    """Float32 (N, num_classes) scores in evaluation mode (BatchNorm uses its running statistics)."""
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    model = model.to(dev).eval()
    stream = FeatureStream(features, dev)
    out = np.empty((features.shape[0], model.num_classes), dtype=np.float32)
    for lo in range(0, features.shape[0], batch_size):
        hi = min(lo + batch_size, features.shape[0])
        out[lo:hi] = model(stream.range(lo, hi)).float().cpu().numpy()
    return out


def evaluate_probe(model: LinearProbe, features: np.ndarray | FeatureStore, labels: np.ndarray,
                   ks: Sequence[int] = (1, 5), source: str | Path | None = None) -> dict[str, Any]:
    """Top-k accuracies (fractions), the mean cross-entropy and the logits on a labelled split (a feature store:
    loaded when it fits its memory budget, else read in blocks)."""
    labels = check_labels(labels, features.shape[0], model.num_classes, "val labels", source)
    if isinstance(features, FeatureStore):
        features = features.resident()
    if isinstance(features, FeatureStore):
        _check_store(features, "val features", source)
    else:
        check_features(features, "val features", source)
    logits = predict_logits(model, features)
    return {"topk": topk_accuracy(logits, labels, ks), "loss": cross_entropy(logits, labels), "logits": logits}
