"""Feature extraction: fast path vs naive fp32, cache re-read, peak memory.

    python -m benchmarks.bench_extraction [--images 512] [--memory-images 10000]
    python -m benchmarks.bench_extraction --sections vit --vit-batches 3   # ViT-S/16 beside ResNet-50 only
    python -m benchmarks.bench_extraction --sections vit --device cuda --vit-batch 256 --vit-batches 8

1. Throughput of ResNet-50 at 224x224, all five taps with Goyal pooling, on the
   same decoded images: a naive fp32 NCHW batch-64 loop vs the suite's path
   (channels_last + bfloat16 autocast), measured alternately in one run.
   Also checks the fast path's numerics against fp32 (cosine similarity).
2. A second request for the same features (a second task on the same checkpoint
   and data) is served from the cache: time vs the first extraction.
3. Peak RSS of extracting all five taps for --memory-images images (in a
   subprocess) vs the size of the fp16 features it returns.
4. ViT-S/16 beside ResNet-50: img/s at 224x224 through the extractor's own forward
   pass (each trunk's default taps, goyal pooling: the CLS token on a ViT) with
   precision fp32 vs auto (bfloat16 autocast where the device has it; channels_last
   for the ResNet only), each pair alternated over rounds on the same images.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import peak_rss_mb, write_json
from evalsuite.cache import FeatureCache
from evalsuite.data import open_dataset
from evalsuite.data.synthetic import write_imagefolder
from evalsuite.features import FeatureExtractor, Transform
from evalsuite.trunks import RESNET_TAPS, arch_info, build_trunk, pool_features, pool_spec, tap_shapes

VIT_VS_RESNET = ("resnet50", "vit_small_patch16")


def naive_forward(trunk, x: torch.Tensor, specs) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        acts = trunk(x)
    return {t: pool_features(a, specs[t]) for t, a in acts.items()}


def fast_forward(trunk_cl, x: torch.Tensor, specs) -> dict[str, torch.Tensor]:
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        acts = trunk_cl(x.contiguous(memory_format=torch.channels_last))
    return {t: pool_features(a.float(), specs[t]) for t, a in acts.items()}


def throughput(images: torch.Tensor, batch: int, rounds: int) -> dict:
    trunk = build_trunk("resnet50", seed=0).eval()
    trunk_cl = build_trunk("resnet50", seed=0).eval().to(memory_format=torch.channels_last)
    shapes = tap_shapes("resnet50", 224)
    specs = {t: pool_spec("resnet50", t, c, h, "goyal") for t, (c, h, _) in shapes.items()}
    fast_forward(trunk_cl, images[:batch], specs)  # warm-up (oneDNN primitive creation)
    naive_forward(trunk, images[:8], specs)
    times = {"naive_fp32_nchw": 0.0, "bf16_channels_last": 0.0}
    for _ in range(rounds):  # alternate so machine-load changes hit both sides alike
        for name, fn, tr in (("naive_fp32_nchw", naive_forward, trunk), ("bf16_channels_last", fast_forward, trunk_cl)):
            t0 = time.perf_counter()
            for i in range(0, len(images), batch):
                fn(tr, images[i : i + batch], specs)
            times[name] += time.perf_counter() - t0
    n = len(images) * rounds
    ips = {k: n / v for k, v in times.items()}
    ref = naive_forward(trunk, images[:16], specs)
    fast = fast_forward(trunk_cl, images[:16], specs)
    cos = {t: float(torch.nn.functional.cosine_similarity(ref[t], fast[t], dim=1).min()) for t in ref}
    return {"images_per_s": ips, "speedup": ips["bf16_channels_last"] / ips["naive_fp32_nchw"],
            "min_cosine_vs_fp32": cos, "images": len(images), "rounds": rounds, "batch": batch}


def vit_vs_resnet(images: torch.Tensor, batch: int, batches: int, rounds: int, device: str = "cpu") -> dict:
    """img/s of each arch x precision through FeatureExtractor._forward (what a task's extraction runs per
    batch, without data loading or cache writes: host-to-device copy and pooled features back to the host
    included), on the first ``batch * batches`` images."""
    images = images[: batch * batches]
    runs = {}
    for arch in VIT_VS_RESNET:
        trunk = build_trunk(arch, seed=0).eval().to(device)
        taps = list(arch_info(arch).get("default_taps", arch_info(arch)["taps"]))
        for precision in ("fp32", "auto"):
            ext = FeatureExtractor(trunk, "bench", arch, precision=precision, batch_size=batch, progress=False,
                                   device=device)
            specs = ext.pool_specs(taps, "goyal", Transform(size=224))
            tr = trunk.to(memory_format=torch.channels_last) if ext._channels_last() else trunk
            runs[(arch, precision)] = (ext, tr, taps, specs)
    idx = torch.arange(batch)

    def once(key) -> float:
        ext, tr, taps, specs = runs[key]
        t0 = time.perf_counter()
        with torch.inference_mode():
            for i in range(0, len(images), batch):
                ext._forward(tr, images[i : i + batch], taps, specs, None, idx)
        return time.perf_counter() - t0

    for key in runs:  # warm-up (oneDNN primitive creation)
        ext, tr, taps, specs = runs[key]
        with torch.inference_mode():
            ext._forward(tr, images[:batch], taps, specs, None, idx)
    seconds = dict.fromkeys(runs, 0.0)
    for _ in range(rounds):  # alternate so machine-load changes hit every run alike
        for key in runs:
            seconds[key] += once(key)
    rows = [{"arch": arch, "precision": precision, "resolved": runs[(arch, precision)][0].precision,
             "taps": runs[(arch, precision)][2], "images_per_s": len(images) * rounds / seconds[(arch, precision)]}
            for arch, precision in runs]
    return {"rows": rows, "batch": batch, "images": len(images), "rounds": rounds, "size": 224,
            "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
            "load_average": os.getloadavg()[0]}


def cache_reuse(root: Path, cache_root: Path) -> dict:
    ds = open_dataset("imagefolder", root, "train")
    tf = Transform(size=224)
    trunk = build_trunk("resnet50", seed=0)
    ext = FeatureExtractor(trunk, "bench", "resnet50", cache=FeatureCache(cache_root), batch_size=64, progress=False)
    t0 = time.perf_counter()
    ext.features(ds, list(RESNET_TAPS), "goyal", tf)
    first = time.perf_counter() - t0
    ext2 = FeatureExtractor(trunk, "bench", "resnet50", cache=FeatureCache(cache_root), batch_size=64,
                            progress=False)
    t0 = time.perf_counter()
    ext2.features(ds, list(RESNET_TAPS), "goyal", tf)
    second = time.perf_counter() - t0
    return {"images": len(ds), "first_extraction_s": first, "cached_read_s": second, "speedup": first / second,
            "second_run_trunk_images": ext2.stats["extracted_images"]}


def memory_child(root: str, cache_root: str) -> None:
    """Run in a subprocess: extract all taps, report baseline and peak RSS and the fp16 feature bytes."""
    ds = open_dataset("imagefolder", Path(root), "train")
    trunk = build_trunk("resnet50", seed=0)
    ext = FeatureExtractor(trunk, "bench-mem", "resnet50", cache=FeatureCache(cache_root), batch_size=64,
                           progress=False)
    # Baseline: model loaded and one batch through it (allocator, oneDNN workspaces, page cache of libs).
    tf = Transform(size=224)
    nb = min(64, len(ds))
    x = torch.stack([tf(ds.load_image(i)) for i in range(nb)])
    ext._forward(ext.trunk.to(memory_format=torch.channels_last), x, list(RESNET_TAPS),
                 ext.pool_specs(list(RESNET_TAPS), "goyal", tf), ds, torch.arange(nb))
    base = peak_rss_mb()
    feats = ext.features(ds, list(RESNET_TAPS), "goyal", tf)
    fp16_mb = sum(f.nbytes for f in feats.values()) / 2**20
    print(f"RESULT {base:.1f} {peak_rss_mb():.1f} {fp16_mb:.1f}")


def memory(n_images: int, tmp: Path) -> dict:
    root = tmp / "mem" / "imagefolder"
    per_class = max(1, n_images // 8)
    write_imagefolder(root, seed=3, per_class=per_class, size=96, splits={"train": 1.0})
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_extraction", "--memory-child", str(root),
                           str(tmp / "memcache")], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"memory child failed:\n{proc.stderr[-3000:]}")
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT"))
    base, peak, fp16 = map(float, line.split()[1:])
    return {"images": per_class * 8, "baseline_rss_mb": base, "peak_rss_mb": peak, "fp16_features_mb": fp16,
            "peak_minus_baseline_mb": peak - base, "overhead_beyond_features_mb": peak - base - fp16}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=256, help="images for the throughput comparison")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--cache-images", type=int, default=256)
    ap.add_argument("--memory-images", type=int, default=10000)
    ap.add_argument("--vit-batch", type=int, default=32, help="batch size of the ViT-S/16 vs ResNet-50 runs")
    ap.add_argument("--vit-batches", type=int, default=4, help="batches per ViT-S/16 vs ResNet-50 run and round")
    ap.add_argument("--device", default="cpu", help="device of the vit section (cpu, cuda)")
    ap.add_argument("--sections", default="throughput,cache,memory,vit",
                    help="comma-separated: throughput, cache, memory, vit")
    ap.add_argument("--memory-child", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.memory_child:
        memory_child(*a.memory_child)
        return
    sections = set(a.sections.split(","))
    unknown = sections - {"throughput", "cache", "memory", "vit"}
    if unknown:
        ap.error(f"unknown section(s) {', '.join(sorted(unknown))}")
    torch.manual_seed(0)
    out: dict = {}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        per_class = max(1, a.images // 8)
        vit_per_class = -(-a.vit_batch * a.vit_batches // 8) if "vit" in sections else 0
        root = write_imagefolder(tmp / "imagefolder", seed=0, per_class=max(per_class, vit_per_class), size=160,
                                 splits={"train": 1.0})
        ds = open_dataset("imagefolder", root, "train")
        tf = Transform(size=224)
        images = torch.stack([tf(ds.load_image(i)) for i in range(len(ds))])
        if "vit" in sections:
            out["vit_vs_resnet"] = vv = vit_vs_resnet(images, a.vit_batch, a.vit_batches, a.rounds, a.device)
            print(f"[vit vs resnet] {vv['device']}, 224px, batch {vv['batch']}, {vv['images']} images x "
                  f"{vv['rounds']} rounds (load average {vv['load_average']:.1f})")
            print(f"  {'arch':18s} {'precision':9s} {'ran as':6s} {'img/s':>7s}  taps")
            for r in vv["rows"]:
                print(f"  {r['arch']:18s} {r['precision']:9s} {r['resolved']:6s} {r['images_per_s']:7.1f}  "
                      f"{','.join(r['taps'])}")
        if "throughput" in sections:
            out["throughput"] = tp = throughput(images[: 8 * per_class], 64, a.rounds)
            ips = tp["images_per_s"]
            print(f"[throughput] ResNet-50 224px, 5 taps: naive fp32 NCHW {ips['naive_fp32_nchw']:.1f} img/s,"
                  f" bf16+channels_last {ips['bf16_channels_last']:.1f} img/s -> {tp['speedup']:.2f}x"
                  f" (min cosine vs fp32 {min(tp['min_cosine_vs_fp32'].values()):.4f})")
        if "cache" in sections:
            cache_root = tmp / "imagefolder_c" / "imagefolder"
            write_imagefolder(cache_root, seed=1, per_class=max(1, a.cache_images // 8), size=160,
                              splits={"train": 1.0})
            out["cache"] = cr = cache_reuse(cache_root, tmp / "cache")
            print(f"[cache] first extraction {cr['first_extraction_s']:.2f} s, second task reads the cache in "
                  f"{cr['cached_read_s']:.3f} s -> {cr['speedup']:.1f}x")
        if "memory" in sections:
            out["memory"] = mem = memory(a.memory_images, tmp)
            print(f"[memory] {mem['images']} images, all 5 taps: peak RSS {mem['peak_rss_mb']:.0f} MiB = baseline "
                  f"{mem['baseline_rss_mb']:.0f} + {mem['peak_minus_baseline_mb']:.0f} MiB; fp16 features "
                  f"{mem['fp16_features_mb']:.0f} MiB; overhead beyond the features "
                  f"{mem['overhead_beyond_features_mb']:.0f} MiB")
    write_json("extraction", {**out, "args": vars(a)})

if __name__ == "__main__":
    main()
