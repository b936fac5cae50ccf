"""``evalsuite data``: generate synthetic datasets in real formats."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_command(sub) -> None:
    p = sub.add_parser("data", help="generate or check datasets",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="examples:\n  evalsuite data synth --kind imagefolder --out data/demo --seed 0")
    dsub = p.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)
    s = dsub.add_parser("synth", help="write a synthetic dataset in a real on-disk format")
    s.add_argument("--kind", default="imagefolder", choices=["imagefolder"], help="dataset format")
    s.add_argument("--out", type=Path, required=True, help="data root to write into")
    s.add_argument("--seed", type=int, default=0, help="random seed (same seed, same bytes)")
    s.add_argument("--size", type=int, default=20, help="images per class (train split)")
    s.add_argument("--image-size", type=int, default=64, help="image side in pixels")
    s.set_defaults(func=cmd_synth)


def cmd_synth(a: argparse.Namespace) -> int:
    from .synthetic import write_imagefolder

    root = write_imagefolder(a.out / "imagefolder", seed=a.seed, per_class=a.size, size=a.image_size)
    print(f"wrote {a.kind} data to {root}")
    return 0
