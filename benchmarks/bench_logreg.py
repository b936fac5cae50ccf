"""Ericsson et al. 2021's linear evaluation (ssl-transfer ``linear.py``): our batched torch logistic-regression
path vs scikit-learn as the reference runs it, same features, one run.

Both sides run ``tasks.transfer.logreg.select_and_refit``: every C of the reference grid
(``1 / logspace(-6, 5, 45)``) fitted on train and scored on val, the best C refit on train + val, scored on
test. The only difference is the ``fit`` backend:

- ours: :func:`~tasks.transfer.logreg.fit_path`, the 45 values batched ``--block`` at a time (default 5),
  each batch warm-started from the previous one, ``--dtype`` float32 products with float64 where it stalls;
- scikit-learn: :class:`~tasks.transfer.reference.SklearnPath`, one ``LogisticRegression(lbfgs,
  warm_start=True)`` refitted C after C from 1e6 down, as the reference. ``--sk-max-iter 100`` (default) is
  the reference's (scikit-learn's default, ConvergenceWarning silenced there); a large value converges it.

``--kind multiclass`` (default): one softmax over ``--classes`` classes, metric top-1 (``--metric
mean_per_class`` for the Aircraft/Caltech/Flowers/Pets metric). ``--kind voc``: 20 two-class problems per C
(the reference's per-class VOC fits), 11-point mAP.

Features are synthetic but shaped like average-pooled ResNet features (the reference feeds them raw, neither
normalised nor standardised): a 64-dim latent (class centre + noise) through a random map, a ReLU, and
log-normal per-channel scales, so classes overlap (not separable) and channels are correlated and unevenly
scaled. Memory: peak RSS during our run minus the RSS before (after a warm-up on a slice), against the
float32 train features; on CUDA, torch's peak allocation. Sizes: ``--quick`` (default, CI) 3000 train /
750 val / 3000 test x 256 dims x 20 classes; ``--real`` 50k train / 10k val / 10k test x 2048 x 100 (hours
for scikit-learn on a 2-core machine). Target: >= 20x scikit-learn, the same C, test score within 0.1
point. Both sides get ``--threads`` threads; on a shared machine give both 1 (OpenMP spin-waiting under load
slows scikit-learn's multi-threaded loss by an order of magnitude). Writes benchmarks/out/logreg.json.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from benchmarks.common import PeakRSS, peak_rss_mb, write_json
from tasks.transfer import logreg
from tasks.transfer.reference import SklearnPath


def make_data(n: int, d: int, k: int, seed: int, rank: int = 64, voc: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(n, d) float32 non-negative features; labels (n,) in [0, k) or, ``voc``, (n, k) in {0, 1} (each image
    1-3 objects, VOC-like)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, rank))
    if voc:
        y = np.zeros((n, k), dtype=np.int64)
        for i, m in enumerate(rng.integers(1, 4, n)):
            y[i, rng.choice(k, m, replace=False)] = 1
        z = y @ centres / np.sqrt(y.sum(1, keepdims=True)) + 2.5 * rng.normal(size=(n, rank))
    else:
        y = rng.integers(0, k, n)
        z = centres[y] + 3.0 * rng.normal(size=(n, rank))
    proj = rng.normal(size=(rank, d)) / np.sqrt(rank)
    x = np.maximum(0.0, z @ proj + 0.3 * rng.normal(size=(n, d)) + 0.2) * rng.lognormal(0.0, 0.5, size=d)
    return x.astype(np.float32), y


def run(args) -> dict:
    voc = args.kind == "voc"
    k = 20 if voc else args.classes
    metric = "map11" if voc else args.metric
    x, y = make_data(args.n + args.n_val + args.n_test, args.d, k, seed=args.seed, voc=voc)
    a, b = args.n, args.n + args.n_val
    train, val, test = (x[:a], y[:a]), (x[a:b], y[a:b]), (x[b:], y[b:])
    cs = logreg.reference_costs(args.n_costs)
    ours_kw = dict(device=args.device, dtype=args.dtype, tol=args.tol, block=args.block or None)
    load = [os.getloadavg()[0]]
    # warm-up on a slice: the first torch/BLAS calls map library code into RSS, which is not solver memory
    logreg.fit_path(train[0][:200], train[1][:200], cs[-3:], **ours_kw)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        ours = logreg.select_and_refit(train, val, test, cs, metric, **ours_kw)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        t_ours = time.perf_counter() - t0
    load.append(os.getloadavg()[0])
    print(f"ours ({args.device}, {args.dtype}, block {args.block}): {t_ours:.1f}s, C = {ours.C:.4g}, "
          f"test {metric} {ours.test_score:.2f}, val best {np.nanmax(ours.val_scores):.2f}, "
          f"iterations {int(ours.path.n_iter.sum())} (max {int(ours.path.n_iter.max())}), "
          f"not converged {ours.not_converged}, float64 finish {int(ours.path.float64_polish.sum())}", flush=True)
    with threadpool_limits(args.threads):  # scikit-learn's OpenMP loss and BLAS get the threads torch has
        t0 = time.perf_counter()
        ref = logreg.select_and_refit(train, val, test, cs, metric, fit=SklearnPath(max_iter=args.sk_max_iter,
                                                                                     tol=args.sk_tol))
        t_sk = time.perf_counter() - t0
    load.append(os.getloadavg()[0])
    print(f"scikit-learn (max_iter {args.sk_max_iter}, tol {args.sk_tol}, warm start): {t_sk:.1f}s, C = {ref.C:.4g}, "
          f"test {metric} {ref.test_score:.2f}, val best {np.nanmax(ref.val_scores):.2f}, "
          f"iterations {int(ref.path.n_iter.sum())}, not converged {ref.not_converged}", flush=True)
    feat_mib = train[0].nbytes / 2**20
    extra = (torch.cuda.max_memory_allocated() / 2**20 if args.device.startswith("cuda") else mem.peak - mem.base)
    row = {
        "kind": args.kind, "metric": metric, "n_train": args.n, "n_val": args.n_val, "n_test": args.n_test,
        "d": args.d, "classes": k, "n_costs": len(cs), "device": args.device, "dtype": args.dtype,
        "tol": args.tol, "block": args.block, "sk_max_iter": args.sk_max_iter, "sk_tol": args.sk_tol,
        "ours_s": t_ours, "sklearn_s": t_sk, "speedup": t_sk / t_ours,
        "C_ours": ours.C, "C_sklearn": ref.C, "same_C": ours.chosen == ref.chosen,
        "test_ours": ours.test_score, "test_sklearn": ref.test_score,
        "delta_test": ours.test_score - ref.test_score,
        "max_abs_delta_val": float(np.nanmax(np.abs(ours.val_scores - ref.val_scores))),
        "val_ours": ours.val_scores.tolist(), "val_sklearn": ref.val_scores.tolist(),
        "iterations_ours": int(ours.path.n_iter.sum()), "iterations_sklearn": int(ref.path.n_iter.sum()),
        "not_converged_ours": ours.not_converged, "not_converged_sklearn": ref.not_converged,
        "float64_finish_ours": int(ours.path.float64_polish.sum()),
        "features_mib_float32": feat_mib,
        ("cuda_peak_alloc_mib" if args.device.startswith("cuda") else "ours_extra_peak_rss_mib"): extra,
        "ours_memory_vs_features": extra / feat_mib, "load_avg_1min": load,
    }
    print(f"speed-up x{row['speedup']:.1f}; same C: {row['same_C']}; test delta {row['delta_test']:+.3f}; "
          f"max |delta val| {row['max_abs_delta_val']:.3f}; memory {row['ours_memory_vs_features']:.2f}x the "
          f"float32 train features; load {load}", flush=True)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="CI-size run (the default)")
    size.add_argument("--real", action="store_true", help="50k x 2048 x 100 classes (hours for scikit-learn on CPU)")
    ap.add_argument("--n", type=int, help="train rows")
    ap.add_argument("--n-val", type=int)
    ap.add_argument("--n-test", type=int)
    ap.add_argument("--d", type=int)
    ap.add_argument("--classes", type=int)
    ap.add_argument("--kind", choices=["multiclass", "voc"], default="multiclass")
    ap.add_argument("--metric", choices=["top1", "mean_per_class"], default="top1", help="multiclass metric")
    ap.add_argument("--n-costs", type=int, default=45, help="values of the reference grid logspace(-6, 5, n)")
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    ap.add_argument("--tol", type=float, default=1e-4, help="ours: max |grad| / n, scikit-learn's tol")
    ap.add_argument("--block", type=int, default=5, help="ours: values of C per batch (0: all in one batch)")
    ap.add_argument("--sk-max-iter", type=int, default=100, help="scikit-learn max_iter (100: the reference's)")
    ap.add_argument("--sk-tol", type=float, default=1e-4, help="scikit-learn tol (1e-4: the reference's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=os.cpu_count(),
                    help="torch threads and scikit-learn's OpenMP / BLAS threads (default: all cores)")
    args = ap.parse_args(argv)
    real = {"n": 50000, "n_val": 10000, "n_test": 10000, "d": 2048, "classes": 100}
    quick = {"n": 3000, "n_val": 750, "n_test": 3000, "d": 256, "classes": 20}
    for key, val in (real if args.real else quick).items():
        if getattr(args, key) is None:
            setattr(args, key, val)
    torch.set_num_threads(args.threads)
    row = run(args)
    write_json("logreg", {"args": vars(args), "rows": [row], "peak_rss_mb": peak_rss_mb(),
                          "target": ">= 20x scikit-learn over the 45-value grid, same C, |delta test| <= 0.1 point"})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
