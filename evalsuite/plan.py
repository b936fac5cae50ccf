"""What a run will cost, said before it starts (``evalsuite run`` prints it; ``--dry-run`` stops there).

A task may offer ``plan(ctx) -> TaskPlan`` (the optional part of the task contract): how many images
the trunk must see and how many training iterations it runs. The time is estimated from the trunk's
throughput measured on this machine at that image size (a backward pass counted as two forwards).

Disk and memory come from the trunk's shapes, found with one forward pass on one image (:func:`profile_trunk`):
the cache holds rows x pooled dims x 2 bytes (float16) per tap; extraction holds the trunk, a batch of inputs,
its largest activation twice (a layer's input and output) and the taps' maps; training holds the trunk four
times (weights, gradients, two optimizer moments) and every activation of a batch (kept for the backward pass);
the host holds a feature task's cached features (float16) and a float32 copy of its largest matrix. These are
float32 upper bounds of the tensors themselves (bf16 autocast halves the activations; allocator slack and
library workspaces come on top).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

#: a plan longer than this on a CPU gets a warning pointing to --protocol quick / --tasks
LONG_ON_CPU_S = 30 * 60
#: bytes per cached feature value (float16; a shard beyond float16's range is kept in float32, twice this)
FEATURE_BYTES = 2
#: bytes per activation value in the memory estimates (float32)
ACTIVATION_BYTES = 4


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
    # tap -> pooled dims cached per image, for a task whose images go through the feature cache (`evalsuite run`
    # fills it in from the task's taps and pooling); empty: the task does not cache features
    feature_dims: dict[str, int] = field(default_factory=dict)
    # split -> cached rows the task holds in memory at once (default: all of the split's; the linear probes hold
    # one augmented view of the training split at a time)
    held_images: dict[str, int] | None = None

    @property
    def total_images(self) -> int:
        return sum(self.images.values())

    @property
    def cache_bytes(self) -> int:
        """Disk the feature cache takes for this plan: rows x dims x 2 bytes, summed over taps."""
        return self.total_images * sum(self.feature_dims.values()) * FEATURE_BYTES

    @classmethod
    def of_splits(cls, protocol, datasets, note: str = "") -> TaskPlan:
        """Every image of each dataset through the trunk once, at the protocol's ``image_size``."""
        return cls(images={ds.split: len(ds) for ds in datasets}, image_size=protocol.image_size, note=note)


def for_seeds(plan: TaskPlan, n: int) -> TaskPlan:
    """The plan of a task run at ``n`` seeds (``evalsuite run --seeds``): its training ``n`` times; images that go
    through the feature cache (``feature_dims``) extracted once, a fine-tuning task's images ``n`` times."""
    if n <= 1:
        return plan
    images = plan.images if plan.feature_dims else {k: v * n for k, v in plan.images.items()}
    note = f"x {n} seeds" + (" (features extracted once)" if plan.feature_dims else "")
    return replace(plan, images=images, train_iterations=plan.train_iterations * n,
                   note=note + (f"; {plan.note}" if plan.note else ""))


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


@dataclass(frozen=True)
class TrunkProfile:
    """What the trunk holds for one image at one size (float32 bytes), from one forward pass."""

    param_bytes: int
    input_bytes: int
    largest_activation_bytes: int  # the largest output of any one module
    activation_bytes: int  # every module's output: what a backward pass keeps
    tap_bytes: dict[str, int]  # each tap's map, before pooling


def profile_trunk(trunk, size: int, device: str = "cpu") -> TrunkProfile:
    """One forward pass of one ``size`` px image through every tap, with a hook on each leaf module."""
    import torch

    outputs: list[int] = []

    def hook(_module, _inputs, out):
        if isinstance(out, torch.Tensor):
            outputs.append(out.numel() * ACTIVATION_BYTES)

    trunk = trunk.to(device).eval()
    leaves = [m for m in trunk.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        with torch.inference_mode():
            taps = trunk(torch.zeros(1, 3, size, size, device=device))
    finally:
        for h in handles:
            h.remove()
    params = sum(p.numel() * p.element_size() for p in trunk.parameters())
    params += sum(b.numel() * b.element_size() for b in trunk.buffers())
    return TrunkProfile(param_bytes=params, input_bytes=3 * size * size * ACTIVATION_BYTES,
                        largest_activation_bytes=max(outputs, default=0), activation_bytes=sum(outputs),
                        tap_bytes={t: a.numel() * ACTIVATION_BYTES for t, a in taps.items()})


def peak_memory(plan: TaskPlan, profiles: dict[int, TrunkProfile], batch_size: int) -> dict[str, int]:
    """Estimated peak bytes of the plan's tensors: ``device`` (extraction or training, whichever holds more)
    and ``host`` (a feature task's features in memory); see the module's doc for the model."""
    device = 0
    if plan.images:
        p = profiles[plan.image_size]
        taps = [p.tap_bytes[t] for t in plan.feature_dims if t in p.tap_bytes] or list(p.tap_bytes.values())
        batch = min(batch_size, max(1, plan.total_images))
        device = p.param_bytes + batch * (p.input_bytes + 2 * p.largest_activation_bytes + sum(taps))
    if plan.train_iterations:
        p = profiles[plan.train_image_size or plan.image_size]
        batch = max(1, plan.images_per_iteration)
        device = max(device, 4 * p.param_bytes + batch * (p.input_bytes + p.activation_bytes))
    host = 0
    if plan.feature_dims:
        held = plan.images if plan.held_images is None else plan.held_images
        dims = plan.feature_dims.values()
        # every held row in float16, and a float32 working copy of the largest one-tap matrix
        host = sum(held.values()) * sum(dims) * FEATURE_BYTES + max(held.values(), default=0) * max(dims) * 4
    return {"device": device, "host": host}


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def describe_costs(plan: TaskPlan, memory: dict[str, int], batch_size: int) -> str:
    """The plan's disk and memory in one line."""
    parts = []
    if plan.feature_dims:
        dims = ", ".join(f"{t} {d}" for t, d in plan.feature_dims.items())
        parts.append(f"cache {plan.total_images} rows x {sum(plan.feature_dims.values())} dims ({dims}) x "
                     f"{FEATURE_BYTES} B = {human_bytes(plan.cache_bytes)}")
    elif plan.images or plan.train_iterations:
        parts.append("no feature cache")
    if memory["device"]:
        what = f"batch {min(batch_size, max(1, plan.total_images))}" if plan.images else ""
        if plan.train_iterations:
            what = (what + ", " if what else "") + f"training {plan.images_per_iteration} images/iteration"
        parts.append(f"peak memory ~{human_bytes(memory['device'])} device ({what})")
    if memory["host"]:
        parts.append(f"~{human_bytes(memory['host'])} host (features)")
    return "; ".join(parts)


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
