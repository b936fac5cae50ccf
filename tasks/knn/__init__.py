"""Neighbour classifiers on frozen features: weighted kNN (DINO's evaluation) and nearest class mean."""

TASKS = {"knn": "task:task", "centroid": "centroid:task"}
