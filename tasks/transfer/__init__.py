"""Many-dataset transfer on frozen features (Ericsson et al. 2021): the batched logistic-regression path
(``logreg``), its reference backends (``reference``), the per-dataset metrics (``metrics``) and few-shot
episodes (``fewshot``). No task is registered yet."""

TASKS: dict[str, str] = {}
