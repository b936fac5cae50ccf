"""Optimisers and the learning-rate schedule shared by every method.

- SGD (momentum, optional Nesterov), Adam/AdamW, and LARS (You et al. 2017, as used by SimCLR/BYOL/
  Barlow Twins/SwAV): per-parameter trust ratio applied to weights only; biases and normalisation parameters
  (param groups flagged ``lars_exclude``) get plain SGD and no weight decay. ``trust="simclr"``:
  eta*||w||/||g + wd*w|| (SimCLR's lars_optimizer.py); ``trust="solo"``: eta*||w||/(||g|| + wd*||w|| + 1e-8),
  a parameter with a zero weight or gradient norm left unscaled and undecayed (solo-learn solo/utils/lars.py,
  LARS's eq. 6). ``clip``: the ratio divided by the lr and capped at 1, so a weight moves by at most the lr
  (solo-learn's ``clip_lr``, NVIDIA apex LARC's clip mode).
- Schedule: linear warm-up from 0 over ``warmup_epochs`` (or from ``warmup_start_lr``, solo-learn's
  LinearWarmupCosineAnnealingLR) then half-cosine down to ``min_lr_ratio * lr`` (Loshchilov & Hutter 2017),
  evaluated per step. Groups flagged ``fixed_lr`` (SimSiam's predictor) keep their base lr; a group's ``lr_scale``
  multiplies its base lr.
"""

from __future__ import annotations

import math

import torch

from evalsuite.errors import UserError

OPTIMIZERS = ("sgd", "lars", "adam", "adamw")
LARS_TRUSTS = ("simclr", "solo")


class LARS(torch.optim.Optimizer):
    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, eta: float = 0.001,
                 clip: bool = False, trust: str = "simclr"):
        if trust not in LARS_TRUSTS:
            raise UserError(f"unknown LARS trust ratio {trust!r}; choose one of {', '.join(LARS_TRUSTS)}")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, clip=clip,
                                      trust=trust, lars_exclude=False))

    @staticmethod
    def scaled_update(p: torch.Tensor, grad: torch.Tensor, g: dict) -> torch.Tensor:
        """The decayed gradient times the trust ratio (module docstring) of one weight."""
        wd, w_norm = g["weight_decay"], torch.norm(p)
        d = grad.add(p, alpha=wd) if wd else grad
        if g["trust"] == "solo":
            g_norm = torch.norm(grad)
            ok = (w_norm > 0) & (g_norm > 0)
            ratio = g["eta"] * w_norm / (g_norm + wd * w_norm + 1e-8)
        else:
            d_norm = torch.norm(d)
            ok = (w_norm > 0) & (d_norm > 0)
            ratio = g["eta"] * w_norm / d_norm
        if g["clip"]:
            ratio = torch.clamp(ratio / g["lr"], max=1.0)
        if g["trust"] == "solo":
            return torch.where(ok, d * ratio, grad)
        return d * torch.where(ok, ratio, torch.ones_like(ratio))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                d = p.grad if g["lars_exclude"] else self.scaled_update(p, p.grad, g)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(g["momentum"]).add_(d)
                p.add_(mu, alpha=-g["lr"])
        return loss


def build_optimizer(groups: list[dict], name: str, lr: float, weight_decay: float, momentum: float,
                    eta: float = 0.001, lars_clip: bool = False, lars_trust: str = "simclr",
                    exclude_bias_norm: bool = True):
    """The named optimiser over the method's parameter groups; ``eta``, ``lars_clip`` and ``lars_trust`` are
    LARS's (module docstring). ``exclude_bias_norm`` False decays the groups flagged ``lars_exclude`` (biases,
    norms) like the others and, under LARS, adapts them too."""
    for g in groups:
        if g.get("lars_exclude") and not exclude_bias_norm:
            g.pop("lars_exclude")
            g.pop("weight_decay", None)
        g.setdefault("weight_decay", weight_decay)
        g["base_lr"] = g.get("lr", lr) * g.get("lr_scale", 1.0)
        g["lr"] = g["base_lr"]
    if name == "lars":
        return LARS(groups, lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, clip=lars_clip,
                    trust=lars_trust)
    clean = [{k: v for k, v in g.items() if k not in ("lars_exclude",)} for g in groups]
    if name == "sgd":
        return torch.optim.SGD(clean, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(clean, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(clean, lr=lr, weight_decay=weight_decay)
    raise UserError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")


def lr_factor(step: int, total: int, warmup: int, min_ratio: float = 0.0, start_ratio: float | None = None) -> float:
    """Multiplier of the base lr at ``step`` (0-based) of ``total``: linear warm-up, then cosine. The warm-up
    reaches 1 at its last step from 1/warmup, or with ``start_ratio`` from that ratio at step 0 (solo-learn's
    LinearWarmupCosineAnnealingLR: start + step (1 - start) / (warmup - 1))."""
    if warmup > 0 and step < warmup:
        if start_ratio is not None:
            return start_ratio + step * (1 - start_ratio) / max(1, warmup - 1)
        return (step + 1) / warmup
    span = max(1, total - warmup)
    t = min(1.0, (step - warmup) / span)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = g["base_lr"] if g.get("fixed_lr") else g["base_lr"] * factor
