"""Many-dataset transfer on frozen features (Ericsson et al. 2021): the linear_transfer and fewshot tasks, built on
the batched logistic-regression path (``logreg``), its reference backends (``reference``), the per-dataset metrics
(``metrics``) and few-shot episodes (``fewshot``)."""

TASKS = {"linear_transfer": "linear_transfer:task", "fewshot": "fewshot_task:task"}
