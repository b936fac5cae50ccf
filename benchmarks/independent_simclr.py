"""An independent SimCLR, written apart from pretrain/, to check whether our trainer or the budget limits what
a few CPU minutes reach on the real 32 px photographs (docs/pretraining.md, "An independent check").

    python -m benchmarks.independent_simclr --root cifar10_dev --steps 500 --batch-size 128

torchvision ResNet-18 (ImageNet stem; ``--cifar-stem`` for the 3x3 one), torchvision.transforms.v2 views (crop,
flip, jitter 0.4, grey 0.2, no blur), SGD + one-cycle, NT-Xent; kNN (k 20, T 0.07, cosine) of res5's
average-pooled features of ``test/`` against ``train/``, five times during the run. Writes
benchmarks/out/independent_simclr.json.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
import torchvision.transforms.v2 as T
from PIL import Image
from torch import nn

from benchmarks.common import write_json

MEAN = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
STD = torch.tensor([0.247, 0.243, 0.261]).view(1, 3, 1, 1)


def load_split(root: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    classes = sorted(d.name for d in (root / split).iterdir() if d.is_dir())
    images, labels = [], []
    for i, c in enumerate(classes):
        for f in sorted((root / split / c).iterdir()):
            images.append(np.asarray(Image.open(f).convert("RGB")))
            labels.append(i)
    return torch.tensor(np.stack(images)).permute(0, 3, 1, 2).contiguous(), torch.tensor(labels)


def normalise(x: torch.Tensor) -> torch.Tensor:
    return ((x.float() / 255 - MEAN) / STD).contiguous(memory_format=torch.channels_last)


def nt_xent(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """z: the 2B projections, view 1 then view 2; each row's positive is its other view."""
    b = z.shape[0] // 2
    z = F.normalize(z, dim=1)
    sim = z @ z.T / temperature
    sim.fill_diagonal_(float("-inf"))
    return F.cross_entropy(sim, torch.cat([torch.arange(b, 2 * b), torch.arange(0, b)]))


@torch.no_grad()
def knn_top1(net: nn.Module, train: tuple, test: tuple, k: int = 20, t: float = 0.07) -> float:
    net.eval()

    def embed(x):
        return F.normalize(torch.cat([net(normalise(x[i:i + 500])) for i in range(0, len(x), 500)]), dim=1)

    bank, queries = embed(train[0]), embed(test[0])
    sims, idx = (queries @ bank.T).topk(k, dim=1)
    votes = torch.zeros(len(queries), int(train[1].max()) + 1).scatter_add_(1, train[1][idx], (sims / t).exp())
    net.train()
    return float((votes.argmax(1) == test[1]).float().mean()) * 100


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, required=True, help="an ImageFolder with train/ and test/")
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.5, help="x batch/256")
    ap.add_argument("--temperature", type=float, default=0.2)
    ap.add_argument("--min-scale", type=float, default=0.08)
    ap.add_argument("--cifar-stem", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    train, test = load_split(a.root, "train"), load_split(a.root, "test")
    net = torchvision.models.resnet18(num_classes=10)  # the fc size sets the RNG state of the conv inits
    if a.cifar_stem:
        net.conv1, net.maxpool = nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.Identity()
    net.fc = nn.Identity()
    net = net.to(memory_format=torch.channels_last)
    head = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 128))
    size = train[0].shape[-1]
    view = T.Compose([T.RandomResizedCrop(size, scale=(a.min_scale, 1.0), antialias=True), T.RandomHorizontalFlip(),
                      T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), T.RandomGrayscale(0.2)])
    lr = a.lr * a.batch_size / 256
    opt = torch.optim.SGD([*net.parameters(), *head.parameters()], lr=lr, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=a.steps, pct_start=0.05)
    rows = [{"step": 0, "seconds": 0.0, "knn_top1": knn_top1(net, train, test)}]
    print(rows[-1], flush=True)
    g, t0 = torch.Generator().manual_seed(0), time.time()
    for step in range(1, a.steps + 1):
        x = train[0][torch.randint(0, len(train[0]), (a.batch_size,), generator=g)]
        views = torch.cat([normalise(torch.stack([view(im) for im in x])) for _ in range(2)])
        loss = nt_xent(head(net(views)), a.temperature)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % max(1, a.steps // 5) == 0:
            rows.append({"step": step, "seconds": round(time.time() - t0, 1), "loss": float(loss.detach()),
                         "knn_top1": knn_top1(net, train, test)})
            print(rows[-1], flush=True)
    write_json("independent_simclr", {"args": {k: str(v) for k, v in vars(a).items()}, "rows": rows})


if __name__ == "__main__":
    main()
