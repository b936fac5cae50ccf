"""Learnability of the synthetic datasets: are they saturated by trivial features?

Measured side by side in one run, on the default-size synthetic VOC2007 (multi-label, mAP over the 20
classes with a linear SVM per class, difficult-only images ignored) and Places205 (10 scene
categories, top-1 of a multinomial logistic regression), always the same linear probe on:

- ``raw_pixels``: the image resized to 16x16, flattened (768 dims);
- ``random_cnn``: a small 5-block CNN with random (seeded) weights, global-average-pooled last block;
- ``trained_cnn``: the same CNN after a short supervised training (``--seconds`` of SGD) on a *separate*
  synthetic set of the same kind (another seed, ``--train-scale`` x the default size): VOC object crops
  (boxes from the XMLs) as 20-way classification, Places images as 10-way classification, at
  ``--crop-px``; i.e. a stand-in for a trunk "pretrained for a short while" on synthetic data.

Also records how long generating the default data takes. The issue's acceptance: raw pixels and the
random trunk stay well below the trained trunk.

    python -m benchmarks.bench_data [--seconds 120] [--train-scale 4] [--px 64] [--threads 2]

Prints a table and writes benchmarks/out/bench_data.json (numbers go to evalsuite/data/README.md).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from benchmarks.common import write_json
from evalsuite.data import open_dataset
from evalsuite.data.synthetic import write_places205, write_voc2007


class SmallCNN(nn.Module):
    def __init__(self, n_out: int, width: int = 32):
        super().__init__()
        chans = [3, width, width * 2, width * 4, width * 4, width * 8]
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(chans[k], chans[k + 1], 3, stride=1 if k == 0 else 2, padding=1, bias=False),
                          nn.BatchNorm2d(chans[k + 1]), nn.ReLU(inplace=True)) for k in range(5))
        self.head = nn.Linear(chans[-1], n_out)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = b(x)
        return x.mean((2, 3))

    def forward(self, x):
        return self.head(self.features(x))


MEAN = torch.tensor([0.5, 0.5, 0.5]).view(1, 3, 1, 1)


def load_tensor(ds, px: int) -> torch.Tensor:
    arr = np.stack([np.asarray(ds.load_image(i).resize((px, px)), np.uint8) for i in range(len(ds))])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float().div(255).sub(MEAN).div(0.25)


def object_crops(ds, px: int) -> tuple[torch.Tensor, np.ndarray]:
    """Every non-difficult VOC object, cropped to its box (+10 % margin) at ``px``, and its class:
    a single-label training signal for the stand-in trunk (much denser than whole-scene BCE)."""
    arr, lab = [], []
    for i in range(len(ds)):
        im, a = ds.load_image(i), ds.annotations(i)
        for (x1, y1, x2, y2), c, dif in zip(a["boxes"], a["labels"], a["difficult"]):
            if dif:
                continue
            m = 0.1 * max(x2 - x1, y2 - y1)
            crop = im.crop((int(x1 - 1 - m), int(y1 - 1 - m), int(x2 + m), int(y2 + m))).resize((px, px))
            arr.append(np.asarray(crop, np.uint8))
            lab.append(int(c))
    x = torch.from_numpy(np.stack(arr)).permute(0, 3, 1, 2).float().div(255).sub(MEAN).div(0.25)
    return x, np.asarray(lab)


def targets(ds) -> np.ndarray:
    return np.asarray(ds.label_matrix) if hasattr(ds, "label_matrix") else np.asarray(ds.labels)


@torch.no_grad()
def embed(model: SmallCNN, x: torch.Tensor) -> np.ndarray:
    model.eval()
    return torch.cat([model.features(x[i:i + 128]) for i in range(0, len(x), 128)]).numpy()


def train(model: SmallCNN, x: torch.Tensor, y: np.ndarray, multilabel: bool, seconds: float, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True)
    yt = torch.from_numpy((y == 1).astype(np.float32) if multilabel else y.astype(np.int64))
    t0, steps, epochs = time.perf_counter(), 0, 0
    while time.perf_counter() - t0 < seconds:
        model.train()
        for idx in torch.randperm(len(x), generator=g).split(64):
            xb = x[idx]
            if torch.rand(1, generator=g).item() < 0.5:  # flip
                xb = xb.flip(3)
            sh = torch.randint(-4, 5, (2,), generator=g).tolist()  # small random translation
            xb = torch.roll(xb, shifts=sh, dims=(2, 3))
            out = model(xb)
            loss = F.binary_cross_entropy_with_logits(out, yt[idx]) if multilabel else F.cross_entropy(out, yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps += 1
            if time.perf_counter() - t0 > seconds:
                break
        epochs += 1
    return {"steps": steps, "epochs": epochs, "seconds": round(time.perf_counter() - t0, 1),
            "final_loss": round(float(loss.detach()), 4)}


def probe(xtr: np.ndarray, ytr: np.ndarray, xte: np.ndarray, yte: np.ndarray, multilabel: bool) -> float:
    """VOC: per-class LinearSVC (C=1), mAP over classes ignoring 0 labels; else logistic regression top-1."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import average_precision_score
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC

    sc = StandardScaler().fit(xtr)
    xtr, xte = sc.transform(xtr), sc.transform(xte)
    if not multilabel:
        clf = LogisticRegression(C=0.1, max_iter=2000).fit(xtr, ytr)
        return 100.0 * float((clf.predict(xte) == yte).mean())
    aps = []
    for c in range(ytr.shape[1]):
        tr, te = ytr[:, c] != 0, yte[:, c] != 0
        if (ytr[tr, c] == 1).sum() == 0 or (yte[te, c] == 1).sum() == 0:
            continue
        svm = LinearSVC(C=0.01, class_weight={1: 2, -1: 1}, max_iter=5000).fit(xtr[tr], ytr[tr, c])
        aps.append(average_precision_score(yte[te, c] == 1, svm.decision_function(xte[te])))
    return 100.0 * float(np.mean(aps))


def run_kind(kind: str, tmp: Path, a) -> dict:
    writer, splits, n_out = ((write_voc2007, ("trainval", "test"), 20) if kind == "voc2007"
                             else (write_places205, ("train", "val"), 10))
    t0 = time.perf_counter()
    eval_root = writer(tmp / f"{kind}_eval", seed=0, scale=1.0)
    gen_s = time.perf_counter() - t0
    pre_root = writer(tmp / f"{kind}_pre", seed=1, scale=a.train_scale)
    tr, te = open_dataset(kind, eval_root, splits[0]), open_dataset(kind, eval_root, splits[1])
    pre = open_dataset(kind, pre_root, splits[0])
    multilabel = kind == "voc2007"
    xtr, xte = load_tensor(tr, a.px), load_tensor(te, a.px)
    ytr, yte = targets(tr), targets(te)
    if multilabel:  # the trunk learns from object crops of the separate set (single-label, 20 classes)
        xpre, ypre = object_crops(pre, a.crop_px)
    else:
        xpre, ypre = load_tensor(pre, a.crop_px), targets(pre)
    res = {"n_train": len(tr), "n_test": len(te), "n_pretrain": len(xpre), "generate_default_s": round(gen_s, 1)}
    raw = lambda x: F.interpolate(x, size=16, mode="area").flatten(1).numpy()  # noqa: E731
    res["raw_pixels"] = probe(raw(xtr), ytr, raw(xte), yte, multilabel)
    torch.manual_seed(a.seed)
    model = SmallCNN(n_out, a.width)
    res["random_cnn"] = probe(embed(model, xtr), ytr, embed(model, xte), yte, multilabel)
    res["training"] = train(model, xpre, ypre, False, a.seconds, a.seed)
    res["trained_cnn"] = probe(embed(model, xtr), ytr, embed(model, xte), yte, multilabel)
    res["metric"] = "mAP" if multilabel else "top1"
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=120, help="training budget of the trained CNN, per dataset")
    ap.add_argument("--train-scale", type=float, default=4.0, help="size of the separate training set (x default)")
    ap.add_argument("--px", type=int, default=96, help="network input side for the probes")
    ap.add_argument("--crop-px", type=int, default=48, help="input side while training the stand-in trunk")
    ap.add_argument("--width", type=int, default=32, help="CNN base width")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kinds", default="voc2007,places205")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    out = {"params": vars(a), "results": {}}
    with tempfile.TemporaryDirectory() as d:
        for kind in a.kinds.split(","):
            r = run_kind(kind, Path(d), a)
            out["results"][kind] = r
            print(f"{kind:10s} {r['metric']:5s} raw px {r['raw_pixels']:5.1f} | random CNN {r['random_cnn']:5.1f} | "
                  f"trained CNN {r['trained_cnn']:5.1f}  (trained {r['training']['epochs']} epochs / "
                  f"{r['training']['seconds']}s on {r['n_pretrain']} images; default data generated in "
                  f"{r['generate_default_s']}s)", flush=True)
    write_json("bench_data", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
