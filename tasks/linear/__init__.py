"""Per-layer linear classifiers on frozen features (Places205 / any ImageFolder)."""

TASKS = {"places205_linear": "task:task"}
