"""Linear-probe throughput on cached fp16 features, and proof that training never re-runs the trunk.

Measured side by side in one run:
- epochs/s and samples/s of ``train_linear_probe`` at the quick size and at a realistic size
  (Places205's res5 Goyal features: 8192 dims, 205 classes, batch 256; N scaled to the machine),
  with the peak-RSS growth during training next to the fp16 and float32 sizes of the matrix
  (a float32 copy of the whole matrix would show up as growth of about the float32 size);
- the places205_linear task run on a tiny ImageFolder with a trunk that counts its forward calls:
  centre-crop training views, then K = 2 augmented training views, each run twice: a first run extracts
  (every image once per view, none during training; the augmented run reads the val features the
  centre-crop run cached), the second reads the cache (0 calls).

    python -m benchmarks.bench_linear_probe [--n 20480] [--epochs 2] [--threads 2]

Prints a table and writes benchmarks/out/bench_linear_probe.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from tasks.linear.probe import ProbeConfig, train_linear_probe

PLACES205_TRAIN = 2_448_873  # official Places205 train list


def reset_peak_rss() -> bool:
    """Linux: reset the process's peak RSS (VmHWM) so growth can be measured per phase."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def current_rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def synthetic_features(n: int, dim: int, classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    x = np.empty((n, dim), dtype=np.float16)
    centres = rng.normal(0, 0.3, (classes, dim)).astype(np.float32)
    for lo in range(0, n, 4096):  # filled in blocks: never a float32 copy of the whole matrix
        hi = min(n, lo + 4096)
        x[lo:hi] = np.abs(centres[y[lo:hi]] + rng.normal(0, 1, (hi - lo, dim)).astype(np.float32))
    return x, y


def bench_training(name: str, n: int, dim: int, classes: int, channels: int, batch: int, epochs: int) -> dict:
    x, y = synthetic_features(n, dim, classes)
    cfg = ProbeConfig(epochs=epochs, batch_size=batch, lr_milestones=(max(1, epochs - 1),), bn="channel")
    train_linear_probe(x[:512], y[:512], classes, ProbeConfig(epochs=1, batch_size=batch, lr_milestones=()),
                       channels=channels, progress=False)  # warm-up: one-time imports and allocations
    reset_peak_rss()
    rss0 = current_rss_mb()
    t0 = time.perf_counter()
    fit = train_linear_probe(x, y, classes, cfg, channels=channels, progress=False)
    wall = time.perf_counter() - t0
    samples = fit.total_iterations * min(batch, n)
    out = {
        "size": name, "n": n, "dim": dim, "classes": classes, "batch": batch, "epochs": epochs,
        "wall_s": round(wall, 3), "epochs_per_s": round(epochs / wall, 4),
        "samples_per_s": round(samples / wall, 1),
        "ms_per_iteration": round(1000 * wall / fit.total_iterations, 2),
        "fp16_matrix_mb": round(x.nbytes / 2**20, 1), "float32_copy_mb": round(x.nbytes * 2 / 2**20, 1),
        "peak_rss_growth_mb": round(peak_rss_mb() - rss0, 1), "final_loss": round(fit.history[-1]["loss"], 4),
    }
    if name == "realistic":
        out["goyal19_places205_hours_per_tap"] = round(PLACES205_TRAIN * 14 / out["samples_per_s"] / 3600, 2)
    return out


def bench_trunk_calls() -> dict:
    from evalsuite.cache import FeatureCache
    from evalsuite.checkpoints import load_checkpoint
    from evalsuite.data.synthetic import write_imagefolder
    from evalsuite.features import FeatureExtractor
    from evalsuite.task import TaskContext
    from tasks.linear.task import task

    ckpt = load_checkpoint("random:resnet18", seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_imagefolder(tmp / "data" / "imagefolder", seed=0, per_class=12, size=48)
        calls: list[int] = []

        def factory() -> FeatureExtractor:
            trunk = ckpt.build_trunk()
            trunk.register_forward_hook(
                lambda m, a, o: calls.append(a[0].shape[0]) if (a[0].shape[0] > 1 or a[0].any()) else None)
            return FeatureExtractor(trunk, ckpt.sha256, ckpt.arch, cache=FeatureCache(tmp / "cache"),
                                    batch_size=16, progress=False)

        center = task.default_protocol("quick").replace(dataset="imagefolder")
        augmented = center.replace(train_views="augmented", augmented_views=2)
        runs = []
        for i, protocol in enumerate((center, center, augmented, augmented)):
            calls.clear()
            ctx = TaskContext(task="places205_linear", checkpoint=ckpt, preset="quick",
                              protocol=protocol, data_root=tmp / "data", out_dir=tmp / f"out{i}",
                              extractor_factory=factory, progress=False)
            t0 = time.perf_counter()
            res = task.run(ctx)
            runs.append({"wall_s": round(time.perf_counter() - t0, 3), "trunk_forward_calls": len(calls),
                         "images_through_trunk": int(sum(calls)), "results": len(res)})
    n_train, n_val = 8 * 12, 8 * 6
    expected = [n_train + n_val, 0, 2 * n_train, 0]  # each view once; val cached by the centre-crop run
    return {"images_per_pass": n_train + n_val, "first_run": runs[0], "second_run_cached": runs[1],
            "augmented_2_views_first_run": runs[2], "augmented_2_views_second_run_cached": runs[3],
            "training_reran_trunk": [r["images_through_trunk"] for r in runs] != expected}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20480, help="rows at the realistic size")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "bench_linear_probe.json")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    report = {
        "threads": a.threads, "torch": torch.__version__,
        "training": [
            bench_training("realistic", a.n, 8192, 205, 2048, 256, a.epochs),  # first: cleanest RSS reading
            bench_training("quick", 48, 9216, 8, 64, 16, 4),
        ],
        "trunk": bench_trunk_calls(),
    }
    print(f"{'size':<10}{'N':>8}{'D':>7}{'C':>5}{'epochs/s':>10}{'samples/s':>11}{'ms/it':>8}{'fp16 MB':>9}"
          f"{'f32 MB':>8}{'RSS+ MB':>9}")
    for r in report["training"]:
        print(f"{r['size']:<10}{r['n']:>8}{r['dim']:>7}{r['classes']:>5}{r['epochs_per_s']:>10.3f}"
              f"{r['samples_per_s']:>11.0f}{r['ms_per_iteration']:>8.1f}{r['fp16_matrix_mb']:>9.1f}"
              f"{r['float32_copy_mb']:>8.1f}{r['peak_rss_growth_mb']:>9.1f}")
    real = report["training"][0]
    print(f"goyal19 Places205 (14 epochs x {PLACES205_TRAIN} rows) per tap at this rate: "
          f"{real['goyal19_places205_hours_per_tap']} h")
    t = report["trunk"]
    print(f"trunk forward calls: first run {t['first_run']['trunk_forward_calls']} "
          f"({t['first_run']['images_through_trunk']} images = one pass over {t['images_per_pass']}), "
          f"second run {t['second_run_cached']['trunk_forward_calls']}; "
          f"wall {t['first_run']['wall_s']} s -> {t['second_run_cached']['wall_s']} s")
    a1, a2 = t["augmented_2_views_first_run"], t["augmented_2_views_second_run_cached"]
    print(f"augmented training views (K=2): first run {a1['images_through_trunk']} images through the trunk "
          f"(2 views of the train split), second run {a2['trunk_forward_calls']} calls; "
          f"wall {a1['wall_s']} s -> {a2['wall_s']} s")
    if t["training_reran_trunk"]:
        raise SystemExit("FAIL: training ran the trunk")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {a.out}")
    return report


if __name__ == "__main__":
    main()
