"""One training loop for every method: single process or ``torchrun`` (DDP; gloo on CPU, NCCL on GPU).

- Data: ``evalsuite.data.open_dataset`` (any classification reader, ImageFolder by default); each sample's
  augmentations are drawn from a generator seeded by (seed, epoch, index), or, with the colour-distortion views
  drawn per batch (``batch_views``, ``pretrain.batch_views``), each batch's from one seeded by (seed, epoch, step,
  rank); each epoch's order from (seed, epoch), so a run is reproducible and a resumed run sees exactly the batches
  it would have seen.
  Video methods train on video readers through ``pretrain.video.SampleDataset`` (``samples_per_video``
  examples per video per epoch, drawn by the method's sampler, seeded alike); a method is refused data of a kind
  its ``data_kinds`` does not name.
- Optimiser/schedule: ``pretrain.optim`` (SGD / LARS / Adam(W), linear warm-up + cosine, per step); the
  base lr scales linearly with the global batch size (lr * B / base_batch_size) unless ``--lr`` is given.
- Precision: fp32 or bf16 autocast (CPU or CUDA), optional channels_last.
- State: ``<out>.state.pt`` (method incl. heads/queues/banks, optimiser, RNG, losses) written atomically at
  every epoch end and every ``save_every`` steps through :class:`evalsuite.io.ResumeState`; a rerun resumes
  from it (settings that differ are refused, naming each; an unreadable state is reported and training starts
  over). The final trunk goes to ``out`` via :func:`evalsuite.checkpoints.save_checkpoint` with the full
  metadata.
"""

from __future__ import annotations

import os
import platform
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from evalsuite.checkpoints import save_checkpoint
from evalsuite.console import note, progress
from evalsuite.distributed import process_group, rank_and_world
from evalsuite.errors import BadData, UserError
from evalsuite.io import ResumeState

from . import distributed as D
from .augment import ViewTransform, center_view
from .base import Batch, Method
from .batch_views import BatchViews, step_generator, view_seed
from .optim import OPTIMIZERS, build_optimizer, lr_factor, set_lr
from .registry import get_method
from .video import FramesInMemory, SampleDataset, VideoSampler, collate_samples, data_kind, frames_fit


@dataclass
class TrainConfig:
    method: str
    arch: str = "resnet18"
    data_root: str = "data"
    dataset: str = "imagefolder"
    split: str = "train"
    data_path: str | None = None  # explicit dataset directory (default: data_root/<layout of dataset>)
    out: str = "pretrained.safetensors"
    epochs: int = 1
    batch_size: int = 64  # per process
    image_size: int = 64
    optimizer: str | None = None
    lr: float | None = None
    weight_decay: float | None = None
    momentum: float | None = None
    #: LARS trust coefficient (the papers' 0.001; solo-learn's 0.02); None = the method's
    lars_eta: float | None = None
    warmup_epochs: float | None = None
    min_lr_ratio: float = 0.0
    precision: str = "fp32"  # fp32 | bf16 | auto
    channels_last: bool = False
    workers: int = 0
    seed: int = 0
    device: str = "cpu"
    save_every: int = 0  # steps; 0 = at epoch ends only
    max_steps_per_epoch: int | None = None
    limit_images: int | None = None
    resume: bool = True
    progress: bool = True
    hp: dict[str, Any] = field(default_factory=dict)
    #: ``paper`` (published hyper-parameters), ``short`` (each method's recipe for minutes of CPU training) or
    #: ``cifar`` (solo-learn's CIFAR config of the method)
    recipe: str = "paper"
    #: wall-clock budget in seconds: the schedule's total is set to the steps that fit (rate over the last
    #: ``budget_check`` steps, re-estimated every step), and training stops when the budget is spent; the final
    #: checkpoint is written as usual (metadata records the budget and the steps actually run)
    time_budget_s: float | None = None
    budget_check: int = 10
    #: grayscale probability of every view (the papers' 0.2) for the colour-distortion views; None = the preset's
    view_gray: float | None = None
    #: multiplier of the colour-distortion views' jitter amplitudes (SimCLR's strength s); None = the preset's
    view_jitter: float | None = None
    #: blur probability of every colour-distortion view; None = the preset's
    view_blur: float | None = None
    #: video methods: examples drawn from each video per epoch (``pretrain.video.SampleDataset``)
    samples_per_video: int = 8
    #: smallest area fraction of the colour-distortion views' (global) crops; None = the preset's
    view_scale: float | None = None
    #: draw the colour-distortion views for a whole batch at once (``pretrain.batch_views``) from the images held
    #: in memory as uint8: ``on``, ``off``, or ``auto`` (on for sets of equal-size images of at most
    #: BATCH_VIEWS_AUTO_PX px, the small-image case where per-image views cost as much as a step)
    batch_views: str = "auto"


#: TrainConfig fields a resumed run may change: where the data and the run live and how fast it goes, not
#: what it trains (every other field, hyper-parameters and views included, must match the resume state)
RESUME_MAY_CHANGE = frozenset({"data_root", "data_path", "workers", "device", "save_every", "progress", "resume",
                               "channels_last", "time_budget_s", "budget_check"})


#: ``batch_views="auto"`` holds a set in memory when its first image is at most this many px on its longer side
BATCH_VIEWS_AUTO_PX = 64
#: and the uint8 copy takes at most this many bytes (also the bound for holding a video set's decoded frames)
BATCH_VIEWS_MAX_BYTES = 2 << 30


def preload_images(data, n: int, strict: bool) -> torch.Tensor | None:
    """The first ``n`` images of ``data`` as one uint8 (n, 3, H, W) tensor; None (``strict``: BadData naming the
    file) when their sizes differ or the copy would exceed BATCH_VIEWS_MAX_BYTES."""
    first = np.array(data.load_image(0).convert("RGB"))
    need = n * first.size
    if need > BATCH_VIEWS_MAX_BYTES:
        if strict:
            raise UserError(f"--batch-views on: {n} images of {first.shape[1]}x{first.shape[0]} px take "
                            f"{need / 2**30:.1f} GiB in memory (at most {BATCH_VIEWS_MAX_BYTES / 2**30:.0f})")
        return None
    out = torch.empty((n, *first.shape), dtype=torch.uint8)
    out[0] = torch.from_numpy(first)
    for i in range(1, n):
        a = np.array(data.load_image(i).convert("RGB"))
        if a.shape != first.shape:
            if strict:
                raise BadData(f"--batch-views on needs images of one size: {a.shape[1]}x{a.shape[0]} px, the "
                              f"first is {first.shape[1]}x{first.shape[0]}", data.image_path(i))
            return None
        out[i] = torch.from_numpy(a)
    return out.permute(0, 3, 1, 2).contiguous()


class ViewDataset(Dataset):
    """(views, index, label) with augmentations seeded per (seed, epoch, index)."""

    def __init__(self, data, transform, seed: int, limit: int | None = None):
        self.data, self.transform, self.seed, self.epoch = data, transform, seed, 0
        self.n = len(data) if limit is None else min(limit, len(data))
        labels = getattr(data, "labels", None)
        self.labels = np.asarray(labels[: self.n]) if labels is not None else np.zeros(self.n, dtype=np.int64)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(view_seed(self.seed, self.epoch, i))
            views = self.transform(self.data.load_image(i))
        if isinstance(views, torch.Tensor):
            views = [views]
        return views, i, int(self.labels[i])


def _collate(items):
    n_views = len(items[0][0])
    views = [torch.stack([it[0][v] for it in items]) for v in range(n_views)]
    return views, torch.tensor([it[1] for it in items]), torch.tensor([it[2] for it in items])


class EpochSampler(Sampler):
    """Seeded permutation per epoch, split across ranks, resumable from a position (in samples)."""

    def __init__(self, n: int, seed: int, rank: int = 0, world: int = 1, shuffle: bool = True):
        self.n, self.seed, self.rank, self.world, self.shuffle = n, seed, rank, world, shuffle
        self.epoch, self.start = 0, 0

    def indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 7919 + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        per = self.n // self.world
        return order[: per * self.world][self.rank :: self.world]

    def __iter__(self):
        return iter(self.indices()[self.start :])

    def __len__(self) -> int:
        return max(0, self.n // self.world - self.start)


class Trainer:
    def __init__(self, cfg: TrainConfig, on_step: Callable[[Trainer], None] | None = None):
        self.cfg = cfg
        #: called after every optimisation step, before any state is saved (logging; an exception it raises,
        #: e.g. KeyboardInterrupt, stops training as a kill would)
        self.on_step = on_step
        self.rank, self.world = rank_and_world()  # torchrun's group, started by train()
        if cfg.device.startswith("cuda") and self.world > 1:
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        else:
            self.device = torch.device(cfg.device)
        if cfg.precision not in ("fp32", "bf16", "auto"):
            raise UserError(f"unknown precision {cfg.precision!r}; choose fp32, bf16 or auto")
        self.amp = cfg.precision == "bf16" or (
            cfg.precision == "auto" and self.device.type == "cuda" and torch.cuda.is_bf16_supported())
        self.method_cls = get_method(cfg.method)
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed)
        self.data = self._open_data()
        #: "images", or the video reader's kind ("video", "egomotion"): what the method must train on
        self.data_kind = data_kind(self.data)
        if self.data_kind not in self.method_cls.data_kinds:
            raise UserError(f"method {cfg.method!r} trains on {' or '.join(self.method_cls.data_kinds)} data; "
                            f"--dataset {cfg.dataset} is {self.data_kind} data")
        self.n_images = len(self.data) if cfg.limit_images is None else min(cfg.limit_images, len(self.data))
        num_classes = len(getattr(self.data, "classes", []) or [])
        self.method: Method = self.method_cls(cfg.arch, cfg.hp, num_samples=self.n_images,
                                              num_classes=num_classes, seed=cfg.seed, recipe=cfg.recipe)
        self.method.to(self.device)
        if cfg.channels_last:
            self.method.to(memory_format=torch.channels_last)
        # the recipe's views for this size, then the --view-* flags
        self.method.view_options = {**self.method.recipe_view_options(cfg.image_size), **self._view_options(cfg)}
        self.views: ViewTransform | None = None
        self.sampler: VideoSampler | None = None
        #: the views drawn per batch from ``images`` (uint8, on the device), when ``batch_views`` is in effect
        self.batch_views: BatchViews | None = None
        self.images: torch.Tensor | None = None
        if self.data_kind == "images":
            self.views = self.method.views(cfg.image_size)
            self.dataset = ViewDataset(self.data, self.views, cfg.seed, cfg.limit_images)
            self.collate, what = _collate, f"{self.n_images} images"
            self.batch_views, self.images = self._batch_views()
        else:
            self.sampler = self.method.sampler(cfg.image_size)
            # every data-loading process holds its own copy
            self.frames_in_memory = frames_fit(self.data, self.n_images, BATCH_VIEWS_MAX_BYTES // max(1, cfg.workers))
            videos = FramesInMemory(self.data) if self.frames_in_memory else self.data
            self.dataset = SampleDataset(videos, self.sampler, cfg.seed, cfg.samples_per_video, cfg.limit_images)
            self.collate = collate_samples
            what = f"{len(self.dataset)} examples ({self.n_images} videos x {cfg.samples_per_video})"
        #: training examples per epoch: images, or videos x samples_per_video
        self.n_items = len(self.dataset)
        self.global_batch = cfg.batch_size * self.world
        self.steps_per_epoch = (self.n_items // self.world) // cfg.batch_size
        if cfg.max_steps_per_epoch:
            self.steps_per_epoch = min(self.steps_per_epoch, cfg.max_steps_per_epoch)
        if self.method.trains and self.steps_per_epoch < 1:
            raise UserError(f"{what} are fewer than one batch of {self.global_batch}; lower --batch-size")
        self.total_steps = self.steps_per_epoch * cfg.epochs
        self.planned_steps = self.total_steps  # before any time-budget shrinking
        self._step_ends: deque[float] = deque(maxlen=max(2, cfg.budget_check) + 1)
        self.optim_cfg = self._optim_config()
        self.optimizer = None
        if self.method.trains:
            oc = self.optim_cfg
            self.optimizer = build_optimizer(self.method.param_groups(), oc["optimizer"], oc["lr"],
                                             oc["weight_decay"], oc["momentum"], eta=oc["lars_eta"],
                                             lars_clip=oc["lars_clip"], lars_trust=oc["lars_trust"],
                                             exclude_bias_norm=oc["exclude_bias_norm"])
        self.model = self.method
        if self.world > 1 and self.method.trains:
            import inspect

            from torch.nn.parallel import DistributedDataParallel as DDP

            # buffers (queues, banks) are kept in sync by the methods themselves (gathered updates)
            sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters
                    else {"broadcast_buffers": False})
            self.model = DDP(self.method, find_unused_parameters=self.method.find_unused_parameters, **sync)
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.losses: list[float] = []
        #: the method's logs of the last step (e.g. ``z_std``, the collapse monitor; RotNet's ``acc``)
        self.last_logs: dict[str, float] = {}
        self.state_path = Path(str(cfg.out) + ".state.pt")

    # ------------------------------------------------------------ setup
    def _view_options(self, cfg: TrainConfig) -> dict[str, float]:
        """``--view-gray`` / ``--view-jitter`` / ``--view-blur`` / ``--view-scale`` as the method's view options
        (checked against its views)."""
        opts: dict[str, float] = {}
        for flag, key, value, hi in (("--view-gray", "gray", cfg.view_gray, 1.0),
                                     ("--view-jitter", "jitter", cfg.view_jitter, 2.0),
                                     ("--view-blur", "blur", cfg.view_blur, 1.0),
                                     ("--view-scale", "scale", cfg.view_scale, 1.0)):
            if value is None:
                continue
            if key not in self.method.view_option_names():
                raise UserError(f"{flag}: the views of {cfg.method} have no colour-distortion step"
                                + ("" if key != "scale" else " and no basic crop"))
            if not 0.0 <= float(value) <= hi:
                raise UserError(f"{flag} must be in [0, {hi:g}], got {value}")
            opts[key] = float(value)
        return opts

    def _batch_views(self) -> tuple[BatchViews | None, torch.Tensor | None]:
        """The batched views and the images they draw from, or (None, None) for per-image views."""
        mode = self.cfg.batch_views
        if mode not in ("auto", "on", "off"):
            raise UserError(f"--batch-views must be auto, on or off, got {mode!r}")
        batched = None if mode == "off" else self.views.batched()
        if batched is None:
            if mode == "on":
                raise UserError(f"--batch-views on: the views of {self.cfg.method} ({self.views.name}) are not "
                                "colour-distortion views")
            return None, None
        if mode == "auto" and max(self.data.load_image(0).size) > BATCH_VIEWS_AUTO_PX:
            return None, None
        images = preload_images(self.data, self.n_images, strict=mode == "on")
        return (None, None) if images is None else (batched, images.to(self.device))

    def _batched_loader(self, sampler: EpochSampler):
        """The epoch's remaining batches as the DataLoader gives them: (views, index, label), views drawn for the
        whole batch with a generator seeded by (seed, epoch, step, rank)."""
        order, b = sampler.indices()[sampler.start:], self.cfg.batch_size
        labels = torch.as_tensor(self.dataset.labels)
        for k in range(len(order) // b):
            index = torch.tensor(order[k * b:(k + 1) * b])
            gen = step_generator(self.cfg.seed, self.epoch, self.step_in_epoch, self.rank)
            yield self.batch_views(self.images[index.to(self.images.device)], gen), index, labels[index]

    def _open_data(self):
        from evalsuite.data import DATA_LAYOUT, open_dataset

        cfg = self.cfg
        root = Path(cfg.data_path) if cfg.data_path else Path(cfg.data_root) / DATA_LAYOUT.get(cfg.dataset,
                                                                                             cfg.dataset)
        if not root.exists():
            raise BadData(f"{cfg.dataset} data not found (pass --data-root or --data-path)", root)
        return open_dataset(cfg.dataset, root, cfg.split)

    def _optim_config(self) -> dict[str, Any]:
        cfg = self.cfg
        d = self.method_cls.optim_defaults(cfg.recipe)
        name = cfg.optimizer or d.get("optimizer", "sgd")
        if name not in OPTIMIZERS:
            raise UserError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
        if cfg.lr is not None:
            lr = cfg.lr
        else:
            lr = d.get("lr", 0.03) * self.global_batch / d.get("base_batch_size", 256)
        warm_epochs = cfg.warmup_epochs if cfg.warmup_epochs is not None else d.get("warmup_epochs", 0)
        return {"optimizer": name, "lr": lr, "base_lr_per_256": None if cfg.lr is not None else d.get("lr"),
                "weight_decay": cfg.weight_decay if cfg.weight_decay is not None else d.get("weight_decay", 0.0),
                "momentum": cfg.momentum if cfg.momentum is not None else d.get("momentum", 0.9),
                "lars_eta": cfg.lars_eta if cfg.lars_eta is not None else d.get("lars_eta", 0.001),
                "lars_clip": bool(d.get("lars_clip", False)), "lars_trust": d.get("lars_trust", "simclr"),
                "exclude_bias_norm": bool(d.get("exclude_bias_norm", True)),
                "warmup_epochs": warm_epochs, "warmup_steps": int(round(warm_epochs * self.steps_per_epoch)),
                "warmup_start_lr": d.get("warmup_start_lr"),
                "min_lr_ratio": cfg.min_lr_ratio, "schedule": "warmup+cosine"}

    # ------------------------------------------------------------ state
    def resume_state(self) -> ResumeState:
        """The resume file: what the run trains must match it (RESUME_MAY_CHANGE may differ)."""
        return ResumeState(self.state_path, self._config_record(), what="pretraining",
                           may_change=RESUME_MAY_CHANGE)

    def save_state(self) -> None:
        if self.rank != 0:
            return
        self.resume_state().save({
            "method": self.method.state_dict(), "optimizer": self.optimizer.state_dict(),
            "epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
            "losses": torch.tensor(self.losses, dtype=torch.float64), "rng": torch.get_rng_state(),
            "last_logs": dict(self.last_logs)})

    def load_state(self) -> bool:
        """Restore the saved state; False when there is none (or it is unreadable: training starts over)."""
        if not (self.cfg.resume and self.method.trains):
            return False
        state = self.resume_state().load(map_location="cpu")
        if state is None:
            return False
        self.method.load_state_dict(state["method"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.epoch, self.step_in_epoch = int(state["epoch"]), int(state["step_in_epoch"])
        self.global_step = int(state["global_step"])
        self.losses = [float(v) for v in state["losses"]]
        self.last_logs = {k: float(v) for k, v in state["last_logs"].items()}
        torch.set_rng_state(state["rng"])
        return True

    def _config_record(self) -> dict[str, Any]:
        c = asdict(self.cfg)
        c.pop("progress", None)
        if self.data_kind == "images":
            c.pop("samples_per_video")  # unused: image runs' states stay comparable with earlier ones
        c.update(world_size=self.world, global_batch_size=self.global_batch)
        return c

    # ------------------------------------------------------------ helpers for methods
    @property
    def progress(self) -> float:
        """Fraction of training done (0 at the first step), for momentum schedules."""
        return self.global_step / max(1, self.total_steps)

    def to_input(self, x: torch.Tensor) -> torch.Tensor:
        x = self.method.preprocess(x.to(self.device, non_blocking=True))
        return x.contiguous(memory_format=torch.channels_last) if self.cfg.channels_last and x.ndim == 4 else x

    def frames_to_input(self, x: torch.Tensor) -> torch.Tensor:
        """Frames (..., 3, H, W) in [0, 1] -> the method's input, as :meth:`to_input` does for images."""
        return self.to_input(x.flatten(0, -4)).unflatten(0, x.shape[:-3])

    def make_batch(self, data, index: torch.Tensor, target: torch.Tensor) -> Batch:
        """A loader batch as the method's :class:`Batch`: image views in the input space; a video sampler's
        dict in ``extra`` (its ``frame_keys`` in the input space, the rest moved to the device)."""
        index, target = index.to(self.device), target.to(self.device)
        if isinstance(data, dict):
            frames = self.sampler.frame_keys
            extra = {k: self.frames_to_input(v) if k in frames else v.to(self.device) for k, v in data.items()}
            return Batch([], index, target, extra)
        return Batch([self.to_input(v) for v in data], index, target)

    @torch.no_grad()
    def full_pass(self, fn, image_size: int | None = None) -> torch.Tensor:
        """``fn(x, index)`` over the whole training set in order with the centre view, trunk in eval mode;
        returns the concatenated outputs (every rank computes all of it; broadcast what must agree)."""
        ds = ViewDataset(self.data, ViewTransform([center_view(image_size or self.cfg.image_size)], "center"),
                         self.cfg.seed, self.cfg.limit_images)
        loader = DataLoader(ds, batch_size=max(self.cfg.batch_size, 64), shuffle=False,
                            num_workers=self.cfg.workers, collate_fn=_collate)
        was = self.method.training
        self.method.eval()
        outs = []
        try:
            for views, index, _ in loader:
                with self.autocast():
                    outs.append(fn(self.to_input(views[0]), index.to(self.device)).float())
        finally:
            self.method.train(was)
        return torch.cat(outs)

    def _warmup_start_ratio(self) -> float | None:
        """The warm-up's first lr as a fraction of the lr (the recipe's ``warmup_start_lr``), None: 1/warmup."""
        start = self.optim_cfg.get("warmup_start_lr")
        return None if start is None or not self.optim_cfg["lr"] else start / self.optim_cfg["lr"]

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp)

    # ------------------------------------------------------------ loop
    def fit(self) -> Path | None:
        cfg = self.cfg
        resumed = self.load_state()
        if self.rank == 0 and resumed:
            note(f"resuming {cfg.method} from epoch {self.epoch} step {self.step_in_epoch} ({self.state_path})")
        start = time.time()
        self._fit_t0 = time.perf_counter()
        if self.method.trains:
            self.method.train()
            self.method.on_train_start(self)
            sampler = EpochSampler(self.n_items, cfg.seed, self.rank, self.world)
            while self.epoch < cfg.epochs:
                self._run_epoch(sampler)
        else:  # a method without gradient steps (random init, k-means init) does its work in on_train_start
            self.method.on_train_start(self)
            self.epoch = cfg.epochs
        if D.is_dist():
            torch.distributed.barrier()
        out = None
        if self.rank == 0:
            out = save_checkpoint(cfg.out, self.method.trunk_state_dict(), self.metadata(time.time() - start))
        return out

    def _run_epoch(self, sampler: EpochSampler) -> None:
        cfg = self.cfg
        if self.step_in_epoch == 0:
            self.method.on_epoch_start(self, self.epoch)
        sampler.epoch, sampler.start = self.epoch, self.step_in_epoch * cfg.batch_size
        self.dataset.epoch = self.epoch
        if self.batch_views is not None:
            loader = self._batched_loader(sampler)
        else:
            loader = DataLoader(self.dataset, batch_size=cfg.batch_size, sampler=sampler, drop_last=True,
                                num_workers=cfg.workers, collate_fn=self.collate,
                                pin_memory=self.device.type == "cuda", persistent_workers=False)
        remaining = self.steps_per_epoch - self.step_in_epoch
        with progress(total=remaining, desc=f"{cfg.method} epoch {self.epoch + 1}/{cfg.epochs}",
                      enabled=cfg.progress and self.rank == 0) as bar:
            if self._run_steps(loader, remaining, bar):
                return
        self.epoch += 1
        self.step_in_epoch = 0
        self.save_state()

    def _run_steps(self, loader, remaining: int, bar) -> bool:
        """The epoch's remaining steps; True when the time budget ended training (state saved)."""
        cfg = self.cfg
        it = iter(loader)
        for _ in range(remaining):
            batch = self.make_batch(*next(it))
            set_lr(self.optimizer, lr_factor(self.global_step, self.total_steps, self.optim_cfg["warmup_steps"],
                                             cfg.min_lr_ratio, self._warmup_start_ratio()))
            with self.autocast():
                out = self.model(batch)
            loss, logs = out if isinstance(out, tuple) else (out, {})
            if not torch.isfinite(loss):
                raise UserError(f"{cfg.method}: loss became {loss.item()} at step {self.global_step}; "
                                "lower the learning rate or use fp32")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.method.on_after_backward(self)
            self.optimizer.step()
            self.method.on_after_step(self)
            self.losses.append(float(loss.detach()))
            self.last_logs = {k: float(v) for k, v in logs.items()}
            self.global_step += 1
            self.step_in_epoch += 1
            bar.update(1)
            bar.set_postfix(loss=f"{self.losses[-1]:.4f}", **{k: f"{v:.4g}" for k, v in self.last_logs.items()})
            if self.on_step is not None:
                self.on_step(self)
            if cfg.time_budget_s is not None and self._budget_tick():
                self.epoch = cfg.epochs
                self.save_state()
                return True
            if cfg.save_every and self.global_step % cfg.save_every == 0 and self.step_in_epoch < self.steps_per_epoch:
                self.save_state()
        return False

    def _budget_tick(self) -> bool:
        """Fit the schedule to the wall-clock budget; True when training must stop now. The rate is measured
        over the last ``budget_check`` steps and re-estimated every step, so the slow first steps (oneDNN /
        allocator warm-up: tens of seconds on a busy CPU) age out and the schedule grows back."""
        now = time.perf_counter()
        elapsed = now - self._fit_t0
        if elapsed >= self.cfg.time_budget_s or self.global_step >= self.total_steps:
            return True
        self._step_ends.append(now)
        if len(self._step_ends) >= 3:
            rate = (self._step_ends[-1] - self._step_ends[0]) / (len(self._step_ends) - 1)  # seconds per step
            fit = self.global_step + int((self.cfg.time_budget_s - elapsed) / max(rate, 1e-9))
            self.total_steps = max(self.global_step + 1, min(self.planned_steps, fit))
        return False

    # ------------------------------------------------------------ metadata
    def metadata(self, seconds: float) -> dict[str, Any]:
        import torchvision

        import evalsuite

        cfg = self.cfg
        return {
            "method": cfg.method,
            "arch": cfg.arch,
            "pretrain_data": f"{cfg.dataset}:{self.data.root}",
            "dataset": cfg.dataset,
            "split": cfg.split,
            "n_images": self.n_images,
            "epochs": cfg.epochs,
            "steps": self.global_step,
            "steps_per_epoch": self.steps_per_epoch,
            "batch_size": cfg.batch_size,
            "global_batch_size": self.global_batch,
            "world_size": self.world,
            "image_size": cfg.image_size,
            "seed": cfg.seed,
            "precision": "bf16" if self.amp else "fp32",
            "channels_last": cfg.channels_last,
            "hyperparameters": self.method.hp,
            "optimizer": self.optim_cfg,
            # image views, or the video sampler's settings (frame gaps, crop)
            "augment": (self.batch_views or self.views if self.sampler is None else self.sampler).describe(),
            "data_kind": self.data_kind,
            "sampling": None if self.sampler is None else {
                "samples_per_video": cfg.samples_per_video, "examples_per_epoch": self.n_items,
                "seed": "numpy Generator per (seed, epoch, example)", "frames_in_memory": self.frames_in_memory},
            "view_options": dict(self.method.view_options),
            "recipe": cfg.recipe,
            "time_budget_s": cfg.time_budget_s,
            "planned_steps": self.planned_steps,
            "schedule_steps": self.total_steps,
            "final_loss": self.losses[-1] if self.losses else None,
            "final_logs": self.last_logs,
            "train_seconds": round(seconds, 3),
            "versions": {"evalsuite": evalsuite.__version__, "torch": torch.__version__,
                         "torchvision": torchvision.__version__, "python": platform.python_version()},
            **self.method.metadata(),
        }


def train(cfg: TrainConfig, on_step: Callable[[Trainer], None] | None = None) -> Path | None:
    """Train and write the checkpoint; returns its path on rank 0 (None on other ranks). Under torchrun the ranks'
    process group (NCCL on CUDA, gloo otherwise) lives for this call."""
    with process_group(cfg.device if torch.cuda.is_available() else "cpu"):
        return Trainer(cfg, on_step).fit()
