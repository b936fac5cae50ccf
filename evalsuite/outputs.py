"""Per-test-sample outputs: the arrays a record's metric is computed from, kept beside the results file.

A task hands them to ``ctx.result(..., outputs=...)``: one :class:`SampleOutputs` per (task, dataset, split, layer)
holds named arrays, most with the test samples on their first axis (targets, predictions, per-sample correctness,
per-class scores and labels, ...; detection's are per detection, naming its image); ``samples.metric(statistic,
**roles)`` says which of them a record's metric is computed from and how (a statistic of :mod:`evalsuite.stats`).
Then

- :func:`attach_intervals` (``evalsuite run``, after each task) fills the record's ``ci_*`` fields with the
  percentile bootstrap interval of its metric, every record of one SampleOutputs under the same resamples. A
  record whose arrays do not give back its value gets no interval and a warning (a task bug, never a crash);
- :func:`write_outputs` (``append_results``) writes each SampleOutputs once, as ``outputs/<sha256>.npz`` beside
  the results file (deterministic zip bytes, so equal arrays are one file; through :mod:`evalsuite.io`), and sets
  the record's ``outputs``: ``{"file": path relative to the results file, "sha256", "statistic", "arrays": {role:
  array name}, "scale", "samples"}``;
- :func:`load_outputs` / :func:`recompute` read a record's arrays back (sha256 checked): a paired comparison of two
  runs loads the arrays of their records with the same (task, dataset, split, layer, metric) this way.
"""

from __future__ import annotations

import hashlib
import io
import math
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import BadData, UserError
from .stats import DEFAULT_LEVEL, DEFAULT_RESAMPLES, bootstrap_many, get_statistic

OUTPUTS_DIR = "outputs"
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # fixed, so the same arrays always give the same bytes


class SampleOutputs:
    """Named per-test-sample arrays of one (task, dataset, split, layer), written as one file."""

    def __init__(self, arrays: Mapping[str, Any]):
        self.arrays = {str(k): np.asarray(v) for k, v in arrays.items()}
        for name, a in self.arrays.items():
            if not name or "/" in name or a.dtype == object:
                raise ValueError(f"per-sample array {name!r}: needs a name without '/' and a numeric dtype")

    def metric(self, statistic: str, scale: float = 100.0, **roles: str) -> MetricOutputs:
        """The arrays a record's metric is computed from: ``statistic`` (``mean``, ``map_voc``, ``map_sklearn``)
        over the arrays named for its roles, times ``scale`` (100 for a percentage)."""
        st = get_statistic(statistic)
        missing = [r for r in st.roles if r not in roles]
        unknown = [r for r in roles if r not in st.roles + st.optional]
        absent = [n for n in roles.values() if n not in self.arrays]
        if missing or unknown or absent:
            raise ValueError(f"statistic {statistic}: roles missing {missing}, unknown {unknown}, "
                             f"arrays not given {absent}")
        return MetricOutputs(self, statistic, dict(roles), float(scale))

    def mean(self, name: str, scale: float = 100.0) -> MetricOutputs:
        """The metric is the mean of the per-sample values ``name`` (e.g. 0/1 correctness) times ``scale``."""
        return self.metric("mean", scale, values=name)

    def to_bytes(self) -> bytes:
        """An ``.npz`` (``numpy.load`` reads it) whose bytes depend on the arrays only."""
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for name in sorted(self.arrays):
                info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_TIME)
                info.compress_type = zipfile.ZIP_DEFLATED
                with zf.open(info, "w", force_zip64=True) as f:
                    np.lib.format.write_array(f, np.ascontiguousarray(self.arrays[name]), allow_pickle=False)
        return buf.getvalue()


@dataclass(frozen=True)
class MetricOutputs:
    """One record's statistic over arrays of a :class:`SampleOutputs` (``roles``: role -> array name)."""

    samples: SampleOutputs
    statistic: str
    roles: dict[str, str]
    scale: float = 100.0

    def arrays(self) -> dict[str, np.ndarray]:
        return {role: self.samples.arrays[name] for role, name in self.roles.items()}

    def value(self) -> float:
        """The metric recomputed from the arrays (in the record's units)."""
        return get_statistic(self.statistic).point(self.arrays()) * self.scale

    def reference(self, file: str, sha256: str) -> dict[str, Any]:
        """The record's ``outputs`` field once the arrays are written to ``file``."""
        return {"file": file, "sha256": sha256, "statistic": self.statistic, "arrays": dict(self.roles),
                "scale": self.scale, "samples": get_statistic(self.statistic).samples(self.arrays())}


def _pending(record: Any) -> MetricOutputs | None:
    return getattr(record, "pending_outputs", None)


def attach_intervals(results: Iterable[Any], resamples: int = DEFAULT_RESAMPLES, level: float = DEFAULT_LEVEL,
                     seed: int = 0) -> None:
    """Fill ``ci_low``, ``ci_high``, ``ci_level``, ``ci_resamples``, ``ci_method``, ``ci_seed`` of every record
    with pending outputs and a finite value (``resamples=0``: none)."""
    from .console import warn

    if int(resamples) <= 0:
        return
    groups: dict[int, list[Any]] = {}
    for r in results:
        m = _pending(r)
        if m is None or r.value is None or not math.isfinite(r.value):
            continue
        if not math.isclose(m.value(), r.value, rel_tol=1e-9, abs_tol=1e-9):
            warn(f"{r.task} {r.layer} {r.metric}: its per-sample outputs give {m.value():.6g}, not the recorded "
                 f"{r.value:.6g}; no interval for it")
            continue
        groups.setdefault(id(m.samples), []).append(r)
    for group in groups.values():
        items = [(_pending(r).statistic, _pending(r).arrays()) for r in group]
        for r, iv in zip(group, bootstrap_many(items, resamples, level, seed)):
            if not (math.isfinite(iv.low) and math.isfinite(iv.high)):
                continue
            scale = _pending(r).scale
            r.ci_low, r.ci_high = iv.low * scale, iv.high * scale
            # an interval of the statistic's own (few-shot's normal one) draws no resamples
            r.ci_level, r.ci_resamples, r.ci_method, r.ci_seed = iv.level, iv.resamples or None, iv.method, iv.seed


def write_outputs(results: Iterable[Any], folder: str | Path) -> None:
    """Write the pending outputs of ``results`` under ``folder/outputs/`` (the results file's folder), each
    SampleOutputs once, and set each record's ``outputs`` reference (the arrays are then let go)."""
    from .io import atomic_write_bytes

    written: dict[int, tuple[str, str]] = {}
    for r in results:
        m = _pending(r)
        if m is None:
            continue
        key = id(m.samples)
        if key not in written:
            data = m.samples.to_bytes()
            sha = hashlib.sha256(data).hexdigest()
            rel = f"{OUTPUTS_DIR}/{sha}.npz"
            path = Path(folder) / rel
            if not (path.is_file() and path.stat().st_size == len(data)):  # content-addressed: same name, same bytes
                atomic_write_bytes(path, data)
            written[key] = (rel, sha)
        r.outputs = m.reference(*written[key])
        r.pending_outputs = None


def load_outputs(results_file: str | Path, record: Mapping[str, Any]) -> tuple[str, dict[str, np.ndarray], float]:
    """(statistic, {role: array}, scale) of a record read from ``results_file`` (or its folder)."""
    arrays = load_arrays(results_file, record)
    ref = record["outputs"]
    return ref["statistic"], {role: arrays[name] for role, name in ref["arrays"].items()}, float(ref["scale"])


def load_arrays(results_file: str | Path, record: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Every array of a record's outputs file by its name (sha256 checked): besides the metric's own arrays e.g.
    ``targets``, by which a paired comparison checks that two runs hold the same test samples in the same order."""
    ref = record.get("outputs")
    if not ref:
        raise UserError(f"the {record.get('task')} {record.get('layer')} {record.get('metric')} record has no "
                        "per-sample outputs")
    base = Path(results_file)
    path = (base if base.is_dir() else base.parent) / ref["file"]
    try:
        data = path.read_bytes()
    except OSError as e:
        raise BadData(f"per-sample outputs unreadable ({e.strerror})", path) from None
    if hashlib.sha256(data).hexdigest() != ref["sha256"]:
        raise BadData("per-sample outputs do not match the sha256 their record gives (changed or truncated)", path)
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        return {name: z[name] for name in z.files}


def recompute(results_file: str | Path, record: Mapping[str, Any]) -> float:
    """A record's value recomputed from its per-sample outputs file."""
    statistic, arrays, scale = load_outputs(results_file, record)
    return get_statistic(statistic).point(arrays) * scale
