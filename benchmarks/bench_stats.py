"""What the uncertainty machinery costs: the bootstrap intervals of evalsuite.stats at the tasks' sizes, the same
beside the task that produced the numbers, and a paired comparison of two real runs. Sections (``--sections``):

``intervals``, 1000 resamples, best of ``--repeats`` after a warm-up call:

- ``map_voc``: VOC07 test (4952 images x 20 classes, ~7 % positives, 2 % ignored), one voc07_svm record;
- ``map_voc`` low-shot: the same with 5 samples of scores (one lowshot_svm record);
- ``mean`` x 25: ImageNet val (50000 images), the 25 per-sample metrics of one knn tap in one call;
- paired ``map_voc``: two runs' VOC07 records;
- ``map_det_voc07``: one detection mAP record, VOC07 test (4952 images x 100 detections, 20 classes, ~3 % TPs);
- ``median_hist``: one surface-normals median record, NYUv2 test (654 images x 18001 bins of 0.01 degree).

``svm``, ``knn``: the task itself beside its intervals, in one run. The task's own ``run(ctx)`` on a real TaskContext
whose datasets and features are handed in (synthetic, VOC-like: ``bench_svm.make_data``; the extraction is left
out, it is the same with or without intervals), then ``attach_intervals`` on its records (what ``evalsuite run``
calls next) and ``write_outputs`` (the per-sample file beside the results); each ratio is over the task's time:

- ``voc07_svm`` at ``--svm-train`` 5011 (trainval) / ``--svm-test`` 4952, 20 classes, each of ``--dims`` (2048,
  9216), the ``--svm-preset``'s cost grid (goyal19: 26 costs x (3 folds + refit) = 2080 problems per tap);
- ``knn`` (goyal19: k 20, ks 10/20/100/200, majority votes, retrieval) on a ``--knn-bank`` x ``--knn-dim`` bank
  written to a real feature cache (memory-mapped, as the task reads it) and ``--knn-queries`` queries:
  VOC07 size by default (5011 / 4952, 20 classes, multi-label: mAP via scikit-learn's AP), ``--knn-data
  imagenet`` single-label (1.28M / 50000, 1000 classes; give smaller ``--knn-bank`` on a small machine).

``paired``: two real ``evalsuite run``s at ``quick`` (``random:resnet18`` at init seeds 0 and 1, the same
synthetic ImageFolder and VOC07 data at ``--paired-scale``: knn, centroid, voc07_svm, places205_linear), then
``evalsuite compare --paired`` of the two (1000 resamples): its wall time and how many rows differ significantly
(Holm-adjusted p <= 0.05).

``--quick``: reduced sizes for a CPU minute (``make bench``). Writes benchmarks/out/stats.json. Targets: the VOC07
interval under a second; an interval under 5 % of its task (the issue's goal).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import write_json
from evalsuite import stats

SECTIONS = ("intervals", "svm", "knn", "paired")
#: --quick: a CPU minute in all
QUICK = {"svm_train": 500, "svm_test": 1000, "dims": [256], "svm_preset": "quick", "knn_bank": 2000,
         "knn_queries": 2000, "knn_dim": 256, "paired_scale": 0.25, "repeats": 1}
#: --knn-data: bank, queries, classes, multi-label
KNN_DATA = {"voc07": (5011, 4952, 20, True), "imagenet": (1_281_167, 50_000, 1000, False)}


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


def interval_rows(a) -> dict[str, float]:
    """The ``intervals`` section: each statistic at its task's size, alone."""
    labels, scores = voc_like(4952, 20, 0)
    _, other = voc_like(4952, 20, 1)
    draws = np.stack([scores + 0.1 * i for i in range(5)])
    rng = np.random.default_rng(2)
    hits = [("mean", {"values": rng.random(50000) < 0.6}) for _ in range(25)]
    dets = detections_like(4952, 20, 100, 3)
    hists = error_histograms(654, 30_000, 4)
    b = a.resamples
    return {
        "voc07_map_voc_s": best_time(lambda: stats.bootstrap_map_ci(scores, labels, resamples=b), a.repeats),
        "voc07_lowshot_5_samples_s": best_time(lambda: stats.bootstrap_map_ci(draws, labels, resamples=b), a.repeats),
        "imagenet_val_25_means_s": best_time(lambda: stats.bootstrap_many(hits, resamples=b), a.repeats),
        "voc07_paired_map_voc_s": best_time(lambda: stats.paired_bootstrap(
            "map_voc", {"scores": scores, "labels": labels}, {"scores": other, "labels": labels}, resamples=b),
            a.repeats),
        "voc07_detection_map_s": best_time(lambda: stats.bootstrap("map_det_voc07", dets, resamples=b), a.repeats),
        "nyuv2_normals_median_s": best_time(lambda: stats.bootstrap("median_hist", hists, resamples=b), a.repeats),
    }


# ---------------------------------------------------------------------------- the task beside its intervals


class Split:
    """What the tasks read of a split: its name, classes, and labels (single-label) or a label matrix (multi-label),
    the other attribute absent (the tasks tell the two apart with hasattr)."""

    root = Path("/synthetic")

    def __init__(self, split: str, classes: list, **targets: np.ndarray):
        self.split, self.classes = split, classes
        for name, value in targets.items():  # labels= or label_matrix=
            setattr(self, name, value)

    def __len__(self) -> int:
        return len(getattr(self, "labels", getattr(self, "label_matrix", [])))

    def fingerprint(self) -> str:
        return f"synthetic-{self.split}-{len(self)}"


def handed_context(task: str, preset: str, out: Path, splits: dict, arrays: dict, stores: dict, ckpt, factory,
                   tap: str, device: str):
    """A real TaskContext (``task`` at ``preset``, the one ``tap``) whose ``open_dataset``, ``features`` and
    ``feature_stores`` give the handed splits, arrays and stores: the task's own code runs on them."""
    from evalsuite import registry
    from evalsuite.task import TaskContext

    @dataclasses.dataclass
    class Handed(TaskContext):
        def open_dataset(self, kind, split, path=None, **options):
            return splits[split]

        def features(self, dataset, taps, pooling=None, transform=None):
            return {t: arrays[dataset.split] for t in taps}

        def feature_stores(self, dataset, taps, pooling=None, transform=None):
            return {t: stores[dataset.split] for t in taps}

    protocol = registry.get_task(task).default_protocol(preset)
    return Handed(task=task, checkpoint=ckpt, preset=preset, protocol=protocol, data_root=out, out_dir=out / task,
                  extractor_factory=factory, device=device, layers=[tap], progress=False)


def task_beside_intervals(task: str, ctx, a) -> dict[str, Any]:
    """Seconds of the task's ``run(ctx)``, of ``attach_intervals`` on its records and of ``write_outputs``, and the
    two ratios to the task."""
    from evalsuite import registry
    from evalsuite.outputs import attach_intervals, write_outputs

    t0 = time.perf_counter()
    records = registry.get_task(task).run(ctx)
    task_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    attach_intervals(records, a.resamples, stats.DEFAULT_LEVEL, 0)
    ci_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as folder:
        t0 = time.perf_counter()
        write_outputs(records, folder)
        write_s = time.perf_counter() - t0
        disk = sum(f.stat().st_size for f in Path(folder).rglob("*.npz"))
    with_ci = [r for r in records if r.ci_low is not None]
    return {"task_s": round(task_s, 3), "intervals_s": round(ci_s, 3), "write_outputs_s": round(write_s, 3),
            "intervals_over_task": round(ci_s / task_s, 4), "outputs_over_task": round(write_s / task_s, 4),
            "records": len(records), "records_with_interval": len(with_ci), "outputs_mb": round(disk / 2**20, 2),
            "headline": {r.metric: round(r.value, 3) for r in records[:3] if r.value is not None}}


def svm_rows(a, ckpt, factory, out: Path) -> list[dict[str, Any]]:
    """voc07_svm at each of ``--dims``: VOC-like features and labels (bench_svm.make_data), 1 % of the positives
    marked difficult (negatives in training, ignored at test, as the task treats VOC's)."""
    from benchmarks.bench_svm import make_data

    rows = []
    for d in a.dims:
        x, y = make_data(a.svm_train + a.svm_test, d, 20, seed=d)
        y[(y > 0) & (np.random.default_rng(d).random(y.shape) < 0.01)] = 0
        classes = [f"class{j}" for j in range(20)]
        splits = {"trainval": Split("trainval", classes, label_matrix=y[: a.svm_train]),
                  "test": Split("test", classes, label_matrix=y[a.svm_train:])}
        arrays = {"trainval": x[: a.svm_train].astype(np.float32), "test": x[a.svm_train:].astype(np.float32)}
        del x
        ctx = handed_context("voc07_svm", a.svm_preset, out, splits, arrays, {}, ckpt, factory, "res5", a.device)
        row = {"task": "voc07_svm", "train": a.svm_train, "test": a.svm_test, "dim": d,
               "costs": len(ctx.protocol.costs), **task_beside_intervals("voc07_svm", ctx, a)}
        rows.append(row)
        print(f"voc07_svm D={d}: task {row['task_s']:.2f} s, intervals {row['intervals_s']:.3f} s "
              f"({100 * row['intervals_over_task']:.2f} %), outputs file {row['write_outputs_s']:.3f} s "
              f"({100 * row['outputs_over_task']:.2f} %)", flush=True)
    return rows


def knn_row(a, ckpt, factory, out: Path) -> dict[str, Any]:
    """knn (goyal19) on a bank written to a real feature cache and read memory-mapped, as the task reads it."""
    from benchmarks.bench_scale import sample
    from benchmarks.bench_svm import make_data
    from evalsuite.cache import FeatureCache

    bank_n, query_n, classes, multilabel = KNN_DATA[a.knn_data]
    bank_n, query_n = a.knn_bank or bank_n, a.knn_queries or query_n
    names = [f"class{j}" for j in range(classes)]
    cache = FeatureCache(out / "cache")
    entry = cache.entry({"bench": "stats", "rows": bank_n, "dim": a.knn_dim, "data": a.knn_data}, bank_n)
    entry.prepare()
    if multilabel:  # one draw for both splits: the same latent drives labels and features
        x, y = make_data(bank_n + query_n, a.knn_dim, classes, seed=1)
        y[(y > 0) & (np.random.default_rng(1).random(y.shape) < 0.01)] = 0
        for i in range(entry.num_shards):
            lo, hi = entry.shard_range(i)
            entry.write_shard(i, x[lo:hi].astype(np.float32))
        queries = x[bank_n:].astype(np.float32)
        splits = {"trainval": Split("trainval", names, label_matrix=y[:bank_n]),
                  "test": Split("test", names, label_matrix=y[bank_n:])}
        overrides = {"dataset": "voc2007", "train_split": "trainval", "val_split": "test"}
    else:  # clustered single-label features (bench_scale.sample), written shard by shard
        labels = np.empty(bank_n, np.int64)
        for i in range(entry.num_shards):
            lo, hi = entry.shard_range(i)
            xs, labels[lo:hi] = sample(a.knn_dim, classes, hi - lo, seed=i)
            entry.write_shard(i, xs)
        queries, qy = sample(a.knn_dim, classes, query_n, seed=-1 % 2**32)
        splits = {"train": Split("train", names, labels=labels), "val": Split("val", names, labels=qy)}
        overrides = {"dataset": "imagenet", "train_split": "train", "val_split": "val"}
    entry.finalize()
    store = entry.open(memory_budget=cache.memory_budget)
    train, val = overrides["train_split"], overrides["val_split"]
    ctx = handed_context("knn", "goyal19", out, splits, {val: queries}, {train: store}, ckpt, factory, "res5",
                         a.device)
    ctx.protocol = dataclasses.replace(ctx.protocol, **overrides)
    row = {"task": "knn", "data": a.knn_data, "bank": bank_n, "queries": query_n, "classes": classes,
           "dim": a.knn_dim, **task_beside_intervals("knn", ctx, a)}
    print(f"knn {a.knn_data} bank {bank_n} x {a.knn_dim}, {query_n} queries: task {row['task_s']:.2f} s, intervals "
          f"{row['intervals_s']:.3f} s ({100 * row['intervals_over_task']:.2f} %) for {row['records_with_interval']} "
          f"records, outputs file {row['write_outputs_s']:.3f} s ({100 * row['outputs_over_task']:.2f} %)",
          flush=True)
    return row


def task_rows(a, sections: list[str]) -> dict[str, Any]:
    """The ``svm`` and ``knn`` sections, over one random ResNet-50 (the trunk the records name; only its pooling
    specs are read)."""
    from evalsuite.checkpoints import load_checkpoint
    from evalsuite.features import FeatureExtractor

    ckpt = load_checkpoint("random:resnet50")
    extractor = {}

    def factory():
        if not extractor:
            extractor["x"] = FeatureExtractor(ckpt.build_trunk(), ckpt.sha256, ckpt.arch, progress=False)
        return extractor["x"]

    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        if "svm" in sections:
            out["svm"] = svm_rows(a, ckpt, factory, Path(tmp))
        if "knn" in sections:
            out["knn"] = knn_row(a, ckpt, factory, Path(tmp))
    return out


# ---------------------------------------------------------------------------- a paired comparison of two real runs


def paired_row(a) -> dict[str, Any]:
    """Two real quick runs (random:resnet18 at init seeds 0 and 1) on the same synthetic data, then ``evalsuite
    compare --paired`` of the two through the CLI: its wall time and the rows found different."""
    from evalsuite.cli import main as cli
    from evalsuite.data.cli import synth
    from evalsuite.runner import RunOptions, run

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for kind in ("imagefolder", "voc"):
            synth(kind, root / "data", seed=0, scale=a.paired_scale)
        run_s = {}
        for seed in (0, 1):
            t0 = time.perf_counter()
            run(RunOptions("random:resnet18", tasks=["knn,centroid,voc07_svm,places205_linear"], preset="quick",
                           overrides=["places205_linear.dataset=imagefolder"], data_root=root / "data",
                           out=root / f"seed{seed}", seed=seed, cache_dir=root / "cache", precision="fp32",
                           progress=False, ci_resamples=a.resamples))
            run_s[seed] = round(time.perf_counter() - t0, 2)
        report = root / "paired.json"
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):  # its table: the counts are read from the report
            cli(["compare", "--results", str(root / "seed0"), "--against", str(root / "seed1"), "--paired",
                 "--resamples", str(a.resamples), "--report", str(report)])
        compare_s = time.perf_counter() - t0
        rep = json.loads(report.read_text())
    summary = rep["summary"]
    by_task: dict[str, list[int]] = {}
    for r in rep["rows"]:
        by_task.setdefault(r["task"], [0, 0])[0] += 1
        by_task[r["task"]][1] += r["status"] != "same"
    row = {"runs_s": run_s, "compare_s": round(compare_s, 3), "rows": summary["compared"],
           "significant": summary["differs"] + summary["differs_within_tolerance"], "skipped": summary["skipped"],
           "per_task_rows_significant": by_task, "data_scale": a.paired_scale}
    print(f"compare --paired of two real quick runs: {compare_s:.2f} s for {row['rows']} rows, {row['significant']} "
          f"significantly different (Holm, alpha 0.05), {row['skipped']} not comparable; the runs took "
          f"{run_s[0]} s and {run_s[1]} s; per task (rows, significant): {by_task}", flush=True)
    return row


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated: {', '.join(SECTIONS)}")
    ap.add_argument("--quick", action="store_true", help=f"reduced sizes for a CPU minute: {QUICK}")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--resamples", type=int, default=stats.DEFAULT_RESAMPLES)
    ap.add_argument("--device", default="cpu", help="the tasks' device (cuda: the SVM solver and FAISS on the GPU)")
    ap.add_argument("--svm-train", type=int, default=5011)
    ap.add_argument("--svm-test", type=int, default=4952)
    ap.add_argument("--dims", type=int, nargs="+", default=[2048, 9216])
    ap.add_argument("--svm-preset", default="goyal19", help="whose cost grid (goyal19: 26 costs, quick: 4)")
    ap.add_argument("--knn-data", default="voc07", choices=sorted(KNN_DATA))
    ap.add_argument("--knn-bank", type=int, default=None, help="bank rows (default: --knn-data's)")
    ap.add_argument("--knn-queries", type=int, default=None, help="queries (default: --knn-data's)")
    ap.add_argument("--knn-dim", type=int, default=2048)
    ap.add_argument("--paired-scale", type=float, default=1.0, help="synthetic data scale of the two paired runs")
    a = ap.parse_args(argv)
    if a.quick:
        given = {k: getattr(a, k) for k, v in vars(ap.parse_args([])).items() if getattr(a, k) != v}
        vars(a).update({**QUICK, **given})
    sections = [x for x in a.sections.split(",") if x]
    out: dict[str, Any] = {"resamples": a.resamples, "repeats": a.repeats, "quick": a.quick, "device": a.device}
    if "intervals" in sections:
        rows = interval_rows(a)
        for k, v in rows.items():
            print(f"{k:28s} {v:.3f} s  ({a.resamples} resamples)")
        out.update(rows)
    if {"svm", "knn"} & set(sections):
        out["tasks"] = task_rows(a, sections)
    if "paired" in sections:
        out["paired"] = paired_row(a)
    write_json("stats", out)


if __name__ == "__main__":
    main()
