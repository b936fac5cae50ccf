"""Compare our numbers with published references or with another set of results.

Rows are matched by (method, arch, pretrain data, task, layer, metric, variant), and by dataset where a
reference row names one (the per-dataset numbers of a many-dataset task, ``linear_transfer`` and ``fewshot``);
against another results set also by checkpoint name, dataset and split. A matched pair is *compared*
only when the protocols agree; otherwise it is reported as ``protocol_mismatch`` and never
silently compared:

* against references: our record's preset name (``goyal19``, ``vissl``, ``quick``) must equal
  the reference protocol's source key (``goyal19``, ``mmselfsup``, ...), or be accepted
  explicitly (``--accept-protocol goyal19=mmselfsup``);
* against results: same preset and identical hyper-parameters (``params``), except those
  named by ``--ignore-param``.

Statuses: ``ok`` (|ours - reference| <= tolerance), ``regression`` (outside tolerance),
``no_value`` (ours is an explained NaN), ``protocol_mismatch``; reference rows with no compared
result are listed as ``missing``. A result of a checkpoint loaded with ``--allow-partial`` carries
the flag ``partial load: N missing keys``, and a result whose protocol deviates from the published one in an
element the conformance table marks (``deviations``, docs/protocols.md) is flagged against references; with
``strict`` either is a protocol mismatch (not comparable).
When no pair at all was compared the report says so, and why (``nothing_compared``); it never passes.
Exit code: 1 when any compared row is a regression or ``no_value`` (with ``strict``: also any
mismatch or missing row, or nothing compared), else 0.

``--paired`` (two result sets, sample by sample, with significance tests) is :mod:`leaderboard.paired`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from evalsuite.errors import UserError
from evalsuite.io import atomic_write_json

from .aggregate import partial_note
from .references import load_references, source_key

REF_KEY = ["method", "arch", "pretrain_data", "task", "layer", "metric", "variant"]
RESULTS_KEY = ["method", "arch", "pretrain_data", "checkpoint_name", "task", "dataset", "split", "layer", "metric",
               "variant"]
IGNORABLE = ("method", "arch", "pretrain_data", "checkpoint_name", "dataset", "split")


@dataclass
class Tolerance:
    """Absolute tolerance per metric (``default`` for the others) plus a relative part."""

    default: float = 0.5
    per_metric: dict[str, float] = field(default_factory=dict)
    relative: float = 0.0

    def allowed(self, metric: str, reference: float) -> float:
        rel = self.relative * abs(reference) if math.isfinite(reference) else 0.0
        return self.per_metric.get(metric, self.default) + rel

    @classmethod
    def parse(cls, items: Iterable[str] | None, relative: float = 0.0, default: float = 0.5) -> Tolerance:
        """``["0.5", "mAP=1.0"]`` -> default 0.5, mAP 1.0."""
        tol = cls(default=default, relative=relative)
        for item in items or []:
            name, _, value = str(item).rpartition("=")
            try:
                v = float(value)
            except ValueError:
                raise UserError(f"--tolerance expects NUMBER or METRIC=NUMBER, got {item!r}") from None
            if not math.isfinite(v) or v < 0:
                raise UserError(f"--tolerance must be a finite number >= 0, got {item!r}")
            if name:
                tol.per_metric[name] = v
            else:
                tol.default = v
        if not math.isfinite(relative) or relative < 0:
            raise UserError(f"--rel-tolerance must be >= 0, got {relative}")
        return tol

    def to_dict(self) -> dict[str, Any]:
        return {"default": self.default, "per_metric": dict(self.per_metric), "relative": self.relative}


@dataclass
class CompareReport:
    against: str
    tolerance: Tolerance
    rows: list[dict[str, Any]] = field(default_factory=list)  # compared + mismatched pairs
    missing: list[dict[str, Any]] = field(default_factory=list)
    unmatched: list[dict[str, Any]] = field(default_factory=list)  # our rows with nothing to compare to
    strict: bool = False
    why_nothing_compared: str = ""  # set when no pair was compared

    def count(self, status: str) -> int:
        return sum(r["status"] == status for r in self.rows)

    @property
    def n_compared(self) -> int:
        return self.count("ok") + self.count("regression") + self.count("no_value")

    @property
    def failed(self) -> bool:
        bad = self.count("regression") + self.count("no_value")
        if self.strict:
            bad += self.count("protocol_mismatch") + len(self.missing) + (self.n_compared == 0)
        return bad > 0

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0

    def summary(self) -> dict[str, Any]:
        nothing = self.n_compared == 0
        return {"compared": self.n_compared,
                "ok": self.count("ok"), "regression": self.count("regression"), "no_value": self.count("no_value"),
                "protocol_mismatch": self.count("protocol_mismatch"), "missing": len(self.missing),
                "unmatched_results": len(self.unmatched), "strict": self.strict,
                "nothing_compared": nothing, "why_nothing_compared": self.why_nothing_compared if nothing else "",
                "passed": not self.failed and not nothing}

    def to_dict(self) -> dict[str, Any]:
        return {"against": self.against, "tolerance": self.tolerance.to_dict(), "summary": self.summary(),
                "rows": self.rows, "missing": self.missing, "unmatched_results": self.unmatched}

    def write_json(self, path: str | Path) -> Path:
        return atomic_write_json(path, self.to_dict(), indent=2, sort_keys=True, default=_jsonable)

    def format_text(self, max_missing: int = 40) -> str:
        out = []
        head = ["status", "method", "arch", "task", "dataset", "layer", "metric", "variant", "ours", "reference",
                "delta", "tol", "protocol (ours | ref)", "flags"]
        table = []
        order = {"regression": 0, "no_value": 1, "ok": 2, "protocol_mismatch": 3}
        for r in sorted(self.rows, key=lambda r: (order.get(r["status"], 9), r["task"], r["method"], r["layer"])):
            table.append([r["status"], r["method"], r["arch"], r["task"], r.get("dataset", ""), r["layer"],
                          r["metric"], r["variant"],
                          _fmt(r["ours"]), _fmt(r["reference"]), _fmt(r["delta"], sign=True), _fmt(r["tolerance"]),
                          f"{r['our_protocol']} | {_short(r['ref_protocol'])}", "; ".join(r["flags"])])
        if table:
            out.append(_text_table(head, table))
        if self.missing:
            out.append(f"\n{len(self.missing)} reference row(s) without a compared result:")
            for m in self.missing[:max_missing]:
                where = f"{m['task']}/{m['dataset']}" if m.get("dataset") else m["task"]
                out.append(f"  {m['method']} {m['arch']} {m['pretrain_data']} {where} {m['layer']} "
                           f"{m['metric']} {m['variant']} = {m['reference']} [{_short(m['ref_protocol'])}]")
            if len(self.missing) > max_missing:
                out.append(f"  ... and {len(self.missing) - max_missing} more (see the JSON report)")
        s = self.summary()
        if s["nothing_compared"]:
            out.append(f"\nnothing compared: {s['why_nothing_compared']}")
        verdict = "FAIL" if self.failed else "PASS"
        if s["nothing_compared"]:
            verdict = "FAIL (nothing compared)" if self.failed else "nothing compared"
        out.append(f"\ncompared {s['compared']}: {s['ok']} within tolerance, {s['regression']} outside, "
                   f"{s['no_value']} without a value; {s['protocol_mismatch']} protocol mismatch(es) not compared; "
                   f"{s['missing']} missing -> {verdict}")
        return "\n".join(out).lstrip("\n")


def _jsonable(o: Any) -> Any:
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if hasattr(o, "item"):
        return o.item()
    return str(o)


def _short(s: str, n: int = 70) -> str:
    s = str(s)
    return s if len(s) <= n else s[: n - 1] + "…"


def _fmt(v: Any, sign: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:+.3f}" if sign else f"{v:.3f}"


def _text_table(head: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _none_if_nan(v: Any) -> Any:
    if v is None:
        return None
    v = float(v)
    return None if math.isnan(v) else v


def _pair_row(key_fields: list[str], o: Mapping, r: Mapping, ref_value: float, tol: Tolerance, compatible: bool,
              extra: dict[str, Any], strict: bool = False) -> dict[str, Any]:
    """One matched pair. Flagged: a result of a partially loaded checkpoint and, against a published number, one
    whose protocol deviates from the published one (``deviations``); with ``strict`` neither is comparable."""
    ours = _none_if_nan(o["value"])
    row = {k: o[k] for k in key_fields}
    partial = bool(o.get("partial", False))
    row.update(ours=ours, reference=ref_value, delta=None, tolerance=tol.allowed(o["metric"], ref_value),
               checkpoint=o.get("checkpoint", ""), our_protocol=o["protocol"],
               flags=[partial_note(int(o.get("missing", 0)))] if partial else [], **extra)
    deviates = list(o.get("deviations") or []) if "ref_source" in extra else []
    if deviates:
        row["flags"].append(f"deviates from the published protocol in {', '.join(deviates)} (docs/protocols.md)")
    row["mismatch"] = ("protocol" if not compatible else "partial load" if partial and strict
                       else "protocol deviation" if deviates and strict else "")
    if row["mismatch"]:
        row["status"] = "protocol_mismatch"
    elif ours is None:
        row["status"] = "no_value"
    else:
        row["delta"] = ours - ref_value
        within = abs(row["delta"]) <= row["tolerance"] + 1e-12
        row["status"] = "ok" if within else "regression"
    row["within"] = row["status"] == "ok"
    return row


def _few(values: Iterable[Any], n: int = 8) -> str:
    vals = sorted({str(v) if v != "" else "(empty)" for v in values})
    more = f" … (+{len(vals) - n} more)" if len(vals) > n else ""
    return ", ".join(vals[:n]) + more


def _why_no_match(ours: list[dict], theirs: list[dict], key: list[str], what: str) -> str:
    """Name the first key field (in order) on which no result agrees with any row of ``theirs``."""
    a_row = f"{'an' if what[0] in 'aeiou' else 'a'} {what} row"
    for i, name in enumerate(key):
        our_keys = {tuple(o[k] for k in key[: i + 1]) for o in ours}
        their_keys = {tuple(r[k] for k in key[: i + 1]) for r in theirs}
        if our_keys & their_keys:
            continue
        shared = {k[:i] for k in our_keys} & {k[:i] for k in their_keys}  # agree on the fields before
        same = f" with the same {', '.join(key[:i])}" if i else ""
        return (f"no result matched {a_row} by {', '.join(key)}: no {what} row has our {name}{same} "
                f"(ours: {_few(k[i] for k in our_keys if k[:i] in shared)}; "
                f"{what}: {_few(k[i] for k in their_keys if k[:i] in shared) or 'none'})")
    return f"no result matched {a_row} by {', '.join(key)}"


def _why_no_dataset(pairs: set[tuple[str, str]]) -> str:
    return (f"no result matched a reference row's dataset (the rows that agree on everything else are for other "
            f"datasets; ours: {_few(o for o, _ in pairs)}; reference: {_few(t for _, t in pairs)})")


def _why_not_comparable(rows: list[dict], hint: str) -> str:
    other = [r for r in rows if r["mismatch"] == "protocol"]
    partial = sum(r["mismatch"] == "partial load" for r in rows)
    deviating = sum(r["mismatch"] == "protocol deviation" for r in rows)
    parts = []
    if other:
        parts.append(f"{len(other)} with another protocol (ours: {_few(r['our_protocol'] for r in other)}; "
                     f"theirs: {_few(source_key(r['ref_protocol']) for r in other)}); {hint}")
    if partial:
        parts.append(f"{partial} from partially loaded checkpoints (not comparable under --strict)")
    if deviating:
        parts.append(f"{deviating} whose protocol deviates from the published one (not comparable under --strict)")
    return f"none of the {len(rows)} matched row(s) is comparable: " + "; ".join(parts)


def compare_to_references(agg: pd.DataFrame, tolerance: Tolerance, references: pd.DataFrame | None = None,
                          accept: Iterable[tuple[str, str]] = (), ignore: Iterable[str] = (),
                          all_missing: bool = False, strict: bool = False) -> CompareReport:
    """Compare deduplicated results (``aggregate.deduplicate``) with published reference rows."""
    refs = load_references() if references is None else references
    refs = refs[refs["value_num"].notna()].copy()
    ignore = set(ignore)
    bad = ignore - {"arch", "pretrain_data", "method"}
    if bad:
        raise UserError(f"--ignore-field accepts arch, pretrain_data or method, not {', '.join(sorted(bad))}")
    key = [k for k in REF_KEY if k not in ignore]
    accept = {(a, b) for a, b in accept}
    refs["ref_task"] = refs["task"]
    refs["task"] = refs["suite_task"]  # match on the suite's task names
    report = CompareReport(against="references", tolerance=tolerance, strict=strict)
    o_records = agg.to_dict("records")
    by_key: dict[tuple, list[dict]] = {}
    for o in o_records:
        by_key.setdefault(tuple(o[k] for k in key), []).append(o)
    scope = {tuple(o[k] for k in ("method", "arch", "pretrain_data") if k not in ignore) for o in o_records}
    matched_ours: set[int] = set()
    other_datasets: set[tuple[str, str]] = set()  # (ours, theirs) where only the dataset differed
    for r in refs.to_dict("records"):
        partners = by_key.get(tuple(r[k] for k in key), [])
        if r["dataset"]:  # a number for one dataset of a many-dataset task: only our record of that dataset
            other_datasets.update((o["dataset"], r["dataset"]) for o in partners if o["dataset"] != r["dataset"])
            partners = [o for o in partners if o["dataset"] == r["dataset"]]
        compared = False
        for o in partners:
            compatible = o["protocol"] == r["source_key"] or (o["protocol"], r["source_key"]) in accept
            row = _pair_row(REF_KEY, o, r, float(r["value_num"]), tolerance, compatible,
                            {"ref_protocol": r["protocol"], "ref_source": r["source_paper"], "ref_file": r["file"],
                             "ref_ambiguous": bool(r["ambiguous"]), "ref_task": r["ref_task"],
                             "dataset": o["dataset"]}, strict)
            report.rows.append(row)
            compared |= row["status"] != "protocol_mismatch"
            matched_ours.add(id(o))
        if not compared:
            in_scope = tuple(r[k] for k in ("method", "arch", "pretrain_data") if k not in ignore) in scope
            if all_missing or in_scope:
                report.missing.append({**{k: r[k] for k in REF_KEY}, "dataset": r["dataset"],
                                       "reference": float(r["value_num"]),
                                       "ref_protocol": r["protocol"], "ref_file": r["file"],
                                       "has_mismatched_result": bool(partners)})
    report.unmatched = [{k: o[k] for k in REF_KEY + ["dataset", "protocol"]} for o in o_records
                        if id(o) not in matched_ours]
    if report.n_compared == 0:
        report.why_nothing_compared = _why_not_comparable(
            report.rows, "--accept-protocol OURS=THEIRS accepts a protocol as the same") if report.rows \
            else _why_no_dataset(other_datasets) if other_datasets \
            else _why_no_match(o_records, refs.to_dict("records"), key, "reference")
    return report


def _checkpoint_name(spec: str) -> str:
    return Path(str(spec)).name if spec else ""


def compare_to_results(agg: pd.DataFrame, other: pd.DataFrame, tolerance: Tolerance,
                       ignore_params: Iterable[str] = (), ignore: Iterable[str] = (),
                       strict: bool = False, label: str = "results") -> CompareReport:
    """Compare deduplicated results with another deduplicated results set (e.g. pinned expectations)."""
    ignore = set(ignore)
    bad = ignore - set(IGNORABLE)
    if bad:
        raise UserError(f"--ignore-field accepts {', '.join(IGNORABLE)}, not {', '.join(sorted(bad))}")
    key = [k for k in RESULTS_KEY if k not in ignore]
    skip = set(ignore_params)

    def prep(df: pd.DataFrame) -> list[dict]:
        d = df.copy()
        # matched by the checkpoint's file name, which records of every version carry (not the display name)
        d["checkpoint_name"] = d["checkpoint"].map(_checkpoint_name)
        d["proto_sig"] = [json.dumps({k: v for k, v in p.items() if k not in skip}, sort_keys=True, default=str)
                          for p in d["params"]]
        return d.to_dict("records")

    ours, theirs = prep(agg), prep(other)
    by_key: dict[tuple, list[dict]] = {}
    for o in ours:
        by_key.setdefault(tuple(o[k] for k in key), []).append(o)
    report = CompareReport(against=label, tolerance=tolerance, strict=strict)
    matched: set[int] = set()
    for r in theirs:
        partners = by_key.get(tuple(r[k] for k in key), [])
        ref_value = _none_if_nan(r["value"])
        compared = False
        for o in partners:
            matched.add(id(o))
            compatible = o["protocol"] == r["protocol"] and o["proto_sig"] == r["proto_sig"]
            if ref_value is None:  # the expectation itself is an explained NaN: ours must be one too
                row = _pair_row(RESULTS_KEY, o, r, float("nan"), tolerance, compatible,
                                {"ref_protocol": r["protocol"]}, strict)
                row["reference"] = None
                if row["status"] != "protocol_mismatch":
                    row["status"] = "ok" if _none_if_nan(o["value"]) is None else "regression"
                    row["within"] = row["status"] == "ok"
            else:
                row = _pair_row(RESULTS_KEY, o, r, ref_value, tolerance, compatible,
                                {"ref_protocol": r["protocol"]}, strict)
            if not compatible:
                row["param_diff"] = _param_diff(o["params"], r["params"], skip)
            report.rows.append(row)
            compared |= row["status"] != "protocol_mismatch"
        if not compared:
            report.missing.append({**{k: r[k] for k in RESULTS_KEY}, "reference": ref_value,
                                   "ref_protocol": r["protocol"], "has_mismatched_result": bool(partners)})
    report.unmatched = [{k: o[k] for k in RESULTS_KEY + ["protocol"]} for o in ours if id(o) not in matched]
    if report.n_compared == 0:
        report.why_nothing_compared = _why_not_comparable(
            report.rows, "differing hyper-parameters are listed as param_diff in --json") \
            if report.rows else _why_no_match(ours, theirs, key, "expected")
    return report


def _param_diff(a: Mapping, b: Mapping, skip: set[str]) -> dict[str, list[Any]]:
    keys = (set(a) | set(b)) - skip
    return {k: [a.get(k), b.get(k)] for k in sorted(keys) if a.get(k) != b.get(k)}
