"""A navigation policy (PPO) on frozen features in a MiniWorld maze: environment, features, metrics."""

TASKS = {"navigation": "task:task"}
