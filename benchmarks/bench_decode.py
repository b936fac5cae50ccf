"""Image decoding throughput for extraction: each path of ``--decode``, side by side on the same JPEGs.

    python -m benchmarks.bench_decode [--images 128] [--side 400] [--workers 2] [--batch 32] [--rounds 2] [--threads 1]

Decodes and transforms (shorter side to 256, centre 224 crop, bilinear: the linear probes' and kNN's transform)
--images synthetic photograph-like JPEGs of --side x 3/4 --side px (quality 90; an ImageNet image averages about
400 x 350) through the extractor's own loaders, without the trunk, so the figure is the decoding path alone:

- ``cpu_0_workers``: PIL in the main process (``--decode cpu --workers 0``);
- ``cpu_N_workers``: PIL in N loading workers (``--decode cpu --workers N``);
- ``tensor_cpu_N_workers``: the GPU path's code with the CPU as the device: JPEG bytes read by N workers, one
  batched ``torchvision.io.decode_jpeg`` per batch and torchvision's tensor resize in the main process;
- ``gpu_N_workers``: ``--decode gpu``, the same on the CUDA device (nvjpeg), when one is present.

Timed from each pass's first batch on (worker start-up is paid once per extraction). Rounds alternate the paths,
so load changes on the machine hit each alike. Prints img/s per path and writes
benchmarks/out/bench_decode.json.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks.common import write_json
from evalsuite.data import open_dataset
from evalsuite.features import (
    EncodedImages,
    Transform,
    TransformedImages,
    collate_encoded,
    collate_images,
    decode_images,
)

TRANSFORM = Transform(size=224, mode="center_crop", resize=256)


def write_jpegs(root: Path, n: int, side: int, seed: int = 0) -> Path:
    """``n`` JPEGs in an ImageFolder layout: smooth random colour fields with fine noise (they compress like
    photographs, not like flat synthetic shapes)."""
    rng = np.random.default_rng(seed)
    folder = root / "train" / "c0"
    folder.mkdir(parents=True)
    h = side * 3 // 4
    for i in range(n):
        coarse = Image.fromarray(rng.integers(0, 256, (h // 16, side // 16, 3), dtype=np.uint8))
        smooth = np.asarray(coarse.resize((side, h), Image.BICUBIC), dtype=np.int16)
        noisy = np.clip(smooth + rng.integers(-12, 13, smooth.shape), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(folder / f"{i:05d}.jpg", quality=90)
    return root


def run_path(ds, path: str, workers: int, batch: int) -> tuple[float, int]:
    """(seconds, images) of decoding and transforming ``ds`` through one path, from its first batch on (the
    workers' start-up, paid once per extraction, left out)."""
    device = "cuda" if path == "gpu" else "cpu"
    encoded = path in ("tensor", "gpu")
    loader = torch.utils.data.DataLoader(
        EncodedImages(ds) if encoded else TransformedImages(ds, TRANSFORM), batch_size=batch, num_workers=workers,
        collate_fn=collate_encoded if encoded else collate_images)
    t0, images = None, 0
    for x, idx in loader:
        if encoded:
            x = torch.stack([TRANSFORM.on_tensor(im) for im in decode_images(x, device)])
        if device == "cuda":
            torch.cuda.synchronize()
        if t0 is None:
            t0 = time.perf_counter()
        else:
            images += len(idx)
    return time.perf_counter() - t0, images


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=128)
    ap.add_argument("--side", type=int, default=400, help="image width (height: 3/4 of it)")
    ap.add_argument("--workers", type=int, default=2, help="N, the loading workers of the multi-worker paths")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads of the main process (per-image work: on a busy machine more threads only spin)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    n = a.workers
    paths = {"cpu_0_workers": ("cpu", 0), f"cpu_{n}_workers": ("cpu", n), f"tensor_cpu_{n}_workers": ("tensor", n)}
    if torch.cuda.is_available():
        paths[f"gpu_{n}_workers"] = ("gpu", n)
    with tempfile.TemporaryDirectory() as d:
        ds = open_dataset("imagefolder", write_jpegs(Path(d), a.images, a.side), "train")
        mean_bytes = int(np.mean([ds.image_path(i).stat().st_size for i in range(len(ds))]))
        for path, workers in paths.values():  # warm-up: worker start-up, oneDNN / CUDA initialisation
            run_path(ds, path, workers, a.batch)
        seconds, images = dict.fromkeys(paths, 0.0), dict.fromkeys(paths, 0)
        for _ in range(a.rounds):
            for name, (path, workers) in paths.items():
                secs, n_images = run_path(ds, path, workers, a.batch)
                seconds[name] += secs
                images[name] += n_images
    ips = {k: round(images[k] / v, 1) for k, v in seconds.items()}
    for name, v in ips.items():
        print(f"{name:22s} {v:8.1f} img/s  ({v / ips['cpu_0_workers']:.2f}x cpu_0_workers)")
    write_json("bench_decode", {"params": vars(a), "mean_jpeg_bytes": mean_bytes,
                                "transform": TRANSFORM.to_dict(), "images_per_s": ips,
                                "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
