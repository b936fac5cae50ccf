"""NYUv2 surface normals: dense heads on a frozen trunk, codebook classification, angular metrics."""

TASKS = {"surface_normals": "task:task"}
