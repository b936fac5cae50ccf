"""Pretraining throughput: steps/s per method, fp32 vs bf16 autocast + channels_last, side by side in one run.

Each method trains ``--steps`` steps (after one warm-up step) on a synthetic ImageFolder with the method's
default heads scaled down by ``--small`` (default on, so the trunk dominates), ResNet-18 at ``--size`` px.

    python -m benchmarks.bench_pretrain [--methods simclr,moco_v2,byol,swav,barlow_twins] [--size 64]
                                        [--batch 32] [--steps 3] [--threads 2] [--full-heads]

Prints a table and writes benchmarks/out/bench_pretrain.json.
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
    "npid": {"nce_k": 1024},
    "pirl": {"n_negatives": 1024},
    "cmc": {"nce_k": 1024},
    "deepcluster": {"n_clusters": 16},
    "sela": {"n_clusters": 16},
}


def steps_per_second(method: str, root: Path, out: Path, size: int, batch: int, steps: int, precision: str,
                     channels_last: bool, hp: dict) -> float:
    from pretrain import TrainConfig, Trainer

    cfg = TrainConfig(method=method, data_root=str(root), out=str(out), batch_size=batch, image_size=size,
                      epochs=1, max_steps_per_epoch=steps + 1, hp=hp, precision=precision,
                      channels_last=channels_last, progress=False, resume=False)
    tr = Trainer(cfg)
    times: list[float] = []
    orig = tr.method.on_after_step

    def timed(trainer):
        orig(trainer)
        times.append(time.perf_counter())

    tr.method.on_after_step = timed
    tr.fit()
    return (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else float("nan")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="simclr,moco_v2,byol,swav,barlow_twins")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--full-heads", action="store_true", help="use the published head sizes")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    from evalsuite.data.synthetic import write_imagefolder

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        per_class = max(2, (a.batch * (a.steps + 1)) // 8 + 1)
        write_imagefolder(root / "imagefolder", seed=0, per_class=per_class, size=a.size)
        for m in a.methods.split(","):
            hp = {} if a.full_heads else SMALL.get(m, {})
            fp32 = steps_per_second(m, root, root / f"{m}_fp32.safetensors", a.size, a.batch, a.steps, "fp32",
                                    False, hp)
            bf16 = steps_per_second(m, root, root / f"{m}_bf16.safetensors", a.size, a.batch, a.steps, "bf16",
                                    True, hp)
            rows.append({"method": m, "fp32_steps_per_s": fp32, "bf16_cl_steps_per_s": bf16,
                         "bf16_speedup": bf16 / fp32 if fp32 else None, "hp": hp})
            print(f"{m:14s} fp32 {fp32:7.3f} steps/s   bf16+channels_last {bf16:7.3f} steps/s   "
                  f"ratio {bf16 / fp32:5.2f}", flush=True)
    payload = {"arch": "resnet18", "image_size": a.size, "batch_size": a.batch, "steps": a.steps, "rows": rows}
    write_json("bench_pretrain", payload)
    return payload


if __name__ == "__main__":
    main()
