"""What the bootstrap intervals of evalsuite.stats cost, at the sizes the tasks give them (1000 resamples).

- ``map_voc``: VOC07 test (4952 images x 20 classes, ~7 % positives, 2 % ignored), one voc07_svm record;
- ``map_voc`` low-shot: the same with 5 samples of scores (one lowshot_svm record);
- ``mean`` x 25: ImageNet val (50000 images), the 25 per-sample metrics of one knn tap in one call;
- paired ``map_voc``: two runs' VOC07 records;
- ``map_det_voc07``: one detection mAP record, VOC07 test (4952 images x 100 detections, 20 classes, ~3 % TPs);
- ``median_hist``: one surface-normals median record, NYUv2 test (654 images x 18001 bins of 0.01 degree).

Each is timed best of ``--repeats`` (after a warm-up call). Writes benchmarks/out/stats.json. Target: the VOC07
interval under a second.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from benchmarks.common import write_json
from evalsuite import stats


def voc_like(n: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.where(rng.random((n, classes)) < 0.07, 1, -1).astype(np.int8)
    labels[rng.random((n, classes)) < 0.02] = 0
    return labels, labels + 1.5 * rng.normal(size=labels.shape)


def detections_like(n: int, classes: int, per_image: int, seed: int) -> dict[str, np.ndarray]:
    """Per-sample arrays of a detection record (tasks.detection.task.sample_arrays)."""
    rng = np.random.default_rng(seed)
    d = n * per_image
    outcome = np.where(rng.random(d) < 0.03, 1, 0).astype(np.int8)
    outcome[rng.random(d) < 0.005] = -1
    return {"image": np.repeat(np.arange(n), per_image), "label": rng.integers(0, classes, d),
            "score": rng.random(d).astype(np.float32), "outcome": outcome,
            "npos": rng.poisson(0.25, (n, classes)).astype(np.int32)}


def error_histograms(n: int, pixels: int, seed: int, bin_deg: float = 0.01) -> dict[str, np.ndarray]:
    """Per-image histograms of angular errors (half-normal, 10-30 degrees wide) as surface_normals keeps them."""
    rng = np.random.default_rng(seed)
    bins = int(round(180 / bin_deg)) + 1
    hist = np.stack([np.bincount((np.abs(rng.normal(0, rng.uniform(10, 30), pixels)) % 180 / bin_deg).astype(int),
                                 minlength=bins) for _ in range(n)]).astype(np.int32)
    return {"hist": hist, "bin_width": np.asarray(bin_deg)}


def best_time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--resamples", type=int, default=stats.DEFAULT_RESAMPLES)
    a = ap.parse_args(argv)
    labels, scores = voc_like(4952, 20, 0)
    _, other = voc_like(4952, 20, 1)
    draws = np.stack([scores + 0.1 * i for i in range(5)])
    rng = np.random.default_rng(2)
    hits = [("mean", {"values": rng.random(50000) < 0.6}) for _ in range(25)]
    dets = detections_like(4952, 20, 100, 3)
    hists = error_histograms(654, 30_000, 4)
    b = a.resamples
    rows = {
        "voc07_map_voc_s": best_time(lambda: stats.bootstrap_map_ci(scores, labels, resamples=b), a.repeats),
        "voc07_lowshot_5_samples_s": best_time(lambda: stats.bootstrap_map_ci(draws, labels, resamples=b), a.repeats),
        "imagenet_val_25_means_s": best_time(lambda: stats.bootstrap_many(hits, resamples=b), a.repeats),
        "voc07_paired_map_voc_s": best_time(lambda: stats.paired_bootstrap(
            "map_voc", {"scores": scores, "labels": labels}, {"scores": other, "labels": labels}, resamples=b),
            a.repeats),
        "voc07_detection_map_s": best_time(lambda: stats.bootstrap("map_det_voc07", dets, resamples=b), a.repeats),
        "nyuv2_normals_median_s": best_time(lambda: stats.bootstrap("median_hist", hists, resamples=b), a.repeats),
    }
    for k, v in rows.items():
        print(f"{k:28s} {v:.3f} s  ({b} resamples)")
    write_json("stats", {"resamples": b, "repeats": a.repeats, **rows})


if __name__ == "__main__":
    main()
