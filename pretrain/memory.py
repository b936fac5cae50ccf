"""Negative stores kept as buffers (so they are checkpointed with the method's ``state_dict``).

- :class:`Queue` (MoCo): FIFO of the last K keys; enqueue overwrites the oldest entries.
- :class:`MemoryBank` (NPID, PIRL, CMC): one L2-normalised vector per training image, updated with
  momentum m: v_i <- normalise(m v_i + (1 - m) f_i) (Wu et al. 2018, Sec. 3.2).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import distributed as D

#: the embedding size and temperature of instance discrimination against a memory bank (Wu et al. 2018),
#: kept by the memory-bank methods (NPID, PIRL, CMC)
BANK_DEFAULTS = {"dim": 128, "temperature": 0.07}


class Queue(nn.Module):
    def __init__(self, size: int, dim: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("items", F.normalize(torch.randn(size, dim, generator=g), dim=1))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor, gather: bool = True) -> None:
        """Write ``keys`` (gathered from every process) at the pointer, wrapping around."""
        keys = D.concat_all_gather(keys) if gather else keys
        keys = keys.detach().to(self.items.dtype)
        size = self.items.shape[0]
        if keys.shape[0] >= size:
            keys = keys[-size:]
        n = keys.shape[0]
        idx = (self.ptr + torch.arange(n, device=keys.device)) % size
        self.items[idx] = keys
        self.ptr.fill_(int((self.ptr + n) % size))


class MemoryBank(nn.Module):
    def __init__(self, n: int, dim: int, momentum: float = 0.5, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        # NPID initialises with uniform random vectors, normalised.
        self.register_buffer("bank", F.normalize(torch.rand(n, dim, generator=g) - 0.5, dim=1))
        self.momentum = momentum

    def __len__(self) -> int:
        return self.bank.shape[0]

    def get(self, index: torch.Tensor) -> torch.Tensor:
        return self.bank[index]

    def sample(self, b: int, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """(b, k) uniformly drawn noise indices (positives may appear, as in NPID's sampler)."""
        return torch.randint(0, len(self), (b, k), generator=generator).to(self.bank.device)

    @torch.no_grad()
    def update(self, index: torch.Tensor, feats: torch.Tensor, gather: bool = True) -> None:
        if gather:
            index, feats = D.concat_all_gather(index), D.concat_all_gather(feats)
        new = self.momentum * self.bank[index] + (1 - self.momentum) * feats.detach().to(self.bank.dtype)
        self.bank[index] = F.normalize(new, dim=1)
