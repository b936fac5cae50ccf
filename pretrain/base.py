"""The method interface every pretraining method implements (one file per method in ``pretrain.methods``).

A method is an ``nn.Module`` that owns the trunk (``self.trunk``, an ``evalsuite.trunks`` trunk whose
``state_dict`` is exactly what the checkpoint stores), its heads, target networks, queues and memory
banks (as buffers, so they are checkpointed with ``state_dict``), and implements:

- ``views(image_size) -> ViewTransform``: PIL image -> list of float RGB tensors in [0, 1] (``pretrain.augment``);
  a video method (``data_kinds`` naming video kinds) implements ``sampler(image_size)`` instead: a picklable
  ``pretrain.video.VideoSampler`` that draws one training example from a video (``pretrain.video``);
- ``training_step(batch) -> loss`` (or ``(loss, logs)``), ``batch`` a :class:`Batch`;
- optional hooks: ``on_train_start(trainer)``, ``on_epoch_start(trainer, epoch)``,
  ``on_after_backward(trainer)``, ``on_after_step(trainer)`` (EMA updates, prototype normalisation ...);
- ``trunk_state_dict()`` (default: ``self.trunk.state_dict()``) and ``metadata()`` (extra checkpoint fields,
  e.g. ``input_space``).

Class attributes: ``name`` (the registry key), ``description``, ``defaults`` (every method hyper-parameter
with its default; overridable with ``--set key=value``), ``optim`` (optimizer defaults: optimizer, lr,
weight_decay, momentum, warmup_epochs, base batch size for linear lr scaling), ``uses_labels``, ``data_kinds``
(the dataset kinds it trains on: ``"images"``, or the video readers' kinds ``"video"`` / ``"egomotion"``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from evalsuite.colorspace import to_input_space
from evalsuite.trunks import arch_info, build_trunk
from evalsuite.vit import ViTTaps

from . import RECIPES
from .augment import COLOUR_PRESETS, VIEW_OPTIONS, ViewTransform, preset, preset_options


@dataclass
class Batch:
    """One training batch: ``views[v]`` is (B, C, H, W) in the method's input space; ``index`` are dataset
    indices (for memory banks / pseudo-labels), ``target`` the dataset labels (supervised baseline only)."""

    views: list[torch.Tensor]
    index: torch.Tensor
    target: torch.Tensor
    extra: dict[str, Any] = field(default_factory=dict)


def embedding_dim(arch: str) -> int:
    """Width of :func:`trunk_embedding` for ``arch``: the last tap's channels, a ViT's embedding width."""
    info = arch_info(arch)
    return info["embed_dim"] if info["family"] == "vit" else info["channels"][-1]


def trunk_embedding(trunk: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The trunk's global representation in float32: the global average of the last tap for convolutional
    trunks; for a ViT the last block's normed CLS token (DINO's and timm's ``token`` pooling), or the patch
    mean for timm models pooled by ``avg``."""
    if isinstance(trunk, ViTTaps):
        tap = f"block{len(trunk.blocks) - 1}"
        tokens = trunk(x, [tap])[tap].float()
        if arch_info(trunk.arch)["global_pool"] == "avg":
            return tokens[:, trunk.num_prefix_tokens:].mean(dim=1)
        return tokens[:, 0]
    last = trunk.tap_names[-1]
    return trunk(x, [last])[last].float().mean(dim=(2, 3))


def mlp(dims: list[int], bn: bool = True, last_bn: bool = False, last_affine: bool = True) -> nn.Sequential:
    """Linear(+BN)+ReLU layers; the last Linear has no ReLU (optionally a BN, as Barlow Twins / SimSiam)."""
    layers: list[nn.Module] = []
    for i in range(len(dims) - 1):
        last = i == len(dims) - 2
        layers.append(nn.Linear(dims[i], dims[i + 1], bias=not (bn and (not last or last_bn))))
        if not last:
            if bn:
                layers.append(nn.BatchNorm1d(dims[i + 1]))
            layers.append(nn.ReLU(inplace=True))
        elif last_bn:
            layers.append(nn.BatchNorm1d(dims[i + 1], affine=last_affine))
    return nn.Sequential(*layers)


def optim_config(optimizer: str, *, lr: float, weight_decay: float, momentum: float = 0.9,
                 warmup_epochs: float = 0, base_batch_size: int = 256) -> dict[str, Any]:
    """A method's optimizer defaults (``Method.optim``): the optimizer, its lr at ``base_batch_size`` (scaled
    linearly with the batch), weight decay, momentum (Adam's beta1) and warm-up epochs."""
    return {"optimizer": optimizer, "lr": lr, "weight_decay": weight_decay, "momentum": momentum,
            "warmup_epochs": warmup_epochs, "base_batch_size": base_batch_size}


#: DeepCluster's optimizer (Caron et al. 2018), which the other pseudo-label methods (SeLA, NAT) reuse
CLUSTERING_OPTIM = optim_config("sgd", lr=0.05, weight_decay=1e-5)

#: optimizer changes every method gets under the ``short`` recipe: a warm-up of a fraction of an epoch (the
#: papers' 10 warm-up epochs would use up a short run at a tiny lr) and a base batch size of 64 for the lr
#: scaling (so a batch of 64 gets the method's base lr, not a quarter of it); DINO's short recipe keeps the paper's
#: scaling (at 4x it a ViT's embedding collapses within 20 steps: docs/pretraining.md)
SHORT_OPTIM: dict[str, Any] = {"warmup_epochs": 0.5, "base_batch_size": 64}
#: the joint-embedding methods' short-run optimizer: LARS with eta = 0.001 at a batch of 64 moves each weight
#: by ~1e-4 of its norm per step (the papers pair it with batches of 4096 and lrs of 4.8), far too little
#: for a few hundred steps; plain SGD with momentum does what a short run needs
SHORT_SGD: dict[str, Any] = {"optimizer": "sgd", "lr": 0.06, "weight_decay": 5e-4, "momentum": 0.9}
#: the ``short`` recipe's colour-distortion views at SHORT_SMALL_PX px or less (real 32 px photographs): see
#: docs/pretraining.md, "Real photographs: the short recipe at 32 px"
SHORT_SMALL_PX = 32
SHORT_SMALL_VIEWS: dict[str, float] = {"blur": 0.0}

#: the ``cifar`` recipe's schedule, every method alike (vturrisi/solo-learn solo/methods/base.py and
#: solo/args/pretrain.py defaults, which the CIFAR configs keep): lr x batch / 256, 10 warm-up epochs linear from
#: 3e-5 (not scaled), then cosine to 0, per step; momentum 0.9
CIFAR_OPTIM: dict[str, Any] = {"warmup_epochs": 10, "warmup_start_lr": 3e-5, "base_batch_size": 256,
                               "momentum": 0.9}
#: the run settings of every solo-learn CIFAR config (batch_size 256, max_epochs 1000, crop_size 32, its CIFAR
#: ResNet-18: 3x3 stride-1 conv1, no max-pool); `evalsuite pretrain --recipe cifar` uses them unless given
CIFAR_TRAIN: dict[str, Any] = {"arch": "resnet18_cifar", "batch_size": 256, "epochs": 1000, "image_size": 32}
#: solo-learn's CIFAR-10 normalisation (pretrain_dataloader.py MEANS_N_STD["cifar10"]), recorded in the checkpoint
CIFAR10_NORMALIZE: dict[str, list[float]] = {"mean": [0.4914, 0.4822, 0.4465], "std": [0.2470, 0.2435, 0.2616]}


def cifar_lars(lr: float, weight_decay: float) -> dict[str, Any]:
    """A solo-learn CIFAR config's LARS (solo/utils/lars.py with eta 0.02, clip_lr and exclude_bias_n_norm):
    trust ratio eta |w| / (|g| + wd |w|), divided by the lr and capped at 1; biases and norms plain SGD, no decay."""
    return {"optimizer": "lars", "lr": lr, "weight_decay": weight_decay, "lars_eta": 0.02, "lars_clip": True,
            "lars_trust": "solo", "exclude_bias_norm": True}


def cifar_sgd(lr: float, weight_decay: float) -> dict[str, Any]:
    """A solo-learn CIFAR config's SGD: biases and norms are decayed too (exclude_bias_n_norm_wd unset)."""
    return {"optimizer": "sgd", "lr": lr, "weight_decay": weight_decay, "exclude_bias_norm": False}


class Method(nn.Module):
    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    #: method hyper-parameters and their defaults (all recorded in the checkpoint metadata)
    defaults: ClassVar[dict[str, Any]] = {}
    #: optimizer defaults (the trainer's --optimizer/--lr/... override them)
    optim: ClassVar[dict[str, Any]] = optim_config("sgd", lr=0.03, weight_decay=1e-4)
    #: the ``short`` recipe (``--recipe short``): overrides of ``defaults`` ("hp") and ``optim`` ("optim") for a
    #: run of minutes on a few thousand small images (no multi-epoch warm-up, queues/prototypes sized to the
    #: data, faster-moving target networks, narrower heads); ``paper`` (the default) uses the published values
    short: ClassVar[dict[str, dict[str, Any]]] = {}
    #: the ``cifar`` recipe (``--recipe cifar``): solo-learn's CIFAR config of the method (vturrisi/solo-learn
    #: scripts/pretrain/cifar/<method>.yaml): "hp", "optim" (over :data:`CIFAR_OPTIM`) and "views" (a preset of
    #: ``pretrain.augment.CIFAR_VIEWS``); empty for methods solo-learn does not have
    cifar: ClassVar[dict[str, Any]] = {}
    #: augmentation preset (pretrain.augment.PRESETS) and number of views
    augment: ClassVar[str] = "simclr"
    n_views: ClassVar[int] = 2
    uses_labels: ClassVar[bool] = False
    #: colour space the trunk expects (evalsuite.colorspace): rgb, lab or gray
    input_space: ClassVar[str] = "rgb"
    #: False for the random baseline: the trainer only writes the checkpoint
    trains: ClassVar[bool] = True
    #: DDP: set when some parameters get no gradient in a step
    find_unused_parameters: ClassVar[bool] = False
    #: dataset kinds the method trains on: "images" (any image reader, through ``views()``) or video readers'
    #: kinds ("video", "egomotion": ``evalsuite.data.video``, through ``sampler()``); the trainer refuses others
    data_kinds: ClassVar[tuple[str, ...]] = ("images",)

    def __init__(self, arch: str, hp: dict[str, Any] | None = None, num_samples: int = 0, num_classes: int = 0,
                 seed: int = 0, recipe: str = "paper"):
        super().__init__()
        self.arch = arch
        self.recipe = recipe
        self.hp = self.resolve_hp(hp or {}, recipe)
        table = self.recipe_overrides(recipe)
        #: the recipe's view preset (None: the method's own views) and input normalisation (None: ImageNet's)
        self.recipe_views: str | None = table["views"]
        self.normalize: dict[str, list[float]] | None = table["normalize"]
        self.num_samples, self.num_classes, self.seed = num_samples, num_classes, seed
        self.trunk = build_trunk(arch)
        self.feat_dim = embedding_dim(arch)
        self.logs: dict[str, float] = {}
        #: keyword options of the views (the trainer's ``view_gray``), passed to ``pretrain.augment.preset``
        self.view_options: dict[str, Any] = {}

    # ------------------------------------------------------------ hyper-parameters
    @classmethod
    def resolve_hp(cls, overrides: dict[str, Any], recipe: str = "paper") -> dict[str, Any]:
        """Defaults (updated by the recipe's) updated by overrides, each override cast to the default's type;
        unknown keys refused."""
        from evalsuite.errors import UserError
        from evalsuite.protocols import cast_like

        out = dict(cls.defaults)
        out.update(cls.recipe_overrides(recipe)["hp"])
        for k, v in overrides.items():
            if k not in out:
                raise UserError(f"method {cls.name!r} has no hyper-parameter {k!r}; known: {', '.join(out) or 'none'}")
            try:
                out[k] = cast_like(v, out[k]) if isinstance(v, str) else v
            except ValueError:
                raise UserError(f"method {cls.name!r}: --set {k}={v} is not a {type(out[k]).__name__} "
                                f"(default {out[k]!r})") from None
        return out

    @classmethod
    def recipe_overrides(cls, recipe: str) -> dict[str, Any]:
        """What the recipe changes: ``hp`` and ``optim`` overrides (empty for ``paper``), the view preset
        ``views``, the input ``normalize`` and the run settings ``train`` (None / empty but for ``cifar``)."""
        from evalsuite.errors import UserError

        if recipe not in RECIPES:
            raise UserError(f"unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
        out: dict[str, Any] = {"hp": {}, "optim": {}, "views": None, "normalize": None, "train": {}}
        if recipe == "short":
            out.update(hp=dict(cls.short.get("hp", {})), optim={**SHORT_OPTIM, **cls.short.get("optim", {})})
        elif recipe == "cifar":
            if not cls.cifar:
                from .registry import methods

                have = sorted(n for n, c in methods().items() if c is not None and c.cifar)
                raise UserError(f"method {cls.name!r} has no cifar recipe (solo-learn has no CIFAR config for it); "
                                f"methods with one: {', '.join(have)}")
            out.update(hp=dict(cls.cifar.get("hp", {})), optim={**CIFAR_OPTIM, **cls.cifar.get("optim", {})},
                       views=cls.cifar["views"], normalize=CIFAR10_NORMALIZE, train=dict(CIFAR_TRAIN))
        elif recipe != "paper" and not getattr(cls, recipe, None):  # a recipe one method defines (SwAV's seer)
            raise UserError(f"method {cls.name!r} has no {recipe} recipe")
        return out

    @classmethod
    def optim_defaults(cls, recipe: str = "paper") -> dict[str, Any]:
        return {**cls.optim, **cls.recipe_overrides(recipe)["optim"]}

    # ------------------------------------------------------------ data
    def views(self, image_size: int) -> ViewTransform:
        return preset(self.recipe_views or self.augment, image_size, n_views=self.n_views, **self.view_options)

    def sampler(self, image_size: int):
        """A video method's example sampler (``pretrain.video.VideoSampler``): ``sampler(dataset, video, rng)``
        -> dict of tensors, frames as float RGB in [0, 1] of ``image_size`` px."""
        from evalsuite.errors import UserError

        raise UserError(f"method {self.name!r} trains on {', '.join(self.data_kinds)} data and has no video sampler")

    def recipe_view_options(self, image_size: int) -> dict[str, float]:
        """The view options the recipe sets for views of ``image_size`` px (the trainer's ``--view-*`` flags
        override them): the ``short`` recipe's :data:`SHORT_SMALL_VIEWS` at :data:`SHORT_SMALL_PX` px or less."""
        if self.recipe == "short" and image_size <= SHORT_SMALL_PX and self.has_colour_views():
            return dict(SHORT_SMALL_VIEWS)
        return {}

    @classmethod
    def has_colour_views(cls) -> bool:
        """Whether ``view_options`` (grayscale probability) apply: the preset views of a colour preset."""
        return cls.views is Method.views and cls.augment in COLOUR_PRESETS

    @classmethod
    def view_option_names(cls) -> tuple[str, ...]:
        """The ``view_options`` the views take: all four with colour distortion, only the crop's smallest area
        fraction (``scale``) with the ``basic`` crop + flip preset, none with a method's own views."""
        if cls.has_colour_views():
            return VIEW_OPTIONS
        return preset_options(cls.augment) if cls.views is Method.views else ()

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """RGB in [0, 1] -> network input (the recipe's normalisation, else ImageNet's; or the method's input
        space)."""
        norm = self.normalize or {}
        return to_input_space(x, self.input_space, **norm)

    # ------------------------------------------------------------ model pieces
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The trunk's global representation (:func:`trunk_embedding`): (B, feat_dim)."""
        return trunk_embedding(self.trunk, x)

    def forward(self, batch: Batch):  # DDP calls forward
        return self.training_step(batch)

    def training_step(self, batch: Batch):
        raise NotImplementedError

    def trunk_state_dict(self) -> dict[str, torch.Tensor]:
        return self.trunk.state_dict()

    def metadata(self) -> dict[str, Any]:
        """Checkpoint fields the evaluation reads: the input space, and a recipe's normalisation."""
        return {"input_space": self.input_space, **({"normalize": self.normalize} if self.normalize else {})}

    # ------------------------------------------------------------ hooks
    def on_train_start(self, trainer) -> None: ...

    def on_epoch_start(self, trainer, epoch: int) -> None: ...

    def on_after_backward(self, trainer) -> None: ...

    def on_after_step(self, trainer) -> None: ...

    def param_groups(self) -> list[dict[str, Any]]:
        """Trainable parameters; biases and norm parameters are excluded from weight decay / LARS adaptation."""
        decay, no_decay = [], []
        for p in self.parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim <= 1 else decay).append(p)
        return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0, "lars_exclude": True}]


class SingleViewMethod(Method):
    """A method trained on one ``basic`` view per image (random resized crop + flip): the supervised baseline,
    the clustering methods and the pretext tasks that build their own inputs from that view."""

    augment = "basic"
    n_views = 1


def momentum_copy(module: nn.Module) -> nn.Module:
    """A frozen copy (momentum / target encoder): no gradients, updated only by :func:`ema_update`."""
    target = copy.deepcopy(module)
    for p in target.parameters():
        p.requires_grad_(False)
    return target


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """target <- m * target + (1 - m) * online for parameters; buffers (BN statistics) are copied."""
    for pt, po in zip(target.parameters(), online.parameters()):
        pt.mul_(momentum).add_(po.detach(), alpha=1 - momentum)
    for bt, bo in zip(target.buffers(), online.buffers()):
        bt.copy_(bo)
