"""Sharded extraction across machines: one submitit array job, each task extracting a disjoint set of cache shards.

Task p of N extracts shards p, p+N, p+2N, ... of every incomplete cache entry
(:meth:`FeatureExtractor.extract_part`, the rule torchrun ranks follow), each written whole through
``CacheEntry.write_shard``; the task that finds every shard on disk when it finishes verifies them (rows and
dimension) and writes the manifests. Batches never cross shard boundaries, so the entry is byte-identical to
one process's.

The submitting process waits for the array. A task that failed (an exception, a node lost, ``kill -9``) is
resubmitted, up to ``rounds`` rounds, and resumes from the shards on disk; a task that Slurm pre-empts or times
out is requeued by submitit itself (the worker has a ``checkpoint`` method) and resumes the same way. After the
last round the submitting process removes what killed tasks left half-written, writes any manifest still
missing, and checks that every entry is complete.

Each task rebuilds what it needs on its node from a :class:`Recipe` written once under the job folder: the
checkpoint's loading arguments, the extractor's settings, the dataset reader, the taps, pooling and transform.
"""

from __future__ import annotations

import dataclasses
import pickle
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .cache import CacheEntry, FeatureCache
from .console import note
from .errors import UserError
from .io import atomic_write

#: `evalsuite run --launcher ...` extracts a dataset split of at least this many images as an array job
DEFAULT_MIN_IMAGES = 100_000
#: array tasks of `evalsuite run --launcher ...` when --array is not given
DEFAULT_TASKS = 8
#: submissions of a task that keeps failing before the extraction gives up
DEFAULT_ROUNDS = 3


@dataclass(frozen=True)
class ArrayExtraction:
    """How to extract a large dataset split as an array job."""

    tasks: int  # array tasks (N)
    launcher: str = "slurm"  # submitit's slurm, local (subprocesses) or debug (in this process)
    folder: Path = Path("runs/submitit/extract")  # submitit's job folders and logs; the recipe
    min_images: int = 0  # a smaller split is extracted by the process that asks for it
    rounds: int = DEFAULT_ROUNDS
    slurm_partition: str | None = None
    slurm_account: str | None = None
    resources: dict[str, Any] | None = None  # per task; None: launch.extraction_resources(device, workers)
    # load_checkpoint's arguments, so that each task loads the same trunk (`evalsuite run` fills them in)
    checkpoint: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Recipe:
    """What one array task rebuilds on its node."""

    checkpoint: dict[str, Any]  # load_checkpoint(**checkpoint)
    extractor: dict[str, Any]  # FeatureExtractor's device, precision, batch_size, workers, decode
    cache_root: str
    shard_rows: int
    dataset: Any  # the ImageDataset reader itself (same samples, same order, same fingerprint)
    taps: tuple[str, ...]
    pooling: str
    transform: Any  # evalsuite.features.Transform

    def build(self):
        """The task's FeatureExtractor (no progress bars: logs go to files)."""
        from .checkpoints import load_checkpoint
        from .features import FeatureExtractor

        ck = load_checkpoint(**self.checkpoint)
        return FeatureExtractor(ck.build_trunk(), ck.sha256, ck.arch,
                                cache=FeatureCache(self.cache_root, shard_rows=self.shard_rows),
                                progress=False, source=ck.spec, **self.extractor)


class ExtractPart:
    """The body of array task ``part``: extract its shards; finalize if it finishes last. Returns the entries.

    ``checkpoint`` makes submitit requeue a pre-empted or timed-out task with the same arguments: it resumes
    from its shards on disk.
    """

    def __call__(self, recipe_path: str, part: int, parts: int) -> dict[str, CacheEntry]:
        recipe = read_recipe(recipe_path)
        ext = recipe.build()
        return ext.extract_part(recipe.dataset, recipe.taps, recipe.pooling, recipe.transform, part, parts)

    def checkpoint(self, *args: Any, **kwargs: Any):
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self, *args, **kwargs)


def write_recipe(folder: Path, recipe: Recipe) -> Path:
    """The recipe, pickled once under the job folder (each task gets its path, not a copy of the dataset)."""
    path = Path(folder) / "recipe.pkl"
    atomic_write(path, lambda tmp: tmp.write_bytes(pickle.dumps(recipe, protocol=pickle.HIGHEST_PROTOCOL)))
    return path


def read_recipe(path: str | Path) -> Recipe:
    # the file this run wrote under its own job folder, as submitit's own pickles of the job
    return pickle.loads(Path(path).read_bytes())


def recipe_for(extractor, dataset, taps: Sequence[str], pooling: str, transform, checkpoint: dict[str, Any]) -> Recipe:
    """The recipe that rebuilds ``extractor`` on another node (its resolved precision and decoder, so that each
    task computes the same cache keys) for one request."""
    return Recipe(
        checkpoint=dict(checkpoint),
        extractor={"device": str(extractor.device), "precision": extractor.precision,
                   "batch_size": extractor.batch_size, "workers": extractor.workers, "decode": extractor.decode},
        cache_root=str(Path(extractor.cache.root).resolve()), shard_rows=extractor.cache.shard_rows,
        dataset=dataset, taps=tuple(taps), pooling=pooling, transform=transform)


def run_array(recipe: Recipe, opts: ArrayExtraction, *, worker: Callable | None = None,
              echo: Callable[[str], None] = note) -> dict[str, CacheEntry]:
    """Extract ``recipe`` with ``opts.tasks`` array tasks; resubmit failed ones; return the complete entries.

    ``worker`` is the task body (default :class:`ExtractPart`; tests pass one that dies part-way).
    """
    from .launch import extraction_resources, make_executor

    if opts.tasks < 1:
        raise UserError(f"--array needs at least 1 task, got {opts.tasks}")
    worker = worker or ExtractPart()
    folder = Path(opts.folder)
    recipe_path = str(write_recipe(folder, recipe))
    resources = opts.resources or extraction_resources(recipe.extractor["device"], recipe.extractor["workers"])
    what = f"{getattr(recipe.dataset, 'kind', 'dataset')}/{getattr(recipe.dataset, 'split', '')}"
    pending = list(range(opts.tasks))
    entries: dict[str, CacheEntry] = {}
    errors: dict[int, str] = {}
    for round_ in range(1, opts.rounds + 1):
        ex = make_executor(opts.launcher, folder / "%j", resources, name=f"evalsuite-extract-{what.replace('/', '-')}",
                           slurm_partition=opts.slurm_partition, slurm_account=opts.slurm_account,
                           array_parallelism=len(pending))
        jobs = ex.map_array(worker, [recipe_path] * len(pending), pending, [opts.tasks] * len(pending))
        echo(f"extracting {what} with array tasks {_ranges(pending)} of {opts.tasks} "
             f"({opts.launcher}, job {jobs[0].job_id.split('_')[0] if jobs else '?'}; round {round_} of {opts.rounds})")
        errors = {}
        for part, job in zip(pending, jobs):
            try:
                entries = job.result() or entries
            except Exception as e:  # submitit re-raises the task's exception with its log, or says it died
                errors[part] = job_error(e)
        if not errors:
            break
        pending = sorted(errors)
        if round_ < opts.rounds:
            echo(f"array task(s) {_ranges(pending)} failed ({errors[pending[0]]}); resubmitting them, they resume "
                 "from their finished shards")
    if errors:
        raise UserError(f"array extraction of {what}: task(s) {_ranges(sorted(errors))} failed {opts.rounds} times, "
                        f"logs under {folder}: {errors[min(errors)]}")
    return complete_entries(entries)


def complete_entries(entries: dict[str, CacheEntry]) -> dict[str, CacheEntry]:
    """After every task ended: clean what killed tasks left half-written, write any manifest still missing (every
    shard verified first), and refuse an entry with shards missing."""
    from .features import all_shards_done, finalize_entries
    from .trunks import PoolSpec

    # each tap's pooling is in its key: no need to load the checkpoint here
    specs = {t: PoolSpec(t, e.fields["pooling"]["method"], e.fields["pooling"]["op"],
                         tuple(e.fields["pooling"]["shape"])) for t, e in entries.items()}
    for e in entries.values():
        e.prepare()  # no task runs now: temporary leftovers of killed ones go
    todo = {t: e for t, e in entries.items() if not e.is_complete()}
    if todo:
        if not all_shards_done(todo, specs):
            missing = {t: e.missing_shards() for t, e in todo.items()}
            raise UserError("array extraction ended with shards missing: "
                            + "; ".join(f"{t}: {_ranges(m)}" for t, m in missing.items() if m))
        finalize_entries(todo, specs)
    return entries


def extract_array(extractor, dataset, taps: Sequence[str], pooling: str, transform) -> None:
    """What FeatureExtractor.features does for a split of at least ``extractor.array.min_images`` images: the
    extraction as an array job. The tasks must write the entries this process reads (same keys)."""
    opts: ArrayExtraction = extractor.array
    if not opts.checkpoint:
        raise UserError("array extraction needs the checkpoint's loading arguments (ArrayExtraction.checkpoint)")
    recipe = recipe_for(extractor, dataset, taps, pooling, transform, opts.checkpoint)
    written = run_array(recipe, dataclasses.replace(opts, folder=Path(opts.folder) / dataset_slug(dataset)))
    mine, _ = extractor.cache_entries(dataset, taps, pooling, transform)
    differ = [t for t in taps if t not in written or written[t].key != mine[t].key]
    if differ:
        raise UserError(f"the array tasks wrote other cache entries than this process reads for {', '.join(differ)} "
                        "(the precision or decoder resolved differently on their nodes: pass --precision and "
                        "--decode explicitly)")


def job_error(e: Exception) -> str:
    """One line for a failed submitit job: the task's exception line, or how it ended without a result."""
    text = str(e).strip()
    parts = text.split("-" * 22 + "\n")  # FailedJobError: the task's traceback between two rules
    if len(parts) >= 3:
        lines = [x.strip() for x in parts[1].splitlines() if x.strip()]
        if lines:
            return lines[-1]
    found = re.search(r"has not produced any output \(state: ([^)]*)\)", text)  # killed, lost, out of memory
    if found:
        return f"the task ended without a result (state {found.group(1)})"
    return text.splitlines()[0] if text else type(e).__name__


def dataset_slug(dataset) -> str:
    """A folder name for one dataset split's array job."""
    return f"{getattr(dataset, 'kind', 'dataset')}-{getattr(dataset, 'split', '')}-{dataset.fingerprint()[:8]}"


def _ranges(parts: Sequence[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5'."""
    out, parts = [], sorted(parts)
    i = 0
    while i < len(parts):
        j = i
        while j + 1 < len(parts) and parts[j + 1] == parts[j] + 1:
            j += 1
        out.append(str(parts[i]) if i == j else f"{parts[i]}-{parts[j]}")
        i = j + 1
    return ",".join(out)
