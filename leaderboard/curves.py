"""Metric-vs-training-step curves of one training run's checkpoints, as one self-contained HTML page.

Each record is placed at its checkpoint's training step (:func:`evalsuite.results.training_step`: the checkpoint's
metadata, else its file name). One plot per (task, dataset, split, protocol, metric), one line per layer, with the
numbers in a table below it; the SVGs are embedded as ``data:`` images (an ``<img>``, where an SVG cannot run
script), so the single file is written atomically (:func:`evalsuite.io.atomic_write_text`) and can be reloaded while
``evalsuite watch`` rewrites it.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from evalsuite import registry
from evalsuite.errors import UserError
from evalsuite.io import atomic_write_text
from evalsuite.results import find_result_files, iter_records, now_iso, training_step

from .aggregate import layer_sort_key
from .aggregate import lower_is_better as error_like
from .plots import step_plot

HEADLINE = "headline"  # in a metrics list: each task's headline metrics


@dataclass
class Curve:
    task: str
    dataset: str
    split: str
    protocol: str
    metric: str
    lower_is_better: bool
    #: checkpoint id -> (step, checkpoint name, {layer: value})
    points: dict[str, tuple[int, str, dict[str, float | None]]] = field(default_factory=dict)

    @property
    def layers(self) -> list[str]:
        return sorted({layer for _, _, values in self.points.values() for layer in values}, key=layer_sort_key)

    @property
    def rows(self) -> list[dict[str, Any]]:
        return [{"step": s, "name": n, "values": v} for s, n, v in sorted(self.points.values(), key=lambda r: r[:2])]

    def svg(self) -> str:
        series = [(layer, [(r["step"], r["values"][layer]) for r in self.rows if r["values"].get(layer) is not None])
                  for layer in self.layers]
        text = step_plot(series, self.metric, f"{self.task}: {self.metric} ({self.dataset} {self.split})",
                         self.lower_is_better)
        return base64.b64encode(text.encode("utf-8")).decode("ascii")


def task_metrics(task: str, metrics: Sequence[str], seen: Sequence[str]) -> list[str]:
    """The metrics of ``task`` to plot: ``metrics`` with ``headline`` expanded to the task's headline metrics (an
    unknown task's, or one without any: its first metric in the records)."""
    out: list[str] = []
    for m in metrics:
        if m != HEADLINE:
            out.append(m)
            continue
        try:
            out.extend(getattr(registry.get_task(task), "headline_metrics", ()) or seen[:1])
        except UserError:
            out.extend(seen[:1])
    return list(dict.fromkeys(out))


def _lower_is_better(task: str, metric: str) -> bool:
    try:
        declared = getattr(registry.get_task(task), "lower_is_better", ())
    except UserError:
        declared = ()
    return metric in declared or error_like(metric)


def collect_curves(records: Iterable[dict[str, Any]], metrics: Sequence[str] = (HEADLINE,)) -> tuple[list[Curve], int]:
    """The curves of ``records`` (a later record of the same checkpoint, layer and metric replaces an earlier one),
    and how many records were left out because their checkpoint has no training step."""
    records = list(records)
    seen: dict[str, list[str]] = {}
    for r in records:
        seen.setdefault(r["task"], [])
        if r["metric"] not in seen[r["task"]]:
            seen[r["task"]].append(r["metric"])
    wanted = {task: set(task_metrics(task, metrics, m)) for task, m in seen.items()}
    curves: dict[tuple, Curve] = {}
    unplaced = 0
    for r in sorted(records, key=lambda r: str(r.get("created", ""))):  # stable: file order within a stamp
        if r["metric"] not in wanted[r["task"]]:
            continue
        step, _ = training_step(r.get("checkpoint_meta"), r.get("checkpoint", ""))
        if step is None:
            unplaced += 1
            continue
        key = (r["task"], r.get("dataset", ""), r.get("split", ""), r.get("protocol", ""), r["metric"])
        curve = curves.setdefault(key, Curve(*key, lower_is_better=_lower_is_better(r["task"], r["metric"])))
        ck = r.get("checkpoint_id") or r.get("checkpoint", "")
        name = r.get("checkpoint_name") or Path(str(r.get("checkpoint", ""))).name
        _, _, values = curve.points.setdefault(ck, (step, name, {}))
        values[r["layer"]] = r.get("value")
    return [curves[k] for k in sorted(curves)], unplaced


def render(curves: list[Curve], title: str, unplaced: int = 0, sources: str = "", refresh: int = 0) -> str:
    from .site import _env

    css = resources.files("leaderboard").joinpath("static/style.css").read_text(encoding="utf-8")
    steps = sorted({s for c in curves for s, _, _ in c.points.values()})
    checkpoints = {ck for c in curves for ck in c.points}
    return _env().get_template("curves.html").render(
        title=title, css=css, curves=[{**vars(c), "layers": c.layers, "rows": c.rows, "svg": c.svg()} for c in curves],
        steps=steps, n_checkpoints=len(checkpoints), unplaced=unplaced, updated=now_iso(), sources=sources,
        refresh=refresh)


def write_curves_page(results: Sequence[str | Path], out: str | Path, metrics: Sequence[str] = (HEADLINE,),
                      title: str = "evalsuite: metrics per training step", refresh: int = 0) -> list[Curve]:
    """Read the records of ``results`` (files or folders) and write the page to ``out`` atomically."""
    files = find_result_files(results)
    records = [r for f in files for r in iter_records(f)]
    curves, unplaced = collect_curves(records, metrics)
    html = render(curves, title, unplaced, ", ".join(str(f) for f in files), refresh)
    atomic_write_text(out, html)
    return curves
