"""Detection speed, side by side in one run: Fast R-CNN training iterations/s and test images/s at the
``quick`` and ``goyal19`` image sizes, and proposal extraction images/s uncached vs cached; then a quality
run: the ``quick`` preset (sliding-window proposals, as the demo) trained vs untrained (0 iterations, the
same head initialisation) on synthetic VOC-like data (mAP, class-agnostic AP, seconds), for each trunk of
``--quality-checkpoints`` (default the random one; a checkpoint pretrained by
``benchmarks.bench_pretrain_quality --keep DIR`` shows whether detection ranks trunks). The 1-minute load
average before and after is recorded (the CPU may be shared).

    python -m benchmarks.bench_detection                     # small defaults (resnet18, a few iterations)
    python -m benchmarks.bench_detection --quality-scale 1   # quality on the demo's full default data
    python -m benchmarks.bench_detection --iters 0 --quality-scale 1 --threads 2 \
        --quality-checkpoints random:resnet18,DIR/supervised.safetensors
    python -m benchmarks.bench_detection --arch resnet50 --iters 10 --images 8 --threads 16 --quality-scale 0
    python -m benchmarks.bench_detection --arch vit_tiny_patch16 --quality-set detection.vit.box_head=4conv1fc
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import peak_rss_mb, write_json


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--iters", type=int, default=3, help="training iterations per size")
    ap.add_argument("--images", type=int, default=4, help="test images per size and proposal images")
    ap.add_argument("--proposals", type=int, default=300, help="test proposals per image")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quality-scale", type=float, default=0.25,
                    help="synthetic data scale of the quality run (1 = 200 trainval + 200 test images; 0 = skip)")
    ap.add_argument("--quality-iters", type=int, default=None, help="training iterations (default: the preset's)")
    ap.add_argument("--quality-checkpoints", default=None,
                    help="comma-separated trunks of the quality run (default: random:<arch>)")
    ap.add_argument("--quality-set", action="append", default=[], metavar="KEY=VALUE",
                    help="a protocol override of the speed and quality runs (detection.vit.box_head=4conv1fc)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    load_before = os.getloadavg()[0]

    import tasks.detection.task as det
    from evalsuite.data import open_dataset
    from evalsuite.data.synthetic import write_voc2007
    from evalsuite.protocols import apply_overrides, parse_overrides
    from evalsuite.trunks import arch_info, build_trunk
    from tasks.detection.fast_rcnn import TorchvisionFastRCNN
    from tasks.detection.proposals import ProposalCache

    out: dict = {"arch": a.arch, "threads": a.threads, "device": a.device, "sizes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_voc2007(root / "data", seed=0, scale=0.1, image_size=400)  # 20 + 20 images, ~400 px
        voc = root / "data" / "VOCdevkit" / "VOC2007"
        train = open_dataset("voc2007", voc, "trainval")

        # proposals: uncached (selective search) vs cached (read back)
        n = min(a.images, len(train))
        cache = ProposalCache(root / "props", "selective_search", {}, dataset_key="bench")
        sub = det._Subset(train, n)
        t = time.perf_counter()
        cache.precompute(sub, progress=False)
        uncached = n / (time.perf_counter() - t)
        t = time.perf_counter()
        for i in range(n):
            cache.get(train, i)
        cached = n / (time.perf_counter() - t)
        out["proposals"] = {"uncached_img_per_s": round(uncached, 3), "cached_img_per_s": round(cached, 1),
                            "cached_over_uncached": round(cached / uncached, 1), "images": n}
        print(f"proposals: uncached {uncached:.2f} img/s, cached {cached:.0f} img/s ({cached / uncached:.0f}x)")

        for preset in ("quick", "goyal19") if a.iters > 0 else ():
            p = apply_overrides({"detection": det.task.default_protocol(preset)},
                                parse_overrides(a.quality_set))["detection"].replace(
                proposal_cache=str(root / "props"), proposals="sliding_window", proposal_limit=a.proposals,
                max_iter=a.iters, checkpoint_period=10**9)
            recs, _ = det.build_records(train, p, train=True, limit=n)
            info = arch_info(a.arch)
            cfg = det.vit_model_config(p, info) if info["family"] == "vit" else det.model_config(p)
            be = TorchvisionFastRCNN(build_trunk(a.arch, seed=0), 20, cfg, device=a.device)
            be.fit(recs, det.train_config(p.replace(max_iter=1), 0))  # warm-up
            t = time.perf_counter()
            be.fit(recs, det.train_config(p, 0))
            train_its = a.iters / (time.perf_counter() - t)
            t = time.perf_counter()
            be.predict(recs, det.test_config(p))
            test_ips = len(recs) / (time.perf_counter() - t)
            out["sizes"][preset] = {"scale": p.train_scales[0], "max_size": p.train_max_size,
                                    "ims_per_batch": p.ims_per_batch, "rois_per_image": p.rois_per_image,
                                    "pool_size": p.pool_size, "freeze_at": p.freeze_at,
                                    **({"vit": p.vit.to_dict()} if info["family"] == "vit" else {}),
                                    "test_proposals": a.proposals, "train_it_per_s": round(train_its, 3),
                                    "test_img_per_s": round(test_ips, 3)}
            print(f"{preset:8s} (short side {p.train_scales[0]}): train {train_its:.3f} it/s, "
                  f"test {test_ips:.3f} img/s")
        if out["sizes"]:
            q, g = out["sizes"]["quick"], out["sizes"]["goyal19"]
            out["ratios"] = {"train_quick_over_goyal19": round(q["train_it_per_s"] / g["train_it_per_s"], 1),
                             "test_quick_over_goyal19": round(q["test_img_per_s"] / g["test_img_per_s"], 1)}
            print(f"quick vs goyal19: train {out['ratios']['train_quick_over_goyal19']}x, "
                  f"test {out['ratios']['test_quick_over_goyal19']}x")
        if a.quality_scale > 0:
            specs = (a.quality_checkpoints or f"random:{a.arch}").split(",")
            out["quality"] = [quality_run(root / "quality", a, s, i) for i, s in enumerate(specs)]
    out["load_avg_1min"] = {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)}
    out["peak_rss_mb"] = round(peak_rss_mb(), 1)
    out["note"] = "test images/s include the trunk on the whole image and res5 on every proposal"
    write_json("detection", out)
    return 0


def quality_run(root: Path, a, spec: str, index: int = 0) -> dict:
    """``quick`` (sliding-window proposals) on trunk ``spec``, trained vs untrained, on synthetic VOC-like data."""
    import tasks.detection.task as det
    from evalsuite.checkpoints import load_checkpoint
    from evalsuite.data.synthetic import write_voc2007
    from evalsuite.protocols import apply_overrides, parse_overrides
    from evalsuite.task import TaskContext

    if not (root / "data").exists():
        write_voc2007(root / "data", seed=0, scale=a.quality_scale)
    proto = det.task.default_protocol("quick")
    iters = proto.max_iter if a.quality_iters is None else a.quality_iters
    res = {"preset": "quick", "data_scale": a.quality_scale, "arch": a.arch, "checkpoint": spec,
           "proposals": "sliding_window", "max_iter": iters, "overrides": a.quality_set}
    for name, n in (("untrained", 0), ("trained", iters)):
        over = parse_overrides([f"detection.proposal_cache={root / 'props'}", "detection.proposals=sliding_window",
                                f"detection.max_iter={n}", *a.quality_set])
        ctx = TaskContext(task="detection", checkpoint=load_checkpoint(spec), preset="quick",
                          protocol=apply_overrides({"detection": proto}, over)["detection"], data_root=root / "data",
                          out_dir=root / f"trunk{index}" / name, extractor_factory=lambda: None, progress=False, seed=0,
                          device=a.device)
        torch.manual_seed(0)
        t = time.perf_counter()
        rows = {r.metric: r for r in det.task.run(ctx)}
        res[name] = {"mAP": round(rows["mAP"].value, 2), "AP_class_agnostic": round(rows["AP_class_agnostic"].value, 2),
                     "seconds": round(time.perf_counter() - t, 1),
                     "num_test_images": rows["mAP"].params["num_test_images"]}
        r = res[name]
        print(f"quality {spec} {name:9s}: mAP {r['mAP']:.2f}, class-agnostic AP {r['AP_class_agnostic']:.2f}"
              f" ({r['seconds']:.0f} s)")
    res["mAP_margin"] = round(res["trained"]["mAP"] - res["untrained"]["mAP"], 2)
    return res


if __name__ == "__main__":
    np.seterr(all="ignore")
    raise SystemExit(main())
