"""Build the static leaderboard site from result records.

Layout of the output directory (works offline from ``file://``; no CDN, no network)::

    index.html                overview: checkpoints x tasks at their best layer (sortable) + published best layers
                              (a multi-dataset task by its summary records alone, linear_transfer's mean); the
                              transfer tables (checkpoints x datasets, mean, average rank: linear_transfer, fewshot)
    tasks/<task>.html         per-layer tables and line plots per (dataset, split, metric), published rows beside ours
                              (spectrum: each label-free metric against kNN top-1 / VOC07 SVM mAP across checkpoints,
                              scatter plots and Spearman's rank correlation, where >= 3 checkpoints have both)
    checkpoints/<id>.html     every number of one checkpoint with its full protocol (params)
    plots/*.svg               matplotlib SVGs (embedded with <img>)
    static/style.css, static/sort.js
    leaderboard.csv           the aggregated table (one row per key, params as JSON)
    leaderboard.md            the overview (and the transfer tables, the spectrum correlations) as Markdown tables
    references_used.csv       the published rows shown on the site

The site is rendered into a temporary sibling directory and swapped into place
(:func:`evalsuite.io.replace_dir`), so a failed build leaves the previous site (or nothing) — never a
half-written one; a new output directory gets the umask's permissions, an existing one keeps its own.
An existing output directory is replaced only if it is empty or a previous leaderboard build.

Uncertainty (docs/uncertainty.md): a number shows its bootstrap interval (``± half-width`` in the overview,
``[low, high]`` on the task and checkpoint pages, error bars on the per-layer plots), or, when it is a mean over
several seeds, ``± std (n=...)``; in each overview column the best entry and those statistically tied with it
are marked ``1st`` / ``=1st`` (:func:`leaderboard.paired.tie_with_best`); a number whose protocol chose a
hyper-parameter on the test set is marked ``test-tuned``.
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
from evalsuite.stats import CI_METHOD

from .aggregate import (
    LABEL_FREE_TASK,
    RANKED_TASKS,
    SUMMARY_DATASET,
    Correlation,
    RankTable,
    best_layer,
    checkpoint_table,
    deduplicate,
    export_columns,
    layer_sort_key,
    load_results,
    partial_note,
    rank_table,
    spectrum_correlations,
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


def build_site(results: Iterable[str | Path] | pd.DataFrame, out: str | Path, *, mode: str = "mean",
               plots: bool = True, references: bool = True, title: str = "evalsuite leaderboard",
               skip_bad_lines: bool = False, tie_resamples: int = 1000, tie_alpha: float = 0.05) -> SiteReport:
    """Aggregate ``results`` (paths, or a DataFrame from :func:`load_results`) and write the site to ``out``.

    With ``skip_bad_lines``, unreadable lines of the results files are skipped (listed in ``report.skipped``).
    ``tie_resamples`` / ``tie_alpha``: the paired tests of the "tied for first" marks (0 resamples: intervals
    and seeds only).
    """
    import time

    t0 = time.perf_counter()
    if int(tie_resamples) < 0 or not 0.0 < float(tie_alpha) < 1.0:
        raise UserError(f"--tie-resamples must be >= 0 and --tie-alpha in (0, 1), got {tie_resamples} and {tie_alpha}")
    out = Path(out)
    _check_out(out)
    skipped: dict[str, list[int]] = {}
    raw = results if isinstance(results, pd.DataFrame) else \
        load_results(results, skipped=skipped if skip_bad_lines else None)
    t1 = time.perf_counter()
    agg = deduplicate(raw, mode)
    t2 = time.perf_counter()
    with replace_dir(out) as tmp:
        report = _render(agg, tmp, plots=plots, references=references, title=title, mode=mode,
                         ties={"resamples": int(tie_resamples), "alpha": float(tie_alpha)})
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
        if (g["dataset"] == SUMMARY_DATASET).any():  # a multi-dataset task: its summary here, the rest in its table
            g = g[g["dataset"] == SUMMARY_DATASET]
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


def _render(agg: pd.DataFrame, root: Path, *, plots: bool, references: bool, title: str, mode: str,
            ties: dict[str, Any] | None = None) -> SiteReport:
    env = _env()
    agg = _with_spread(agg)
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
    _mark_ties(overview_rows, cols, **(ties or {"resamples": 0, "alpha": 0.05}))
    columns = [{**_col_label(c, multi[c[0]]), "task_slug": task_slug[c[0]], "lower": _lower(c[3])} for c in cols]
    published_best = _published_best(refs, cols) if refs is not None else []
    transfer = [_rank_view(rank_table(agg, t), ck_info) for t in RANKED_TASKS if t in tasks]
    transfer = [t for t in transfer if t["rows"]]
    (root / "plots").mkdir()
    correlations = _correlation_views(spectrum_correlations(agg), ck_info, root, plots)
    pages = []
    (root / "index.html").write_text(env.get_template("index.html").render(
        title=title, base="", columns=columns, rows=overview_rows, tasks=[(t, task_slug[t]) for t in tasks],
        checkpoints=list(ck_info.values()), published=published_best, mode=mode, our_protocols=our_protocols,
        n_numbers=len(agg), transfer=transfer), encoding="utf-8")
    pages.append("index.html")

    # ---------------- task pages
    (root / "tasks").mkdir()
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
                rsub = refs[(refs["suite_task"] == task) & (refs["metric"] == metric) & (refs["variant"] == variant)
                            & refs["dataset"].isin(["", dataset])]  # a per-dataset number: this dataset's only
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
                                                                       all_layers],
                             [_bounds(x["by_layer"].get(lay)) for lay in all_layers]) for x in ordered],
                           [(f"{p['label']} [{p['source_key']}]", [_num(p["by_layer"].get(lay)) for lay in
                                                                    all_layers]) for p in pub
                            if sum(lay in p["by_layer"] for lay in all_layers) > 1],
                           metric, f"{task} · {dataset}/{split} · {metric} {variant}".strip(), lower)
                plot_file = "../plots/" + name
            sections.append({"dataset": dataset, "split": split, "metric": metric, "variant": variant,
                             "layers": layers, "rows": ordered, "lower": lower, "plot": plot_file,
                             "published": pub, "pub_layers": pub_layers})
        (root / "tasks" / f"{task_slug[task]}.html").write_text(env.get_template("task.html").render(
            title=f"{task} — {title}", base="../", task=task, sections=sections,
            correlations=correlations if task == LABEL_FREE_TASK else []), encoding="utf-8")
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
    export = agg[cols_out].copy()
    export["tuned_on_test_params"] = [" ".join(t) for t in export["tuned_on_test_params"]]
    export.to_csv(root / "leaderboard.csv", index=False)
    markdown = _markdown(columns, overview_rows) + "".join(_rank_markdown(t) for t in transfer) + \
        _correlation_markdown(correlations)
    (root / "leaderboard.md").write_text(markdown, encoding="utf-8")
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


def _bounds(r: dict | None) -> tuple[float, float] | None:
    """The error bar of a plotted value: mean ± std over several seeds, else its bootstrap interval."""
    if r is None or not _finite(r["value"]):
        return None
    if r["n_seeds"] > 1 and _finite(r["std"]):
        return (r["value"] - r["std"], r["value"] + r["std"])
    if _finite(r["ci_low"]) and _finite(r["ci_high"]):
        return (float(r["ci_low"]), float(r["ci_high"]))
    return None


def _spread(r: dict) -> dict[str, str]:
    """How a number's uncertainty is shown: ``pm`` (``± 1.10``: the interval's half-width, or ``± std (n=3)`` over
    seeds), ``range`` (``[70.10, 72.30]``, or the same ``± std (n=3)``) and ``title`` (what it is); empty strings
    when there is none."""
    if r["n_seeds"] > 1 and _finite(r["std"]):
        text = f"± {fmt_num(r['std'])} (n={int(r['n_seeds'])})"
        return {"pm": text, "range": text, "title": f"mean ± sample std over {int(r['n_seeds'])} seeds"}
    lo, hi = r.get("ci_low"), r.get("ci_high")
    if _finite(lo) and _finite(hi):
        level = r.get("ci_level")
        level_text = f"{float(level):.0%} " if _finite(level) else ""
        method = r.get("ci_method") or CI_METHOD
        # the bootstrap's wording as before; an interval of the statistic's own (few-shot episodes) names its method
        what = f"{level_text}bootstrap interval over the test samples" if method == CI_METHOD else \
            f"{level_text}interval ({method})"
        return {"pm": f"± {fmt_num((hi - lo) / 2)}", "range": f"[{fmt_num(lo)}, {fmt_num(hi)}]",
                "title": f"{what}: [{fmt_num(lo, 3)}, {fmt_num(hi, 3)}]"}
    return {"pm": "", "range": "", "title": ""}


def _with_spread(agg: pd.DataFrame) -> pd.DataFrame:
    out = agg.copy()
    out["spread"] = [_spread(r) for r in out.to_dict("records")] if len(out) else pd.Series(dtype=object)
    return out


def _mark_ties(rows: list[dict], cols: list[tuple], *, resamples: int, alpha: float) -> None:
    """Per overview column, the best entry and those statistically tied with it (paired.tie_with_best) get
    ``tie`` = {"mark": "1st" / "=1st", "title": how it was told}; marks only where at least one other entry could
    be told apart or tied."""
    from .paired import OutputsCache, tie_with_best

    cache = OutputsCache()
    for i, col in enumerate(cols):
        cells = [r["cells"][i] for r in rows if r["cells"][i] is not None and _finite(r["cells"][i]["value"])]
        if len(cells) < 2:
            continue
        lower = _lower(col[3])
        best = (min if lower else max)(cells, key=lambda c: c["value"])
        told = [(c, tie_with_best(best, c, cache, resamples=resamples, alpha=alpha)) for c in cells if c is not best]
        told = [(c, t) for c, t in told if t is not None]
        if not told:
            continue
        best["tie"] = {"mark": "1st", "title": f"best of the column; {sum(t.tied for _, t in told)} of "
                                               f"{len(cells) - 1} other(s) statistically tied with it"}
        for c, t in told:
            if t.tied:
                p = "" if t.p_value is None else f", p = {t.p_value:.3g}"
                c["tie"] = {"mark": "=1st", "title": f"statistically tied with the best ({t.method}{p})"}


def _num(r: dict | None) -> float | None:
    return float(r["value_num"]) if r is not None else None


def _published_best(refs: pd.DataFrame, cols: list[tuple]) -> list[dict]:
    """Published rows at their best layer for the overview's (task, metric, variant) columns (and dataset, for a row
    that names one)."""
    wanted = {(c[0], c[3], c[4]) for c in cols}
    wanted_ds = {(c[0], c[1], c[3], c[4]) for c in cols}
    out = []
    if refs is None or refs.empty:
        return out
    for (task, ds, metric, variant, m, a, pdata, proto), g in refs.groupby(
            ["suite_task", "dataset", "metric", "variant", "method", "arch", "pretrain_data", "protocol"], sort=True):
        if (task, metric, variant) not in wanted or (ds and (task, ds, metric, variant) not in wanted_ds):
            continue
        lower = _lower(metric)
        r = g.loc[g["value_num"].idxmin() if lower else g["value_num"].idxmax()]
        out.append({"task": f"{task} · {ds}" if ds else task, "metric": metric, "variant": variant,
                    "label": f"{m} / {a} / {pdata}",
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
                pm = f" {c['spread']['pm']}" if c["spread"]["pm"] else ""
                tuned = " †" if c["tuned_on_test"] else ""
                tie = f" [{c['tie']['mark']}]" if c.get("tie") else ""
                cells.append(f"{fmt_num(c['value'])}{pm} ({c['layer']}){tuned}{tie}")
        lines.append("| " + " | ".join(_md_cell(x) for x in cells) + " |")
    lines.append("")
    lines.append("Best layer per task in parentheses; numbers from `evalsuite leaderboard build`. ± is the half-width "
                 "of the bootstrap interval over the test samples, or the std over n seeds; [1st] / [=1st]: the best "
                 "of a column and the entries statistically tied with it; †: a hyper-parameter was chosen on the test "
                 "set (docs/uncertainty.md).")
    return "\n".join(lines) + "\n"


def _rank_view(table: RankTable, ck_info: dict[str, dict]) -> dict[str, Any]:
    """A transfer table for the template: column labels (dataset, then metric and shots) and one row per
    (checkpoint, protocol) with its layer, numbers, mean, count and average rank."""
    def shots(variant: str) -> str:  # shots=5 -> 5-shot
        return f"{variant.split('=', 1)[1]}-shot" if variant.startswith("shots=") else variant

    columns = [{"label": ds, "sub": " ".join(x for x in (metric, shots(variant)) if x)}
               for ds, metric, variant in table.columns]
    rows = []
    for r in table.rows.to_dict("records"):
        cells = [r[str(c)] if _finite(r[str(c)]) else None for c in table.columns]
        rows.append({"ck": ck_info[r["ckpt"]], "protocol": r["protocol"], "layer": r["layer"], "cells": cells,
                     "mean": r["mean"], "n": int(r["n"]), "avg_rank": r["avg_rank"]})
    return {"task": table.task, "id": f"transfer-{slug(table.task)}", "columns": columns, "rows": rows,
            "n_columns": len(columns)}


def _rank_markdown(t: dict[str, Any]) -> str:
    head = ["checkpoint", "protocol", "layer", *(f"{c['label']} {c['sub']}".strip() for c in t["columns"]), "mean",
            "avg. rank"]
    lines = ["", f"## {t['task']}: checkpoints x datasets", "",
             "| " + " | ".join(_md_cell(h) for h in head) + " |", "|" + "---|" * len(head)]
    for r in t["rows"]:
        n = f" ({r['n']} of {t['n_columns']})" if r["n"] < t["n_columns"] else ""
        cells = [r["ck"]["label"], r["protocol"], r["layer"], *(fmt_num(c) for c in r["cells"]),
                 fmt_num(r["mean"]) + n, fmt_num(r["avg_rank"])]
        lines.append("| " + " | ".join(_md_cell(x) for x in cells) + " |")
    lines += ["", "Each checkpoint at its layer with the most numbers (then the best mean); mean over its datasets; "
              "average rank: per column, the checkpoints of the same protocol ranked (1 = best), averaged over the "
              "row's columns (Ericsson et al. 2021)."]
    return "\n".join(lines) + "\n"


def _correlation_views(corrs: list[Correlation], ck_info: dict[str, dict], root: Path,
                       plots: bool) -> list[dict[str, Any]]:
    """The spectrum page's "label-free vs labelled" section: per correlation its labels, Spearman's rho and p, the
    points (checkpoint, tap, both values) and a scatter plot (``plots/``, linked from the task page)."""
    views = []
    for c in corrs:
        task, metric, dataset, split, variant, protocol = c.target
        target = " ".join(x for x in (task, metric, variant) if x) + f" ({dataset}/{split}, {protocol})"
        label_free = f"{c.metric} ({c.spectrum[0]}, {c.spectrum[1]})"
        plot = None
        if plots:
            name = slug(f"corr|{c.metric}|{'|'.join(c.spectrum)}|{'|'.join(c.target)}") + ".svg"
            from .plots import scatter_plot

            scatter_plot(root / "plots" / name, [(ck_info[ck]["label"], x, y) for ck, _, x, y in c.points],
                         label_free, target, f"Spearman ρ = {fmt_num(c.rho)} (n = {len(c.points)})")
            plot = "../plots/" + name
        views.append({"metric": c.metric, "label_free": label_free, "target": target, "rho": c.rho,
                      "p_value": c.p_value, "n": len(c.points), "plot": plot,
                      "points": [{"ck": ck_info[ck], "layer": lay, "x": x, "y": y} for ck, lay, x, y in c.points]})
    return views


def _correlation_markdown(views: list[dict[str, Any]]) -> str:
    if not views:
        return ""
    lines = ["", f"## {LABEL_FREE_TASK}: label-free metrics vs labelled results", "",
             "| label-free metric | labelled result | checkpoints | Spearman ρ | p |", "|---|---|---|---|---|"]
    for v in views:
        cells = [v["label_free"], v["target"], str(v["n"]), fmt_num(v["rho"]), fmt_num(v["p_value"], 3)]
        lines.append("| " + " | ".join(_md_cell(x) for x in cells) + " |")
    lines += ["", "One point per checkpoint: the labelled result at its best tap and the label-free metric at that "
              "same tap; Spearman's rank correlation across the checkpoints (scipy.stats.spearmanr)."]
    return "\n".join(lines) + "\n"
