"""What a run will cost, said before it starts (``evalsuite run`` prints it; ``--dry-run`` stops there).

A task may offer ``plan(ctx) -> TaskPlan`` (the optional part of the task contract): how many images
the trunk must see and how many training iterations it runs. The time is estimated from the trunk's
throughput measured on this machine at that image size (a backward pass counted as two forwards).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

#: a plan longer than this on a CPU gets a warning pointing to --protocol quick / --tasks
LONG_ON_CPU_S = 30 * 60


@dataclass
class TaskPlan:
    images: dict[str, int] = field(default_factory=dict)  # split -> images to extract or evaluate
    image_size: int = 224
    train_iterations: int = 0
    images_per_iteration: int = 0
    train_image_size: int | None = None
    # split -> images the training iterations draw from (their cost is in train_iterations, not extraction)
    train_images: dict[str, int] = field(default_factory=dict)
    note: str = ""

    @property
    def total_images(self) -> int:
        return sum(self.images.values())

    @classmethod
    def of_splits(cls, protocol, datasets, note: str = "") -> TaskPlan:
        """Every image of each dataset through the trunk once, at the protocol's ``image_size``."""
        return cls(images={ds.split: len(ds) for ds in datasets}, image_size=protocol.image_size, note=note)


def measure_throughput(trunk, size: int, device: str = "cpu", batch: int = 4, repeats: int = 3) -> float:
    """Images per second of a forward pass of ``trunk`` at ``size`` px: the median of ``repeats`` timed batches
    after one warm-up batch (a busy machine makes single timings jumpy)."""
    import statistics

    import torch

    x = torch.randn(batch, 3, size, size, device=device)
    trunk = trunk.to(device).eval()
    times = []
    with torch.inference_mode():
        trunk(x)
        for _ in range(repeats):
            t0 = time.perf_counter()
            trunk(x)
            times.append(time.perf_counter() - t0)
    return batch / max(statistics.median(times), 1e-6)


def estimate_seconds(plan: TaskPlan, images_per_s: dict[int, float]) -> float:
    """Seconds for the plan given forward throughput per image size (training counts forward + backward)."""
    secs = plan.total_images / images_per_s[plan.image_size]
    if plan.train_iterations:
        size = plan.train_image_size or plan.image_size
        secs += 3 * plan.train_iterations * max(1, plan.images_per_iteration) / images_per_s[size]
    return secs


def human_time(secs: float) -> str:
    if secs < 90:
        return f"{secs:.0f} s"
    if secs < 90 * 60:
        return f"{secs / 60:.0f} min"
    return f"{secs / 3600:.1f} h"


def describe(plan: TaskPlan) -> str:
    parts = []
    if plan.images:
        splits = ", ".join(f"{k} {v}" for k, v in plan.images.items())
        parts.append(f"{plan.total_images} images at {plan.image_size} px ({splits})")
    if plan.train_iterations:
        size = plan.train_image_size or plan.image_size
        text = f"{plan.train_iterations} training iterations x {plan.images_per_iteration} images at {size} px"
        if plan.train_images:
            text += " from " + ", ".join(f"{k} {v}" for k, v in plan.train_images.items())
        parts.append(text)
    if plan.note:
        parts.append(plan.note)
    return "; ".join(parts) or "no trunk work"
