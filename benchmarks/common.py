"""Helpers shared by the benchmark scripts: JSON output, machine description, peak RSS."""

from __future__ import annotations

import os
import platform
import resource
import time
from pathlib import Path
from typing import Any

OUT_DIR = Path(__file__).resolve().parent / "out"


def machine() -> dict[str, Any]:
    import torch

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
            "processor": platform.processor(), "load_avg_1min": load, "torch": torch.__version__,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_json(name: str, payload: dict[str, Any]) -> Path:
    from evalsuite.io import atomic_write_json

    path = atomic_write_json(OUT_DIR / f"{name}.json", {"machine": machine(), **payload}, indent=2, default=str)
    print(f"wrote {path}")
    return path
