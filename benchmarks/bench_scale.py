"""Real-size evaluation with bounded memory: a streamed linear-probe epoch and sharded exact kNN on on-disk stores.

Synthetic features are written in the feature cache's own format (fp16 ``.npy`` shards of 512 rows + manifest,
``evalsuite.cache``), then every measurement runs in a fresh process, its peak RSS reset at the start of the
measured step (so the peak is the step's own, net of the interpreter and libraries):

- ``probe``: one linear-probe epoch streamed from each store under the memory budget (``train_linear_probe`` on
  the ``FeatureStore``, ``stream=True``): rows/s, peak RSS growth and its ratio to the store's size, the shuffle
  buffer and the memory estimate printed before training. ``--in-memory`` adds the same epoch on the loaded
  matrix beside it (its rows/s and peak: about the store's size).
- ``knn``: ``--queries`` queries against the first store as the bank. Exact: ``open_bank`` + ``search`` (the bank
  streamed in blocks when the search does not fit the budget); IVF-Flat: ``tasks.knn.search.build_index`` on the
  bank streamed from the store in blocks of a quarter of the budget (never loaded whole; the index holds its own
  float32 copy, outside the budget), k-means on a seeded sample (``--ivf-train-size``, default max(39 nlist, 50k)
  capped at 256 nlist), ``--nlist`` (default the power of two nearest sqrt(N); 0: the module's 4 sqrt(N)),
  ``--nprobe``; time of the build (k-means, add) and of the search, peak RSS, and IVF recall@k against the exact
  neighbours of every query.

Defaults are the issue's sizes: stores of 1M x 2048 (ResNet-50 res5 global-average features, ImageNet size) and
200k x 9216 (Goyal et al.'s res5 features), a 4 GiB budget. That writes 7.7 GB and IVF holds the 8 GB float32
bank plus its index; ``--quick`` (what ``make bench`` runs) shrinks every size.

    python -m benchmarks.bench_scale                      # the issue's sizes
    python -m benchmarks.bench_scale --quick
    python -m benchmarks.bench_scale --stores 100000x1024 --budget 64M --queries 500 --sections probe,knn

The stores are read right after they are written, from the page cache: the figures are the process's memory and
CPU cost, not the disk's (a cold read adds the disk's time, and no resident memory).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import current_rss_mb, reset_peak, vm_hwm_mb, write_json
from evalsuite.cache import parse_size

SECTIONS = ("probe", "knn")
QUICK = {"stores": "50000x256,8000x2304", "budget": "24M", "queries": 500, "classes": 20}


def parse_store(spec: str) -> tuple[int, int]:
    rows, dim = spec.lower().split("x")
    return int(rows), int(dim)


def centres(dim: int, classes: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng([seed, dim]).standard_normal((classes, dim), dtype=np.float32)


def sample(dim: int, classes: int, rows: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Clustered features: a class centre plus noise of twice its scale (kNN and the probe have something to find)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, rows)
    x = centres(dim, classes)[y]
    x += 2.0 * rng.standard_normal((rows, dim), dtype=np.float32)
    return x, y


def entry_of(root: Path, rows: int, dim: int):
    from evalsuite.cache import FeatureCache

    return FeatureCache(root).entry({"bench": "scale", "rows": rows, "dim": dim}, rows)


def write_store(root: Path, rows: int, dim: int, classes: int) -> dict:
    """The store and its labels (``labels_<rows>x<dim>.npy``), shard by shard as extraction writes them."""
    entry = entry_of(root, rows, dim)
    labels = np.empty(rows, np.int64)
    t0 = time.perf_counter()
    if not entry.is_complete():
        entry.prepare()
        for i in range(entry.num_shards):
            lo, hi = entry.shard_range(i)
            x, labels[lo:hi] = sample(dim, classes, hi - lo, seed=i)
            entry.write_shard(i, x)
        entry.finalize()
        np.save(root / f"labels_{rows}x{dim}.npy", labels)
    seconds = time.perf_counter() - t0
    nbytes = rows * dim * 2
    return {"rows": rows, "dim": dim, "store_mb": round(nbytes / 2**20, 1), "write_seconds": round(seconds, 2),
            "write_mb_per_s": round(nbytes / 2**20 / max(seconds, 1e-9), 1)}


# ---------------------------------------------------------------------------- workers (one fresh process each)


def worker(args) -> dict:
    import faiss
    import torch

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)

    rows, dim = parse_store(args.store)
    entry = entry_of(Path(args.root), rows, dim)
    budget = parse_size(args.budget)
    t0 = time.perf_counter()
    store = entry.open(memory_budget=budget)  # every shard's checksum, read in 1 MiB pieces
    out = {"verify_seconds": round(time.perf_counter() - t0, 3), "store_mb": round(store.nbytes / 2**20, 1),
           "budget_mb": round(budget / 2**20, 1)}
    if args.worker in ("probe", "probe_in_memory"):
        out.update(probe_epoch(args, store, Path(args.root) / f"labels_{rows}x{dim}.npy"))
    elif args.worker == "exact":
        out.update(knn_exact(args, store))
    elif args.worker == "ivf":
        out.update(knn_ivf(args, store))
    return out


def measured(fn):
    """(result, seconds, peak RSS growth in MiB) of ``fn()``: the peak since a reset, minus the RSS before it."""
    base = current_rss_mb()
    reset = reset_peak()
    t0 = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - t0
    growth = (vm_hwm_mb() - base) if reset else float("nan")
    return result, seconds, growth


def probe_epoch(args, store, labels_path: Path) -> dict:
    from tasks.linear.probe import ProbeConfig, train_linear_probe

    labels = np.load(labels_path)
    config = ProbeConfig(epochs=1, batch_size=args.batch, lr=0.01, lr_milestones=(), bn="feature")
    warm = sample(store.dim, args.classes, 2 * args.batch, seed=-1 % 2**32)  # torch's first-use buffers: baseline
    train_linear_probe(warm[0].astype(np.float16), warm[1], args.classes, config, progress=False)
    streamed = args.worker == "probe"
    fit, seconds, growth = measured(lambda: train_linear_probe(
        store, labels, args.classes, config, progress=False, stream=streamed, desc=f"probe {args.store}"))
    rows = fit.total_iterations * min(args.batch, len(store))
    store_mb = store.nbytes / 2**20
    return {"mode": "streamed" if streamed else "in_memory", "seconds": round(seconds, 3),
            "rows_per_s": round(rows / seconds), "peak_growth_mb": round(growth, 1),
            "peak_growth_over_store": round(growth / store_mb, 3), "loss": round(fit.history[-1]["loss"], 4),
            "shuffle_buffer_rows": (fit.stream or {}).get("shuffle_buffer_rows"),
            "memory_estimate_mb": round((fit.stream or {}).get("memory_estimate", 0) / 2**20, 1) or None}


def queries_of(args, dim: int) -> np.ndarray:
    from tasks.knn.search import normalize_rows

    return normalize_rows(sample(dim, args.classes, args.queries, seed=10**6)[0])


def knn_exact(args, store) -> dict:
    from tasks.knn.search import SearchConfig, StoredBank, open_bank, search

    queries = queries_of(args, store.dim)
    config = SearchConfig(chunk_size=args.chunk)
    search(queries, queries, 2, config)  # FAISS's and BLAS's first-use buffers: baseline

    def run():
        bank = open_bank(store, len(queries), args.k, config, desc="exact knn")
        return bank, search(queries, bank, args.k, config)

    (bank, nb), seconds, growth = measured(run)
    np.save(args.ids_out, nb.ids)
    fp32_mb = store.nbytes * 2 / 2**20
    return {"method": "exact (flat)", "seconds": round(seconds, 3), "queries_per_s": round(len(queries) / seconds, 1),
            "streamed": isinstance(bank, StoredBank), "bank_blocks": nb.info.get("bank_blocks", 1),
            "block_rows": nb.info.get("bank_block_rows"), "peak_growth_mb": round(growth, 1),
            "peak_growth_over_fp32_bank": round(growth / fp32_mb, 3), "recall_at_k": 1.0}


def bench_nlist(nlist: int | None, rows: int) -> int | None:
    """The bench's IVF cells: as given, the power of two nearest sqrt(N) by default (below FAISS's 4-16 sqrt(N)
    guideline: a 1M bank builds in minutes on 2 cores; the recall is measured), None (the module's rule) for 0."""
    if nlist is None:
        return int(2 ** round(np.log2(np.sqrt(rows))))
    return nlist or None


def knn_ivf(args, store) -> dict:
    from tasks.knn.search import SearchConfig, StoredBank, block_unit, build_index, index_bytes, recall_at_k_ids

    queries = queries_of(args, store.dim)
    config = SearchConfig(index="ivf", nlist=bench_nlist(args.nlist, len(store)), nprobe=args.nprobe,
                          ivf_train_size=args.ivf_train_size, seed=0)
    # the bank streamed from the store in blocks of a quarter of the budget; the index holds its own float32 copy
    unit = block_unit()
    block_rows = max(unit, parse_size(args.budget) // 4 // (store.dim * 4) // unit * unit)
    info, times = {}, {}

    def run():
        index = build_index(StoredBank(store, block_rows), config, info, desc="ivf")
        t = time.perf_counter()
        ids = np.concatenate([index.search(queries[a:a + args.chunk], args.k)[1]
                              for a in range(0, len(queries), args.chunk)])
        times["search"] = time.perf_counter() - t
        return index, ids

    (index, ids), seconds, growth = measured(run)
    import faiss

    ivf = faiss.extract_index_ivf(index)
    exact = np.load(args.ids_out)
    index_mb = index_bytes(len(store), store.dim, config) / 2**20
    build = info["train_seconds"] + info["add_seconds"]
    return {"method": f"ivf (nlist {ivf.nlist}, nprobe {ivf.nprobe})", "seconds": round(seconds, 3),
            "build_seconds": round(build, 3), "train_seconds": info["train_seconds"],
            "add_seconds": info["add_seconds"], "search_seconds": round(times["search"], 3),
            "ivf_train_size": info["ivf_train_size"], "build_gflop": info["build_gflop"],
            "build_gflop_per_s": round(info["build_gflop"] / max(build, 1e-9), 1), "block_rows": block_rows,
            "queries_per_s": round(len(queries) / times["search"], 1), "peak_growth_mb": round(growth, 1),
            "peak_growth_over_fp32_bank": round(growth / (store.nbytes * 2 / 2**20), 3),
            "index_mb": round(index_mb, 1), "peak_growth_over_index": round(growth / index_mb, 3),
            "recall_at_k": round(recall_at_k_ids(ids, exact), 4)}


# ---------------------------------------------------------------------------- driver


def run_worker(args, mode: str, store: str, ids_out: Path) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.bench_scale", "--worker", mode, "--store", store, "--root", str(args.root),
           "--ids-out", str(ids_out), *[f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                                        if k in ("budget", "classes", "batch", "queries", "k", "chunk", "nprobe",
                                                 "threads") and v is not None]]
    for name in ("nlist", "ivf_train_size"):
        if getattr(args, name) is not None:
            cmd.append(f"--{name.replace('_', '-')}={getattr(args, name)}")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{mode} on {store} failed:\n{proc.stderr[-3000:]}")
    notes = [line for line in proc.stderr.splitlines() if "note:" in line]
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "notes": notes}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help=f"small sizes (make bench): {QUICK}")
    ap.add_argument("--stores", default="1000000x2048,200000x9216", help="ROWSxDIM,...; the first is the kNN bank")
    ap.add_argument("--budget", default="4G", help="memory budget (EVALSUITE_MEMORY_BUDGET / --memory-budget)")
    ap.add_argument("--classes", type=int, default=205)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--chunk", type=int, default=1024, help="kNN queries per FAISS call")
    ap.add_argument("--nlist", type=int, default=None,
                    help="IVF cells (default: the power of two nearest sqrt(N), 1024 at 1M: a build of ~6.3 TFLOP, "
                         "minutes on 2 cores; 0: tasks.knn.search's 4 sqrt(N), 4000 at 1M: ~42 TFLOP, over half an "
                         "hour at the ~20 GFLOP/s FAISS reached on 2 cores)")
    ap.add_argument("--ivf-train-size", type=int, default=None,
                    help="rows the IVF k-means trains on (default: max(39 nlist, 50000) capped at 256 nlist)")
    ap.add_argument("--nprobe", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--sections", default=",".join(SECTIONS))
    ap.add_argument("--in-memory", action="store_true", help="also the in-memory probe epoch (holds each store)")
    ap.add_argument("--root", type=Path, default=None, help="where the stores go (default: a temporary folder)")
    ap.add_argument("--keep", action="store_true", help="keep the stores (reused by a later run with --root)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--store", help=argparse.SUPPRESS)
    ap.add_argument("--ids-out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    sections = [s for s in args.sections.split(",") if s]
    if set(sections) - set(SECTIONS):
        raise SystemExit(f"unknown sections {set(sections) - set(SECTIONS)}; choose from {SECTIONS}")
    stores = [s.strip() for s in args.stores.split(",") if s.strip()]
    temporary = args.root is None
    args.root = Path(tempfile.mkdtemp(prefix="bench_scale_")) if temporary else args.root
    results: dict = {"stores": [], "probe": [], "knn": []}
    try:
        for spec in stores:
            results["stores"].append(write_store(args.root, *parse_store(spec), args.classes))
            print(f"store {spec}: {results['stores'][-1]}", flush=True)
        ids_out = args.root / "exact_ids.npy"
        if "probe" in sections:
            for spec in stores:
                for mode in ("probe", "probe_in_memory") if args.in_memory else ("probe",):
                    results["probe"].append({"store": spec, **run_worker(args, mode, spec, ids_out)})
        if "knn" in sections:
            for mode in ("exact", "ivf"):
                results["knn"].append({"store": stores[0], **run_worker(args, mode, stores[0], ids_out)})
    finally:
        if temporary and not args.keep:
            shutil.rmtree(args.root, ignore_errors=True)
    print(f"\nbudget {args.budget}, batch {args.batch}, {args.threads} thread(s)")
    for r in results["probe"]:
        print(f"probe {r['store']:>13s} {r['mode']:9s}: {r['rows_per_s']:>9,d} rows/s, "
              f"peak RSS +{r['peak_growth_mb']:.0f} MiB = {r['peak_growth_over_store']:.3f} x the "
              f"{r['store_mb']:.0f} MiB store (buffer {r['shuffle_buffer_rows']} rows, estimate "
              f"{r['memory_estimate_mb']} MiB), checksums {r['store_mb'] / max(r['verify_seconds'], 1e-9):.0f} MiB/s")
    for r in results["knn"]:
        build = (f" (build {r['build_seconds']:.1f} s: k-means on {r['ivf_train_size']} rows "
                 f"{r['train_seconds']:.1f} s, add {r['add_seconds']:.1f} s, {r['build_gflop_per_s']} GFLOP/s; "
                 f"search {r['search_seconds']:.2f} s)" if "build_seconds" in r else "")
        print(f"knn {r['store']:>15s} {r['method']:28s}: {r['seconds']:.2f} s{build} ({r['queries_per_s']} queries/s), "
              f"peak RSS +{r['peak_growth_mb']:.0f} MiB = {r['peak_growth_over_fp32_bank']:.3f} x the fp32 bank, "
              f"recall@{args.k} {r['recall_at_k']}" + (f", {r['bank_blocks']} blocks" if "bank_blocks" in r else ""))
    config = {k: str(v) for k, v in vars(args).items() if k not in ("worker", "store", "ids_out")}
    write_json("scale", {"config": config, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
