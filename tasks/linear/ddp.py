"""Data-parallel linear probes under ``torchrun`` (gloo on CPU, NCCL on GPU); nothing changes in one process.

Each rank trains on its share of every global batch (``batch[rank::world]``, :func:`evalsuite.cache.lockstep_batches`)
and the ranks together compute what one process computes on the whole batch:

- :func:`synced_batch_norm`: the training-mode BatchNorm statistics over the rows of every rank (what
  ``nn.SyncBatchNorm`` does on GPUs; it refuses CPU tensors), gradients flowing back through the all-reduce
  (``torch.distributed.nn.functional.all_reduce``), the running statistics updated as ``nn.BatchNorm1d`` updates
  them;
- each rank's loss is its rows' summed cross-entropy divided by the global batch size, and
  :func:`all_reduce_grads` sums every head's gradients (and the losses, for the history) in one all-reduce, so
  every rank takes the same SGD step: the one of the global batch's mean loss.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn


def synced_batch_norm(bn: nn.BatchNorm1d, x: torch.Tensor) -> torch.Tensor:
    """``bn`` in training mode on ``x`` ((N, C) or (N, C, L)) with the batch statistics of every rank's rows together
    (per channel over N and L; biased variance to normalise, unbiased for the running variance)."""
    from torch.distributed.nn.functional import all_reduce as all_reduce_with_grad  # only where dist is built

    dims = [0] if x.dim() == 2 else [0, 2]
    local = x.new_tensor([x.numel() // max(1, x.shape[1])])
    summed = all_reduce_with_grad(torch.cat([x.sum(dims), local]))
    count = summed[-1].detach()
    shape = (1, -1) if x.dim() == 2 else (1, -1, 1)
    mean = (summed[:-1] / count).reshape(shape)
    var = (all_reduce_with_grad(((x - mean) ** 2).sum(dims)) / count).reshape(shape)
    y = (x - mean) / torch.sqrt(var + bn.eps)
    if bn.affine:
        y = y * bn.weight.reshape(shape) + bn.bias.reshape(shape)
    if bn.track_running_stats:
        with torch.no_grad():
            bn.num_batches_tracked.add_(1)
            f = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
            bn.running_mean.mul_(1 - f).add_(mean.flatten(), alpha=f)
            bn.running_var.mul_(1 - f).add_(var.flatten() * count / (count - 1).clamp(min=1), alpha=f)
    return y


def all_reduce_grads(models: Sequence[nn.Module], losses: Sequence[torch.Tensor]) -> list[float]:
    """Sum every model's gradients and the ``losses`` over the ranks in place, one all-reduce for all of them;
    returns the summed losses."""
    grads = [p.grad for m in models for p in m.parameters() if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads] + [torch.stack([v.detach().to(grads[0].dtype) for v in losses])])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    at = 0
    for g in grads:
        g.copy_(flat[at:at + g.numel()].view_as(g))
        at += g.numel()
    return flat[at:].tolist()
