"""Fine-tuning the whole trunk and a linear head on the labelled images, and top-k on a labelled split.

Model (:class:`FineTuneModel`): the trunk's last tap pooled to one vector with the ``avg`` pooling of
``evalsuite.trunks`` (a ResNet's res5 averaged over space; a ViT's last-block CLS token after the final norm), then
``nn.Linear(dim, classes)``. BatchNorm layers use the statistics of each forward pass while training and their
running averages (momentum 0.1, SimCLR's ``batch_norm_decay`` 0.9) when evaluating.

Optimisers (:func:`build_optimizer`):

- ``lars``: SimCLR's ``LARSOptimizer`` (lars_optimizer.py) with classic momentum: v <- m v + lr t (g + wd w),
  w <- w - v, the trust ratio t = eta ||w|| / ||g + wd w|| (1 when either norm is 0) on the trunk's weight tensors,
  t = 1 and no weight decay on normalisation parameters, biases and the head (SimCLR's exclusion list
  ``['batch_normalization', 'bias', 'head_supervised']``; its ``add_weight_decay`` still decays the head's weight).
- ``momentum``: SGD with momentum, Nesterov's when ``nesterov`` (SimCLR's ``--optimizer=momentum`` is
  ``MomentumOptimizer(use_nesterov=True)``); weight decay on every parameter but the normalisation layers'
  (SimCLR's ``add_weight_decay``, VISSL's ``regularize_bn: False``).

Schedule (:class:`Schedule`, SimCLR's model_util.py ``learning_rate_schedule`` and ``get_train_steps``): training
reads a stream of batches over consecutive epochs, each a permutation seeded by (seed, epoch), so a batch may
span two epochs as in SimCLR's repeated, shuffled dataset; N x epochs // batch + 1 steps. The base lr is scaled by
batch / 256 (``linear``) or sqrt(batch) (``sqrt``); a linear warm-up from 0 over round(warmup_epochs x N // batch)
steps, then ``cosine`` to 0 over the other steps (TF's ``cosine_decay``) or ``multistep``: x gamma at each
milestone epoch (VISSL's multistep, updated per epoch; a step belongs to the epoch its batch starts in).

A batch larger than ``micro_batch`` runs as micro-batches whose gradients add up (BatchNorm then sees each
micro-batch's statistics, not the whole batch's: recorded). The state (model, optimiser, step, losses) is saved
with :class:`evalsuite.io.ResumeState` every ``save_every`` steps and at the end; every draw depends only on
(seed, epoch, image), so a resumed run ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from evalsuite.console import progress as progress_bar
from evalsuite.data import ImageDataset
from evalsuite.errors import BadData, UserError
from evalsuite.features import Transform, TransformedImages, collate_images
from evalsuite.io import ResumeState
from evalsuite.trunks import arch_info, pool_features, pool_spec, tap_shapes
from tasks.linear.probe import topk_hits
from tasks.semi_supervised.augment import TrainView

NORM_LAYERS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.SyncBatchNorm, nn.LayerNorm, nn.GroupNorm)


# ---------------------------------------------------------------------------------------------- the model


def feature_tap(arch: str) -> str:
    """The trunk's output tap: the deepest one (a ViT's last block, not ``last4``)."""
    return [t for t in arch_info(arch)["taps"] if t != "last4"][-1]


class FineTuneModel(nn.Module):
    """trunk -> the last tap, ``avg``-pooled -> ``nn.Linear(dim, num_classes)``."""

    def __init__(self, trunk: nn.Module, num_classes: int, image_size: int, init: str = "zeros", seed: int = 0):
        super().__init__()
        self.trunk, self.tap = trunk, feature_tap(trunk.arch)
        channels, spatial, _ = tap_shapes(trunk.arch, image_size, [self.tap])[self.tap]
        self.pool = pool_spec(trunk.arch, self.tap, channels, spatial, "avg")
        self.head = nn.Linear(self.pool.dim, num_classes)
        init_head(self.head, init, seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(pool_features(self.trunk(x, [self.tap])[self.tap], self.pool))


HEAD_INITS = ("zeros", "gaussian", "pytorch_default")


def init_head(head: nn.Linear, init: str, seed: int) -> None:
    """``zeros`` (SimCLR's ``zero_init_logits_layer``), ``gaussian`` (N(0, 0.01^2) weights, zero bias: SimCLR's
    ``linear_layer`` initializer) or ``pytorch_default`` (``nn.Linear``'s, VISSL's ``mlp`` head), seeded."""
    if init not in HEAD_INITS:
        raise UserError(f"unknown head init {init!r}; choose one of {', '.join(HEAD_INITS)}")
    with torch.no_grad():
        if init == "zeros":
            head.weight.zero_()
            head.bias.zero_()
        elif init == "gaussian":
            head.weight.copy_(torch.randn(head.weight.shape, generator=torch.Generator().manual_seed(seed)) * 0.01)
            head.bias.zero_()
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                head.reset_parameters()


# ---------------------------------------------------------------------------------------------- optimiser


class LARS(torch.optim.Optimizer):
    """SimCLR's LARSOptimizer with classic momentum; each group's ``adapt`` says whether the trust ratio applies."""

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, eta: float = 0.001):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, adapt=True))

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                d = p.grad.add(p, alpha=g["weight_decay"]) if g["weight_decay"] else p.grad
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"].mul_(g["momentum"])
                if g["adapt"]:
                    w_norm, d_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(d)
                    trust = torch.where((w_norm > 0) & (d_norm > 0), g["eta"] * w_norm / d_norm, 1.0)
                    buf.add_(d * (g["lr"] * trust))
                else:
                    buf.add_(d, alpha=g["lr"])
                p.sub_(buf)


def parameter_groups(model: FineTuneModel, optimizer: str, weight_decay: float, head_lr_mult: float
                     ) -> list[dict[str, Any]]:
    """The parameters by (trust ratio, weight decay, lr multiplier) as the module docstring gives them."""
    norm = {id(p) for m in model.trunk.modules() if isinstance(m, NORM_LAYERS) for p in m.parameters(recurse=False)}
    lars = optimizer == "lars"
    groups: dict[tuple[str, bool, float, float], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith("head."):
            key = ("head", False, 0.0 if lars and name.endswith("bias") else weight_decay, head_lr_mult)
        elif id(p) in norm:
            key = ("trunk normalisation", False, 0.0, 1.0)
        elif p.ndim > 1:
            key = ("trunk weights", lars, weight_decay, 1.0)
        else:
            key = ("trunk biases", False, 0.0 if lars else weight_decay, 1.0)
        groups.setdefault(key, []).append(p)
    return [{"params": ps, "name": k[0], "adapt": k[1], "weight_decay": k[2], "lr_mult": k[3]}
            for k, ps in groups.items()]


def build_optimizer(model: FineTuneModel, optimizer: str, momentum: float, nesterov: bool, weight_decay: float,
                    eta: float, head_lr_mult: float) -> torch.optim.Optimizer:
    groups = parameter_groups(model, optimizer, weight_decay, head_lr_mult)
    if optimizer == "lars":
        if nesterov:
            raise UserError("semi_supervised.nesterov applies to optimizer=momentum (SimCLR's LARS has none)")
        return LARS(groups, lr=0.0, momentum=momentum, eta=eta)
    if optimizer == "momentum":
        return torch.optim.SGD([{k: v for k, v in g.items() if k != "adapt"} for g in groups], lr=0.0,
                               momentum=momentum, nesterov=nesterov)
    raise UserError(f"unknown optimizer {optimizer!r}; choose lars or momentum")


def describe_groups(opt: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """What each parameter group gets (recorded with the results)."""
    return [{"name": g["name"], "tensors": len(g["params"]), "elements": sum(p.numel() for p in g["params"]),
             "trust_ratio": bool(g.get("adapt", False)), "weight_decay": g["weight_decay"], "lr_mult": g["lr_mult"]}
            for g in opt.param_groups]


# ---------------------------------------------------------------------------------------------- schedule


@dataclass(frozen=True)
class Schedule:
    num_images: int
    batch_size: int
    epochs: int
    lr: float
    scaling: str = "sqrt"  # "linear": lr x batch / 256; "sqrt": lr x sqrt(batch)
    kind: str = "cosine"  # or "multistep"
    warmup_epochs: float = 0.0
    milestones: tuple[float, ...] = ()
    gamma: float = 0.1

    def __post_init__(self):
        if self.num_images < 1 or self.batch_size < 1 or self.epochs < 1:
            raise UserError(f"fine-tuning needs images, a batch and epochs (got {self.num_images} images, batch "
                            f"{self.batch_size}, {self.epochs} epochs)")
        if self.scaling not in ("linear", "sqrt"):
            raise UserError(f"unknown lr scaling {self.scaling!r}; choose linear or sqrt")
        if self.kind not in ("cosine", "multistep"):
            raise UserError(f"unknown lr schedule {self.kind!r}; choose cosine or multistep")

    @property
    def scaled_lr(self) -> float:
        factor = self.batch_size / 256 if self.scaling == "linear" else math.sqrt(self.batch_size)
        return self.lr * factor

    @property
    def total_steps(self) -> int:
        return self.num_images * self.epochs // self.batch_size + 1

    @property
    def warmup_steps(self) -> int:
        return int(round(self.warmup_epochs * self.num_images // self.batch_size))

    def epoch_of(self, step: int) -> int:
        """The epoch the batch of ``step`` starts in."""
        return step * self.batch_size // self.num_images

    def lr_at(self, step: int) -> float:
        lr, warmup, total = self.scaled_lr, self.warmup_steps, self.total_steps
        if warmup and step < warmup:
            return step / warmup * lr
        if self.kind == "multistep":
            return lr * self.gamma ** sum(self.epoch_of(step) >= m for m in self.milestones)
        span = total - warmup
        return lr * 0.5 * (1 + math.cos(math.pi * min(step - warmup, span) / span))

    def to_dict(self) -> dict[str, Any]:
        return {"scaled_lr": self.scaled_lr, "total_steps": self.total_steps, "warmup_steps": self.warmup_steps,
                "steps_formula": "num_images x epochs // batch_size + 1 (SimCLR get_train_steps)"}


def stream_positions(step: int, batch_size: int, num_images: int, seed: int) -> list[tuple[int, int]]:
    """(epoch, position in the labelled list) of the batch of ``step``: the stream of per-epoch permutations."""
    out, cache = [], {}
    for pos in range(step * batch_size, (step + 1) * batch_size):
        epoch, k = divmod(pos, num_images)
        if epoch not in cache:
            cache[epoch] = np.random.default_rng([int(seed), epoch]).permutation(num_images)
        out.append((epoch, int(cache[epoch][k])))
    return out


# ---------------------------------------------------------------------------------------------- data


class _TrainImages(torch.utils.data.Dataset):
    """Item (epoch, k): the view of labelled image k in that epoch; errors come back as values (reported cleanly)."""

    def __init__(self, dataset: ImageDataset, indices: np.ndarray, labels: np.ndarray, view: TrainView, seed: int):
        self.dataset, self.indices, self.labels, self.view, self.seed = dataset, indices, labels, view, seed

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: tuple[int, int]):
        epoch, k = key
        i = int(self.indices[k])
        try:
            return self.view(self.dataset.load_image(i), self.seed, epoch, i), int(self.labels[i]), None
        except BadData as e:
            return None, i, (e.message, e.path)


class _StepBatches:
    """The loader's batch sampler: the keys of steps ``start`` .. ``total - 1``."""

    def __init__(self, schedule: Schedule, seed: int, start: int):
        self.schedule, self.seed, self.start = schedule, seed, start

    def __len__(self) -> int:
        return self.schedule.total_steps - self.start

    def __iter__(self):
        s = self.schedule
        for step in range(self.start, s.total_steps):
            yield stream_positions(step, s.batch_size, s.num_images, self.seed)


# ---------------------------------------------------------------------------------------------- training


@dataclass(frozen=True)
class FitConfig:
    schedule: Schedule
    optimizer: str = "lars"
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    lars_eta: float = 0.001
    head_lr_mult: float = 1.0
    micro_batch: int | None = None
    precision: str = "fp32"  # or "bf16": bfloat16 autocast
    workers: int = 0
    seed: int = 0


@dataclass
class FitReport:
    total_steps: int
    resumed_from_step: int
    losses: list[dict[str, float]] = field(default_factory=list)
    trunk_change: float = 0.0  # ||trunk after - trunk before|| / ||trunk before|| over every trunk parameter
    groups: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        values = [r["loss"] for r in self.losses]
        return {"loss_per_interval": self.losses, "loss_first": values[0] if values else None,
                "loss_final": values[-1] if values else None}


def _trunk_vector(model: FineTuneModel) -> torch.Tensor:
    return torch.cat([p.detach().float().flatten().cpu() for p in model.trunk.parameters()])


def fine_tune(model: FineTuneModel, dataset: ImageDataset, labels: np.ndarray, indices: np.ndarray,
              view: TrainView, cfg: FitConfig, *, device: str = "cpu", resume: ResumeState | None = None,
              save_every: int = 1, progress: bool = False, desc: str = "fine-tune",
              on_step: Callable[[int], None] | None = None) -> FitReport:
    """Train ``model`` on the labelled ``indices`` of ``dataset`` for ``cfg.schedule.total_steps`` steps,
    continuing from ``resume``'s state when it holds one. ``on_step(n)`` is called after each step with the number
    of steps done (after the state is saved; raising from it stops training)."""
    s, dev = cfg.schedule, torch.device(device)
    before = _trunk_vector(model)
    model.to(dev)
    opt = build_optimizer(model, cfg.optimizer, cfg.momentum, cfg.nesterov, cfg.weight_decay, cfg.lars_eta,
                          cfg.head_lr_mult)
    report = FitReport(s.total_steps, 0, groups=describe_groups(opt))
    state = resume.load(map_location=dev) if resume is not None else None
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        report.resumed_from_step, report.losses = int(state["step"]), list(state["losses"])
    start = report.resumed_from_step
    micro = cfg.micro_batch or s.batch_size
    if micro < 1:
        raise UserError(f"semi_supervised.micro_batch must be >= 1, got {micro}")
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")
    loader = torch.utils.data.DataLoader(_TrainImages(dataset, indices, labels, view, cfg.seed),
                                         batch_sampler=_StepBatches(s, cfg.seed, start), num_workers=cfg.workers,
                                         collate_fn=collate_images, pin_memory=dev.type == "cuda")
    model.train()
    window: list[float] = []
    bar = progress_bar(loader, desc=desc, total=s.total_steps, initial=start, enabled=progress, unit="step")
    for step, (x, y) in enumerate(bar, start=start):
        lr = s.lr_at(step)
        for g in opt.param_groups:
            g["lr"] = lr * g["lr_mult"]
        opt.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for xs, ys in zip(x.split(micro), y.split(micro)):
            with autocast:
                loss = F.cross_entropy(model(xs.to(dev, non_blocking=True)).float(), ys.to(dev, non_blocking=True))
            (loss * (len(ys) / len(y))).backward()
            loss_sum += float(loss.detach()) * len(ys)
        if not math.isfinite(loss_sum):
            raise UserError(f"{desc}: the training loss became {loss_sum} at step {step} (lr {lr:.3g}); lower "
                            "semi_supervised.lr")
        opt.step()
        window.append(loss_sum / len(y))
        done = step + 1
        if len(window) == save_every or done == s.total_steps:
            report.losses.append({"step": done, "epoch": round(done * s.batch_size / s.num_images, 3),
                                  "loss": round(float(np.mean(window)), 6), "lr": lr})
            window = []
            if resume is not None:
                resume.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": done,
                             "losses": report.losses})
        if on_step is not None:
            on_step(done)
    bar.close()
    model.eval()
    report.trunk_change = float(torch.linalg.vector_norm(_trunk_vector(model) - before)
                                / torch.linalg.vector_norm(before).clamp_min(1e-12))
    return report


# ---------------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(model: FineTuneModel, dataset: ImageDataset, labels: np.ndarray, transform: Transform,
             ks: Sequence[int], *, batch_size: int = 256, workers: int = 0, device: str = "cpu",
             precision: str = "fp32", progress: bool = False, desc: str = "evaluate") -> dict[str, Any]:
    """Top-k accuracies (fractions) and the mean cross-entropy of ``model`` in evaluation mode; per image, the top-k
    ``hits`` and the argmax ``pred``."""
    dev = torch.device(device)
    model.to(dev).eval()
    loader = torch.utils.data.DataLoader(TransformedImages(dataset, transform), batch_size=batch_size, shuffle=False,
                                         num_workers=workers, collate_fn=collate_images)
    logits = np.empty((len(dataset), model.head.out_features), dtype=np.float32)
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        for x, idx in progress_bar(loader, desc=desc, enabled=progress):
            logits[idx.numpy()] = model(x.to(dev)).float().cpu().numpy()
    labels = np.asarray(labels, dtype=np.int64)
    z = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    hits = topk_hits(logits, labels, ks)
    return {"topk": {k: float(h.mean()) for k, h in hits.items()}, "hits": hits, "pred": logits.argmax(axis=1),
            "loss": float(-log_p[np.arange(len(labels)), labels].mean())}
