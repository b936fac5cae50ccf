"""``evalsuite data``: generate synthetic datasets in real formats (``synth``) and check a dataset (``check``)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..console import HelpFormatter
from ..errors import BadData, UserError

# what --kind all writes: every image kind, and the two transfer stand-ins the demo evaluates (linear_transfer on
# cifar10 and dtd, fewshot on eurosat)
SYNTH_KINDS = ("imagefolder", "imagenet", "voc", "places", "nyuv2", "cifar10", "dtd", "eurosat")
# per class at --size 1 and the least, for the transfer kinds --kind all writes: a quick few-shot episode draws
# 5 + 15 images of a class, so eurosat keeps 20 per class at any size
ALL_TRANSFER_PER_CLASS = {"dtd": (4, 2), "eurosat": (20, 20)}
VIDEO_KINDS = ("video", "egomotion")  # written only when asked for (egomotion needs the navigation plug-in)
# the transfer suite's datasets with a synthetic writer (evalsuite/data/synth_transfer.py), written only when asked
# for, one by one or all with --kind transfer
TRANSFER_KINDS = ("fgvc_aircraft", "caltech101", "stanford_cars", "dtd", "flowers102", "food101", "oxford_pets",
                  "sun397", "eurosat", "isic", "chestx", "cropdisease")
ALIASES = {"voc": "voc2007", "places": "places205"}
CHECK_KINDS = ("imagefolder", "imagenet", "voc", "voc2007", "places", "places205", "nyuv2", "cifar10", "cifar100",
               "digits", *VIDEO_KINDS, *TRANSFER_KINDS)
SPLITS = {"imagefolder": ("train", "val"), "imagenet": ("train", "val"), "voc2007": ("trainval", "test"),
          "places205": ("train", "val"),
          "nyuv2": ("train", "test"), "cifar10": ("train", "test"), "cifar100": ("train", "test"),
          "digits": ("train", "test"), "video": ("train", "val"), "egomotion": ("train", "val"),
          **{k: ("test",) if k in ("eurosat", "isic", "chestx", "cropdisease") else ("train", "val", "test")
             for k in TRANSFER_KINDS}}
# plug-ins offer an ego-motion recorder (frames + camera poses) here; the navigation task registers MiniWorld's
RECORDER_GROUP = "evalsuite.recorders"

EPILOG = """\
examples:
  evalsuite data synth --out data/demo --seed 0                 every kind, default size, into one data root
  evalsuite data synth --kind voc --out data/big --size 10      10x the images of the default VOC stand-in
  evalsuite data synth --kind nyuv2 --nyu-format dir --out data/d
  evalsuite data synth --kind imagenet --imagenet-layout folder --out data/d
  evalsuite data check --kind imagenet --root ~/data             (~/data/imagenet: class folders or the official val)
  evalsuite data check --kind voc --root ~/data                 (~/data/VOCdevkit/VOC2007, or the folder itself)
  evalsuite data check --kind places --root data/demo --skip-corrupt
  evalsuite data synth --kind video --out data/v --seconds 5     videos with sound (H.264 + AAC in MP4)
  evalsuite data synth --kind egomotion --out data/v            MiniWorld frames with camera poses (needs [nav])
  evalsuite data check --kind video --root ~/clips --split all  every video file under ~/clips
  evalsuite data synth --kind transfer --out data/t             the transfer suite's stand-ins (Aircraft ... ChestX)
  evalsuite data check --kind dtd --root ~/data                 (~/data/dtd, torchvision's layout)
"""


def add_command(sub) -> None:
    p = sub.add_parser("data", help="generate or check datasets", formatter_class=HelpFormatter,
                       epilog=EPILOG)
    dsub = p.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)
    s = dsub.add_parser("synth", help="write synthetic datasets in their real on-disk formats",
                        formatter_class=HelpFormatter, epilog=EPILOG)
    kinds = list(dict.fromkeys([*SYNTH_KINDS, *VIDEO_KINDS, *TRANSFER_KINDS, "transfer", "all"]))
    s.add_argument("--kind", default="all", choices=kinds,
                   help="dataset to write (default all: every image kind into the one data root, with the transfer "
                        "suite's dtd and eurosat; transfer: every transfer-suite kind)")
    s.add_argument("--out", type=Path, required=True, help="data root to write into (each kind in its usual sub-path)")
    s.add_argument("--seed", type=int, default=0, help="random seed (same seed, byte-identical files)")
    s.add_argument("--size", type=float, default=1.0,
                   help="scale factor on the number of images (1.0: ~400 VOC, 400 Places, 96 NYUv2, 240 ImageFolder, "
                        "128 ImageNet, 600 CIFAR images, 16 videos, 10 ego-motion sequences; transfer kinds: 5 classes "
                        "x 6 images per split, with --kind all dtd 4 and eurosat 20 (at least 20))")
    s.add_argument("--image-size", type=int, default=None, help="image side in pixels (default: each kind's own)")
    s.add_argument("--nyu-format", choices=["mat", "dir"], default="mat",
                   help="NYUv2 layout: labeled .mat + splits.mat (default) or per-frame files")
    s.add_argument("--imagenet-layout", choices=["official", "folder"], default="official",
                   help="ImageNet val layout: flat with the devkit's ground truth (default) or class folders")
    s.add_argument("--seconds", type=float, default=3.0, help="video / ego-motion sequence length")
    s.add_argument("--fps", type=int, default=10, help="video frame rate (ego-motion: one frame per step)")
    s.add_argument("--codec", choices=["h264", "mpeg4", "ffv1"], default="h264",
                   help="video codec: H.264 + AAC in MP4, MPEG-4 part 2 + AAC in MP4, or lossless FFV1 + FLAC in "
                        "Matroska (ego-motion is always FFV1)")
    s.add_argument("--backgrounds", type=int, default=None, metavar="K",
                   help="videos: draw every backdrop from one pool of K shared by all videos (default: each video "
                        "its own clutter, which then identifies the video)")
    s.add_argument("--env", action="append", default=None,
                   help="ego-motion environment(s), cycled over the sequences (default: MiniWorld OneRoom, "
                        "FourRooms, TMaze, Maze)")
    s.set_defaults(func=cmd_synth)
    c = dsub.add_parser("check", help="parse a dataset, decode every file and summarise it (exit 2 on bad data)",
                        formatter_class=HelpFormatter, epilog=EPILOG)
    c.add_argument("--kind", required=True, choices=CHECK_KINDS)
    c.add_argument("--root", type=Path, default=Path("."),
                   help="the data root (the kind's usual sub-path is looked up) or the dataset folder itself")
    c.add_argument("--split", action="append", help="split(s) to check (default: the kind's usual two)")
    c.add_argument("--skip-corrupt", action="store_true", help="count and report unreadable images instead of failing")
    c.set_defaults(func=cmd_check)


def synth(kind: str, out: Path, seed: int = 0, scale: float = 1.0, image_size: int | None = None,
          nyu_format: str = "mat", imagenet_layout: str = "official", seconds: float = 3.0, fps: int = 10,
          codec: str = "h264", envs: list[str] | None = None, backgrounds: int | None = None) -> dict[str, Path]:
    """Write one kind (or "all") under the data root ``out``; returns {kind: written path}."""
    from . import synth_video as V
    from . import synthetic as S

    kinds = SYNTH_KINDS if kind == "all" else TRANSFER_KINDS if kind == "transfer" else (kind,)
    px = {} if image_size is None else {"image_size": image_size}
    done: dict[str, Path] = {}
    for k in kinds:
        if k == "imagefolder":
            done[k] = S.write_imagefolder(out / "imagefolder", seed=seed, per_class=max(1, round(20 * scale)),
                                          size=image_size or 64)
        elif k == "imagenet":
            done[k] = S.write_imagenet(out, seed=seed, scale=scale, layout=imagenet_layout, **px)
        elif k == "voc":
            done[k] = S.write_voc2007(out, seed=seed, scale=scale, **px)
        elif k == "places":
            done[k] = S.write_places205(out, seed=seed, scale=scale, **px)
        elif k == "nyuv2":
            hw = {} if image_size is None else {"height": image_size * 3 // 4, "width": image_size}
            done[k] = S.write_nyuv2(out, seed=seed, scale=scale, fmt=nyu_format, **hw)
        elif k == "cifar10":
            done[k] = S.write_cifar10(out, seed=seed, scale=scale)
        elif k == "video":
            done[k] = V.write_videos(out, seed=seed, scale=scale, seconds=seconds, size=image_size or 64, fps=fps,
                                     codec_name=codec, backgrounds=backgrounds)
        elif k in TRANSFER_KINDS:
            from .synth_transfer import DEFAULT_PER_CLASS, write_transfer

            base, least = ALL_TRANSFER_PER_CLASS[k] if kind == "all" else (DEFAULT_PER_CLASS, 1)
            done[k] = write_transfer(k, out, per_class=max(least, round(base * scale)), seed=seed,
                                     image_size=image_size or 32)
        elif k == "egomotion":
            done[k] = V.write_egomotion(out, egomotion_recorder(), seed=seed, scale=scale,
                                        length=max(2, round(seconds * fps)), size=image_size or 64,
                                        envs=envs or V.EGOMOTION_ENVS, fps=fps)
        else:  # pragma: no cover - argparse restricts choices
            raise UserError(f"unknown synthetic kind {k!r}")
    return done


def egomotion_recorder():
    """The ego-motion recorder a plug-in offers (entry point ``egomotion`` of ``evalsuite.recorders``)."""
    from ..registry import entry_points

    ep = entry_points(RECORDER_GROUP).get("egomotion")
    if ep is None:
        raise UserError(f"no ego-motion recorder is installed (the navigation plug-in offers one through the "
                        f"{RECORDER_GROUP} entry point): reinstall evalsuite with the [nav] extra, "
                        "pip install -e '.[nav]'")
    try:
        return ep.load()
    except ImportError as e:
        raise UserError(f"the ego-motion recorder ({ep.value}) cannot be imported ({e}); install the [nav] "
                        "extra") from None


def cmd_synth(a: argparse.Namespace) -> int:
    if a.size <= 0:
        raise UserError(f"--size must be positive, got {a.size}")
    if a.seconds <= 0 or a.fps <= 0:
        raise UserError(f"--seconds and --fps must be positive, got {a.seconds} and {a.fps}")
    if a.backgrounds is not None and a.backgrounds < 1:
        raise UserError(f"--backgrounds must be at least 1, got {a.backgrounds}")
    t0 = time.perf_counter()
    for k, path in synth(a.kind, a.out, a.seed, a.size, a.image_size, a.nyu_format, a.imagenet_layout, a.seconds,
                         a.fps, a.codec, a.env, a.backgrounds).items():
        print(f"wrote {k} to {path}")
    print(f"done in {time.perf_counter() - t0:.1f}s (seed {a.seed}, size {a.size})")
    return 0


def resolve_root(kind: str, root: Path) -> Path:
    from . import DATA_LAYOUT

    sub = DATA_LAYOUT.get(kind, kind)
    if sub and (root / sub).exists():
        return root / sub
    return root


def check_dataset(kind: str, root: Path, split: str, skip_corrupt: bool = False) -> dict:
    """Open one split and touch every sample (image decode, annotations, normals); returns a summary."""
    import numpy as np

    from . import open_dataset

    opts = {"skip_corrupt": True} if skip_corrupt and kind != "digits" else {}
    ds = open_dataset(kind, root, split, **opts)
    if len(ds) == 0:
        raise BadData(f"split {split!r} is empty", root)
    s = ds.describe()
    if kind in VIDEO_KINDS:  # decode every frame and every audio sample
        decoded = [ds.check(i) for i in range(len(ds))]
        s["audio_seconds"] = round(sum(d["audio_samples"] / max(1, v.sample_rate)
                                       for d, v in zip(decoded, ds.videos)), 2)
        if kind == "egomotion":
            rel = np.concatenate([ds.relative(i) for i in range(len(ds))])
            s["mean_step_m"] = round(float(np.abs(rel[:, 0]).mean()), 4)
            s["mean_turn_deg"] = round(float(np.degrees(np.abs(rel[:, 2])).mean()), 2)
    else:
        for i in range(len(ds)):
            ds.load_image(i)
    if kind == "voc2007":
        s["objects"] = ds.check_annotations()
        s["difficult_objects"] = int(sum(ds.annotations(i)["difficult"].sum() for i in range(len(ds))))
        # image-class pairs whose every object is difficult (label 0): voc07_svm's default trains them as
        # negatives (difficult_in_train=negative) and leaves them out of the test AP
        s["difficult_only_labels"] = int((ds.label_matrix == 0).sum())
    elif kind == "nyuv2":
        s["valid_fraction"] = round(float(np.mean([ds.valid_mask(i).mean() for i in range(len(ds))])), 4)
        ds.normals(0)
    elif hasattr(ds, "labels"):
        s["classes"] = len(ds.classes)
        s["per_class_min"] = int(np.bincount(ds.labels, minlength=len(ds.classes)).min())
    s["fingerprint"] = ds.fingerprint()[:16]
    return s


def cmd_check(a: argparse.Namespace) -> int:
    kind = ALIASES.get(a.kind, a.kind)
    root = a.root if kind == "digits" else resolve_root(kind, a.root)
    skipped = 0
    for split in a.split or SPLITS[kind]:
        s = check_dataset(kind, root, split, a.skip_corrupt)
        skipped += s.get("skipped_corrupt", 0)
        print(f"{kind} {split}: " + ", ".join(f"{k}={v}" for k, v in s.items() if k not in ("kind", "split")))
    if skipped:
        print(f"skipped {skipped} corrupt file(s) (--skip-corrupt)")
    print("ok")
    return 0
