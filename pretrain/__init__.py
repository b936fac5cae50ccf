"""Pretraining: one file per method in ``pretrain.methods`` (auto-discovered), one shared trainer.

    from pretrain import TrainConfig, train
    train(TrainConfig(method="simclr", arch="resnet18", data_root="data", epochs=10, out="simclr.safetensors"))

Names are imported on first use, so ``evalsuite --help`` (which adds the ``pretrain`` command) needs no torch.
"""

from importlib import import_module

#: the recipes every method resolves (``Method.resolve_hp``); here, torch-free, for the CLI's choices
RECIPES = ("paper", "short", "cifar", "seer")

_EXPORTS = {"Batch": "base", "Method": "base", "get_method": "registry", "register_method": "registry",
            "available_methods": "registry:methods", "TrainConfig": "trainer", "Trainer": "trainer",
            "train": "trainer"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, _, attr = _EXPORTS[name].partition(":")
    return getattr(import_module(f"{__name__}.{module}"), attr or name)
