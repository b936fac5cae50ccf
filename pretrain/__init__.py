"""Pretraining: one file per method in ``pretrain.methods`` (auto-discovered), one shared trainer.

    from pretrain import TrainConfig, train
    train(TrainConfig(method="simclr", arch="resnet18", data_root="data", epochs=10, out="simclr.safetensors"))
"""

from .base import Batch, Method
from .registry import get_method, methods, register_method
from .trainer import TrainConfig, Trainer, train

__all__ = ["Batch", "Method", "TrainConfig", "Trainer", "get_method", "methods", "register_method", "train"]
