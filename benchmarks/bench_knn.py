"""kNN search: FAISS exact (tasks.knn.search) vs scikit-learn brute force vs a torch brute-force reference.

One run, same features, side by side: wall time of the search, peak RSS of each method (each runs
in its own fresh process, so peaks do not mix), agreement of the neighbour ids with FAISS exact,
and recall@k of the approximate indexes (IVF, HNSW) against exact.

Issue 8's goal at 50k x 2048 bank, 10k queries, k=200 (``--bank 50000 --dim 2048 --queries 10000
--k 200``): FAISS exact >= 2.5x faster than scikit-learn brute force, and peak RSS <= 1.5x the
fp32 bank. Defaults are small (CPU / CI). RSS is reported as measured and net of the process
baseline (interpreter + libraries, measured before the features exist).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import current_rss_mb, peak_rss_mb, reset_peak, vm_hwm_mb, write_json

METHODS = ("faiss_flat", "sklearn_brute", "torch_brute", "faiss_ivf", "faiss_hnsw")


def make_data(n: int, q: int, d: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Clustered, L2-normalised float32 features, generated in place (no fp64 copies of the bank)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((100, d), dtype=np.float32)

    def block(m, s):
        out = np.empty((m, d), np.float32)
        r = np.random.default_rng(s)
        for a in range(0, m, 4096):
            b = min(m, a + 4096)
            out[a:b] = centres[r.integers(0, 100, b - a)]
            out[a:b] += r.standard_normal((b - a, d), dtype=np.float32) * 2.0
            out[a:b] /= np.linalg.norm(out[a:b], axis=1, keepdims=True)  # per block: no full-size temporary
        return out

    return block(n, seed + 1), block(q, seed + 2)


def worker(args) -> None:
    import faiss
    import torch
    from sklearn.neighbors import NearestNeighbors
    from threadpoolctl import threadpool_limits

    from tasks.knn.search import SearchConfig, search

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    base = current_rss_mb()
    bank, queries = make_data(args.bank, args.queries, args.dim, args.seed)
    after_data = current_rss_mb()
    peak_reset = reset_peak()
    k = args.k
    with threadpool_limits(args.threads):
        t0, c0 = time.perf_counter(), time.process_time()
        info = {}
        if args.worker == "faiss_flat":
            nb = search(queries, bank, k, SearchConfig(chunk_size=args.chunk))
            ids = nb.ids
            info = {"tie_rows_recomputed": nb.info["tie_rows_recomputed"]}
        elif args.worker in ("faiss_ivf", "faiss_hnsw"):
            cfg = SearchConfig(index=args.worker.split("_")[1], chunk_size=args.chunk,
                               recall_queries=args.recall_queries)
            nb = search(queries, bank, k, cfg)
            ids = nb.ids
            info = {key: v for key, v in nb.info.items() if key in ("recall_vs_exact", "nlist", "nprobe", "hnsw_m",
                                                                     "ef_search", "recall_queries")}
        elif args.worker == "sklearn_brute":
            # on unit vectors Euclidean ranking = cosine ranking; sklearn chunks by working_memory (1 GiB default)
            nn = NearestNeighbors(n_neighbors=k, algorithm="brute", metric="euclidean").fit(bank)
            ids = nn.kneighbors(queries, return_distance=False)
        elif args.worker == "torch_brute":
            b = torch.from_numpy(bank)
            ids = np.empty((len(queries), k), np.int64)
            for a in range(0, len(queries), args.chunk):
                s = torch.from_numpy(queries[a:a + args.chunk]) @ b.T
                ids[a:a + args.chunk] = torch.topk(s, k, dim=1).indices.numpy()
        else:
            raise SystemExit(f"unknown worker {args.worker}")
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak = vm_hwm_mb() if peak_reset else peak_rss_mb()  # peak during the search (incl. the features)
    np.save(args.ids_out, np.asarray(ids, np.int64))
    print(json.dumps({"method": args.worker, "seconds": elapsed, "cpu_seconds": cpu, "peak_rss_mb": peak,
                      "peak_is_search_only": peak_reset,
                      "rss_baseline_mb": base, "rss_after_data_mb": after_data, **info}))


def overlap(a: np.ndarray, b: np.ndarray) -> float:
    """Mean fraction of shared neighbours per query (order ignored)."""
    return float(np.mean([len(np.intersect1d(x, y)) for x, y in zip(a, b, strict=True)]) / a.shape[1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bank", type=int, default=5000)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--k", type=int, default=200)
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--recall-queries", type=int, default=1000)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--ids-out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args)
        return 0

    bank_mb = args.bank * args.dim * 4 / 2**20
    rows, ids = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for m in args.methods.split(","):
            out = Path(tmp) / f"{m}.npy"
            cmd = [sys.executable, "-m", "benchmarks.bench_knn", "--worker", m, "--ids-out", str(out),
                   *[f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                     if k not in ("worker", "ids_out", "methods")]]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stderr, file=sys.stderr)
                return 1
            rows[m] = json.loads(proc.stdout.strip().splitlines()[-1])
            ids[m] = np.load(out)
    ref = ids.get("faiss_flat")
    for m, r in rows.items():
        r["fp32_bank_mb"] = round(bank_mb, 1)
        r["peak_over_bank"] = round(r["peak_rss_mb"] / bank_mb, 3)
        r["peak_net_of_baseline_over_bank"] = round((r["peak_rss_mb"] - r["rss_baseline_mb"]) / bank_mb, 3)
        r["search_overhead_mb"] = round(r["peak_rss_mb"] - r["rss_after_data_mb"], 1)
        if ref is not None:
            r["neighbour_overlap_with_faiss_flat"] = round(overlap(ids[m], ref), 6)
    ratios = {}
    if "faiss_flat" in rows:
        f = rows["faiss_flat"]["seconds"]
        for m in ("sklearn_brute", "torch_brute"):
            if m in rows:
                ratios[f"{m}_over_faiss_flat"] = round(rows[m]["seconds"] / f, 3)
                # CPU time is steadier than wall time on a shared machine
                fc = rows["faiss_flat"]["cpu_seconds"]
                ratios[f"{m}_over_faiss_flat_cpu"] = round(rows[m]["cpu_seconds"] / fc, 3)
    print(f"bank {args.bank} x {args.dim} (fp32 {bank_mb:.0f} MiB), {args.queries} queries, k={args.k}, "
          f"threads={args.threads}")
    print(f"{'method':15s} {'seconds':>9s} {'cpu s':>9s} {'peak MiB':>9s} {'net/bank':>9s} {'overhead':>9s} "
          f"{'overlap':>8s} extra")
    for m, r in rows.items():
        extra = {k: r[k] for k in ("recall_vs_exact", "nlist", "nprobe", "ef_search") if k in r}
        print(f"{m:15s} {r['seconds']:9.2f} {r['cpu_seconds']:9.2f} {r['peak_rss_mb']:9.0f} "
              f"{r['peak_net_of_baseline_over_bank']:9.2f} "
              f"{r['search_overhead_mb']:9.0f} {r.get('neighbour_overlap_with_faiss_flat', float('nan')):8.4f} "
              f"{extra or ''}")
    for k, v in ratios.items():
        print(f"{k}: {v}x")
    goals = {}
    if "sklearn_brute_over_faiss_flat" in ratios:
        goals["faiss_vs_sklearn_speedup>=2.5"] = ratios["sklearn_brute_over_faiss_flat"] >= 2.5
    if "faiss_flat" in rows:
        goals["faiss_peak_net_of_baseline<=1.5x_bank"] = rows["faiss_flat"]["peak_net_of_baseline_over_bank"] <= 1.5
    print("goals:", goals)
    write_json("knn", {"config": {k: v for k, v in vars(args).items() if k not in ("worker", "ids_out")},
                       "results": rows, "ratios": ratios, "goals": goals})
    return 0


if __name__ == "__main__":
    sys.exit(main())
