"""Per-class linear SVMs on frozen features: VOC07 (Goyal et al. 2019) and its low-shot variant."""

TASKS = {"voc07_svm": "voc07:task", "lowshot_svm": "lowshot:task"}
