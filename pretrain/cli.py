"""``evalsuite pretrain``: train one method and write an evalsuite checkpoint (``--list`` shows methods)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from evalsuite.errors import UserError

from . import RECIPES

#: what a run uses when neither the command line nor the recipe sets it
RUN_DEFAULTS = {"arch": "resnet18", "batch_size": 64, "epochs": 1, "image_size": 64}

EPILOG = """\
examples:
  evalsuite pretrain --list
  evalsuite pretrain --method simclr --arch resnet18 --data-root data --epochs 10 --out simclr.safetensors
  evalsuite pretrain --method moco_v2 --data-root data --set queue_size=4096 --set temperature=0.2 \\
                     --precision bf16 --channels-last --out moco.safetensors
  evalsuite pretrain --method byol --recipe cifar --data cifar10 --arch resnet18 --out byol_cifar.safetensors
  evalsuite pretrain --method shuffle_learn --recipe short --dataset video --data-root data --out sal.safetensors
  torchrun --nproc_per_node 2 -m evalsuite pretrain --method swav --data-root data --out swav.safetensors
  evalsuite run --checkpoint simclr.safetensors --tasks knn --protocol quick --data-root data
"""


def add_command(sub) -> None:
    from evalsuite.console import add_command

    p = add_command(sub, "pretrain", help="pretrain a trunk with a self-supervised method", epilog=EPILOG,
                    description="Train a trunk with one method (`--list` shows them) and write a safetensors "
                                "checkpoint with every hyper-parameter in its metadata; rerunning the same command "
                                "resumes from OUT.state.pt.")
    p.add_argument("--list", action="store_true", help="list the available methods and exit")
    p.add_argument("--method", help="method name (see --list)")
    p.add_argument("--arch", help="trunk architecture (default: the recipe's, else resnet18)")
    p.add_argument("--data-root", type=Path, default=Path(os.environ.get("EVALSUITE_DATA", "data")),
                   help="directory holding the datasets")
    p.add_argument("--data", "--data-path", dest="data_path", type=Path,
                   help="explicit dataset directory (default: DATA_ROOT/<dataset layout>)")
    p.add_argument("--dataset", default="imagefolder",
                   help="dataset kind (evalsuite.data reader); the video methods take video or egomotion")
    p.add_argument("--split", default="train")
    p.add_argument("--epochs", type=int, help="default: the recipe's, else 1")
    p.add_argument("--batch-size", type=int, help="per process (default: the recipe's, else 64)")
    p.add_argument("--image-size", type=int, help="default: the recipe's, else 64")
    p.add_argument("--optimizer", choices=["sgd", "lars", "adam", "adamw"], help="default: the method's")
    p.add_argument("--lr", type=float, help="absolute learning rate (default: method lr x batch / 256)")
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--momentum", type=float)
    p.add_argument("--lars-eta", type=float, help="LARS trust coefficient (default: the method's, 0.001 in the papers)")
    p.add_argument("--warmup-epochs", type=float)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "auto"])
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--batch-views", default="auto", choices=["auto", "on", "off"],
                   help="draw the colour-distortion views per batch from the images held in memory (auto: for sets "
                        "of equal-size images of at most 64 px)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--save-every", type=int, default=0, help="also save the resume state every N steps")
    p.add_argument("--max-steps-per-epoch", type=int)
    p.add_argument("--limit-images", type=int, help="use only the first N images (videos)")
    p.add_argument("--samples-per-video", type=int, default=8, metavar="N",
                   help="video methods: examples drawn from each video per epoch (default 8)")
    p.add_argument("--no-resume", action="store_true", help="ignore an existing OUT.state.pt")
    p.add_argument("--recipe", default="paper", choices=list(RECIPES),
                   help="hyper-parameter recipe: the papers' values; each method's recipe for a run of minutes "
                        "on a few thousand small images (short); solo-learn's CIFAR config of the method, with its "
                        "views, CIFAR-10 normalisation, batch 256, 1000 epochs, 32 px and CIFAR ResNet-18 unless "
                        "given (cifar); SEER's VISSL config on a RegNetY (seer, swav only). --set still overrides")
    p.add_argument("--time-budget", type=float, metavar="SECONDS",
                   help="fit the lr schedule to this wall-clock budget and stop when it is spent")
    p.add_argument("--view-gray", type=float, metavar="P",
                   help="grayscale probability of every view of the colour-distortion presets (papers: 0.2; "
                        "1 = colour-free views, for data whose colours are per instance)")
    p.add_argument("--view-jitter", type=float, metavar="S",
                   help="scale the colour-distortion views' jitter amplitudes (SimCLR's strength s; 1 = the "
                        "papers', 0.5 = half)")
    p.add_argument("--view-blur", type=float, metavar="P",
                   help="blur probability of every view of the colour-distortion presets (default: the preset's)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a method hyper-parameter; repeatable")
    p.add_argument("--out", type=Path, default=Path("pretrained.safetensors"))
    p.add_argument("--no-progress", action="store_true")
    g = p.add_argument_group("Slurm (optional, needs submitit: the cluster extra)")
    g.add_argument("--slurm", action="store_true", help="submit to Slurm instead of running here")
    g.add_argument("--nodes", type=int, default=1)
    g.add_argument("--gpus-per-node", type=int, default=1)
    g.add_argument("--partition")
    g.add_argument("--timeout-min", type=int, default=24 * 60)
    p.set_defaults(func=cmd_pretrain)


def parse_hp(items: list[str]) -> dict[str, str]:
    """``--set KEY=VALUE`` items as {KEY: VALUE} (strings: the method casts each to its default's type)."""
    hp = {}
    for item in items:
        if "=" not in item:
            raise UserError(f"--set expects KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        hp[k.strip()] = v.strip()
    return hp


def run_settings(recipe_train: dict, a: argparse.Namespace) -> dict:
    """arch, batch size, epochs and image size: the command line's, else the recipe's, else RUN_DEFAULTS."""
    out = {}
    for key, default in RUN_DEFAULTS.items():
        given = getattr(a, key)
        out[key] = given if given is not None else recipe_train.get(key, default)
    return out


def cmd_pretrain(a: argparse.Namespace) -> int:
    from .registry import methods

    if a.list:
        from .registry import get_method

        names = sorted(methods())
        width = max(map(len, names))
        for name in names:
            print(f"{name:{width}s} {get_method(name).description}")
        return 0
    if not a.method:
        raise UserError("--method is required (see `evalsuite pretrain --list`)")
    hp = parse_hp(a.overrides)
    from .registry import get_method
    from .trainer import TrainConfig, train

    run = run_settings(get_method(a.method).recipe_overrides(a.recipe)["train"], a)
    cfg = TrainConfig(method=a.method, arch=run["arch"], data_root=str(a.data_root), dataset=a.dataset,
                      split=a.split, data_path=str(a.data_path) if a.data_path else None, out=str(a.out),
                      epochs=run["epochs"], batch_size=run["batch_size"], image_size=run["image_size"],
                      optimizer=a.optimizer, lr=a.lr,
                      weight_decay=a.weight_decay, momentum=a.momentum, lars_eta=a.lars_eta,
                      warmup_epochs=a.warmup_epochs,
                      precision=a.precision, channels_last=a.channels_last, workers=a.workers, seed=a.seed,
                      batch_views=a.batch_views, device=a.device, save_every=a.save_every,
                      max_steps_per_epoch=a.max_steps_per_epoch,
                      limit_images=a.limit_images, resume=not a.no_resume, progress=not a.no_progress, hp=hp,
                      recipe=a.recipe, time_budget_s=a.time_budget, view_gray=a.view_gray,
                      view_jitter=a.view_jitter, view_blur=a.view_blur, samples_per_video=a.samples_per_video)
    if a.slurm:
        from .launch import submit

        job = submit(cfg, nodes=a.nodes, gpus_per_node=a.gpus_per_node, partition=a.partition,
                     timeout_min=a.timeout_min, folder=Path(str(a.out) + ".slurm"))
        print(f"submitted job {job.job_id}; logs in {a.out}.slurm")
        return 0
    out = train(cfg)
    if out is not None:
        print(f"wrote {out}")
    return 0
