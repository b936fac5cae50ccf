"""Result records: one JSON object per line in ``results.jsonl``.

A number without its protocol is a bug: every record carries the checkpoint id
and metadata, the task, dataset, split, layer and metric, the preset name and
the fully resolved hyper-parameters, library versions, wall time and host.
A number computed from per-test-sample outputs also carries its bootstrap interval
(``ci_*``) and a reference to those outputs (``outputs``; docs/uncertainty.md).
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import math
import os
import platform
import re
import socket
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

from .errors import BadData, UserError

SCHEMA_VERSION = 1
RESULTS_FILE = "results.jsonl"


@dataclass
class Result:
    """One number and everything needed to reproduce it."""

    task: str
    dataset: str
    split: str
    layer: str
    metric: str
    value: float | None
    checkpoint_id: str = ""
    checkpoint: str = ""
    checkpoint_format: str = ""
    method: str = ""
    arch: str = ""
    pretrain_data: str = ""
    checkpoint_meta: dict[str, Any] = field(default_factory=dict)
    #: ``--name``, else the file name without its suffixes (``moco_v2_800ep``), else the spec (``random:resnet18``)
    checkpoint_name: str = ""
    #: which weights were evaluated and whether any were missing: ``weights`` (the file's entry, "" for a plain
    #: state dict), ``partial``, ``missing`` (count), ``missing_keys`` (the first 50)
    checkpoint_load: dict[str, Any] = field(default_factory=dict)
    #: protocol fields where this number's protocol differs from the published one (docs/protocols.md)
    deviations: list[str] = field(default_factory=list)
    #: whether the protocol chose a hyper-parameter on the split ``value`` is reported on (the test set), and which
    #: (``tuned_on_test_params``: e.g. ``["cost"]`` for the published low-shot SVM, ``["epoch"]`` for a linear probe
    #: reporting its best val epoch); from the task protocol's ``tuned_on_test()`` (docs/uncertainty.md)
    tuned_on_test: bool = False
    tuned_on_test_params: list[str] = field(default_factory=list)
    protocol: str = ""
    params: dict[str, Any] = field(default_factory=dict)
    #: sha256 of the resolved protocol alone (``params`` also holds what the task measured, e.g. a training curve):
    #: records with equal hashes ran under the same hyper-parameters, so the leaderboard averages their seeds
    protocol_hash: str = ""
    seed: int | None = None
    note: str = ""
    dataset_fingerprint: str = ""
    wall_time_s: float | None = None
    versions: dict[str, str] = field(default_factory=dict)
    host: str = ""
    created: str = ""
    run_id: str = ""
    #: the percentile bootstrap interval of ``value`` over the test samples (evalsuite.outputs.attach_intervals);
    #: None for a number without per-sample outputs or with intervals turned off (--ci-resamples 0)
    ci_low: float | None = None
    ci_high: float | None = None
    ci_level: float | None = None
    ci_resamples: int | None = None
    ci_method: str = ""
    ci_seed: int | None = None
    #: the per-test-sample outputs ``value`` is computed from: ``file`` (relative to the results file), ``sha256``,
    #: ``statistic``, ``arrays`` (role -> array name), ``scale``, ``samples`` (evalsuite.outputs)
    outputs: dict[str, Any] | None = None
    schema: int = SCHEMA_VERSION

    #: not a record field: the per-sample arrays (evalsuite.outputs.MetricOutputs) until append_results writes them
    pending_outputs = None

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        v = d["value"]
        if v is not None and not (isinstance(v, float) and math.isfinite(v)):
            if isinstance(v, float):
                # A NaN must be explained, never silently stored as a number.
                if not d["note"]:
                    raise ValueError(f"non-finite value for {self.task}/{self.layer}/{self.metric} without a note")
                d["value"] = None
        return json.dumps(d, sort_keys=True, default=_json_default)


def _json_default(o: Any) -> Any:
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


@lru_cache(maxsize=1)
def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for dist in ("evalsuite", "torch", "torchvision", "numpy", "scikit-learn", "faiss-cpu", "faiss-gpu",
                 "safetensors", "pandas", "cyanure", "stable-baselines3", "miniworld"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return versions


def host_name() -> str:
    return socket.gethostname()


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# Where a checkpoint's training step is found: metadata keys (ours: "steps", the global step when it was written),
# then the file name: a step / iteration token ("epoch=3-step=500.ckpt", "iter_2000.pth") or a trailing number after a
# separator ("checkpoint_0005.pth"; not "resnet50.pth")
STEP_KEYS = ("global_step", "step", "steps", "iteration")
_STEP_TOKEN = re.compile(r"(?:^|[^a-z])(?:global_step|step|steps|iter|iteration|it)[-_=]?(\d+)", re.IGNORECASE)
_TRAILING_NUMBER = re.compile(r"(?:^|[-_.])(\d+)$")
_CHECKPOINT_SUFFIXES = re.compile(r"(\.(tar|pth|pt|pyth|ckpt|safetensors|torch|pkl|bin))+$", re.IGNORECASE)


def training_step(checkpoint_meta: Mapping[str, Any] | None, checkpoint: str | Path) -> tuple[int | None, str]:
    """The training step a checkpoint was written at and where it was read (``"metadata:steps"``, ``"file name"``):
    the metadata's ``STEP_KEYS``, else the file name; ``(None, "")`` when neither says."""
    for key in STEP_KEYS:
        value = (checkpoint_meta or {}).get(key)
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            return int(value), f"metadata:{key}"
    stem = _CHECKPOINT_SUFFIXES.sub("", Path(str(checkpoint)).name)
    found = _STEP_TOKEN.findall(stem) or _TRAILING_NUMBER.findall(stem)
    return (int(found[-1]), "file name") if found else (None, "")


def append_results(path: str | Path, results: Sequence[Result]) -> Path:
    """Append records to a JSONL file atomically: all lines in one locked write, or none.

    Lines are serialised before the file is touched, so a record that fails to
    serialise leaves the file as it was. Records' per-sample outputs are written
    first, under ``outputs/`` beside the file (evalsuite.outputs.write_outputs).
    """
    from .outputs import write_outputs

    path = Path(path)
    if path.is_dir():
        path = path / RESULTS_FILE
    write_outputs(results, path.parent)  # the per-sample arrays first: a record never names a missing file
    payload = "".join(r.to_json() + "\n" for r in results).encode()
    if not payload:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        # Make sure an earlier torn write cannot glue onto our first line.
        size = os.fstat(fd).st_size
        if size:
            with open(path, "rb") as f:
                f.seek(size - 1)
                if f.read(1) != b"\n":
                    payload = b"\n" + payload
        view = memoryview(payload)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fsync(fd)
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
    return path


class UnreadableLine(BadData):
    """A line of a results file that is not a result record (not UTF-8, not JSON, not a record object)."""

    def __init__(self, message: str, path: str | Path, lineno: int):
        super().__init__(message, path)
        self.lineno = lineno


def iter_numbered_records(path: str | Path, skipped: list[int] | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, record)`` for each record of a JSONL results file; blank lines are passed over.

    An unreadable line (e.g. one cut off by a crash) raises :class:`UnreadableLine` naming the file and
    line; when a ``skipped`` list is given, its number is appended there instead and reading goes on.
    """
    path = Path(path)
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                rec = _parse_line(raw)
            except ValueError as e:
                if skipped is None:
                    raise UnreadableLine(f"line {lineno} {e}", path, lineno) from None
                skipped.append(lineno)
                continue
            if rec is not None:
                yield lineno, rec


def _parse_line(raw: bytes) -> dict[str, Any] | None:
    """The record on one line, None for a blank line; ValueError saying what is wrong otherwise."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("is not UTF-8 text (is this a results.jsonl?)") from None
    if not line.strip():
        return None
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"is not valid JSON (column {e.colno}: {e.msg.removesuffix(' at')})") from None
    if not isinstance(rec, dict) or "metric" not in rec or "task" not in rec:
        raise ValueError("is not a result record")
    return rec


def iter_records(path: str | Path, skipped: list[int] | None = None) -> Iterator[dict[str, Any]]:
    """The records of a JSONL results file (see :func:`iter_numbered_records` for ``skipped``)."""
    for _, rec in iter_numbered_records(path, skipped):
        yield rec


def skipped_lines_message(path: str | Path, linenos: Sequence[int]) -> str:
    """One line saying how many unreadable lines of ``path`` were skipped, and where the first was."""
    n = len(linenos)
    where = f"first at line {min(linenos)}" if n > 1 else f"at line {linenos[0]}"
    return f"skipped {n} unreadable line{'s' if n > 1 else ''} in {path} ({where})"


def find_result_files(paths: Iterable[str | Path]) -> list[Path]:
    """Expand directories to the ``results.jsonl`` files under them."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(p.rglob(RESULTS_FILE))
            if not found:
                raise UserError(f"no {RESULTS_FILE} under this directory", p)
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise UserError("results file or directory not found", p)
    return files


def read_results(paths: str | Path | Iterable[str | Path], skipped: dict[str, list[int]] | None = None):
    """Read result records into a pandas DataFrame, one row per record.

    Nested fields (``params``, ``checkpoint_meta``, ``versions``) stay as dicts;
    ``params_json`` holds a canonical JSON string of ``params`` for grouping. With a ``skipped``
    dict, unreadable lines are skipped and listed there per file (see :func:`iter_numbered_records`).
    """
    import pandas as pd

    if isinstance(paths, (str, Path)):
        paths = [paths]
    rows = []
    for f in find_result_files(paths):
        lines: list[int] | None = None if skipped is None else []
        for rec in iter_records(f, lines):
            rec["source_file"] = str(f)
            rows.append(rec)
        if lines:
            skipped[str(f)] = lines
    columns = [f.name for f in dataclasses.fields(Result)] + ["source_file"]
    df = pd.DataFrame(rows, columns=columns if not rows else None)
    if rows:
        df["params_json"] = [json.dumps(p, sort_keys=True) for p in df["params"]]
    else:
        df["params_json"] = pd.Series(dtype=str)
    return df
