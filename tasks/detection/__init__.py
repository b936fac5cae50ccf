"""Fast R-CNN on VOC07 with a frozen or fine-tuned trunk: model, proposals, VOC evaluation."""

TASKS = {"detection": "task:task"}
