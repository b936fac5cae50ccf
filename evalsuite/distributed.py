"""``torchrun`` in the core: the process group of ``evalsuite extract`` and ``evalsuite run`` (gloo on CPU, NCCL
on CUDA) and this process's rank. Without torchrun (``WORLD_SIZE`` unset or 1) everything here is a no-op.

Under a process group the feature extractor shards extraction over the ranks (``evalsuite.features``) and the tasks
that say ``distributed = True`` (the linear probes: ``tasks.linear.ddp``) train data-parallel.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist

from .errors import UserError


def env_world_size() -> int:
    """The number of processes torchrun started (``WORLD_SIZE``; 1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def env_rank() -> int:
    """This process's rank among them (``RANK``; 0 without torchrun): rank 0 prints and writes the results."""
    return int(os.environ.get("RANK", "0"))


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the initialised process group, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@contextmanager
def process_group(device: str) -> Iterator[tuple[int, int]]:
    """The process group of torchrun's processes for the block, yielding (rank, world size): NCCL for a CUDA
    ``device`` (each rank on the GPU of its ``LOCAL_RANK``), gloo otherwise; destroyed at the end. Nothing is
    started without torchrun, or when the caller already started a group (the caller then ends it)."""
    if env_world_size() <= 1 or (dist.is_available() and dist.is_initialized()):
        yield rank_and_world()
        return
    cuda = device.startswith("cuda")
    if cuda and device != "cuda":
        raise UserError(f"under torchrun give --device cuda, not {device}: each rank takes the GPU of its LOCAL_RANK")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        yield rank_and_world()
        dist.barrier()  # no rank tears its connections down while another still works (gloo aborts at exit)
    finally:
        dist.destroy_process_group()
