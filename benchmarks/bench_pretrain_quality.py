"""Pretraining quality: does a few minutes of each method beat the random-init trunk? (issues 5 and 6)

Side by side in one run, on synthetic data written by the real writers (``evalsuite.data.synthetic``):

- pretraining set: a synthetic ImageFolder ``train`` split at 64 px, ``--per-class`` images per class, labels
  unused except by ``supervised``. ``--pretrain-data objects`` (default): one object of each of the 20
  VOC-like classes per image over the VOC-like clutter (``write_object_imagefolder``: the categories the VOC
  task tests, as ImageNet's overlap PASCAL's); ``studio``: the same objects over a pool of ``--backgrounds``
  cluttered backdrops shared by every class and image (a backdrop then identifies no image, so
  instance-discrimination methods must tell images apart by their object); ``shapes``: the 8 plain shape classes of
  ``write_imagefolder``, which share nothing with the VOC-like classes but low-level statistics;
- each method in ``--methods`` trains ResNet-18 (``--arch``) with the ``short`` recipe
  (``pretrain.base.SHORT_OPTIM`` + the method's ``short`` overrides, all recorded in the checkpoint
  metadata) for a fixed wall budget (``--minutes``; the trainer fits its cosine schedule to the budget) or
  a fixed number of steps (``--steps``), at ``--px`` px crops, batch ``--batch-size``;
- the saved checkpoint AND ``random:<arch>`` (same seed) are evaluated through the real tasks at the
  ``quick`` preset with the image size set to ``--eval-px``: ``knn`` (weighted kNN top-1 on the
  ImageFolder ``val`` split against the ``train`` bank, every tap) and ``voc07_svm`` (per-class linear SVM
  with cross-validated cost, test mAP on the synthetic VOC2007 ``test`` split, every tap).

``--snapshots M1,M2`` also saves the trunk when a ``--minutes`` run's wall clock passes each mark and evaluates it
like the final one (each row's ``snapshots``): a learning curve from one run, its points mid-schedule.

The issues' acceptance: each method's kNN top-1 (best tap) and best-layer VOC mAP clearly above the
random-init rows; Jigsaw's per-layer mAP peaks at an intermediate tap. The machine load average is recorded
before and after each method (the CPU is shared), so the minutes can be read against it.

Video (``--video``): the twelve methods that learn an image trunk from video, sound or ego-motion (every method
whose ``data_kinds`` lacks ``images``; ``--methods`` picks some) pretrain on synthetic videos written once under the
data root: ``video/train`` (``evalsuite.data.synth_video.write_videos``: the same 20 object classes moving over the
VOC-like clutter, with sound; ``--videos``; ``--video-backgrounds K`` draws the clutter from a pool of K shared
backdrops) for the methods that take ``video`` data, ``egomotion/train``
(``write_egomotion``: MiniWorld walks with the camera's pose, through the navigation plug-in's recorder;
``--egomotion-sequences``) for those that only take ``egomotion`` data; ``--video-seconds`` long at 10 fps,
``--video-px`` square frames, ``--samples-per-video`` examples drawn per video per epoch. Each checkpoint and
``random:<arch>`` are evaluated as above (``knn`` on the ``--pretrain-data`` ImageFolder, default ``studio`` here,
and ``voc07_svm``).

Real photographs (``--data-folder PATH``): an ImageFolder with ``train/`` and ``test/`` (or ``val/``), or a
``.tar.gz`` of one (unpacked into the work directory), e.g. shared/realdata/cifar10_dev.tar.gz (5,000 train /
1,000 test CIFAR-10 images). Each method pretrains on its ``train`` split; it and the random-init trunk are
evaluated at ``quick`` on the same folder, each image resized to ``--eval-px`` square (32 px CIFAR images stay
as they are): ``knn`` (top-1 on the test split against the train bank) and ``places205_linear`` (the linear
probe on the train split's centre views, top-1 on the test split). No VOC.

    python -m benchmarks.bench_pretrain_quality                       # small: 2 methods, 0.5 min each
    python -m benchmarks.bench_pretrain_quality --minutes 3 --per-class 250 \\
        --methods supervised,simclr,moco_v2,byol,swav,barlow_twins,rotnet,jigsaw,colorization
    python -m benchmarks.bench_pretrain_quality --data-folder shared/realdata/cifar10_dev.tar.gz --recipe cifar \\
        --methods simclr,moco_v2,byol,swav,barlow_twins,simsiam,dino --minutes 10
    python -m benchmarks.bench_pretrain_quality --data-folder shared/realdata/cifar10_dev.tar.gz --px 32 \\
        --arch resnet18_cifar_w16 --batch-size 128 --methods simclr,moco_v2 --minutes 10 --threads 1
    python -m benchmarks.bench_pretrain_quality --video --minutes 10 --per-class 120 --voc-scale 4 \\
        --precision fp32 --no-channels-last

Prints a table and writes benchmarks/out/bench_pretrain_quality.json (``_folder.json`` with ``--data-folder``,
``_video.json`` with ``--video``; ``--tag T`` appends ``_T`` to the name).
"""

from __future__ import annotations

import argparse
import os
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import write_json
from evalsuite.errors import UserError
from pretrain.cli import parse_hp

ISSUE5 = ["simclr", "moco_v2", "byol", "swav", "barlow_twins"]
ISSUE6 = ["rotnet", "jigsaw", "colorization"]


N_CLASSES = {"objects": 20, "studio": 20, "shapes": 8}
VIDEO_FPS = 10


def video_methods() -> list[str]:
    """Every registered method that learns an image trunk from video, sound or ego-motion (no ``images`` data)."""
    from pretrain.registry import methods

    return [name for name, cls in methods().items() if "images" not in cls.data_kinds]


def video_dataset(method: str) -> str:
    """The video data ``method`` pretrains on here: ``video`` when it takes it, else its first kind (``egomotion``)."""
    from pretrain.registry import get_method

    kinds = get_method(method).data_kinds
    if "images" in kinds:
        raise UserError(f"--video: method {method!r} trains on images, not video")
    return "video" if "video" in kinds else kinds[0]


def video_count(a, kind: str) -> int:
    return a.videos if kind == "video" else a.egomotion_sequences


def make_video_data(root: Path, a, kinds: set[str]) -> dict:
    """The pretraining videos of each kind in ``kinds`` under ``root/<kind>`` (``video``: synthetic videos with
    sound; ``egomotion``: walks recorded by the navigation plug-in), written once; each description is kept in
    ``root/<kind>.txt`` so a reused root is checked."""
    from evalsuite.data.cli import egomotion_recorder
    from evalsuite.data.synth_video import write_egomotion, write_videos

    frames = max(2, round(a.video_seconds * VIDEO_FPS))
    out = {}
    for kind in sorted(kinds):
        t0, n = time.perf_counter(), video_count(a, kind)
        desc = f"{kind} seed={a.seed} train={n} frames={frames} fps={VIDEO_FPS} px={a.video_px}" + (
            f" backgrounds={a.video_backgrounds}" if kind == "video" and a.video_backgrounds else "")
        marker = root / f"{kind}.txt"
        if (root / kind).exists() and (not marker.exists() or marker.read_text() != desc):
            print(f"{root / kind}: holds other videos than {desc!r}; use a fresh --data-root", file=sys.stderr)
            raise SystemExit(2)
        if not (root / kind).exists():
            if kind == "video":
                write_videos(root, seed=a.seed, n_train=n, n_val=1, seconds=frames / VIDEO_FPS, size=a.video_px,
                             fps=VIDEO_FPS, backgrounds=a.video_backgrounds)
            else:
                write_egomotion(root, egomotion_recorder(), seed=a.seed, n_train=n, n_val=1, length=frames,
                                size=a.video_px, fps=VIDEO_FPS)
            marker.write_text(desc)
        out[kind] = {"description": desc, "seconds": round(time.perf_counter() - t0, 1)}
    return out


def make_data(root: Path, seed: int, per_class: int, voc_scale: float, kind: str = "objects",
              backgrounds: int = 16) -> dict:
    """ImageFolder (pretraining + kNN) and VOC2007 (SVM) in their real layouts under ``root``; the
    pretraining set's description is kept in ``root/imagefolder.txt`` so a reused root is checked."""
    from evalsuite.data.synthetic import write_imagefolder, write_object_imagefolder, write_voc2007

    t0 = time.perf_counter()
    desc = f"{kind} seed={seed} per_class={per_class}" + (f" backgrounds={backgrounds}" if kind == "studio" else "")
    marker = root / "imagefolder.txt"
    if (root / "imagefolder").exists() and (not marker.exists() or marker.read_text() != desc):
        print(f"{root / 'imagefolder'}: holds another pretraining set than {desc!r}; use a fresh --data-root",
              file=sys.stderr)
        raise SystemExit(2)
    if not (root / "imagefolder").exists():
        if kind == "shapes":
            write_imagefolder(root / "imagefolder", seed=seed, per_class=per_class, size=64)
        else:
            write_object_imagefolder(root / "imagefolder", seed=seed, per_class=per_class, size=64,
                                     backgrounds=backgrounds if kind == "studio" else None)
        marker.write_text(desc)
    if not (root / "VOCdevkit").exists():
        write_voc2007(root, seed=seed, scale=voc_scale)
    return {"root": str(root), "pretrain_data": desc, "imagefolder_classes": N_CLASSES[kind],
            "imagefolder_per_class": per_class, "voc_scale": voc_scale,
            "seconds": round(time.perf_counter() - t0, 1)}


def real_folder(path: Path, work: Path) -> dict:
    """The ImageFolder at ``path`` (a ``.tar.gz`` of one is unpacked under ``work`` first): its root, the split
    evaluated (``test``, else ``val``) and the image counts."""
    from evalsuite.data import open_dataset

    if path.is_file():
        dest = work / "folder"
        if not dest.exists():
            with tarfile.open(path) as tar:
                tar.extractall(dest, filter="data")
        tops = [d for d in dest.iterdir() if d.is_dir()]
        path = tops[0] if len(tops) == 1 and not (dest / "train").exists() else dest
    test = next((s for s in ("test", "val") if (path / s).is_dir()), None)
    if not (path / "train").is_dir() or test is None:
        print(f"{path}: needs train/ and test/ (or val/) class folders", file=sys.stderr)
        raise SystemExit(2)
    train, held = open_dataset("imagefolder", path, "train"), open_dataset("imagefolder", path, test)
    return {"root": str(path), "pretrain_data": f"imagefolder:{path}", "test_split": test,
            "n_train": len(train), "n_test": len(held), "classes": len(train.classes)}


def load() -> float:
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else float("nan")


def pretrain(method: str, a, root: Path, out: Path, folder: dict | None = None, dataset: str | None = None) -> dict:
    """Train ``method`` on the synthetic ImageFolder under ``root``, on ``folder``'s train split, or on the videos
    of kind ``dataset`` under ``root``."""
    from evalsuite.checkpoints import read_metadata, save_checkpoint
    from pretrain.augment import VIEW_OPTIONS
    from pretrain.registry import get_method
    from pretrain.trainer import TrainConfig, Trainer

    budget, epochs, per_epoch = a.minutes * 60, a.epochs, None
    if dataset:
        n_train = video_count(a, dataset) * a.samples_per_video
    else:
        n_train = folder["n_train"] if folder else N_CLASSES[a.pretrain_data] * a.per_class
    if a.steps:  # fixed step count instead of a wall budget: the cosine schedule spans exactly these steps
        spe = max(1, n_train // a.batch_size)
        budget, epochs = None, -(-a.steps // spe)
        per_epoch = -(-a.steps // epochs)
    cfg = TrainConfig(method=method, arch=a.arch, data_root=str(root), out=str(out), image_size=a.px,
                      dataset=dataset or "imagefolder", samples_per_video=a.samples_per_video,
                      data_path=folder["root"] if folder else None,
                      batch_size=a.batch_size, epochs=epochs, max_steps_per_epoch=per_epoch, seed=a.seed,
                      workers=a.workers, precision=a.precision, channels_last=a.channels_last, resume=False,
                      batch_views=a.batch_views,
                      progress=a.progress, recipe=a.recipe, time_budget_s=budget,
                      **{f"view_{k}": getattr(a, f"view_{k}") if k in get_method(method).view_option_names() else None
                         for k in VIEW_OPTIONS},
                      lr=a.lr, optimizer=a.optimizer, weight_decay=a.weight_decay, lars_eta=a.lars_eta,
                      warmup_epochs=a.warmup_epochs,
                      device=a.device, hp=method_hp(method, a.hp))
    l0, t0 = load(), time.perf_counter()
    marks, taken = sorted(m for m in a.snapshots if m < a.minutes) if budget else [], []

    def snapshot(tr: Trainer) -> None:
        """At each of the ``--snapshots`` wall marks: the trunk as it is, mid-schedule, beside ``out``."""
        elapsed = time.perf_counter() - tr._fit_t0
        while marks and elapsed >= marks[0] * 60:
            mark = marks.pop(0)
            path = out.with_name(f"{out.stem}_at{mark:g}min{out.suffix}")
            save_checkpoint(path, tr.method.trunk_state_dict(), tr.metadata(elapsed))
            taken.append({"at_minutes": mark, "minutes": round(elapsed / 60, 2), "steps": tr.global_step,
                          "path": str(path)})

    trainer = Trainer(cfg, on_step=snapshot if marks else None)
    trainer.fit()
    seconds = time.perf_counter() - t0
    meta = read_metadata(out)
    losses = trainer.losses
    return {"minutes": round(seconds / 60, 2), "steps": trainer.global_step, "epochs_seen":
            round(trainer.global_step / max(1, trainer.steps_per_epoch), 2),
            "loss_first": round(losses[0], 4) if losses else None,
            "loss_last": round(sum(losses[-10:]) / len(losses[-10:]), 4) if losses else None,
            "load_before": l0, "load_after": load(), "recipe": meta.get("recipe"),
            "hyperparameters": meta.get("hyperparameters"), "optimizer": meta.get("optimizer"),
            "view_options": meta.get("view_options"),
            "precision": meta.get("precision"), "image_size": meta.get("image_size"), "snapshots": taken}


def evaluate_snapshots(row: dict, evaluate_one) -> None:
    """Evaluate each snapshot of ``row`` with ``evaluate_one(checkpoint)``, in place."""
    for snap in row.get("snapshots", []):
        snap.update(evaluate_one(snap.pop("path")))


def method_hp(method: str, hp: dict[str, str]) -> dict[str, str]:
    """The ``--set`` values whose KEY is one of ``method``'s hyper-parameters."""
    from pretrain.registry import get_method

    known = get_method(method).defaults
    return {k: v for k, v in hp.items() if k in known}


def evaluate(checkpoint: str, a, root: Path, work: Path) -> dict:
    from evalsuite.runner import RunOptions, run

    overrides = [f"knn.image_size={a.eval_px}", f"voc07_svm.image_size={a.eval_px}", *a.eval_set]
    t0 = time.perf_counter()
    rep = run(RunOptions(checkpoint=checkpoint, arch=a.arch, tasks=["knn", "voc07_svm"], preset="quick",
                         overrides=overrides, data_root=root, out=work / "runs", cache_dir=work / "cache",
                         seed=a.seed, precision=a.eval_precision, progress=False, device=a.device))
    knn, svm = {}, {}
    for r in rep.results:
        if r.task == "knn" and r.metric == "top1":
            knn[r.layer] = round(r.value, 2)
        elif r.task == "voc07_svm" and r.metric == "mAP" and r.value is not None:
            svm[r.layer] = round(r.value, 2)
    best_knn = max(knn, key=knn.get) if knn else None
    best_svm = max(svm, key=svm.get) if svm else None
    return {"knn_top1": knn.get(best_knn), "knn_best_layer": best_knn, "knn_top1_per_layer": knn,
            "map": svm.get(best_svm), "map_best_layer": best_svm, "map_per_layer": svm,
            "eval_seconds": round(time.perf_counter() - t0, 1), "eval_overrides": overrides}


def evaluate_folder(checkpoint: str, a, folder: dict, work: Path) -> dict:
    """kNN and linear-probe top-1 (best tap) of ``checkpoint`` on the real folder's test split, at ``quick`` with
    every image resized to ``--eval-px`` square."""
    from evalsuite.runner import RunOptions, run

    root, split = Path(folder["root"]), folder["test_split"]
    overrides = [f"knn.data_path={root.name}", f"knn.val_split={split}", f"knn.image_size={a.eval_px}",
                 "knn.resize_mode=square", "places205_linear.dataset=imagefolder",
                 f"places205_linear.data_path={root.name}", f"places205_linear.val_split={split}",
                 f"places205_linear.image_size={a.eval_px}", "places205_linear.resize_mode=square", *a.eval_set]
    t0 = time.perf_counter()
    rep = run(RunOptions(checkpoint=checkpoint, arch=a.arch, tasks=["knn", "places205_linear"], preset="quick",
                         overrides=overrides, data_root=root.parent, out=work / "runs", cache_dir=work / "cache",
                         seed=a.seed, precision=a.eval_precision, progress=False, device=a.device))
    top1 = {"knn": {}, "places205_linear": {}}
    for r in rep.results:
        if r.metric == "top1" and r.task in top1 and r.value is not None:
            top1[r.task][r.layer] = round(r.value, 2)
    out = {"eval_seconds": round(time.perf_counter() - t0, 1), "eval_overrides": overrides}
    for task, key in (("knn", "knn"), ("places205_linear", "linear")):
        per = top1[task]
        best = max(per, key=per.get) if per else None
        out.update({f"{key}_top1": per.get(best), f"{key}_best_layer": best, f"{key}_top1_per_layer": per})
    return out


def main_folder(a, methods: list[str], work: Path) -> list[dict]:
    """The real-folder mode: random init, then each method, through kNN and the linear probe."""
    folder = real_folder(a.data_folder, work)
    rows = []
    base = {"method": f"random:{a.arch}", "minutes": 0.0, "steps": 0, "load_before": load()}
    base.update(evaluate_folder(f"random:{a.arch}", a, folder, work))
    rows.append(base)
    _print_folder_row(base)
    for m in methods:
        ck = work / f"{m}.safetensors"
        try:
            row = {"method": m, **pretrain(m, a, work, ck, folder)}
            row.update(evaluate_folder(str(ck), a, folder, work))
            evaluate_snapshots(row, lambda c: evaluate_folder(c, a, folder, work))
        except Exception as e:  # one broken method must not cost the others' measurements
            print(f"{m}: FAILED {type(e).__name__}: {e}", flush=True)
            rows.append({"method": m, "error": f"{type(e).__name__}: {e}"})
            continue
        for key in ("knn", "linear"):
            mine, rand = row[f"{key}_top1"], base[f"{key}_top1"]
            row[f"d_{key}"] = None if mine is None or rand is None else round(mine - rand, 2)
        rows.append(row)
        _print_folder_row(row)
        _write(a, folder, rows, "bench_pretrain_quality_folder")
    _print_folder_table(rows)
    _write(a, folder, rows, "bench_pretrain_quality_folder")
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", help=f"comma list (issue 5: {','.join(ISSUE5)}; issue 6: {','.join(ISSUE6)}; "
                   "default: simclr,rotnet, with --video every video method)")
    p.add_argument("--minutes", type=float, default=0.5, help="wall budget per method")
    p.add_argument("--steps", type=int, help="fixed step count per method instead of --minutes")
    p.add_argument("--snapshots", type=lambda v: [float(x) for x in v.split(",") if x], default=[],
                   metavar="M1,M2", help="also evaluate the trunk as it was after M1, M2, ... minutes of the "
                   "--minutes run (mid-schedule: the cosine spans the whole run), a learning curve in one run")
    p.add_argument("--epochs", type=int, default=10**6, help="cap on epochs under --minutes")
    p.add_argument("--arch", help="trunk (default: the recipe's, else resnet18)")
    p.add_argument("--px", type=int, help="pretraining crop size (default: the recipe's, else 64 = the quick "
                   "preset's eval size)")
    p.add_argument("--eval-px", type=int, help="evaluation image size (default: --px)")
    p.add_argument("--batch-size", type=int, help="default: the recipe's, else 32")
    p.add_argument("--per-class", type=int, default=60, help="ImageFolder train images per class (val: half)")
    p.add_argument("--voc-scale", type=float, default=1.0)
    p.add_argument("--pretrain-data", choices=sorted(N_CLASSES),
                   help="pretraining / kNN ImageFolder (see the module docstring; default objects, with --video "
                        "studio, the kNN set only)")
    p.add_argument("--backgrounds", type=int, default=16, help="backdrop pool size of --pretrain-data studio")
    p.add_argument("--recipe", default="short", choices=["short", "paper", "cifar"],
                   help="cifar: solo-learn's CIFAR configs (methods without one fail), with its batch 256, 32 px "
                        "and CIFAR ResNet-18 unless --batch-size / --px / --arch are given")
    p.add_argument("--data-folder", type=Path, metavar="PATH",
                   help="pretrain and evaluate on this real ImageFolder (train/ + test/ or val/, or a .tar.gz of "
                        "one) instead of the synthetic sets (see the module docstring)")
    p.add_argument("--video", action="store_true",
                   help="pretrain the video methods on synthetic videos / ego-motion walks (see the module docstring)")
    p.add_argument("--videos", type=int, default=200, help="--video: synthetic training videos")
    p.add_argument("--egomotion-sequences", type=int, default=64, help="--video: ego-motion training walks")
    p.add_argument("--video-seconds", type=float, default=3.0, help="--video: length of each video and walk (10 fps)")
    p.add_argument("--video-px", type=int, default=64, help="--video: frame size of the videos and walks")
    p.add_argument("--video-backgrounds", type=int, help="--video: draw the videos' backdrops from a pool of this "
                   "many shared by all videos (default: each video its own), so a backdrop identifies no video")
    p.add_argument("--samples-per-video", type=int, default=8,
                   help="--video: examples drawn from each video per epoch")
    p.add_argument("--view-gray", type=float, help="grayscale probability of the colour-distortion views "
                   "(methods that have them; default: the papers' 0.2)")
    p.add_argument("--view-jitter", type=float, help="colour-jitter strength of the colour-distortion views "
                   "(methods that have them; default: the papers', 1)")
    p.add_argument("--view-blur", type=float, help="blur probability of the colour-distortion views "
                   "(methods that have them; default: the preset's)")
    p.add_argument("--view-scale", type=float, help="smallest crop area fraction of the colour-distortion views "
                   "and of the basic crop + flip view (methods that have them; default: the recipe's at the size, "
                   "else the preset's)")
    p.add_argument("--lr", type=float, help="learning rate of every method (default: each recipe's, scaled by batch)")
    p.add_argument("--optimizer", help="optimizer of every method (default: each recipe's)")
    p.add_argument("--lars-eta", type=float, help="LARS trust coefficient of every method (default: each recipe's)")
    p.add_argument("--weight-decay", type=float, help="weight decay of every method (default: each recipe's)")
    p.add_argument("--warmup-epochs", type=float, help="lr warm-up of every method (default: each recipe's; the "
                   "cifar recipe's 10 epochs are 190 steps of 5,000 images at batch 256)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="method hyper-parameter, applied to each method that has KEY (repeatable)")
    p.add_argument("--eval-set", action="append", default=[], metavar="TASK.FIELD=VALUE",
                   help="protocol override of the evaluation tasks, after the image sizes (repeatable; e.g. "
                        "voc07_svm.costs=[1.0] for a smoke run)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "auto"],
                   help="pretraining precision (fp32 + channels_last: the fastest at 32 px on the 2-core CPU, "
                        "docs/pretraining.md)")
    p.add_argument("--eval-precision", default="fp32", choices=["fp32", "bf16", "auto"],
                   help="feature extraction precision (bf16's oneDNN warm-up per batch shape costs minutes here)")
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--batch-views", default="auto", choices=["auto", "on", "off"],
                   help="the trainer's per-batch views (pretrain.batch_views; auto: images of at most 64 px)")
    p.add_argument("--device", default="cpu", help="pretraining and evaluation device (cpu, cuda)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-root", type=Path, help="reuse/keep data here (default: a temporary directory)")
    p.add_argument("--keep", type=Path, help="keep checkpoints and feature cache in this directory")
    p.add_argument("--progress", action="store_true")
    p.add_argument("--tag", help="suffix of the JSON's name (runs side by side write their own)")
    a = p.parse_args(argv)
    methods = [m for m in (a.methods or "").split(",") if m] or (video_methods() if a.video else ["simclr", "rotnet"])
    a.methods = ",".join(methods)
    a.pretrain_data = a.pretrain_data or ("studio" if a.video else "objects")
    try:
        if a.video and a.data_folder:
            raise UserError("--video and --data-folder: pick one")
        kinds = {m: video_dataset(m) for m in methods} if a.video else {}
        a.hp = parse_hp(a.set)
        run_defaults(a, methods)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    a.eval_px = a.eval_px or a.px
    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory(prefix="bench_pq_") as tmp:
        work = a.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        if a.data_folder:
            main_folder(a, methods, work)
            return
        root = a.data_root or work / "data"
        data = make_data(root, a.seed, a.per_class, a.voc_scale, a.pretrain_data, a.backgrounds)
        name = "bench_pretrain_quality"
        if a.video:
            try:
                data = {"knn_set": data, "videos": make_video_data(root, a, set(kinds.values()))}
            except UserError as e:
                print(f"error: {e}", file=sys.stderr)
                raise SystemExit(2) from None
            name = "bench_pretrain_quality_video"
        rows = []
        base = {"method": f"random:{a.arch}", "minutes": 0.0, "steps": 0, "load_before": load()}
        base.update(evaluate(f"random:{a.arch}", a, root, work))
        rows.append(base)
        _print_row(base)
        for m in methods:
            ck = work / f"{m}.safetensors"
            try:
                row = {"method": m, **({"pretrain_dataset": kinds[m]} if m in kinds else {}),
                       **pretrain(m, a, root, ck, dataset=kinds.get(m))}
                row.update(evaluate(str(ck), a, root, work))
                evaluate_snapshots(row, lambda c: evaluate(c, a, root, work))
            except Exception as e:  # one broken method must not cost the others' measurements
                print(f"{m}: FAILED {type(e).__name__}: {e}", flush=True)
                rows.append({"method": m, "error": f"{type(e).__name__}: {e}"})
                continue
            row["beats_random_knn"] = row["knn_top1"] is not None and row["knn_top1"] > base["knn_top1"]
            row["beats_random_map"] = row["map"] is not None and row["map"] > base["map"]
            row["d_knn"] = round(row["knn_top1"] - base["knn_top1"], 2)
            row["d_map"] = round(row["map"] - base["map"], 2)
            rows.append(row)
            _print_row(row)
            _write(a, data, rows, name)  # after every method: a long run keeps what it measured
    _print_table(rows)
    _write(a, data, rows, name)


def run_defaults(a, methods: list[str]) -> None:
    """``--arch`` / ``--px`` / ``--batch-size`` left out: the recipe's (the first method's; every method with a
    recipe of run settings has the same), else resnet18 / 64 / 32."""
    from pretrain.registry import get_method

    train = get_method(methods[0]).recipe_overrides(a.recipe)["train"] if methods else {}
    a.arch = a.arch or train.get("arch", "resnet18")
    a.px = a.px or train.get("image_size", 64)
    a.batch_size = a.batch_size or train.get("batch_size", 32)


def _write(a, data: dict, rows: list[dict], name: str = "bench_pretrain_quality") -> None:
    params = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()}
    name += f"_{a.tag}" if a.tag else ""
    write_json(name, {"params": params, "data": data, "rows": rows, "load_avg_end": list(os.getloadavg())})


def _print_row(r: dict) -> None:
    print(f"{r['method']:16s} {r['minutes']:5.2f} min {r['steps']:5d} steps  kNN {r['knn_top1']:5.1f} "
          f"({r['knn_best_layer']})  mAP {r['map']:5.1f} ({r['map_best_layer']})  per-layer mAP "
          + " ".join(f"{k}={v:.1f}" for k, v in r["map_per_layer"].items())
          + f"  load {r.get('load_before')}->{r.get('load_after', '')}", flush=True)
    _print_snapshots(r)


def _print_snapshots(r: dict) -> None:
    for snap in r.get("snapshots", []):
        print(f"  after {snap['minutes']:5.2f} min {snap['steps']:5d} steps  kNN {snap['knn_top1']} "
              f"({snap['knn_best_layer']})", flush=True)


def _print_folder_row(r: dict) -> None:
    def f(v):
        return "  n/a" if v is None else f"{v:5.1f}"

    print(f"{r['method']:16s} {r['minutes']:5.2f} min {r['steps']:5d} steps  kNN {f(r['knn_top1'])} "
          f"({r['knn_best_layer']})  linear {f(r['linear_top1'])} ({r['linear_best_layer']})  "
          f"load {r.get('load_before')}->{r.get('load_after', '')}", flush=True)
    _print_snapshots(r)


def _print_folder_table(rows: list[dict]) -> None:
    print("\n| method | minutes | steps | kNN top-1 (best tap) | linear top-1 (best tap) | load avg |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['method']} | failed: {r['error']} |")
            continue
        print(f"| {r['method']} | {r['minutes']:.1f} | {r['steps']} | {r['knn_top1']} ({r['knn_best_layer']}) | "
              f"{r['linear_top1']} ({r['linear_best_layer']}) | {r.get('load_before')}-{r.get('load_after', '')} |")


def _print_table(rows: list[dict]) -> None:
    """The markdown table; a video-mode row names its pretraining data after the method."""
    taps = list(rows[0]["map_per_layer"])
    print("\n| method | minutes | steps | kNN top-1 (best tap) | VOC mAP (best tap) | "
          + " | ".join(f"mAP {t}" for t in taps) + " | load avg |")
    print("|" + "---|" * (6 + len(taps)))
    for r in rows:
        if "error" in r:
            print(f"| {r['method']} | failed: {r['error']} |")
            continue
        label = r["method"] + (f" ({r['pretrain_dataset']})" if "pretrain_dataset" in r else "")
        print(f"| {label} | {r['minutes']:.1f} | {r['steps']} | {r['knn_top1']:.1f} ({r['knn_best_layer']}) | "
              f"{r['map']:.1f} ({r['map_best_layer']}) | "
              + " | ".join(f"{r['map_per_layer'].get(t, float('nan')):.1f}" for t in taps)
              + f" | {r.get('load_before')}-{r.get('load_after', '')} |")


if __name__ == "__main__":
    main()
