"""Fidelity of feature extraction: the effect of each extraction element kept as an option.

- precision: fp32 features kept in float32 (the references) against the suite's fp32 (the goyal19 / vissl
  default), kept in its float16 cache, and bf16 autocast, float16 cache (``auto``, quick's default): per
  tap the feature error, and the change of every published-protocol number: voc07_svm mAP, knn top-1 (single
  label) / mAP (VOC), and the centroid sanity task's top-1.
- conv1 pooling: padding left out of the average (``goyal``: fair_ssb's Caffe2 AveragePool) against counted
  (``vissl``: nn.AvgPool2d): the conv1 features and voc07_svm's conv1 mAP.
- resizing: voc07_svm's shorter side 256 then 224 x 224 with OpenCV's bilinear (fair_ssb) against 224 x 224 in one
  PIL step (the earlier default) and the two steps with PIL's bilinear (VISSL); knn's bicubic resize (DINO)
  against bilinear.

Data: the 8 real VOC2007 images of ``tests/fixtures/voc2007_mini`` (5 trainval / 3 test; AP only for classes with
test positives), a synthetic VOC2007 and the synthetic ImageFolder (``evalsuite data synth``), at the published
224 px, through a seeded random ResNet-50 or the ``--checkpoints`` given (a trained one: its BatchNorm statistics
and activations are a network's, not an initialisation's).

    python -m benchmarks.fidelity.features [--n 40] [--per-class 10] [--checkpoints random:resnet50 FILE]

Writes benchmarks/out/fidelity_features.json.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.fidelity import arg_parser, run_cli
from evalsuite import registry
from evalsuite.cache import FeatureCache
from evalsuite.checkpoints import load_checkpoint
from evalsuite.data import open_dataset
from evalsuite.features import FeatureExtractor, Transform
from evalsuite.protocols import apply_overrides, parse_overrides
from evalsuite.task import TaskContext
from evalsuite.trunks import pool_features

REPO = Path(__file__).resolve().parents[2]
FIXTURE_VOC = REPO / "tests" / "fixtures" / "voc2007_mini"
TAPS = ["conv1", "res2", "res3", "res4", "res5"]
DEFAULTS = {"n": 40, "per_class": 10, "checkpoints": ["random:resnet50"], "datasets": ["real", "synthetic"],
            "device": "cpu", "tasks": ["voc07_svm", "knn", "centroid"]}
# the extraction variants: (precision, cache dtype)
PRECISIONS = {"fp32_float32": ("fp32", "float32"), "fp32_float16": ("fp32", "float16"),
              "bf16_float16": ("bf16", "float16")}
# voc07_svm transforms (fair_ssb is the goyal19 reference, VISSL the vissl one)
SVM_TRANSFORMS = {
    "fair_ssb_scale256_square224_cv2": Transform(size=224, mode="scale_square", resize=256,
                                                 interpolation="cv2_bilinear"),
    "vissl_scale256_square224_pil": Transform(size=224, mode="scale_square", resize=256, interpolation="bilinear"),
    "square224_pil": Transform(size=224, mode="square", interpolation="bilinear"),
}
# knn at goyal19 (DINO)
KNN_TRANSFORM = Transform(size=224, mode="center_crop", resize=256, interpolation="bicubic")


class _Float32Features(FeatureExtractor):
    """fp32 features as computed, in float32 (the references' np.save of float32 blobs): the suite's cache keeps
    float16, so these are computed here, channels_last as the extractor does, and kept for the process."""

    memo: dict[tuple, np.ndarray] = {}

    def features(self, dataset, taps, pooling: str = "goyal", transform: Transform | None = None):
        transform = transform or Transform()
        specs = self.pool_specs(taps, pooling, transform)
        key = (self.checkpoint_id, dataset.fingerprint(), pooling, json.dumps(transform.to_dict(), sort_keys=True))
        need = [t for t in taps if (*key, t) not in self.memo]
        if need:
            trunk = self.trunk.to(self.device).eval().to(memory_format=torch.channels_last)
            rows: dict[str, list[np.ndarray]] = {t: [] for t in need}
            with torch.inference_mode():
                for lo in range(0, len(dataset), self.batch_size):
                    batch = range(lo, min(len(dataset), lo + self.batch_size))
                    x = torch.stack([transform(dataset.load_image(i)) for i in batch]).to(self.device)
                    acts = trunk(x.contiguous(memory_format=torch.channels_last), need)
                    for t in need:
                        rows[t].append(pool_features(acts[t].float(), specs[t]).cpu().numpy())
            for t in need:
                self.memo[(*key, t)] = np.concatenate(rows[t])
        return {t: self.memo[(*key, t)] for t in taps}


@dataclasses.dataclass
class _Context(TaskContext):
    """A task context whose transform is given (for transforms the task's protocol cannot yet name)."""

    fixed_transform: Transform | None = None

    def transform(self) -> Transform:
        return self.fixed_transform or super().transform()


def _extractor(ckpt, cache: Path, variant: str, device: str) -> FeatureExtractor:
    precision, dtype = PRECISIONS[variant]
    cls = _Float32Features if dtype == "float32" else FeatureExtractor
    return cls(ckpt.build_trunk(), ckpt.sha256, ckpt.arch, cache=FeatureCache(cache), device=device,
               precision=precision, batch_size=16, progress=False)


def _run(task: str, preset: str, root: Path, work: Path, ckpt, variant: str, args, overrides=(),
         transform: Transform | None = None) -> tuple[dict[tuple[str, str], float], float]:
    """``task`` at ``preset`` (with ``overrides``) on ``root``: {(tap, metric): value} and seconds."""
    protocol = apply_overrides({task: registry.get_task(task).default_protocol(preset)},
                               parse_overrides(list(overrides)))[task]
    cache = work / "cache"  # one per checkpoint: every run reads the features another extracted
    ctx = _Context(task=task, checkpoint=ckpt, preset=preset, protocol=protocol, data_root=root,
                   out_dir=work / "out", extractor_factory=lambda: _extractor(ckpt, cache, variant, args.device),
                   device=args.device, seed=0, progress=False, cache_dir=cache, fixed_transform=transform)
    t0 = time.perf_counter()
    records = registry.get_task(task).run(ctx)
    return {(r.layer, r.metric): r.value for r in records}, time.perf_counter() - t0


def _delta(a, b):
    return None if a is None or b is None else round(a - b, 4)


def _max_abs(deltas) -> float | None:
    deltas = [abs(d) for d in deltas if d is not None]
    return max(deltas) if deltas else None


def feature_error(ref: np.ndarray, other: np.ndarray) -> dict[str, float]:
    """How far ``other`` is from the fp32 reference ``ref`` (rows are images)."""
    a, b = np.asarray(ref, np.float64), np.asarray(other, np.float64)
    scale = np.abs(a).max() or 1.0
    cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)
    return {"max_abs_over_max": float(np.abs(a - b).max() / scale),
            "median_rel": float(np.median(np.abs(a - b) / np.maximum(np.abs(a), 1e-6 * scale))),
            "min_cosine": float(cos.min())}


def precision_features(datasets: dict[str, Any], work: Path, ckpt, args) -> dict:
    """Per dataset, pooling and tap: the error of each variant against fp32 computed and kept in float32."""
    out: dict[str, Any] = {}
    for name, ds in datasets.items():
        for pooling, tf in (("goyal", SVM_TRANSFORMS["fair_ssb_scale256_square224_cv2"]), ("avg", KNN_TRANSFORM)):
            feats = {v: _extractor(ckpt, work / "cache", v, args.device).features(ds, TAPS, pooling, tf)
                     for v in PRECISIONS}
            for variant in ("fp32_float16", "bf16_float16"):
                out.setdefault(name, {}).setdefault(pooling, {})[variant] = {
                    tap: feature_error(feats["fp32_float32"][tap], feats[variant][tap]) for tap in TAPS}
    return out


def precision_tasks(roots: dict[str, Path], work: Path, ckpt, args) -> dict:
    """Every published-protocol number at each precision variant, and its change from fp32 / float32."""
    jobs = []
    for name, root in roots.items():
        if "voc" in name and "voc07_svm" in args.tasks:
            # the goyal19 transform (fair_ssb); the SVM protocol cannot name it yet
            jobs.append(("voc07_svm", "goyal19", name, root, ["voc07_svm.undefined_ap=exclude"], "mAP",
                         SVM_TRANSFORMS["fair_ssb_scale256_square224_cv2"]))
        if "knn" in args.tasks and name != "real_voc2007_fixture":  # 5 trainval images: too few neighbours
            # k and ks within the small banks (vissl's k=200 too)
            extra = (["knn.dataset=voc2007", "knn.train_split=trainval", "knn.val_split=test", "knn.k=5",
                      "knn.ks=[5,10]"] if "voc" in name else ["knn.k=20", "knn.ks=[10,20]"])
            extra.append("knn.retrieval=false")
            jobs.append(("knn", "goyal19", name, root, extra, "mAP" if "voc" in name else "top1", None))
        if "centroid" in args.tasks and "imagefolder" in name:
            jobs.append(("centroid", "goyal19", name, root, [], "top1", None))
    out: dict[str, Any] = {}
    for task, preset, name, root, overrides, metric, tf in jobs:
        values, seconds = {}, {}
        for variant in PRECISIONS:
            values[variant], seconds[variant] = _run(task, preset, root, work, ckpt, variant, args, overrides, tf)
        ref, others = values["fp32_float32"], ("fp32_float16", "bf16_float16")
        rows = {tap: {"fp32_float32": ref[tap, m], **{v: values[v][tap, m] for v in others},
                      **{f"delta_{v}": _delta(values[v][tap, m], ref[tap, m]) for v in others}}
                for tap, m in ref if m == metric}
        out.setdefault(task, {}).setdefault(preset, {})[name] = {
            "metric": metric, "overrides": overrides, "taps": rows,
            "seconds": {k: round(v, 1) for k, v in seconds.items()},
            "max_abs_delta_fp32_float16": _max_abs(r["delta_fp32_float16"] for r in rows.values()),
            "max_abs_delta_bf16_float16": _max_abs(r["delta_bf16_float16"] for r in rows.values())}
    return out


def conv1_pooling(datasets: dict[str, Any], roots: dict[str, Path], work: Path, ckpt, args) -> dict:
    """conv1 with the padding left out of the average (goyal) against counted (vissl)."""
    tf = SVM_TRANSFORMS["fair_ssb_scale256_square224_cv2"]
    out: dict[str, Any] = {}
    for name, ds in datasets.items():
        ext = _extractor(ckpt, work / "cache", "fp32_float32", args.device)
        a = ext.features(ds, ["conv1"], "goyal", tf)["conv1"]
        b = ext.features(ds, ["conv1"], "vissl", tf)["conv1"]
        out.setdefault(name, {})["features_vissl_vs_goyal"] = feature_error(a, b)
    for name, root in roots.items():
        if "voc" not in name or "voc07_svm" not in args.tasks:
            continue
        m = {}
        for pooling in ("goyal", "vissl"):
            values, _ = _run("voc07_svm", "goyal19", root, work, ckpt, "fp32_float32", args,
                             ["voc07_svm.undefined_ap=exclude", "voc07_svm.layers=conv1",
                              f"voc07_svm.pooling={pooling}"], transform=tf)
            m[pooling] = values["conv1", "mAP"]
        out.setdefault(name, {})["voc07_svm_conv1_mAP"] = {**m, "vissl_minus_goyal": _delta(m["vissl"], m["goyal"])}
    return out


def resizing(roots: dict[str, Path], work: Path, ckpt, args) -> dict:
    """voc07_svm under each reference's resizing; knn with DINO's bicubic against bilinear."""
    out: dict[str, Any] = {}
    for name, root in roots.items():
        if "voc" in name and "voc07_svm" in args.tasks:
            maps = {label: _run("voc07_svm", "goyal19", root, work, ckpt, "fp32_float32", args,
                                ["voc07_svm.undefined_ap=exclude"], transform=tf)[0]
                    for label, tf in SVM_TRANSFORMS.items()}
            ref = maps["fair_ssb_scale256_square224_cv2"]
            out.setdefault("voc07_svm", {})[name] = {
                tap: {**{label: maps[label][tap, "mAP"] for label in maps},
                      **{f"{label}_minus_fair_ssb": _delta(maps[label][tap, "mAP"], ref[tap, "mAP"])
                         for label in maps if label != "fair_ssb_scale256_square224_cv2"}}
                for tap, metric in ref if metric == "mAP"}
        if "imagefolder" in name and "knn" in args.tasks:
            tops = {interp: _run("knn", "goyal19", root, work, ckpt, "fp32_float32", args,
                                 ["knn.ks=[10,20]", "knn.retrieval=false", f"knn.interpolation={interp}"])[0]
                    for interp in ("bicubic", "bilinear")}
            out.setdefault("knn", {})[name] = {
                tap: {"top1_bicubic": tops["bicubic"][tap, "top1"], "top1_bilinear": tops["bilinear"][tap, "top1"],
                      "bilinear_minus_bicubic": _delta(tops["bilinear"][tap, "top1"], tops["bicubic"][tap, "top1"])}
                for tap, metric in tops["bicubic"] if metric == "top1"}
    return out


def measure(args) -> dict:
    """Run every comparison (missing attributes of ``args`` take ``DEFAULTS``)."""
    for key, value in DEFAULTS.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    ckpts = {spec: load_checkpoint(spec, seed=0) for spec in args.checkpoints}
    out: dict[str, Any] = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                           "checkpoints": {}}
    with tempfile.TemporaryDirectory(prefix="fidelity_features_") as tmp:
        roots: dict[str, Path] = {}
        if "real" in args.datasets:
            roots["real_voc2007_fixture"] = FIXTURE_VOC
        if "synthetic" in args.datasets:
            from evalsuite.data.synth_voc import write_voc2007
            from evalsuite.data.synthetic import write_imagefolder

            write_voc2007(Path(tmp) / "synthetic_voc", seed=0, image_size=256, n_trainval=args.n, n_test=args.n)
            roots["synthetic_voc2007"] = Path(tmp) / "synthetic_voc"
            write_imagefolder(Path(tmp) / "synthetic_if" / "imagefolder", seed=0, per_class=args.per_class, size=256)
            roots["synthetic_imagefolder"] = Path(tmp) / "synthetic_if"
        datasets = {}
        for name, root in roots.items():
            if "voc" in name:
                datasets[name] = open_dataset("voc2007", root / "VOCdevkit" / "VOC2007"
                                              if (root / "VOCdevkit").exists() else root, "test")
            else:
                datasets[name] = open_dataset("imagefolder", root / "imagefolder", "val")
        sections = {"precision_features": partial(precision_features, datasets),
                    "precision_tasks": partial(precision_tasks, roots),
                    "conv1_pooling": partial(conv1_pooling, datasets, roots), "resizing": partial(resizing, roots)}
        for label, ckpt in ckpts.items():
            work = Path(tmp) / f"work_{ckpt.sha256[:12]}"
            t0 = time.perf_counter()
            res = out["checkpoints"][label] = {}
            for section, fn in sections.items():
                try:
                    res[section] = fn(work, ckpt, args)
                except Exception as e:  # one failing comparison must not lose the others
                    res[section] = {"error": f"{type(e).__name__}: {e}"}
                print(f"[{label}] {section} done ({time.perf_counter() - t0:.0f} s)", flush=True)
            res["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def _print(result: dict) -> None:
    for label, r in result["checkpoints"].items():
        print(f"== {label} ({r['seconds']} s)")
        for section, v in r.items():
            if isinstance(v, dict) and "error" in v:
                print(f"  {section}: {v['error']}")
        r = {k: v for k, v in r.items() if not (isinstance(v, dict) and "error" in v)}
        for name, by_pool in r.get("precision_features", {}).items():
            for pooling, by_variant in by_pool.items():
                for variant, taps in by_variant.items():
                    worst = max(taps.values(), key=lambda e: e["max_abs_over_max"])
                    print(f"  features {name} {pooling} {variant}: max |err|/max {worst['max_abs_over_max']:.2e}, "
                          f"min cosine {min(e['min_cosine'] for e in taps.values()):.6f}")
        for task, by_preset in r.get("precision_tasks", {}).items():
            for preset, by_data in by_preset.items():
                for name, d in by_data.items():
                    print(f"  {task} {preset} {name} {d['metric']}: max |delta| fp32+float16 "
                          f"{d['max_abs_delta_fp32_float16']}, bf16+float16 {d['max_abs_delta_bf16_float16']}")
                    for tap, row in d["taps"].items():
                        print(f"    {tap}: {row['fp32_float32']:.3f} | {row['delta_fp32_float16']:+} | "
                              f"{row['delta_bf16_float16']:+}")
        for name, d in r.get("conv1_pooling", {}).items():
            print(f"  conv1 pooling {name}: {d}")
        for task, by_data in r.get("resizing", {}).items():
            for name, taps in by_data.items():
                print(f"  resizing {task} {name}:")
                for tap, row in taps.items():
                    print(f"    {tap}: {row}")


def main(argv=None) -> int:
    ap = arg_parser(__doc__)
    ap.add_argument("--n", type=int, help="synthetic VOC images per split (trainval and test)")
    ap.add_argument("--per-class", type=int, help="synthetic ImageFolder train images per class (val: half)")
    ap.add_argument("--checkpoints", nargs="+", help="checkpoints to measure (default: random:resnet50, seed 0)")
    ap.add_argument("--datasets", nargs="+", choices=["real", "synthetic"])
    ap.add_argument("--tasks", nargs="+", choices=["voc07_svm", "knn", "centroid"])
    ap.add_argument("--out-name", default="fidelity_features", help="benchmarks/out/NAME.json")
    return run_cli(ap, argv, measure, _print, "fidelity_features")


if __name__ == "__main__":
    raise SystemExit(main())
