"""Per-layer linear classifiers on frozen features (Places205, ImageNet / any single-label data)."""

TASKS = {"places205_linear": "task:task", "imagenet_linear": "task:imagenet_task"}
