"""Build the static leaderboard site from result records.

Layout of the output directory (works offline from ``file://``; no CDN, no network)::

    index.html                overview: checkpoints x tasks at their best layer (sortable) + published best layers
    tasks/<task>.html         per-layer tables and line plots per (dataset, split, metric), published rows beside ours
    checkpoints/<id>.html     every number of one checkpoint with its full protocol (params)
    plots/*.svg               matplotlib SVGs (embedded with <img>)
    static/style.css, static/sort.js
    leaderboard.csv           the aggregated table (one row per key, params as JSON)
    leaderboard.md            the overview as a Markdown table
    references_used.csv       the published rows shown on the site

The site is rendered into a temporary sibling directory and swapped into place
(:func:`evalsuite.io.replace_dir`), so a failed build leaves the previous site (or nothing) — never a
half-written one; a new output directory gets the umask's permissions, an existing one keeps its own.
An existing output directory is replaced only if it is empty or a previous leaderboard build.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import pandas as pd
from jinja2 import Environment, PackageLoader, select_autoescape

from evalsuite.errors import UserError
from evalsuite.io import replace_dir

from .aggregate import (
    best_layer,
    checkpoint_table,
    deduplicate,
    export_columns,
    layer_sort_key,
    load_results,
    partial_note,
)
from .references import load_references

MARKER = ".evalsuite-leaderboard"
PRIMARY_METRICS = ("mAP", "top1", "AP50", "median_angle_error_deg", "pct_within_11.25deg", "spl", "success_rate")


@dataclass
class SiteReport:
    out: Path
    n_records: int
    n_rows: int
    n_checkpoints: int
    tasks: list[str]
    pages: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    skipped: dict[str, list[int]] = field(default_factory=dict)  # unreadable lines skipped, per file


def slug(name: str) -> str:
    """A file-name-safe, collision-free slug for a user-supplied name."""
    base = re.sub(r"[^a-z0-9]+", "-", str(name).lower()).strip("-")[:40] or "x"
    return f"{base}-{hashlib.sha1(str(name).encode()).hexdigest()[:8]}"


def fmt_num(v: Any, digits: int = 2) -> str:
    if v is None:
        return "–"
    try:
        f = float(v)
    except (TypeError, ValueError):
        return str(v)
    if math.isnan(f):
        return "–"
    return f"{f:.{digits}f}"


def _env() -> Environment:
    env = Environment(loader=PackageLoader("leaderboard", "templates"), autoescape=select_autoescape(default=True),
                      trim_blocks=True, lstrip_blocks=True)
    env.filters["num"] = fmt_num
    env.filters["pretty"] = lambda d: json.dumps(d, indent=2, sort_keys=True, default=str)
    return env


def _check_out(out: Path) -> None:
    if out.exists():
        if not out.is_dir():
            raise UserError("output path exists and is not a directory", out)
        if any(out.iterdir()) and not (out / MARKER).exists():
            raise UserError("output directory is not empty and is not a previous leaderboard build; "
                            "refusing to replace it", out)


def build_site(results: Iterable[str | Path] | pd.DataFrame, out: str | Path, *, mode: str = "latest",
               plots: bool = True, references: bool = True, title: str = "evalsuite leaderboard",
               skip_bad_lines: bool = False) -> SiteReport:
    """Aggregate ``results`` (paths, or a DataFrame from :func:`load_results`) and write the site to ``out``.

    With ``skip_bad_lines``, unreadable lines of the results files are skipped (listed in ``report.skipped``).
    """
    import time

    t0 = time.perf_counter()
    out = Path(out)
    _check_out(out)
    skipped: dict[str, list[int]] = {}
    raw = results if isinstance(results, pd.DataFrame) else \
        load_results(results, skipped=skipped if skip_bad_lines else None)
    t1 = time.perf_counter()
    agg = deduplicate(raw, mode)
    t2 = time.perf_counter()
    with replace_dir(out) as tmp:
        report = _render(agg, tmp, plots=plots, references=references, title=title, mode=mode)
        (tmp / MARKER).write_text("built by evalsuite leaderboard build\n")
        t3 = time.perf_counter()
    report.out, report.n_records, report.skipped = out, len(raw), skipped
    report.timings = {"read_s": t1 - t0, "aggregate_s": t2 - t1, "render_s": t3 - t2,
                      "total_s": time.perf_counter() - t0}
    return report


# ------------------------------------------------------------------ view models

def _row_key(r: dict) -> tuple[str, str]:
    return (r["ckpt"], r["protocol"])


def _cols_for_overview(best: pd.DataFrame) -> list[tuple]:
    cols = []
    for task, g in best.groupby("task", sort=True):
        metrics = [m for m in PRIMARY_METRICS if m in set(g["metric"])] or sorted(set(g["metric"]))
        sub = g[g["metric"].isin(metrics)]
        combos = sub[["dataset", "split", "metric", "variant"]].drop_duplicates().to_dict("records")
        combos.sort(key=lambda c: (metrics.index(c["metric"]), c["dataset"], c["split"], _variant_rank(c["variant"])))
        for c in combos:
            cols.append((task, c["dataset"], c["split"], c["metric"], c["variant"]))
    return cols


def _variant_rank(v: str) -> tuple[int, str]:
    m = re.match(r"^\w+=(\d+)$", v or "")
    return (int(m.group(1)), v) if m else (-1, v or "")


def _col_label(col: tuple, multi_dataset: bool) -> dict[str, str]:
    task, dataset, split, metric, variant = col
    parts = [task]
    if multi_dataset:
        parts.append(f"{dataset}/{split}")
    sub = " ".join(x for x in (metric, variant) if x)
    return {"task": " ".join(parts), "sub": sub}


def _render(agg: pd.DataFrame, root: Path, *, plots: bool, references: bool, title: str, mode: str) -> SiteReport:
    env = _env()
    static = resources.files("leaderboard") / "static"
    (root / "static").mkdir()
    for name in ("style.css", "sort.js"):
        (root / "static" / name).write_bytes((static / name).read_bytes())
    ckpts = checkpoint_table(agg)
    ck_info = {r["ckpt"]: _checkpoint_view(r) for r in ckpts.to_dict("records")}
    tasks = sorted(set(agg["task"])) if not agg.empty else []
    task_slug = {t: slug(t) for t in tasks}
    refs = load_references() if references else None
    if refs is not None:
        refs = refs[refs["suite_task"].isin(tasks) & refs["value_num"].notna()].copy()
    best = best_layer(agg)
    our_protocols = sorted(set(agg["protocol"])) if not agg.empty else []

    # ---------------- overview
    cols = _cols_for_overview(best) if not best.empty else []
    multi = {t: best[best["task"] == t][["dataset", "split"]].drop_duplicates().shape[0] > 1 for t in tasks}
    col_index = {c: i for i, c in enumerate(cols)}
    rows: dict[tuple, dict] = {}
    for r in best.to_dict("records"):
        c = (r["task"], r["dataset"], r["split"], r["metric"], r["variant"])
        row = rows.setdefault(_row_key(r), {"ck": ck_info[r["ckpt"]], "protocol": r["protocol"],
                                            "cells": [None] * len(cols)})
        if c in col_index:
            row["cells"][col_index[c]] = r
    overview_rows = sorted(rows.values(), key=lambda x: (x["ck"]["label"], x["protocol"]))
    columns = [{**_col_label(c, multi[c[0]]), "task_slug": task_slug[c[0]], "lower": _lower(c[3])} for c in cols]
    published_best = _published_best(refs, cols) if refs is not None else []
    pages = []
    (root / "index.html").write_text(env.get_template("index.html").render(
        title=title, base="", columns=columns, rows=overview_rows, tasks=[(t, task_slug[t]) for t in tasks],
        checkpoints=list(ck_info.values()), published=published_best, mode=mode, our_protocols=our_protocols,
        n_numbers=len(agg)), encoding="utf-8")
    pages.append("index.html")

    # ---------------- task pages
    (root / "tasks").mkdir()
    (root / "plots").mkdir()
    used_refs = []
    for task in tasks:
        sections = []
        tdf = agg[agg["task"] == task]
        for (dataset, split, metric, variant), g in tdf.groupby(["dataset", "split", "metric", "variant"],
                                                                 sort=True):
            layers = sorted(set(g["layer"]), key=layer_sort_key)
            srows = {}
            for r in g.to_dict("records"):
                sr = srows.setdefault(_row_key(r), {"ck": ck_info[r["ckpt"]], "protocol": r["protocol"],
                                                    "by_layer": {}})
                sr["by_layer"][r["layer"]] = r
            lower = _lower(metric)
            for sr in srows.values():
                vals = [(lay, x["value"]) for lay, x in sr["by_layer"].items() if _finite(x["value"])]
                sr["best"] = (min if lower else max)(vals, key=lambda t: t[1])[0] if vals else None
                sr["params"] = sr["by_layer"][sr["best"]]["params"] if sr["best"] else \
                    next(iter(sr["by_layer"].values()))["params"]
            pub = []
            if refs is not None:
                rsub = refs[(refs["suite_task"] == task) & (refs["metric"] == metric) & (refs["variant"] == variant)]
                for (m, a, pdata, proto), rg in rsub.groupby(["method", "arch", "pretrain_data", "protocol"],
                                                             sort=True):
                    by_layer = {x["layer"]: x for x in rg.to_dict("records")}
                    src = rg.iloc[0]
                    pub.append({"label": f"{m} / {a} / {pdata}", "protocol": proto, "source_key": src["source_key"],
                                "source": src["source_paper"], "file": src["file"], "by_layer": by_layer,
                                "ambiguous": bool(rg["ambiguous"].any()),
                                "mismatch": src["source_key"] not in set(g["protocol"])})
                    used_refs.append(rg)
            pub_layers = sorted({lay for p in pub for lay in p["by_layer"]}, key=layer_sort_key)
            all_layers = sorted(set(layers) | set(pub_layers), key=layer_sort_key)
            plot_file = None
            ordered = sorted(srows.values(), key=lambda x: (x["ck"]["label"], x["protocol"]))
            if plots and (len(layers) > 1 or len(all_layers) > 1):
                name = slug(f"{task}|{dataset}|{split}|{metric}|{variant}") + ".svg"
                from .plots import layer_plot

                layer_plot(root / "plots" / name, all_layers,
                           [(f"{x['ck']['label']} [{x['protocol']}]", [_val(x["by_layer"].get(lay)) for lay in
                                                                       all_layers]) for x in ordered],
                           [(f"{p['label']} [{p['source_key']}]", [_num(p["by_layer"].get(lay)) for lay in
                                                                    all_layers]) for p in pub
                            if sum(lay in p["by_layer"] for lay in all_layers) > 1],
                           metric, f"{task} · {dataset}/{split} · {metric} {variant}".strip(), lower)
                plot_file = "../plots/" + name
            sections.append({"dataset": dataset, "split": split, "metric": metric, "variant": variant,
                             "layers": layers, "rows": ordered, "lower": lower, "plot": plot_file,
                             "published": pub, "pub_layers": pub_layers})
        (root / "tasks" / f"{task_slug[task]}.html").write_text(env.get_template("task.html").render(
            title=f"{task} — {title}", base="../", task=task, sections=sections), encoding="utf-8")
        pages.append(f"tasks/{task_slug[task]}.html")

    # ---------------- checkpoint pages
    (root / "checkpoints").mkdir()
    for ck, g in agg.groupby("ckpt", sort=False):
        info = ck_info[ck]
        recs = g.to_dict("records")
        latest = max(recs, key=lambda r: (r["created"], r["order"]))
        (root / "checkpoints" / f"{info['slug']}.html").write_text(env.get_template("checkpoint.html").render(
            title=f"{info['label']} — {title}", base="../", ck=info, records=recs, latest=latest,
            task_slug=task_slug), encoding="utf-8")
        pages.append(f"checkpoints/{info['slug']}.html")

    # ---------------- exports
    cols_out = [c for c in export_columns() if c in agg.columns]
    agg[cols_out].to_csv(root / "leaderboard.csv", index=False)
    (root / "leaderboard.md").write_text(_markdown(columns, overview_rows), encoding="utf-8")
    if used_refs:
        pd.concat(used_refs).drop_duplicates().drop(columns=["value_num"]).to_csv(root / "references_used.csv",
                                                                                    index=False)
    return SiteReport(out=root, n_records=0, n_rows=len(agg), n_checkpoints=len(ck_info), tasks=tasks, pages=pages)


def _checkpoint_view(row: dict) -> dict:
    keys = row["checkpoint_load"].get("missing_keys")
    return {**row, "slug": slug(row["ckpt"]), "partial_note": partial_note(row["missing"]),
            "missing_keys": [str(k) for k in keys] if isinstance(keys, list) else []}


def _lower(metric: str) -> bool:
    from .aggregate import lower_is_better

    return lower_is_better(metric)


def _finite(v: Any) -> bool:
    return v is not None and isinstance(v, (int, float)) and math.isfinite(v)


def _val(r: dict | None) -> float | None:
    return r["value"] if r is not None and _finite(r["value"]) else None


def _num(r: dict | None) -> float | None:
    return float(r["value_num"]) if r is not None else None


def _published_best(refs: pd.DataFrame, cols: list[tuple]) -> list[dict]:
    """Published rows at their best layer for the overview's (task, metric, variant) columns."""
    wanted = {(c[0], c[3], c[4]) for c in cols}
    out = []
    if refs is None or refs.empty:
        return out
    for (task, metric, variant, m, a, pdata, proto), g in refs.groupby(
            ["suite_task", "metric", "variant", "method", "arch", "pretrain_data", "protocol"], sort=True):
        if (task, metric, variant) not in wanted:
            continue
        lower = _lower(metric)
        r = g.loc[g["value_num"].idxmin() if lower else g["value_num"].idxmax()]
        out.append({"task": task, "metric": metric, "variant": variant, "label": f"{m} / {a} / {pdata}",
                    "value": r["value"], "layer": r["layer"], "protocol": proto, "source": r["source_paper"],
                    "source_key": r["source_key"], "ambiguous": bool(r["ambiguous"])})
    return out


def _md_cell(s: str) -> str:
    """Markdown renderers pass inline HTML through: escape it, and the table's pipes."""
    s = str(s).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return s.replace("|", "\\|").replace("\n", " ")


def _markdown(columns: list[dict], rows: list[dict]) -> str:
    head = ["checkpoint", "protocol"] + [f"{c['task']} {c['sub']}".strip() for c in columns]
    lines = ["| " + " | ".join(_md_cell(h) for h in head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["ck"]["label"], r["protocol"]]
        for c in r["cells"]:
            if c is None or not _finite(c["value"]):
                cells.append("–")
            else:
                std = f" ± {fmt_num(c['std'])}" if _finite(c.get("std")) else ""
                cells.append(f"{fmt_num(c['value'])}{std} ({c['layer']})")
        lines.append("| " + " | ".join(_md_cell(x) for x in cells) + " |")
    lines.append("")
    lines.append("Best layer per task in parentheses; numbers from `evalsuite leaderboard build`.")
    return "\n".join(lines) + "\n"
