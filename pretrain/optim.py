"""Optimisers and the learning-rate schedule shared by every method.

- SGD (momentum, optional Nesterov), Adam/AdamW, and LARS (You et al. 2017, as used by SimCLR/BYOL/
  Barlow Twins/SwAV): per-parameter trust ratio eta*||w||/||g + wd*w|| applied to weights only; biases and
  normalisation parameters (param groups flagged ``lars_exclude``) get plain SGD and no weight decay.
- Schedule: linear warm-up from 0 over ``warmup_epochs`` then half-cosine down to ``min_lr_ratio * lr``
  (Loshchilov & Hutter 2017), evaluated per step. Groups flagged ``fixed_lr`` (SimSiam's predictor) keep
  their base lr.
"""

from __future__ import annotations

import math

import torch

from evalsuite.errors import UserError

OPTIMIZERS = ("sgd", "lars", "adam", "adamw")


class LARS(torch.optim.Optimizer):
    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, eta: float = 0.001):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta,
                                      lars_exclude=False))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if not g["lars_exclude"]:
                    if g["weight_decay"]:
                        d = d.add(p, alpha=g["weight_decay"])
                    w_norm, d_norm = torch.norm(p), torch.norm(d)
                    trust = torch.where((w_norm > 0) & (d_norm > 0), g["eta"] * w_norm / d_norm,
                                        torch.ones_like(w_norm))
                    d = d.mul(trust)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(g["momentum"]).add_(d)
                p.add_(mu, alpha=-g["lr"])
        return loss


def build_optimizer(groups: list[dict], name: str, lr: float, weight_decay: float, momentum: float,
                    eta: float = 0.001):
    """The named optimiser over the method's parameter groups; ``eta`` is LARS's trust coefficient."""
    for g in groups:
        g.setdefault("weight_decay", weight_decay)
        g["base_lr"] = g.get("lr", lr)
        g["lr"] = g["base_lr"]
    if name == "lars":
        return LARS(groups, lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta)
    clean = [{k: v for k, v in g.items() if k not in ("lars_exclude",)} for g in groups]
    if name == "sgd":
        return torch.optim.SGD(clean, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(clean, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(clean, lr=lr, weight_decay=weight_decay)
    raise UserError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")


def lr_factor(step: int, total: int, warmup: int, min_ratio: float = 0.0) -> float:
    """Multiplier of the base lr at ``step`` (0-based) of ``total``: linear warm-up, then cosine."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup)
    t = min(1.0, (step - warmup) / span)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = g["base_lr"] if g.get("fixed_lr") else g["base_lr"] * factor
