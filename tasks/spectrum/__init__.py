"""Label-free representation quality from cached features: RankMe, alpha-ReQ, uniformity and alignment."""

TASKS = {"spectrum": "task:task"}
