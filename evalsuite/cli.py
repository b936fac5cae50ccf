"""The ``evalsuite`` command line.

Built-in sub-commands: ``run``, ``list``, ``inspect``, ``extract``, ``demo``, ``watch``. Other modules
add theirs (``data``, ``pretrain``, ``leaderboard``, ``compare``) through the
``evalsuite.commands`` entry-point group, so this file never changes for them.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path

from . import __version__, registry
from .console import HelpFormatter
from .errors import UserError
from .protocols import INTERPOLATIONS, POOLINGS, RESIZE_MODES

EPILOG_RUN = """\
examples:
  evalsuite run --checkpoint random:resnet18 --tasks centroid --protocol quick --data-root data/demo
  evalsuite run --checkpoint moco_v2_800ep.pth.tar --tasks voc07_svm --layers res4,res5 \\
                --data-root /datasets --set svm.backend=sklearn
  evalsuite run --checkpoint ckpt.safetensors --tasks all --protocol goyal19 --out runs/mine
  evalsuite run --checkpoint ckpt.pth --tasks places205_linear,knn --seeds 0,1,2   # mean ± std over seeds
  evalsuite run --schedule leaderboard.toml          # resumable; --force recomputes finished jobs
  evalsuite run --checkpoint ckpt.pth --tasks all --launcher slurm --slurm-partition gpu
  torchrun --nproc_per_node=8 -m evalsuite run --checkpoint ckpt.pth --tasks places205_linear,knn --device cuda
                                                     # linear probes data-parallel, knn on rank 0 (docs/scale.md)
"""


class Parser(argparse.ArgumentParser):
    """Every command's parser: a usage error is one line naming the command, exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def seed_list(text: str) -> list[int]:
    """``--seeds 0,1,2``: comma-separated integers."""
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        seeds = []
    if not seeds:
        raise argparse.ArgumentTypeError(f"takes comma-separated integers such as 0,1,2, got {text!r}")
    return seeds


def memory_size(text: str) -> int:
    """A size such as 16G or 512MiB, in bytes (evalsuite.cache.parse_size)."""
    from .cache import parse_size

    try:
        return parse_size(text)
    except UserError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="evalsuite",
        description="Evaluate frozen visual representations on transfer benchmarks.",
        formatter_class=HelpFormatter,
        epilog="Run `evalsuite COMMAND --help` for each command's options and examples.",
    )
    p.add_argument("--version", action="version", version=f"evalsuite {__version__}")
    p.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    _add_run(sub)
    _add_list(sub)
    _add_inspect(sub)
    _add_extract(sub)
    _add_demo(sub)
    _add_watch(sub)
    plugins = dict(sorted(registry.entry_points(registry.COMMAND_GROUP).items()))
    plugins.update(registry.registered(registry.COMMAND_GROUP))
    for name, ep in plugins.items():
        try:
            (ep.load() if hasattr(ep, "load") else ep)(sub)
        except ImportError as e:  # an optional extra is not installed: the command says so when used
            stub = sub.add_parser(name, help=f"(unavailable: {e})")
            stub.set_defaults(func=lambda a, e=e, n=name: _raise(UserError(f"command {n!r} is unavailable: {e}")))
    for command in sub.choices.values():  # --debug works after the sub-command too
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return p


def _raise(e: Exception):
    raise e


def add_checkpoint_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--checkpoint", required=required,
                   help="checkpoint path, random:<arch> or torchvision:<arch> (see `evalsuite list --formats`)")
    p.add_argument("--arch", help="architecture (inferred from metadata or keys when omitted)")
    p.add_argument("--allow-partial", action="store_true", help="evaluate even if trunk keys are missing")
    p.add_argument("--trust-pickle", action="store_true",
                   help="DANGEROUS: allow pickles that run code (weights_only=False)")
    p.add_argument("--weights", metavar="KEY",
                   help="the file's entry to evaluate, e.g. state_dict (default: EMA weights, DINO's teacher; "
                        "`evalsuite inspect` shows the choice)")
    p.add_argument("--name", metavar="NAME",
                   help="the checkpoint's name in result records (default: the file name without suffixes)")


def add_runtime_args(p: argparse.ArgumentParser, seeds: bool = False) -> None:
    """Device, seed, extraction and cache options; ``seeds``: also ``--seeds``, which ``--seed`` excludes."""
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    seed = p.add_mutually_exclusive_group() if seeds else p
    seed.add_argument("--seed", type=int, default=0, help="seed for everything random (random init included)")
    if seeds:
        seed.add_argument("--seeds", type=seed_list, metavar="S,S,...",
                          help="run each seeded task once per seed (a probe's init and order, low-shot samples, "
                               "trained heads), the seed-independent ones once; features are extracted once and a "
                               "random init is built from the first seed (docs/uncertainty.md#seeds)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="extraction batch size")
    p.add_argument("--workers", type=non_negative_int, default=0, help="data-loading worker processes")
    p.add_argument("--precision", default=None, choices=["auto", "fp32", "bf16"],
                   help="extraction precision (default: the preset's, fp32 for goyal19 and vissl as the references, "
                        "auto for quick; `extract`: auto); auto = bf16 autocast + channels_last where supported")
    p.add_argument("--decode", default=None, choices=["auto", "cpu", "gpu"],
                   help="image decoding: cpu (PIL/libjpeg in the loading workers), gpu (JPEGs decoded in batches "
                        "by nvjpeg on the CUDA device), auto (gpu when extracting on CUDA); default: the preset's, cpu "
                        "for goyal19, vissl, dino21 and ericsson21, auto for quick (`extract`: auto). Part of the "
                        "cache key")
    p.add_argument("--cache-dir", type=Path, help="feature cache (default $EVALSUITE_CACHE, else "
                   "$XDG_CACHE_HOME/evalsuite/features, i.e. ~/.cache/evalsuite/features)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _add_task_selection(p: argparse.ArgumentParser, tasks: str, protocol: str) -> None:
    """The options that say what to evaluate and where the data is (run, watch)."""
    p.add_argument("--tasks", default=tasks, help="comma-separated task names, or all")
    p.add_argument("--layers", help="comma-separated taps (default: each task's own)")
    p.add_argument("--protocol", default=protocol, help="preset: goyal19, vissl, dino21, ericsson21 or quick")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a protocol field (task.key=value or key=value); repeatable")
    p.add_argument("--data-root", type=Path, default=None,
                   help="directory holding the datasets (default $EVALSUITE_DATA or data/)")


def _add_run(sub) -> None:
    from .stats import DEFAULT_LEVEL, DEFAULT_RESAMPLES

    p = sub.add_parser("run", help="evaluate a checkpoint on tasks", formatter_class=HelpFormatter,
                       description="Evaluate one checkpoint, frozen, on the selected tasks and append one "
                                   "result record per (task, layer, metric) to OUT/results.jsonl.",
                       epilog=EPILOG_RUN)
    add_checkpoint_args(p, required=False)
    p.add_argument("--schedule", type=Path, metavar="FILE",
                   help="run every pending (checkpoint, task, preset, seed) job of a TOML/JSON schedule instead")
    p.add_argument("--force", action="store_true", help="with --schedule: recompute finished jobs too")
    p.add_argument("--dry-run", action="store_true", help="print the plan (or a schedule's pending jobs) and stop")
    p.add_argument("--verbose", action="store_true", help="print every result record, not each task's best layer")
    p.add_argument("--ci-resamples", type=non_negative_int, default=DEFAULT_RESAMPLES, metavar="N",
                   help="bootstrap resamples of the test samples for each number's interval (it covers the "
                        "test-set draw, not seeds; 0: none)")
    p.add_argument("--ci-level", type=float, default=DEFAULT_LEVEL, metavar="P",
                   help="confidence level of the intervals")
    _add_task_selection(p, tasks="all", protocol="goyal19")
    p.add_argument("--out", type=Path, default=None, help="output directory for results.jsonl (default runs/)")
    p.add_argument("--launcher", default="none", choices=["none", "local", "debug", "slurm"],
                   help="none: run here; slurm/local/debug: one submitit job per task (logs in OUT/submitit)")
    p.add_argument("--slurm-partition", help="Slurm partition for --launcher slurm")
    p.add_argument("--slurm-account", help="Slurm account for --launcher slurm")
    p.add_argument("--memory-budget", metavar="SIZE", type=memory_size, default=None,
                   help="features a task holds in memory at once, e.g. 16G (default $EVALSUITE_MEMORY_BUDGET, else "
                        "4G); larger features are streamed from the cache (docs/scale.md)")
    p.add_argument("--array", type=non_negative_int, default=None, metavar="N",
                   help="with --launcher: extract a split of at least --array-min-images images as an array job of N "
                        "tasks (each a disjoint set of cache shards); 0: never (default 8)")
    p.add_argument("--array-min-images", type=non_negative_int, default=None, metavar="IMAGES",
                   help="the smallest split extracted as an array job (default 100000: ImageNet and Places205 train, "
                        "not VOC)")
    add_runtime_args(p, seeds=True)
    p.set_defaults(func=cmd_run)


def cmd_run(a: argparse.Namespace) -> int:
    from .distributed import env_rank, env_world_size
    from .runner import RunOptions, run

    if bool(a.schedule) == bool(a.checkpoint):
        raise UserError("evalsuite run needs exactly one of --checkpoint or --schedule")
    if env_world_size() > 1 and (a.schedule or a.launcher != "none"):  # torchrun: `run` starts the process group
        raise UserError(f"{'--schedule' if a.schedule else '--launcher'} runs its own jobs: run `evalsuite run` "
                        "once, not under torchrun")
    if a.schedule:
        from evalsuite.schedule import run_schedule

        if a.seeds:
            raise UserError("--seeds is for --checkpoint runs: a schedule lists its own seeds (seeds = [0, 1, 2])")
        rep = run_schedule(a.schedule, force=a.force, out=a.out, data_root=a.data_root, cache_dir=a.cache_dir,
                           device=None if a.device == "cpu" else a.device, tasks=None if a.tasks == "all" else a.tasks,
                           dry_run=a.dry_run, progress=not a.no_progress)
        return rep.exit_code
    a.data_root = a.data_root or Path(os.environ.get("EVALSUITE_DATA", "data"))
    a.out = a.out or Path("runs")

    opts = RunOptions(
        checkpoint=a.checkpoint, arch=a.arch, tasks=[a.tasks], layers=[a.layers] if a.layers else None,
        preset=a.protocol, overrides=a.overrides, data_root=a.data_root, out=a.out, device=a.device,
        seed=a.seed, seeds=a.seeds, batch_size=a.batch_size, workers=a.workers, cache_dir=a.cache_dir,
        precision=a.precision, memory_budget=a.memory_budget,
        allow_partial=a.allow_partial, trust_pickle=a.trust_pickle, weights=a.weights, name=a.name,
        progress=not a.no_progress, show_plan=True, dry_run=a.dry_run, ci_resamples=a.ci_resamples,
        ci_level=a.ci_level, decode=a.decode, array=_array_options(a),
    )
    if a.launcher != "none" and not a.dry_run:  # a dry run prints the plan here and submits nothing
        return _run_launched(opts, a)
    report = run(opts)
    if a.dry_run or env_rank() != 0:  # under torchrun rank 0 alone prints and writes
        return 0
    if not report.results and report.skipped:
        looked = "; ".join(f"{name}: {why}" for name, why in report.skipped)
        raise UserError(f"every requested task was skipped (data root {a.data_root}; {looked})")
    print_results(report.results, title=f"{report.checkpoint.spec} ({report.checkpoint.arch}, {a.protocol})",
                  verbose=a.verbose)
    print(f"{len(report.results)} result records appended to {report.results_file}")
    return 0


def _array_options(a: argparse.Namespace):
    """The array extraction of `evalsuite run --launcher ...` (None without a launcher or with --array 0)."""
    from .extract_array import DEFAULT_MIN_IMAGES, DEFAULT_TASKS, ArrayExtraction

    tasks = DEFAULT_TASKS if a.array is None else a.array
    if a.launcher == "none" or tasks == 0:
        if a.array or a.array_min_images is not None:
            raise UserError("--array and --array-min-images need --launcher local, debug or slurm")
        return None
    return ArrayExtraction(tasks=tasks, launcher=a.launcher, folder=Path(a.out) / "submitit" / "extract",
                           min_images=DEFAULT_MIN_IMAGES if a.array_min_images is None else a.array_min_images,
                           slurm_partition=a.slurm_partition, slurm_account=a.slurm_account)


def _run_launched(opts, a: argparse.Namespace) -> int:
    from .launch import launch, split_by_task

    jobs, all_mode = split_by_task(opts)
    summaries = launch(jobs, a.launcher, Path(a.out) / "submitit", skip_missing_data=all_mode,
                       slurm_partition=a.slurm_partition, slurm_account=a.slurm_account)
    n = 0
    for s in summaries:
        if s.skipped:
            print(f"skipped {s.task}: {s.skipped}")
        else:
            print(f"{s.task}: {s.n_results} result records")
            n += s.n_results
    print(f"{n} result records appended to {Path(a.out) / 'results.jsonl'}")
    return 0


def print_results(results, title: str = "results", verbose: bool = False) -> None:
    """Every record with ``verbose``; otherwise each task's headline metrics at their best layer (baselines, whose
    note starts with "baseline", left out), as mean ± sample std over the seeds of ``--seeds``."""
    from .console import table

    def shown(v):
        return "n/a" if v is None else f"{v:.4g}"

    print(title)
    several = len({r.seed for r in results}) > 1
    if verbose:
        rows = [(r.task, r.dataset, r.split, r.layer, r.metric, *((r.seed,) if several else ()), shown(r.value))
                for r in results]
        print(table(rows, ("task", "dataset", "split", "layer", "metric", *(("seed",) if several else ()), "value"),
                    right=("value",)))
        return
    rows = []
    for task in dict.fromkeys(r.task for r in results):
        mine = [r for r in results if r.task == task]
        headline = getattr(_task_or_none(task), "headline_metrics", None) or (mine[0].metric,)
        lower = getattr(_task_or_none(task), "lower_is_better", ())
        for metric in headline:
            group = [r for r in mine if r.metric == metric and not r.note.startswith("baseline")]
            if not group:
                continue
            entries = [(r, vals) for r, vals in across_seeds(group) if vals] or [(group[0], [])]
            pick = min if metric in lower else max
            best, values = pick(entries, key=lambda e: sum(e[1]) / len(e[1]) if e[1] else float("nan"))
            rows.append((task, best.dataset, metric, best.layer, mean_std_text(values), len(mine)))
    print(table(rows, ("task", "dataset", "metric", "best layer", "value", "records"), right=("value", "records")))
    print("(each task's headline metric at its best layer" + (", mean ± std over seeds" if several else "")
          + "; --verbose prints every record)")


def across_seeds(records: list) -> list[tuple]:
    """``(record, [its value at each seed])`` for one task's records of one metric: a task emits its records in
    the same order at every seed, so the i-th records of the seeds are one number (lowshot_svm's k, say, is not in
    the key); records that do not line up so are each their own entry. None values are left out."""
    per_seed: dict = {}
    for r in records:
        per_seed.setdefault(r.seed, []).append(r)
    runs = list(per_seed.values())

    def where(r) -> tuple:
        return r.dataset, r.split, r.layer, r.note

    if any([where(r) for r in run] != [where(r) for r in runs[0]] for run in runs):
        return [(r, [r.value] if r.value is not None else []) for r in records]
    return [(rs[0], [r.value for r in rs if r.value is not None]) for rs in zip(*runs)]


def mean_std_text(values: list[float]) -> str:
    """One value as it is; several (one per seed) as ``mean ± sample std (n=...)``, the leaderboard's form; none:
    n/a."""
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.4g}"
    mean = sum(values) / len(values)
    std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
    return f"{mean:.4g} ± {std:.2g} (n={len(values)})"


def _task_or_none(name: str):
    try:
        return registry.get_task(name)
    except UserError:
        return None


def _add_list(sub) -> None:
    p = sub.add_parser("list", help="list tasks, methods, presets, checkpoint formats, architectures",
                       formatter_class=HelpFormatter,
                       epilog="examples:\n  evalsuite list\n  evalsuite list --presets --tasks-only voc07_svm")
    p.add_argument("--tasks", action="store_true", help="tasks only")
    p.add_argument("--methods", action="store_true", help="pretraining methods only")
    p.add_argument("--presets", action="store_true", help="every task's resolved protocol per preset")
    p.add_argument("--formats", action="store_true", help="checkpoint formats only")
    p.add_argument("--archs", action="store_true", help="architectures and their taps")
    p.add_argument("--tasks-only", nargs="*", default=None, metavar="TASK", help="restrict --presets to tasks")
    p.set_defaults(func=cmd_list)


def cmd_list(a: argparse.Namespace) -> int:
    from .checkpoints import FORMATS
    from .protocols import PRESETS, format_protocol
    from .trunks import ARCHS

    everything = not (a.tasks or a.methods or a.presets or a.formats or a.archs)
    if a.tasks or everything:
        print("tasks:")
        for name in registry.task_names():
            t = registry.get_task(name)
            print(f"  {name:18s} {getattr(t, 'description', '')}")
    if a.methods or everything:
        print("pretraining methods:")
        for name in registry.method_names():
            try:
                doc = getattr(registry.get_method(name), "description", "") or ""
            except UserError as e:
                doc = f"(unavailable: {e})"
            print(f"  {name:18s} {doc}")
    if a.presets or everything:
        print("protocol presets:")
        for name, text in PRESETS.items():
            print(f"  {name:10s} {text}")
    if a.presets:
        for name in a.tasks_only or registry.task_names():
            t = registry.get_task(name)
            for preset in PRESETS:
                print(f"\n[{name} / {preset}]")
                try:
                    print(format_protocol(t.default_protocol(preset)))
                except UserError as e:
                    print(f"(refused: {e})")
    if a.formats or everything:
        print("checkpoint formats:")
        for name, text in FORMATS.items():
            print(f"  {name:16s} {text}")
    if a.archs or everything:
        print("architectures:")
        for name, info in ARCHS.items():
            taps = list(info["taps"])
            shown = ", ".join(taps) if len(taps) <= 8 else f"{', '.join(taps[:2])}, … {', '.join(taps[-3:])}"
            print(f"  {name:22s} taps: {shown}")
    return 0


def _add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="show a checkpoint's format, architecture and key-match report",
                       formatter_class=HelpFormatter,
                       epilog="examples:\n  evalsuite inspect moco_v2_800ep.pth.tar\n"
                              "  evalsuite inspect ckpt.safetensors --arch resnet18 --keys")
    p.add_argument("checkpoint", help="checkpoint path, random:<arch> or torchvision:<arch>")
    p.add_argument("--arch", help="architecture (inferred when omitted)")
    p.add_argument("--allow-partial", action="store_true", help="report instead of refusing on missing keys")
    p.add_argument("--trust-pickle", action="store_true", help="DANGEROUS: allow pickles that run code")
    p.add_argument("--weights", metavar="KEY", help="the file's entry to inspect, e.g. state_dict")
    p.add_argument("--keys", action="store_true", help="list every missing and unexpected key")
    p.set_defaults(func=cmd_inspect)


def cmd_inspect(a: argparse.Namespace) -> int:
    import json

    from .checkpoints import load_checkpoint

    ck = load_checkpoint(a.checkpoint, arch=a.arch, allow_partial=a.allow_partial, trust_pickle=a.trust_pickle,
                         weights=a.weights)
    r = ck.report
    note = ck.weights_note()
    print(f"checkpoint: {ck.spec}")
    print(f"name:       {ck.name}")
    print(f"sha256:     {ck.file_sha256 or ck.sha256}")
    if ck.file_sha256 and ck.sha256 != ck.file_sha256:
        print(f"id:         {ck.sha256} (the file's hash and the evaluated entry)")
    print(f"format:     {ck.format}")
    print(f"arch:       {ck.arch}")
    print(f"weights at: {r.source}" + (f" ({note})" if note else ""))
    print(f"keys:       {r.summary()}")
    if ck.metadata:
        print("metadata:   " + json.dumps(ck.metadata, sort_keys=True, default=str))
    limit = None if a.keys else 10
    for label, keys in (("missing", r.missing), ("unexpected", r.unexpected)):
        if keys:
            shown = keys[:limit]
            more = f" … (+{len(keys) - len(shown)}, use --keys)" if len(shown) < len(keys) else ""
            print(f"{label}: " + ", ".join(shown) + more)
    return 0


def _add_extract(sub) -> None:
    p = sub.add_parser(
        "extract", help="fill the feature cache for one dataset split (torchrun-aware)",
        formatter_class=HelpFormatter,
        description="Extract features of every tap into the cache. Under torchrun each rank extracts its own "
                    "shards and rank 0 writes the manifest; with --launcher and --array N, N array tasks (on N "
                    "machines) do the same, a failed one is resubmitted and resumes from its finished shards. A "
                    "later `evalsuite run` reads the cache.",
        epilog=textwrap.dedent("""\
            examples:
              evalsuite extract --checkpoint ckpt.safetensors --dataset imagefolder --root data/demo/imagefolder \\
                                --split train --layers res4,res5 --pooling goyal
              torchrun --nproc_per_node=4 -m evalsuite extract --checkpoint ckpt.pth --dataset voc2007 \\
                                --root /datasets/VOCdevkit/VOC2007 --split trainval
              evalsuite extract --checkpoint ckpt.pth --dataset imagenet --root /datasets/imagenet --split train \\
                                --device cuda --workers 8 --launcher slurm --array 16 --slurm-partition gpu
            """),
    )
    add_checkpoint_args(p)
    p.add_argument("--dataset", required=True, help="dataset kind (imagefolder, voc2007, ...)")
    p.add_argument("--root", type=Path, required=True, help="dataset root directory")
    p.add_argument("--split", required=True, help="split name")
    p.add_argument("--layers", help="comma-separated taps (default: all)")
    p.add_argument("--pooling", default="goyal", choices=POOLINGS, help="per-tap pooling")
    p.add_argument("--image-size", type=int, default=224, help="input resolution")
    p.add_argument("--resize-mode", default="square", choices=RESIZE_MODES, help="resize mode")
    p.add_argument("--resize", type=positive_int, help="shorter side before the crop / square resize "
                   "(default: image size x 256/224)")
    p.add_argument("--interpolation", default="bilinear", choices=INTERPOLATIONS, help="resize interpolation")
    p.add_argument("--shard-rows", type=int, default=512, help="rows per cache shard (unit of resume)")
    p.add_argument("--launcher", default="none", choices=["none", "local", "debug", "slurm"],
                   help="none: extract here (torchrun-aware); slurm/local/debug: a submitit array job of --array tasks")
    p.add_argument("--array", type=positive_int, default=1, metavar="N",
                   help="with --launcher: array tasks, each extracting cache shards i with i %% N == its index")
    p.add_argument("--log-dir", type=Path, default=Path("runs/submitit"), help="with --launcher: submitit's logs")
    p.add_argument("--slurm-partition", help="Slurm partition for --launcher slurm")
    p.add_argument("--slurm-account", help="Slurm account for --launcher slurm")
    add_runtime_args(p)
    p.set_defaults(func=cmd_extract)


def cmd_extract(a: argparse.Namespace) -> int:
    from .cache import FeatureCache
    from .checkpoints import load_checkpoint
    from .data import open_dataset
    from .distributed import env_world_size, process_group
    from .features import FeatureExtractor, Transform
    from .runner import validate_layers

    if a.launcher != "none":
        if env_world_size() > 1:
            raise UserError("--launcher submits its own array tasks: run `evalsuite extract` once, not under torchrun")
        return _extract_array(a)
    with process_group(a.device) as (rank, _):  # torchrun: each rank extracts its share of the shards
        ck = load_checkpoint(a.checkpoint, arch=a.arch, allow_partial=a.allow_partial,
                             trust_pickle=a.trust_pickle, seed=a.seed, weights=a.weights, name=a.name)
        layers = validate_layers(ck.arch, [a.layers] if a.layers else None)
        ds = open_dataset(a.dataset, a.root, a.split)
        cache = FeatureCache(a.cache_dir, shard_rows=a.shard_rows)
        ext = FeatureExtractor(ck.build_trunk(), ck.sha256, ck.arch, cache=cache, device=a.device,
                               precision=a.precision or "auto", batch_size=a.batch_size,
                               workers=a.workers, progress=not a.no_progress, source=ck.spec,
                               decode=a.decode or "auto")
        tf = Transform.from_protocol(argparse.Namespace(image_size=a.image_size, resize_mode=a.resize_mode,
                                                        resize=a.resize, interpolation=a.interpolation), ck.metadata)
        feats = ext.features(ds, layers or list(ext.trunk.tap_names), a.pooling, tf)
    if rank == 0:
        for tap, x in feats.items():
            print(f"{tap}: {x.shape[0]} x {x.shape[1]} ({ext.precision}) cached under {ext.cache.root}")
    return 0


def _extract_array(a: argparse.Namespace) -> int:
    """`evalsuite extract --launcher L --array N`: the checkpoint, layers and dataset are checked here; each array
    task loads them again on its node and extracts its shards."""
    from .cache import FeatureCache
    from .checkpoints import load_checkpoint
    from .data import open_dataset
    from .extract_array import ArrayExtraction, Recipe, dataset_slug, run_array
    from .features import Transform
    from .runner import validate_layers

    load = {"spec": a.checkpoint, "arch": a.arch, "allow_partial": a.allow_partial, "trust_pickle": a.trust_pickle,
            "seed": a.seed, "weights": a.weights, "name": a.name}
    ck = load_checkpoint(**load)
    layers = validate_layers(ck.arch, [a.layers] if a.layers else None) or list(ck.build_trunk().tap_names)
    ds = open_dataset(a.dataset, a.root.resolve(), a.split)  # absolute: the tasks may start elsewhere
    tf = Transform.from_protocol(argparse.Namespace(image_size=a.image_size, resize_mode=a.resize_mode,
                                                    resize=a.resize, interpolation=a.interpolation), ck.metadata)
    recipe = Recipe(checkpoint={**load, "arch": ck.arch},
                    extractor={"device": a.device, "precision": a.precision or "auto", "batch_size": a.batch_size,
                               "workers": a.workers, "decode": a.decode or "auto"},
                    cache_root=str(FeatureCache(a.cache_dir).root.resolve()), shard_rows=a.shard_rows, dataset=ds,
                    taps=tuple(layers), pooling=a.pooling, transform=tf)
    opts = ArrayExtraction(tasks=a.array, launcher=a.launcher, folder=a.log_dir / "extract" / dataset_slug(ds),
                           slurm_partition=a.slurm_partition, slurm_account=a.slurm_account)
    for tap, e in run_array(recipe, opts).items():
        m = e.manifest()
        print(f"{tap}: {m['rows']} x {m['dim']} ({e.fields['precision']}) cached under {e.root}")
    return 0


def _add_demo(sub) -> None:
    from .demo import DEMO_ARCH, DEMO_METHODS

    p = sub.add_parser("demo", help="synthetic data -> pretraining -> every task -> leaderboard, in one plan",
                       formatter_class=HelpFormatter,
                       description="The README's main command: generates the default synthetic data, pretrains "
                                   "a few methods briefly, evaluates every checkpoint on every task at the quick "
                                   "preset and builds the leaderboard site. Re-running resumes (finished steps "
                                   "are skipped).",
                       epilog="examples:\n  evalsuite demo\n  evalsuite demo --methods random,simclr --tasks "
                              "knn,voc07_svm --out runs/small\n  evalsuite demo --dry-run")
    p.add_argument("--data-root", type=Path, default=Path("data/demo"), help="where the synthetic data goes")
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="checkpoints, results, cache and site")
    p.add_argument("--methods", default=",".join(DEMO_METHODS), help="comma-separated pretraining methods")
    p.add_argument("--arch", default=DEMO_ARCH, help="trunk architecture for every method")
    p.add_argument("--tasks", default="all", help="comma-separated tasks, or all")
    p.add_argument("--protocol", default="quick", help="preset for every task")
    p.add_argument("--epochs", type=int, default=1, help="pretraining epochs per method")
    p.add_argument("--data-scale", type=float, default=1.0, help="synthetic data size factor")
    p.add_argument("--seed", type=int, default=0, help="seed for data, pretraining and evaluation")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="protocol override passed to every evaluation")
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    p.add_argument("--no-progress", action="store_true", help="one line per step instead of a progress bar")
    p.set_defaults(func=cmd_demo)


def cmd_demo(a: argparse.Namespace) -> int:
    from .demo import DemoConfig, build_plan, format_plan, logged_step, run_plan, summary_table, write_outcomes
    from .runner import resolve_tasks
    from .task import environment_problem

    task_names, all_mode = resolve_tasks([a.tasks])
    for m in (m for m in a.methods.split(",") if m and m != "random"):
        registry.get_method(m)  # an unknown method is bad input: one line, exit 2, before anything runs
    if all_mode:
        for name in list(task_names):
            why = environment_problem(registry.get_task(name))
            if why:
                task_names.remove(name)
                print(f"note: {name} left out of the demo: {why}")
    cfg = DemoConfig(data_root=a.data_root, out=a.out, methods=[m for m in a.methods.split(",") if m],
                     arch=a.arch, tasks=task_names, preset=a.protocol, epochs=a.epochs, seed=a.seed,
                     data_scale=a.data_scale, overrides=a.overrides)
    steps = build_plan(cfg, task_names)
    print(f"plan: {len(steps)} steps (each is an evalsuite command; re-running skips finished ones)")
    print(format_plan(steps))
    if a.dry_run:
        return 0
    t0 = time.perf_counter()
    outcomes = run_plan(steps, logged_step(a.out / "logs", main), progress=not a.no_progress)
    a.out.mkdir(parents=True, exist_ok=True)
    write_outcomes(a.out / "demo_steps.json", outcomes)
    table = summary_table(a.out, a.protocol)
    if not table.empty:
        print(table.round(3).to_string())
    failed = [o for o in outcomes if o.status == "failed"]
    ran = sum(o.status == "done" for o in outcomes)
    print(f"demo: {ran} steps run, {sum(o.status == 'skipped' for o in outcomes)} already done, {len(failed)} failed "
          f"in {time.perf_counter() - t0:.0f}s; results in {a.out / 'results.jsonl'}, "
          f"leaderboard at {a.out / 'site' / 'index.html'}")
    for o in failed:
        print(f"  FAILED {o.step.label}: {o.error}")
    print(f"each step's output: {a.out / 'logs'}")
    return 1 if failed else 0


EPILOG_WATCH = """\
examples:
  evalsuite watch runs/pretrain/ckpts --data-root data/demo          # knn + spectrum, quick preset, every 60 s
  evalsuite watch ckpts/ --tasks centroid,spectrum --interval 300 --out runs/watch --set image_size=32
  evalsuite watch ckpts/ --data-root data/demo --once                # what is there now, then exit
"""


def _add_watch(sub) -> None:
    from .watch import DEFAULT_METRICS, DEFAULT_TASKS

    p = sub.add_parser("watch", help="evaluate each new checkpoint a training run writes into a folder",
                       formatter_class=HelpFormatter, epilog=EPILOG_WATCH,
                       description="Poll DIR for checkpoint files; evaluate each new one (once its size stops "
                                   "changing and it loads) as `evalsuite run` would, append the records to "
                                   "OUT/results.jsonl and rewrite OUT/curves.html, the metrics per training step. "
                                   "OUT/watch_state.json remembers what was evaluated, across restarts.")
    p.add_argument("directory", type=Path, metavar="DIR", help="the folder the training run writes checkpoints to")
    _add_task_selection(p, tasks=DEFAULT_TASKS, protocol="quick")
    p.add_argument("--out", type=Path, default=None,
                   help="results, state, page and feature cache (default DIR/evalsuite_watch)")
    p.add_argument("--interval", type=float, default=60.0, help="seconds between two looks at DIR")
    p.add_argument("--once", action="store_true",
                   help="evaluate what is in DIR now (two looks --settle seconds apart) and exit")
    p.add_argument("--settle", type=float, default=2.0,
                   help="with --once: seconds a file's size must stay the same")
    p.add_argument("--metrics", default=DEFAULT_METRICS,
                   help="metrics plotted on the page; 'headline' is each task's headline metrics")
    p.add_argument("--arch", help="architecture (inferred from metadata or keys when omitted)")
    p.add_argument("--allow-partial", action="store_true", help="evaluate even if trunk keys are missing")
    p.add_argument("--trust-pickle", action="store_true",
                   help="DANGEROUS: allow pickles that run code (weights_only=False)")
    p.add_argument("--weights", metavar="KEY", help="the files' entry to evaluate, e.g. state_dict")
    add_runtime_args(p)
    p.set_defaults(func=cmd_watch)


def cmd_watch(a: argparse.Namespace) -> int:
    from .watch import Watcher, WatchOptions

    if a.interval <= 0 or a.settle < 0:
        raise UserError("--interval must be positive and --settle 0 or more")
    opts = WatchOptions(
        directory=a.directory, out=a.out, tasks=a.tasks, layers=[a.layers] if a.layers else None, preset=a.protocol,
        overrides=a.overrides,
        data_root=a.data_root or Path(os.environ.get("EVALSUITE_DATA", "data")), device=a.device, seed=a.seed,
        batch_size=a.batch_size, workers=a.workers, cache_dir=a.cache_dir, precision=a.precision, arch=a.arch,
        allow_partial=a.allow_partial, trust_pickle=a.trust_pickle, weights=a.weights, interval=a.interval,
        settle=a.settle, metrics=a.metrics, progress=not a.no_progress)
    watcher = Watcher(opts, command=main)
    if a.once:
        n = watcher.run_once()
        print(f"{n} checkpoint(s) evaluated; results in {watcher.out / 'results.jsonl'}")
        return 0
    watcher.run_forever()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        if args.debug:
            raise
        print(f"evalsuite: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("evalsuite: interrupted (finished work is kept; re-run to resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
