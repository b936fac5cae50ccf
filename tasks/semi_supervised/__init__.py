"""Semi-supervised fine-tuning: the whole trunk and a linear head trained on 1 % / 10 % of a training set's labels."""

TASKS = {"semi_supervised": "task:task"}
