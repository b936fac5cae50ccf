"""Pretraining: one file per method in ``pretrain.methods`` (auto-discovered), one shared trainer.

    from pretrain import TrainConfig, train
    train(TrainConfig(method="simclr", arch="resnet18", data_root="data", epochs=10, out="simclr.safetensors"))
"""

from .base import Batch, Method
from .registry import get_method, register_method
from .registry import methods as available_methods  # `pretrain.methods` is the subpackage of method files
from .trainer import TrainConfig, Trainer, train

__all__ = ["Batch", "Method", "TrainConfig", "Trainer", "available_methods", "get_method", "register_method", "train"]
