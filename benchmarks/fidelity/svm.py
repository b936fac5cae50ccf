"""Fidelity of voc07_svm and lowshot_svm: the effect of each deviation from the reference kept as an option.

- ``svm.backend``: our exact solver (torch, the goyal19 default) against the reference's LinearSVC stopped at
  ``max_iter=2000`` (``svm.backend=sklearn``, fair_self_supervision_benchmark ``tools/svm/train_svm_kfold.py``):
  per tap the mAP of both, per class the chosen cost of both, and how many LinearSVC fits stopped at max_iter.
- ``lowshot_svm.cost_selection``: the published choice on the test set (goyal19) against ``cv``, per tap and k;
  and the backend comparison again at the published selection.

Data: the 8 real VOC2007 images of ``tests/fixtures/voc2007_mini`` (5 trainval / 3 test: AP is defined for the
classes with test positives only) and a synthetic VOC2007 (``evalsuite.data.synth_voc``), through a seeded random
ResNet-18 (every tap, goyal pooling), goyal19 preset with the small-size overrides listed in the output; and
synthetic VOC-like features (``benchmarks.bench_svm.make_data``: 1000 / 1000 rows, D = 512, 20 classes) through
voc07_svm's sweep with the goyal19 and vissl cost grids, a size at which LinearSVC does reach max_iter.

    python -m benchmarks.fidelity.svm [--n 100] [--image-size 64] [--layers res4 res5] [--lowshot-layers res5]

Writes benchmarks/out/fidelity_svm.json.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.fidelity import arg_parser, run_cli
from evalsuite import registry
from evalsuite.cache import FeatureCache
from evalsuite.checkpoints import load_checkpoint
from evalsuite.console import note
from evalsuite.features import FeatureExtractor
from evalsuite.protocols import apply_overrides, parse_overrides
from evalsuite.task import TaskContext

REPO = Path(__file__).resolve().parents[2]
FIXTURE_VOC = REPO / "tests" / "fixtures" / "voc2007_mini"
DEFAULTS = {"n": 100, "image_size": 64, "layers": ["conv1", "res2", "res3", "res4", "res5"], "k_values": [1, 2, 4],
            "samples": 5, "lowshot_layers": ["res5"], "datasets": ["real", "synthetic", "features"],
            "device": "cpu", "lowshot": True, "feature_n": 1000, "feature_d": 512}


def _run(task: str, root: Path, work: Path, ckpt, args, overrides: list[str], layers=None) -> tuple[dict, float]:
    """The task at goyal19 with ``overrides`` on the data under ``root`` (taps ``layers``, default ``args.layers``);
    records by (layer, k) and seconds."""
    protocol = apply_overrides({task: registry.get_task(task).default_protocol("goyal19")},
                               parse_overrides(overrides))[task]
    cache = work / "cache"  # shared by every run: features are extracted once per dataset

    def extractor():
        return FeatureExtractor(ckpt.build_trunk(), ckpt.sha256, ckpt.arch, cache=FeatureCache(cache),
                                precision="fp32", batch_size=32, progress=False)

    ctx = TaskContext(task=task, checkpoint=ckpt, preset="goyal19", protocol=protocol, data_root=root,
                      out_dir=work / "out", extractor_factory=extractor, device=args.device, seed=0,
                      layers=layers or args.layers, progress=False, cache_dir=cache)
    t0 = time.perf_counter()
    records = registry.get_task(task).run(ctx)
    seconds = time.perf_counter() - t0
    note(f"{task} on {root.name} with {' '.join(overrides)}: {seconds:.0f} s")
    return {(r.layer, r.params.get("k")): r for r in records}, seconds


def _delta(a, b):
    return None if a is None or b is None else round(a - b, 4)


def compare_backends_voc07(root: Path, work: Path, ckpt, args) -> dict:
    base = [f"voc07_svm.image_size={args.image_size}", "voc07_svm.undefined_ap=exclude"]
    exact, t_exact = _run("voc07_svm", root, work, ckpt, args, [*base, "voc07_svm.svm.backend=torch"])
    ref, t_ref = _run("voc07_svm", root, work, ckpt, args, [*base, "voc07_svm.svm.backend=sklearn"])
    taps = {}
    for (tap, _), a in exact.items():
        b = ref[tap, None]
        pa, pb = a.params, b.params
        differ = {c: [pa["chosen_cost"][c], pb["chosen_cost"][c]] for c in pa["classes"]
                  if pa["chosen_cost"][c] != pb["chosen_cost"][c]}
        ap_deltas = [abs(pa["ap_per_class"][c] - pb["ap_per_class"][c]) for c in pa["classes"]
                     if pa["ap_per_class"][c] is not None and pb["ap_per_class"][c] is not None]
        taps[tap] = {
            "mAP_exact": a.value, "mAP_sklearn": b.value, "delta_mAP": _delta(a.value, b.value),
            "max_abs_delta_AP": round(max(ap_deltas), 4) if ap_deltas else None,
            "classes_with_AP": len(ap_deltas), "classes_choosing_another_cost": differ,
            "chosen_cost_exact": pa["chosen_cost"], "chosen_cost_sklearn": pb["chosen_cost"],
            "problems": pa["problems_solved"], "sklearn_stopped_at_max_iter": pb["problems_not_converged"],
            "exact_not_converged": pa["problems_not_converged"], "feature_dim": pa["feature_dim"],
        }
    return {"num_train": next(iter(exact.values())).params["num_train"],
            "num_test": next(iter(exact.values())).params["num_test"], "overrides": base,
            "seconds": {"exact": round(t_exact, 1), "sklearn": round(t_ref, 1)}, "taps": taps}


def compare_backends_features(args) -> dict:
    """voc07_svm's sweep (3-fold CV cost choice, refit, test AP) on synthetic VOC-like features
    (``benchmarks.bench_svm.make_data``), where larger costs make LinearSVC reach max_iter: goyal19 and vissl grids."""
    import numpy as np

    from benchmarks.bench_svm import make_data
    from tasks.svm import solver as svm
    from tasks.svm.common import GOYAL19_COSTS, VISSL_COSTS

    x, y = make_data(2 * args.feature_n, args.feature_d, 20, seed=0)
    xtr, ytr, xte, yte = x[:args.feature_n], y[:args.feature_n], x[args.feature_n:], y[args.feature_n:]
    out = {"n_train": args.feature_n, "n_test": args.feature_n, "d": args.feature_d, "classes": 20}
    for grid, costs in (("goyal19", GOYAL19_COSTS), ("vissl", VISSL_COSTS)):
        sweeps, seconds = {}, {}
        for backend in ("torch", "sklearn"):
            t0 = time.perf_counter()
            sweeps[backend] = svm.cv_sweep(xtr, ytr, costs, 3, svm.SVMConfig(backend=backend))
            seconds[backend] = round(time.perf_counter() - t0, 1)
        aps = {b: [svm.voc_ap(yte[:, j], s.final.decision(xte)[:, j]) for j in range(20)] for b, s in sweeps.items()}
        exact, ref = sweeps["torch"], sweeps["sklearn"]
        out[grid] = {
            "mAP_exact": round(100 * float(np.mean(aps["torch"])), 4),
            "mAP_sklearn": round(100 * float(np.mean(aps["sklearn"])), 4),
            "delta_mAP": round(100 * float(np.mean(aps["torch"]) - np.mean(aps["sklearn"])), 4),
            "max_abs_delta_AP": round(100 * float(np.max(np.abs(np.subtract(aps["torch"], aps["sklearn"])))), 4),
            "classes_choosing_another_cost": {j: [a, b] for j, (a, b) in
                                              enumerate(zip(exact.chosen_costs, ref.chosen_costs)) if a != b},
            "max_abs_delta_cv_AP": round(100 * float(np.abs(exact.cv_ap - ref.cv_ap).max()), 4),
            "problems": 20 * len(costs) * 4, "sklearn_stopped_at_max_iter": ref.not_converged,
            "exact_not_converged": exact.not_converged, "seconds": seconds,
        }
        note(f"synthetic features, {grid} costs: {out[grid]}")
    return out


def compare_lowshot(root: Path, work: Path, ckpt, args) -> dict:
    ks = ",".join(str(k) for k in args.k_values)
    base = [f"lowshot_svm.image_size={args.image_size}", "lowshot_svm.undefined_ap=exclude",
            f"lowshot_svm.k_values={ks}", f"lowshot_svm.num_samples={args.samples}"]
    base.append(f"lowshot_svm.layers={','.join(args.lowshot_layers)}")
    runs, seconds = {}, {}
    for name, extra in (("test_exact", []), ("cv_exact", ["lowshot_svm.cost_selection=cv"]),
                        ("test_sklearn", ["lowshot_svm.svm.backend=sklearn"])):
        runs[name], t = _run("lowshot_svm", root, work, ckpt, args, [*base, *extra], layers=args.lowshot_layers)
        seconds[name] = round(t, 1)
    rows = []
    for key, pub in runs["test_exact"].items():
        cv, sk = runs["cv_exact"][key], runs["test_sklearn"][key]
        rows.append({
            "tap": key[0], "k": key[1], "mAP_test_selected": pub.value, "mAP_cv_selected": cv.value,
            "published_minus_cv": _delta(pub.value, cv.value),
            "chosen_cost": pub.params.get("chosen_cost"),
            "mAP_test_selected_sklearn": sk.value, "exact_minus_sklearn": _delta(pub.value, sk.value),
            "chosen_cost_sklearn": sk.params.get("chosen_cost"),
        })
    gaps = [r["published_minus_cv"] for r in rows if r["published_minus_cv"] is not None]
    backend = [abs(r["exact_minus_sklearn"]) for r in rows if r["exact_minus_sklearn"] is not None]
    return {"overrides": base, "seconds": seconds, "rows": rows,
            "published_minus_cv_mean": round(sum(gaps) / len(gaps), 3) if gaps else None,
            "published_minus_cv_range": [min(gaps), max(gaps)] if gaps else None,
            "max_abs_exact_minus_sklearn": max(backend) if backend else None,
            "same_chosen_cost_both_backends": sum(r["chosen_cost"] == r["chosen_cost_sklearn"] for r in rows),
            "rows_compared": len(rows)}


def measure(args) -> dict:
    """Run every comparison on the datasets in ``args.datasets`` (missing attributes take ``DEFAULTS``)."""
    for key, value in DEFAULTS.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    ckpt = load_checkpoint("random:resnet18", seed=0)
    out: dict[str, Any] = {"checkpoint": "random:resnet18 (seed 0)", "preset": "goyal19", "args": vars(args).copy()}
    with tempfile.TemporaryDirectory(prefix="fidelity_svm_") as tmp:
        roots = {}
        if "real" in args.datasets:
            roots["real_voc2007_fixture"] = FIXTURE_VOC
        if "synthetic" in args.datasets:
            from evalsuite.data.synth_voc import write_voc2007

            write_voc2007(Path(tmp) / "synthetic", seed=0, image_size=max(args.image_size, 64), n_trainval=args.n,
                          n_test=args.n)
            roots["synthetic_voc2007"] = Path(tmp) / "synthetic"
        if "features" in args.datasets:
            out["voc07_svm_synthetic_features"] = compare_backends_features(args)
        for name, root in roots.items():
            work = Path(tmp) / f"work_{name}"
            out.setdefault("voc07_svm", {})[name] = compare_backends_voc07(root, work, ckpt, args)
            if args.lowshot and name != "real_voc2007_fixture":  # 5 trainval images: no 19k negatives to sample
                out.setdefault("lowshot_svm", {})[name] = compare_lowshot(root, work, ckpt, args)
    return out


def _print(result: dict) -> None:
    for name, d in result.get("voc07_svm", {}).items():
        print(f"voc07_svm {name} ({d['num_train']} train / {d['num_test']} test), s {d['seconds']}")
        for tap, r in d["taps"].items():
            print(f"  {tap}: mAP exact {r['mAP_exact']:.2f} sklearn {r['mAP_sklearn']:.2f} (delta {r['delta_mAP']}), "
                  f"{len(r['classes_choosing_another_cost'])} of 20 classes choose another cost, "
                  f"LinearSVC stopped at max_iter {r['sklearn_stopped_at_max_iter']} of {r['problems']}")
    feats = result.get("voc07_svm_synthetic_features")
    if feats:
        for grid in ("goyal19", "vissl"):
            r = feats[grid]
            print(f"voc07_svm synthetic features n={feats['n_train']} d={feats['d']}, {grid} costs: mAP exact "
                  f"{r['mAP_exact']:.2f} sklearn {r['mAP_sklearn']:.2f} (delta {r['delta_mAP']}), "
                  f"{len(r['classes_choosing_another_cost'])} of 20 classes choose another cost, LinearSVC stopped "
                  f"at max_iter {r['sklearn_stopped_at_max_iter']} of {r['problems']}, s {r['seconds']}")
    for name, d in result.get("lowshot_svm", {}).items():
        print(f"lowshot_svm {name}: published (test) minus cv mAP mean {d['published_minus_cv_mean']} range "
              f"{d['published_minus_cv_range']}; |exact - sklearn| <= {d['max_abs_exact_minus_sklearn']}; "
              f"s {d['seconds']}")
        for r in d["rows"]:
            print(f"  {r['tap']} k={r['k']}: test-selected {r['mAP_test_selected']:.2f} (C={r['chosen_cost']}) "
                  f"cv {r['mAP_cv_selected']:.2f}; sklearn {r['mAP_test_selected_sklearn']:.2f} "
                  f"(C={r['chosen_cost_sklearn']})")


def main(argv=None) -> int:
    ap = arg_parser(__doc__)
    ap.add_argument("--n", type=int, help="synthetic VOC images per split (trainval and test)")
    ap.add_argument("--image-size", type=int)
    ap.add_argument("--layers", nargs="+", help="voc07_svm taps (default: all five)")
    ap.add_argument("--lowshot-layers", nargs="+", help="lowshot_svm taps (default: res5)")
    ap.add_argument("--k-values", type=int, nargs="+")
    ap.add_argument("--samples", type=int)
    ap.add_argument("--datasets", nargs="+", choices=["real", "synthetic", "features"])
    ap.add_argument("--feature-n", type=int, help="synthetic VOC-like feature rows per split (features case)")
    ap.add_argument("--feature-d", type=int, help="their dimension")
    ap.add_argument("--no-lowshot", dest="lowshot", action="store_false", default=None)
    return run_cli(ap, argv, measure, _print, "fidelity_svm")


if __name__ == "__main__":
    raise SystemExit(main())
