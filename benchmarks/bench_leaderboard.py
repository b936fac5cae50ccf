"""Leaderboard build time for many records (default 10k), measured side by side in one run.

Synthetic result records (checkpoints x tasks x layers x metrics, with re-runs) are written as
results.jsonl, then timed: read + validate, deduplicate (latest and mean), full site build with
plots, and the site without plots (ratio = what the SVG plots cost). Also `compare` against the
published references. Prints the numbers and writes benchmarks/out/leaderboard.json.

    .venv/bin/python -m benchmarks.bench_leaderboard                 # 10k records
    .venv/bin/python -m benchmarks.bench_leaderboard --records 50000
"""

from __future__ import annotations

import argparse
import random
import shutil
import tempfile
import time
from pathlib import Path

from benchmarks.common import peak_rss_mb, write_json

TASKS = {"voc07_svm": ["mAP"], "places205_linear": ["top1", "top5"], "knn": ["top1", "top5"],
         "lowshot_svm": ["mAP"], "surface_normals": ["median_angle_error_deg", "pct_within_11.25deg"]}
LAYERS = ["conv1", "res2", "res3", "res4", "res5"]
METHODS = ["supervised", "jigsaw", "rotnet", "simclr", "moco_v2", "byol", "swav", "random", "colorization"]


def make_records(n: int, seed: int = 0):
    from evalsuite.results import Result

    rng = random.Random(seed)
    combos = [(t, m) for t, ms in TASKS.items() for m in ms]
    per_ck = len(combos) * len(LAYERS)
    n_ck = max(1, n // per_ck)
    out = []
    for c in range(n_ck):
        method = METHODS[c % len(METHODS)]
        for t, m in combos:
            for li, layer in enumerate(LAYERS):
                if len(out) >= n:
                    return out
                rerun = rng.random() < 0.1
                for rep in range(2 if rerun else 1):
                    out.append(Result(
                        task=t, dataset="synthetic", split="test", layer=layer, metric=m,
                        value=rng.uniform(10, 90), checkpoint_id=f"{c:064x}", checkpoint=f"ckpts/{method}_{c}.pth",
                        method=method, arch="resnet50", pretrain_data="imagenet1k", protocol="goyal19",
                        params={"costs": [1, 10, 100], "folds": 3, "layer_index": li, "rep": rep}, seed=rep,
                        created=f"2024-01-{1 + rep:02d}T00:00:00Z"))
    return out[:n]


def timed(fn):
    t0 = time.perf_counter()
    r = fn()
    return r, time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=10_000)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    from evalsuite.results import append_results
    from leaderboard.aggregate import deduplicate, load_results
    from leaderboard.compare import Tolerance, compare_to_references
    from leaderboard.site import build_site

    tmp = Path(tempfile.mkdtemp(prefix="bench_leaderboard_"))
    try:
        recs = make_records(args.records)
        (tmp / "runs").mkdir()
        append_results(tmp / "runs" / "results.jsonl", recs)
        raw, t_read = timed(lambda: load_results([tmp / "runs"]))
        agg, t_latest = timed(lambda: deduplicate(raw, "latest"))
        _, t_mean = timed(lambda: deduplicate(raw, "mean"))
        rep, t_site = timed(lambda: build_site(raw, tmp / "site"))
        _, t_noplot = timed(lambda: build_site(raw, tmp / "site_noplots", plots=False))
        _, t_cli = timed(lambda: build_site([tmp / "runs"], tmp / "site2"))
        cmp, t_cmp = timed(lambda: compare_to_references(agg, Tolerance()))
        size = sum(p.stat().st_size for p in (tmp / "site").rglob("*") if p.is_file())
        result = {
            "records": len(raw), "aggregated_rows": len(agg), "checkpoints": rep.n_checkpoints,
            "pages": len(rep.pages), "site_mb": round(size / 2**20, 2),
            "read_validate_s": round(t_read, 3), "dedupe_latest_s": round(t_latest, 3),
            "dedupe_mean_s": round(t_mean, 3), "site_build_s": round(t_site, 3),
            "site_build_no_plots_s": round(t_noplot, 3), "end_to_end_from_files_s": round(t_cli, 3),
            "compare_references_s": round(t_cmp, 3), "plots_share_of_build": round(1 - t_noplot / t_site, 3),
            "records_per_s_end_to_end": round(len(raw) / t_cli), "peak_rss_mb": round(peak_rss_mb(), 1),
        }
        for k, v in result.items():
            print(f"{k:28s} {v}")
        write_json("leaderboard", result)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
