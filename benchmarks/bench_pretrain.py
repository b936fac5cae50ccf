"""Pretraining throughput: steps/s per method, fp32 vs bf16 autocast + channels_last, side by side in one run.

Each method trains ``--steps`` steps (after one warm-up step) on a synthetic ImageFolder with the method's
default heads scaled down by ``--small`` (default on, so the trunk dominates), ResNet-18 at ``--size`` px.

    python -m benchmarks.bench_pretrain [--methods simclr,moco_v2,byol,swav,barlow_twins] [--size 64]
                                        [--batch 32] [--steps 3] [--threads 2] [--full-heads]

Prints a table and writes benchmarks/out/bench_pretrain.json.

``--table``: every joint-embedding method (``JOINT_EMBEDDING``) at every ``--sizes`` (32 and 64 px), in every
``--modes`` (fp32, bf16 autocast, each with and without channels_last) and with every ``--workers`` entry: a count of
data-loading processes drawing per-image views (0 and 2), or ``batch``, the views drawn per batch from the images
held in memory (``pretrain.batch_views``), measured one after the other in one run; the synthetic images are written
at each size, so decoding (per image) and augmenting them is part of every step. Writes
benchmarks/out/bench_pretrain_table.json.

    python -m benchmarks.bench_pretrain --table [--device cuda] [--steps 20] [--batch 256] [--arch resnet18_cifar_w16]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import write_json

SMALL = {
    "simclr": {"proj_hidden": 512, "proj_dim": 128},
    "moco_v1": {"queue_size": 4096},
    "moco_v2": {"queue_size": 4096, "mlp_hidden": 512},
    "byol": {"proj_hidden": 512, "pred_hidden": 512},
    "simsiam": {"proj_dim": 512, "pred_hidden": 128},
    "barlow_twins": {"proj_dim": 1024},
    "swav": {"proj_hidden": 512, "n_prototypes": 300, "n_local": 2},
    "dino": {"out_dim": 4096, "hidden_dim": 512, "n_local": 2},
    "npid": {"nce_k": 1024},
    "pirl": {"n_negatives": 1024},
    "cmc": {"nce_k": 1024},
    "deepcluster": {"n_clusters": 16},
    "sela": {"n_clusters": 16},
}
#: the methods that train on two or more augmented views of each image (the ``--table`` rows)
JOINT_EMBEDDING = ("simclr", "moco_v1", "moco_v2", "byol", "simsiam", "barlow_twins", "swav", "dino")
#: ``--modes``: name -> (precision, channels_last)
MODES = {"fp32": ("fp32", False), "bf16": ("bf16", False), "fp32+cl": ("fp32", True), "bf16+cl": ("bf16", True)}


def steps_per_second(method: str, root: Path, out: Path, size: int, batch: int, steps: int, precision: str,
                     channels_last: bool, hp: dict, workers: int = 0, device: str = "cpu", arch: str = "resnet18",
                     batch_views: str = "off") -> float:
    from pretrain import TrainConfig, Trainer

    cfg = TrainConfig(method=method, arch=arch, data_root=str(root), out=str(out), batch_size=batch,
                      image_size=size, epochs=1, max_steps_per_epoch=steps + 1, hp=hp, precision=precision,
                      channels_last=channels_last, progress=False, resume=False, workers=workers, device=device,
                      batch_views=batch_views)
    tr = Trainer(cfg)
    times: list[float] = []
    orig = tr.method.on_after_step

    def timed(trainer):
        orig(trainer)
        if trainer.device.type == "cuda":
            torch.cuda.synchronize(trainer.device)
        times.append(time.perf_counter())

    tr.method.on_after_step = timed
    tr.fit()
    return (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else float("nan")


def _write_data(root: Path, size: int, batch: int, steps: int) -> None:
    from evalsuite.data.synthetic import write_imagefolder

    per_class = max(2, (batch * (steps + 1)) // 8 + 1)
    write_imagefolder(root / "imagefolder", seed=0, per_class=per_class, size=size)


def table(a) -> dict:
    """Every method x size x mode x workers, one Trainer each, in one run."""
    methods = [m for m in a.methods.split(",") if m] if a.methods else list(JOINT_EMBEDDING)
    sizes = [int(s) for s in a.sizes.split(",")]
    modes = [m for m in a.modes.split(",") if m]
    workers = [w if w == "batch" else int(w) for w in a.workers.split(",")]
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        raise SystemExit(f"unknown --modes {', '.join(unknown)}; known: {', '.join(MODES)}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            root = Path(tmp) / f"px{size}"
            _write_data(root, size, a.batch, a.steps)
            for m in methods:
                hp = {} if a.full_heads else SMALL.get(m, {})
                for mode in modes:
                    precision, cl = MODES[mode]
                    for w in workers:
                        sps = steps_per_second(m, root, root / f"{m}.safetensors", size, a.batch, a.steps,
                                               precision, cl, hp, workers=0 if w == "batch" else w, device=a.device,
                                               arch=a.arch, batch_views="on" if w == "batch" else "off")
                        rows.append({"method": m, "image_size": size, "mode": mode, "precision": precision,
                                     "channels_last": cl, "workers": w, "steps_per_s": round(sps, 4), "hp": hp})
                        print(f"{m:14s} {size:3d} px  {mode:8s} workers {w}  {sps:8.3f} steps/s", flush=True)
    _print_table(rows, modes, workers)
    payload = {"arch": a.arch, "batch_size": a.batch, "steps": a.steps, "device": a.device,
               "threads": a.threads, "rows": rows}
    write_json("bench_pretrain_table", payload)
    return payload


def _print_table(rows: list[dict], modes: list[str], workers: list[int]) -> None:
    cols = [(mode, w) for mode in modes for w in workers]
    print("\n| method | px | " + " | ".join(f"{mode} {'batch' if w == 'batch' else f'w{w}'}" for mode, w in cols)
          + " |")
    print("|---|---|" + "---|" * len(cols))
    cell = {(r["method"], r["image_size"], r["mode"], r["workers"]): r["steps_per_s"] for r in rows}
    for method, size in dict.fromkeys((r["method"], r["image_size"]) for r in rows):
        print(f"| {method} | {size} | " + " | ".join(f"{cell[(method, size, mode, w)]:.2f}" for mode, w in cols)
              + " |")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", help="comma list (default: simclr,moco_v2,byol,swav,barlow_twins; with --table "
                   "every joint-embedding method)")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--full-heads", action="store_true", help="use the published head sizes")
    p.add_argument("--device", default="cpu")
    p.add_argument("--table", action="store_true", help="the steps/s table (module docstring)")
    p.add_argument("--sizes", default="32,64", help="--table: image sizes")
    p.add_argument("--modes", default="fp32,bf16,fp32+cl,bf16+cl", help=f"--table: of {', '.join(MODES)}")
    p.add_argument("--workers", default="0,2,batch",
                   help="--table: data-loading worker counts (per-image views) and/or 'batch' (per-batch views)")
    p.add_argument("--arch", default="resnet18", help="--table: the trunk")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.table:
        return table(a)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _write_data(root, a.size, a.batch, a.steps)
        for m in (a.methods or "simclr,moco_v2,byol,swav,barlow_twins").split(","):
            hp = {} if a.full_heads else SMALL.get(m, {})
            fp32 = steps_per_second(m, root, root / f"{m}_fp32.safetensors", a.size, a.batch, a.steps, "fp32",
                                    False, hp, device=a.device)
            bf16 = steps_per_second(m, root, root / f"{m}_bf16.safetensors", a.size, a.batch, a.steps, "bf16",
                                    True, hp, device=a.device)
            rows.append({"method": m, "fp32_steps_per_s": fp32, "bf16_cl_steps_per_s": bf16,
                         "bf16_speedup": bf16 / fp32 if fp32 else None, "hp": hp})
            print(f"{m:14s} fp32 {fp32:7.3f} steps/s   bf16+channels_last {bf16:7.3f} steps/s   "
                  f"ratio {bf16 / fp32:5.2f}", flush=True)
    payload = {"arch": "resnet18", "image_size": a.size, "batch_size": a.batch, "steps": a.steps, "rows": rows}
    write_json("bench_pretrain", payload)
    return payload


if __name__ == "__main__":
    main()
