"""Detection speed, side by side in one run: Fast R-CNN training iterations/s and test images/s at the
``quick`` and ``goyal19`` image sizes, and proposal extraction images/s uncached vs cached.

    python -m benchmarks.bench_detection                     # small defaults (resnet18, a few iterations)
    python -m benchmarks.bench_detection --arch resnet50 --iters 10 --images 8 --threads 16
"""

from __future__ import annotations

import argparse
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
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)

    from evalsuite.data import open_dataset
    from evalsuite.data.synthetic import write_voc2007
    from evalsuite.trunks import build_trunk
    from tasks import detection as det
    from tasks.fast_rcnn import ModelConfig, TorchvisionFastRCNN
    from tasks.proposals import ProposalCache

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

        for preset in ("quick", "goyal19"):
            p = det.task.default_protocol(preset)
            p.update(proposal_cache=str(root / "props"), proposals="sliding_window", proposal_limit=a.proposals,
                     max_iter=a.iters, checkpoint_period=10**9)
            recs, _ = det.build_records(train, p, train=True, limit=n)
            be = TorchvisionFastRCNN(build_trunk(a.arch, seed=0), 20,
                                     ModelConfig(pool_size=int(p["pool_size"]), freeze_at=int(p["freeze_at"])),
                                     device=a.device)
            be.fit(recs, det.train_config({**p, "max_iter": 1}, 0))  # warm-up
            t = time.perf_counter()
            be.fit(recs, det.train_config(p, 0))
            train_its = a.iters / (time.perf_counter() - t)
            t = time.perf_counter()
            be.predict(recs, det.test_config(p))
            test_ips = len(recs) / (time.perf_counter() - t)
            out["sizes"][preset] = {"scale": p["train_scales"][0], "max_size": p["train_max_size"],
                                    "ims_per_batch": p["ims_per_batch"], "rois_per_image": p["rois_per_image"],
                                    "pool_size": p["pool_size"], "freeze_at": p["freeze_at"],
                                    "test_proposals": a.proposals, "train_it_per_s": round(train_its, 3),
                                    "test_img_per_s": round(test_ips, 3)}
            print(f"{preset:8s} (short side {p['train_scales'][0]}): train {train_its:.3f} it/s, "
                  f"test {test_ips:.3f} img/s")
        q, g = out["sizes"]["quick"], out["sizes"]["goyal19"]
        out["ratios"] = {"train_quick_over_goyal19": round(q["train_it_per_s"] / g["train_it_per_s"], 1),
                         "test_quick_over_goyal19": round(q["test_img_per_s"] / g["test_img_per_s"], 1)}
        print(f"quick vs goyal19: train {out['ratios']['train_quick_over_goyal19']}x, "
              f"test {out['ratios']['test_quick_over_goyal19']}x")
    out["peak_rss_mb"] = round(peak_rss_mb(), 1)
    out["note"] = "test images/s include the trunk on the whole image and res5 on every proposal"
    write_json("detection", out)
    return 0


if __name__ == "__main__":
    np.seterr(all="ignore")
    raise SystemExit(main())
