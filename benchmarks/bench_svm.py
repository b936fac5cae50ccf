"""Batched torch SVM sweep vs the anchors' one-LinearSVC-per-problem loop, same features, one run.

Both run ``tasks.solvers.svm.cv_sweep`` (classes x costs x (folds + 1) problems); the only difference
is ``SVMConfig.backend``. Prints the time ratio and the test-mAP difference (benchmark AP), writes
benchmarks/out/svm.json. Issue target (real sizes: --n 5011 --d 9216 --classes 20 --costs goyal19):
>= 20x faster with |delta mAP| <= 0.2 points. Small defaults so it runs in a minute on a laptop.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from benchmarks.common import peak_rss_mb, write_json
from tasks.solvers import svm


def make_data(n, d, k, seed):
    rng = np.random.default_rng(seed)
    basis = rng.normal(size=(k, d)) / np.sqrt(d)
    y = np.where(rng.random((n, k)) < 0.15, 1, -1).astype(np.int8)
    x = np.maximum(0, y @ basis * 2 + rng.normal(size=(n, d)))  # ReLU-like, non-negative features
    return svm.l2_normalize(x.astype(np.float32)), y


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=600)
    ap.add_argument("--n-test", type=int, default=600)
    ap.add_argument("--d", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--classes", type=int, default=5)
    ap.add_argument("--costs", choices=["goyal19", "vissl", "small"], default="small")
    ap.add_argument("--folds", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    costs = {"goyal19": svm.GOYAL19_COSTS, "vissl": svm.VISSL_COSTS, "small": [1e-3, 0.1, 1.0, 10.0]}[args.costs]
    rows = []
    for d in args.d:
        x, y = make_data(args.n + args.n_test, d, args.classes, seed=d)
        xtr, ytr, xte, yte = x[:args.n], y[:args.n], x[args.n:], y[args.n:]
        out = {}
        for backend in ("torch", "sklearn"):
            cfg = svm.SVMConfig(backend=backend)
            t0 = time.perf_counter()
            sweep = svm.cv_sweep(xtr, ytr, costs, args.folds, cfg, device=args.device if backend == "torch" else "cpu")
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            scores = sweep.final.decision(xte)
            m = 100 * np.mean([svm.voc_ap(yte[:, j], scores[:, j]) for j in range(args.classes)])
            out[backend] = {"seconds": dt, "mAP": m, "chosen": sweep.chosen_costs, "not_converged": sweep.not_converged}
        row = {"n": args.n, "d": d, "classes": args.classes, "costs": len(costs), "folds": args.folds,
               "problems": args.classes * len(costs) * (args.folds + 1), "device": args.device,
               "torch_s": out["torch"]["seconds"], "sklearn_s": out["sklearn"]["seconds"],
               "speedup": out["sklearn"]["seconds"] / out["torch"]["seconds"],
               "mAP_torch": out["torch"]["mAP"], "mAP_sklearn": out["sklearn"]["mAP"],
               "delta_mAP": out["torch"]["mAP"] - out["sklearn"]["mAP"],
               "same_chosen_costs": out["torch"]["chosen"] == out["sklearn"]["chosen"],
               "not_converged": {b: out[b]["not_converged"] for b in out}}
        rows.append(row)
        print(f"D={d}: torch {row['torch_s']:.2f}s  sklearn {row['sklearn_s']:.2f}s  speedup x{row['speedup']:.1f}  "
              f"mAP {row['mAP_torch']:.2f} vs {row['mAP_sklearn']:.2f} (delta {row['delta_mAP']:+.3f})  "
              f"same costs: {row['same_chosen_costs']}", flush=True)
    write_json("svm", {"args": vars(args), "rows": rows, "peak_rss_mb": peak_rss_mb()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
