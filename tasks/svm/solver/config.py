"""The solver's settings: one frozen protocol group, nested in the SVM tasks' protocols as ``svm``
(``--set voc07_svm.svm.backend=sklearn``) and recorded with every result."""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Any, Literal

from evalsuite.errors import UserError
from evalsuite.protocols import TaskProtocol

Backend = Literal["torch", "sklearn", "cyanure"]
BACKENDS: tuple[str, ...] = typing.get_args(Backend)


@dataclass(frozen=True)
class SVMConfig(TaskProtocol):
    """Every solver setting (all recorded with the result)."""

    backend: Backend = "torch"
    loss: Literal["squared_hinge", "hinge"] = "squared_hinge"
    pos_weight: float = 2.0
    neg_weight: float = 1.0
    intercept_scaling: float = 1.0
    # torch backend
    tol: float = 1e-6  # ||grad|| <= tol * ||grad at w = 0||, per problem (1e-5 is loose at C >= 1000)
    max_newton: int = 60
    max_cg: int = 500
    cg_forcing: float = 0.1  # CG stops at ||residual|| <= min(cg_forcing, sqrt(||g|| / ||g0||)) ||g||
    dtype: Literal["float32", "float64"] = "float32"  # matmul precision; norms for the stopping test are float64
    precond_rank: int = 64  # top eigen-directions of Z^T Z in the CG preconditioner (0: none)
    warm_start: bool = True  # solve each cost path in increasing order from the previous solution
    max_problems: int = 4096  # problems solved together, at most
    memory_fraction: float = 1.0  # per-problem solver state <= this x the float32 feature matrix
    # exact kernel Newton steps: auto (where cheaper than the CG they replace), always, never
    direct_steps: Literal["auto", "always", "never"] = "auto"
    cg_straggle: float = 0.125  # CG stops its last <= this fraction of problems once they lag (0: never)
    # sklearn backend (the benchmark's LinearSVC arguments)
    sklearn_tol: float = 1e-4
    sklearn_max_iter: int = 2000
    # cyanure backend
    cyanure_tol: float = 1e-6
    cyanure_max_iter: int = 2000

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise UserError(f"unknown svm backend {self.backend!r}; choose one of {', '.join(BACKENDS)}")
        if self.loss != "squared_hinge" and self.backend != "sklearn":
            raise UserError(f"svm loss {self.loss!r} is only available with svm.backend=sklearn "
                            "(the benchmark uses squared_hinge)")
        if self.loss not in ("squared_hinge", "hinge"):
            raise UserError(f"unknown svm loss {self.loss!r}; use squared_hinge or hinge")
        if self.direct_steps not in ("auto", "always", "never"):
            raise UserError(f"svm direct_steps must be auto, always or never, got {self.direct_steps!r}")
        if self.dtype not in ("float32", "float64"):
            raise UserError(f"svm dtype must be float32 or float64, got {self.dtype!r}")
        if not (self.pos_weight > 0 and self.neg_weight > 0 and self.intercept_scaling >= 0):
            raise UserError("svm class weights must be positive and intercept_scaling >= 0")

    def to_dict(self) -> dict[str, Any]:
        """The settings, plus the class weights and penalty as LinearSVC's arguments read (the result's
        ``solver`` record)."""
        d = super().to_dict()
        d["class_weight"] = {"1": self.pos_weight, "-1": self.neg_weight}
        d["penalty"] = "l2 (bias regularised, liblinear convention)"
        return d
