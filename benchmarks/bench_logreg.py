"""Ericsson et al. 2021's linear evaluation (ssl-transfer ``linear.py``): our batched torch logistic-regression
path vs scikit-learn as the reference runs it, same features, one run.

Both sides run ``tasks.transfer.logreg.select_and_refit``: every C of the reference grid
(``1 / logspace(-6, 5, 45)``) fitted on train and scored on val, the best C refit on train + val, scored on
test. The only difference is the ``fit`` backend:

- ours: :func:`~tasks.transfer.logreg.fit_path`, the 45 values batched ``--block`` at a time (default 3),
  each batch warm-started from the values solved before, ``--dtype`` float32 products with float64 where it
  stalls;
- scikit-learn: :class:`~tasks.transfer.reference.SklearnPath`, one ``LogisticRegression(lbfgs,
  warm_start=True)`` refitted C after C from 1e6 down, as the reference. ``--sk-max-iter 100`` (default) is
  the reference's (scikit-learn's default, ConvergenceWarning silenced there); a large value converges it.
  ``--sk-every K``: scikit-learn fits only ``cs[::K]`` (the reference's order, warm starts along it) and its
  whole-grid time is *extrapolated*: its measured time per value on the sub-grid x 45, plus its measured refit.
  Ours still solves the whole grid; the chosen C and test score are compared on the sub-grid (ours' choice
  among its val scores at the sub-grid's values, refit there).

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
slows scikit-learn's multi-threaded loss by an order of magnitude). Writes benchmarks/out/logreg.json
(or ``--out``): times, choices, test scores, val curves, memory (ours' host RSS growth; on CUDA torch's peak
allocation; the process's peak RSS).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

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


class Timed:
    """A ``fit`` backend that records the wall time of each call (the path, then the refit)."""

    def __init__(self, fit, cuda: bool = False):
        self.fit, self.cuda, self.seconds = fit, cuda, []

    def __call__(self, *a, **kw):
        t0 = time.perf_counter()
        out = self.fit(*a, **kw)
        if self.cuda:
            torch.cuda.synchronize()
        self.seconds.append(time.perf_counter() - t0)
        return out


def run(args) -> dict:
    voc = args.kind == "voc"
    cuda = args.device.startswith("cuda")
    k = 20 if voc else args.classes
    metric = "map11" if voc else args.metric
    t0 = time.perf_counter()
    x, y = make_data(args.n + args.n_val + args.n_test, args.d, k, seed=args.seed, voc=voc)
    print(f"data: {x.shape} in {time.perf_counter() - t0:.1f}s", flush=True)
    a, b = args.n, args.n + args.n_val
    train, val, test = (x[:a], y[:a]), (x[a:b], y[a:b]), (x[b:], y[b:])
    cs = logreg.reference_costs(args.n_costs)
    sub = np.arange(0, len(cs), args.sk_every)  # scikit-learn's sub-grid: every K-th value, the reference's order
    ours_kw = dict(device=args.device, dtype=args.dtype, tol=args.tol, block=args.block or None)
    load = [os.getloadavg()[0]]
    # warm-up on a slice: the first torch/BLAS calls map library code into RSS, which is not solver memory
    logreg.fit_path(train[0][:200], train[1][:200], cs[-3:], **ours_kw)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    timed = Timed(logreg.fit_path, cuda)
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        ours = logreg.select_and_refit(train, val, test, cs, metric, fit=timed, **ours_kw)
        if cuda:
            torch.cuda.synchronize()
        t_ours = time.perf_counter() - t0
    cuda_peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
    load.append(os.getloadavg()[0])
    print(f"ours ({args.device}, {args.dtype}, block {args.block}): {t_ours:.2f}s whole grid ({len(cs)} values; "
          f"path {timed.seconds[0]:.2f}s, refit {timed.seconds[1]:.2f}s), C = {ours.C:.4g}, test {metric} "
          f"{ours.test_score:.2f}, val best {np.nanmax(ours.val_scores):.2f}, iterations "
          f"{int(ours.path.n_iter.sum())} (max {int(ours.path.n_iter.max())}), not converged {ours.not_converged}, "
          f"float64 finish {int(ours.path.float64_polish.sum())}", flush=True)
    # ours on scikit-learn's sub-grid: the choice among its val scores there, and the test score at that C
    i_sub = int(sub[logreg.select_index(list(ours.val_scores[sub]), list(cs[sub]))])
    test_ours_sub = (ours.test_score if i_sub == ours.chosen else
                     logreg.refit_at(train, val, test, ours.path, i_sub, metric, **ours_kw)[1])
    sk_timed = Timed(SklearnPath(max_iter=args.sk_max_iter, tol=args.sk_tol))
    with threadpool_limits(args.threads):  # scikit-learn's OpenMP loss and BLAS get the threads torch has
        t0 = time.perf_counter()
        ref = logreg.select_and_refit(train, val, test, cs[sub], metric, fit=sk_timed)
        t_sk = time.perf_counter() - t0
    load.append(os.getloadavg()[0])
    t_sk_path, t_sk_refit = sk_timed.seconds
    per_value = t_sk_path / len(sub)
    # the whole grid: the path's measured time per value times the grid, plus the one refit (measured)
    t_sk_whole = per_value * len(cs) + t_sk_refit
    basis = "measured" if len(sub) == len(cs) else "extrapolated"
    print(f"scikit-learn (max_iter {args.sk_max_iter}, tol {args.sk_tol}, warm start) on {len(sub)} of {len(cs)} "
          f"values (every {args.sk_every}): {t_sk:.1f}s measured (path {t_sk_path:.1f}s, {per_value:.2f}s per "
          f"value; refit {t_sk_refit:.1f}s); whole grid {t_sk_whole:.1f}s {basis}; C = {ref.C:.4g}, test {metric} "
          f"{ref.test_score:.2f}, val best {np.nanmax(ref.val_scores):.2f}, iterations "
          f"{int(ref.path.n_iter.sum())}, not converged {ref.not_converged}", flush=True)
    if args.sk_every > 1:
        print(f"note: each sub-grid fit starts from the value {args.sk_every} grid steps before it (on the whole grid: "
              f"1 step), which costs it more iterations ({ref.path.n_iter.mean():.0f} per value here): the "
              f"extrapolation overestimates scikit-learn's whole-grid time (docs/benchmarks.md)", flush=True)
    feat_mib = train[0].nbytes / 2**20
    rss_extra = mem.peak - mem.base
    row = {
        "kind": args.kind, "metric": metric, "n_train": args.n, "n_val": args.n_val, "n_test": args.n_test,
        "d": args.d, "classes": k, "n_costs": len(cs), "device": args.device,
        "device_name": torch.cuda.get_device_name() if cuda else None, "dtype": args.dtype,
        "tol": args.tol, "block": args.block, "sk_max_iter": args.sk_max_iter, "sk_tol": args.sk_tol,
        "threads": args.threads,
        # time: ours always solves the whole grid; scikit-learn the sub-grid cs[::sk_every]
        "ours_s": t_ours, "ours_path_s": timed.seconds[0], "ours_refit_s": timed.seconds[1],
        "sk_every": args.sk_every, "sklearn_values": len(sub), "sklearn_Cs": cs[sub].tolist(),
        "sklearn_s": t_sk, "sklearn_path_s": t_sk_path, "sklearn_refit_s": t_sk_refit,
        "sklearn_s_per_value": per_value, "sklearn_whole_grid_s": t_sk_whole, "sklearn_whole_grid_is": basis,
        "sklearn_iterations_per_value": float(ref.path.n_iter.mean()),
        "sklearn_s_per_iteration": t_sk_path / max(1, int(ref.path.n_iter.sum())),
        "speedup": t_sk_whole / t_ours, "speedup_is": f"ours measured vs scikit-learn {basis} (whole grid)",
        # the choice: ours on the whole grid, and both on scikit-learn's sub-grid
        "C_ours": ours.C, "test_ours": ours.test_score,
        "C_ours_subgrid": float(cs[i_sub]), "test_ours_subgrid": test_ours_sub,
        "C_sklearn": ref.C, "test_sklearn": ref.test_score,
        "same_C": bool(cs[i_sub] == ref.C), "delta_test": test_ours_sub - ref.test_score,
        "max_abs_delta_val": float(np.nanmax(np.abs(ours.val_scores[sub] - ref.val_scores))),
        "val_ours": ours.val_scores.tolist(), "val_sklearn": ref.val_scores.tolist(),
        "iterations_ours": int(ours.path.n_iter.sum()), "iterations_sklearn": int(ref.path.n_iter.sum()),
        "not_converged_ours": ours.not_converged, "not_converged_sklearn": ref.not_converged,
        "float64_finish_ours": int(ours.path.float64_polish.sum()),
        # memory: ours' RSS growth over the RSS before it (host), torch's peak allocation on CUDA
        "features_mib_float32": feat_mib, "ours_extra_peak_rss_mib": rss_extra,
        "ours_rss_vs_features": rss_extra / feat_mib, "cuda_peak_alloc_mib": cuda_peak,
        "cuda_peak_vs_features": cuda_peak / feat_mib if cuda else None,
        "process_peak_rss_mib": peak_rss_mb(), "load_avg_1min": load,
    }
    mem_txt = (f"CUDA peak {cuda_peak:.0f} MiB ({row['cuda_peak_vs_features']:.2f}x), " if cuda else "")
    print(f"speed-up x{row['speedup']:.1f} ({row['speedup_is']}); on the sub-grid: C ours {row['C_ours_subgrid']:.4g} "
          f"vs scikit-learn {ref.C:.4g} (same: {row['same_C']}), test {test_ours_sub:.2f} vs {ref.test_score:.2f} "
          f"({row['delta_test']:+.3f}); max |delta val| {row['max_abs_delta_val']:.3f}; memory: {mem_txt}host RSS "
          f"+{rss_extra:.0f} MiB ({row['ours_rss_vs_features']:.2f}x the float32 train features), process peak "
          f"{row['process_peak_rss_mib']:.0f} MiB; load {load}", flush=True)
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
    ap.add_argument("--block", type=int, default=3, help="ours: values of C per batch (0: all in one batch)")
    ap.add_argument("--sk-max-iter", type=int, default=100, help="scikit-learn max_iter (100: the reference's)")
    ap.add_argument("--sk-tol", type=float, default=1e-4, help="scikit-learn tol (1e-4: the reference's)")
    ap.add_argument("--sk-every", type=int, default=1,
                    help="scikit-learn fits every K-th value of the grid only (its time extrapolated to the grid)")
    ap.add_argument("--out", type=Path, help="the JSON file (default benchmarks/out/logreg.json)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=os.cpu_count(),
                    help="torch threads and scikit-learn's OpenMP / BLAS threads (default: all cores)")
    args = ap.parse_args(argv)
    if args.sk_every < 1:
        ap.error("--sk-every must be >= 1")
    real = {"n": 50000, "n_val": 10000, "n_test": 10000, "d": 2048, "classes": 100}
    quick = {"n": 3000, "n_val": 750, "n_test": 3000, "d": 256, "classes": 20}
    for key, val in (real if args.real else quick).items():
        if getattr(args, key) is None:
            setattr(args, key, val)
    torch.set_num_threads(args.threads)
    row = run(args)
    write_json("logreg", {"args": vars(args), "rows": [row], "peak_rss_mb": peak_rss_mb(),
                          "target": ">= 20x scikit-learn over the 45-value grid, same C, |delta test| <= 0.1 point"},
               path=args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
