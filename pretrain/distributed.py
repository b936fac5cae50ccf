"""Collectives for contrastive learning under ``torchrun`` (gloo on CPU, NCCL on GPU); no-ops in one process.

- :func:`gather_with_grad`: all_gather whose backward sums the incoming gradients over ranks and returns
  this rank's slice, so SimCLR's negatives from other processes carry gradient back to their owners
  (``torch.distributed.all_gather`` alone cuts the graph; a backward that returns only the local grad
  without the all-reduce under-counts by the world size, the bug several libraries had).
- :func:`concat_all_gather`: no-grad gather (MoCo keys for the queue, memory-bank updates).
- :func:`batch_shuffle` / :func:`batch_unshuffle`: MoCo's shuffled BN across processes.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from evalsuite.distributed import rank_and_world


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return rank_and_world()[1]


def rank() -> int:
    return rank_and_world()[0]


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor):
        out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x.contiguous())
        return torch.cat(out, 0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        n = grad.shape[0] // dist.get_world_size()
        r = dist.get_rank()
        return grad[r * n : (r + 1) * n]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every rank (rank order) keeping the gradient to every rank's own rows."""
    if not is_dist() or world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


@torch.no_grad()
def concat_all_gather(x: torch.Tensor) -> torch.Tensor:
    if not is_dist() or world_size() == 1:
        return x
    out = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, 0)


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (no-op in one process)."""
    if is_dist() and world_size() > 1:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def all_reduce_max(x: torch.Tensor) -> torch.Tensor:
    """In-place maximum over ranks (no-op in one process)."""
    if is_dist() and world_size() > 1:
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return x


@torch.no_grad()
def batch_shuffle(x: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """MoCo's shuffled BN: gather all keys' inputs, permute them globally (same permutation on every rank:
    rank 0's is broadcast), give each rank a slice. Returns (local shuffled input, index to unshuffle)."""
    gathered = concat_all_gather(x)
    n_all = gathered.shape[0]
    perm = torch.randperm(n_all, generator=generator).to(x.device)
    if is_dist() and world_size() > 1:
        dist.broadcast(perm, src=0)
    unshuffle = torch.argsort(perm)
    n = x.shape[0]
    r = rank()
    return gathered[perm[r * n : (r + 1) * n]], unshuffle


@torch.no_grad()
def batch_unshuffle(y: torch.Tensor, unshuffle: torch.Tensor) -> torch.Tensor:
    gathered = concat_all_gather(y)
    n = y.shape[0]
    r = rank()
    return gathered[unshuffle[r * n : (r + 1) * n]]


def broadcast(x: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Rank ``src``'s tensor on every rank (in place; no-op in one process)."""
    if is_dist() and world_size() > 1:
        dist.broadcast(x, src=src)
    return x
