"""Paired comparisons of two runs on the same test samples, from their per-sample outputs (docs/uncertainty.md).

``evalsuite compare --paired`` (:func:`compare_paired`): every (task, dataset, split, layer, metric, variant) both
result sets hold is one row, when both records have per-sample outputs of the same test set (same
``dataset_fingerprint``, sample count, statistic, and ``targets`` / ``labels`` where the files keep them). A row's
test is McNemar's on per-sample correctness (boolean per-sample values: top-n hits) and otherwise the paired
bootstrap's p-value; every row also gets the paired bootstrap interval of the difference A - B. Holm's
adjustment runs over all rows compared; a row *differs* when its adjusted p-value is at most ``alpha`` and its
difference is outside the compare command's tolerance, and only such rows fail the comparison.

The leaderboard's "tied for first" bracket (:func:`tie_with_best`) uses the same paired test against the best
entry where both have outputs; otherwise Welch's t-test over seeds, otherwise overlapping intervals.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from evalsuite import stats
from evalsuite.console import table
from evalsuite.errors import UserError
from evalsuite.io import atomic_write_json
from evalsuite.outputs import load_arrays

from .compare import Tolerance

PAIRED_KEY = ["task", "dataset", "split", "layer", "metric", "variant"]
#: arrays that identify the test samples and their order; compared when both outputs files keep them (few-shot:
#: ``episodes``, the rows each episode drew, so two runs are paired episode by episode)
SAMPLE_IDS = ("targets", "labels", "episodes")
#: a recorded value and the one recomputed from its outputs agree to this (in the metric's units)
VALUE_TOLERANCE = 1e-6


class OutputsCache:
    """Every outputs file read once (sha256 checked) while rows are compared."""

    def __init__(self) -> None:
        self._files: dict[str, dict[str, np.ndarray]] = {}

    def arrays(self, rec: Mapping[str, Any]) -> dict[str, np.ndarray]:
        path = str((Path(rec["source_file"]).parent / rec["outputs"]["file"]).resolve())
        if path not in self._files:
            self._files[path] = load_arrays(rec["source_file"], rec)
        return self._files[path]


@dataclass(frozen=True)
class Paired:
    """Both records' metric arrays, ready for a paired test."""

    statistic: str
    a: dict[str, np.ndarray]
    b: dict[str, np.ndarray]
    scale: float


def _finite(v: Any) -> bool:
    """A finite number (numpy scalars included; None, NaN and booleans are not)."""
    if v is None or isinstance(v, (bool, np.bool_, str)):
        return False
    try:
        return math.isfinite(float(v))
    except (TypeError, ValueError):
        return False


def pair_outputs(a: Mapping[str, Any], b: Mapping[str, Any], cache: OutputsCache) -> Paired | str:
    """The two records' arrays when they can be compared sample by sample, else the reason they cannot."""
    for side, r in (("A", a), ("B", b)):
        if not _finite(r.get("value")):
            return f"no value in {side}"
        if not isinstance(r.get("outputs"), Mapping):
            return f"no per-sample outputs in {side}"
        if not r.get("dataset_fingerprint"):
            return f"no dataset fingerprint in {side}: the test sets cannot be checked to be the same"
    ra, rb = a["outputs"], b["outputs"]
    if a["dataset_fingerprint"] != b["dataset_fingerprint"]:
        return (f"different test sets (dataset fingerprints {a['dataset_fingerprint'][:12]} vs "
                f"{b['dataset_fingerprint'][:12]})")
    if ra.get("samples") != rb.get("samples"):
        return f"different numbers of test samples ({ra.get('samples')} vs {rb.get('samples')})"
    if ra["statistic"] != rb["statistic"] or float(ra["scale"]) != float(rb["scale"]):
        return f"the metric is computed differently ({ra['statistic']} x {ra['scale']} vs {rb['statistic']} x " \
               f"{rb['scale']})"
    try:
        fa, fb = cache.arrays(a), cache.arrays(b)
    except UserError as e:
        return f"outputs unreadable: {e}"
    for name in SAMPLE_IDS:
        if name in fa and name in fb and not np.array_equal(fa[name], fb[name]):
            return f"the test samples differ in order or labels ({name} arrays differ)"
    arrays = [{role: f[name] for role, name in r["arrays"].items()} for f, r in ((fa, ra), (fb, rb))]
    st, scale = stats.get_statistic(ra["statistic"]), float(ra["scale"])
    for side, r, arr in (("A", a, arrays[0]), ("B", b, arrays[1])):
        got = st.point(arr) * scale
        if not math.isclose(got, float(r["value"]), rel_tol=VALUE_TOLERANCE, abs_tol=VALUE_TOLERANCE):
            return f"{side}'s outputs give {got:.6g}, not its recorded value {float(r['value']):.6g}"
    return Paired(ra["statistic"], arrays[0], arrays[1], scale)


def is_correctness(p: Paired) -> bool:
    """Per-sample correctness (a mean of booleans: top-n hits), where McNemar's test applies."""
    return p.statistic == "mean" and p.a["values"].dtype == bool and p.b["values"].dtype == bool


def paired_test(p: Paired, resamples: int, level: float, seed: int) -> dict[str, Any]:
    """The paired bootstrap of the difference A - B (in the metric's units) and, on per-sample correctness,
    McNemar's test; ``p_value`` / ``test`` is the row's test: McNemar where it applies, else the bootstrap's."""
    d = stats.paired_bootstrap(p.statistic, p.a, p.b, resamples, level, seed)
    out: dict[str, Any] = {"difference": d.difference * p.scale, "diff_low": d.low * p.scale,
                           "diff_high": d.high * p.scale, "p_bootstrap": d.p_value, "mcnemar": None,
                           "p_value": d.p_value, "test": "paired bootstrap"}
    if is_correctness(p):
        m = stats.mcnemar(p.a["values"], p.b["values"])
        out["mcnemar"] = {"only_a": m.b, "only_b": m.c, "statistic": m.statistic, "p_value": m.p_value,
                          "method": m.method}
        out["p_value"], out["test"] = m.p_value, f"McNemar ({m.method})"
    return out


# ------------------------------------------------------------------------------------------------ compare


@dataclass
class PairedReport:
    against: str
    tolerance: Tolerance
    alpha: float
    level: float
    resamples: int
    seed: int
    rows: list[dict[str, Any]] = field(default_factory=list)  # compared pairs
    skipped: list[dict[str, Any]] = field(default_factory=list)  # matched but not comparable, with the reason
    only_ours: list[dict[str, Any]] = field(default_factory=list)
    only_theirs: list[dict[str, Any]] = field(default_factory=list)
    strict: bool = False

    def count(self, status: str) -> int:
        return sum(r["status"] == status for r in self.rows)

    @property
    def failed(self) -> bool:
        return self.count("differs") > 0 or (self.strict and (bool(self.skipped) or not self.rows))

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0

    def summary(self) -> dict[str, Any]:
        return {"compared": len(self.rows), "same": self.count("same"),
                "differs_within_tolerance": self.count("differs_within_tolerance"), "differs": self.count("differs"),
                "skipped": len(self.skipped), "only_ours": len(self.only_ours), "only_theirs": len(self.only_theirs),
                "strict": self.strict, "passed": not self.failed and bool(self.rows)}

    def to_dict(self) -> dict[str, Any]:
        return {"against": self.against, "paired": True, "tolerance": self.tolerance.to_dict(), "alpha": self.alpha,
                "level": self.level, "resamples": self.resamples, "seed": self.seed, "correction": "holm",
                "summary": self.summary(), "rows": self.rows, "skipped": self.skipped, "only_ours": self.only_ours,
                "only_theirs": self.only_theirs}

    def write_json(self, path: str | Path) -> Path:
        from .compare import _jsonable

        return atomic_write_json(path, self.to_dict(), indent=2, sort_keys=True, default=_jsonable)

    def format_text(self) -> str:
        order = {"differs": 0, "differs_within_tolerance": 1, "same": 2}
        rows = sorted(self.rows, key=lambda r: (order[r["status"]], r["task"], r["dataset"], r["layer"], r["metric"]))
        cols = ["status", "task", "data", "layer", "metric", "A", "B", "A-B", f"{self.level:.0%} interval",
                "p boot", "McNemar p (A|B only)", "p Holm", "tol"]
        body = [[r["status"], r["task"], f"{r['dataset']}/{r['split']}", r["layer"],
                 " ".join(x for x in (r["metric"], r["variant"]) if x), f"{r['ours']:.3f}", f"{r['reference']:.3f}",
                 f"{r['delta']:+.3f}", f"[{r['diff_low']:+.3f}, {r['diff_high']:+.3f}]", _p(r["p_bootstrap"]),
                 f"{_p(r['mcnemar']['p_value'])} ({r['mcnemar']['only_a']}|{r['mcnemar']['only_b']})"
                 if r["mcnemar"] else "-", _p(r["p_holm"]), f"{r['tolerance']:.3f}"] for r in rows]
        out = [table(body, cols, right=cols[5:])] if body else []
        if self.skipped:
            out.append(f"\n{len(self.skipped)} matched row(s) not compared:")
            out += ["  " + " ".join(x for x in (s["task"], f"{s['dataset']}/{s['split']}", s["layer"], s["metric"],
                                                s["variant"]) if x) + f": {s['reason']}" for s in self.skipped]
        s = self.summary()
        verdict = "FAIL" if self.failed else "PASS" if self.rows else "nothing compared"
        out.append(f"\npaired {s['compared']} row(s) (Holm over {s['compared']} test(s), alpha {self.alpha:g}, "
                   f"{self.resamples} resamples): {s['same']} not significantly different, "
                   f"{s['differs_within_tolerance']} different within tolerance, {s['differs']} different beyond "
                   f"tolerance; {s['skipped']} not comparable; {s['only_ours']} only in ours, {s['only_theirs']} only "
                   f"in {self.against} -> {verdict}")
        return "\n".join(out).lstrip("\n")


def _p(p: float) -> str:
    return f"{p:.3g}" if p >= 1e-3 else f"{p:.1e}"


def _key(r: Mapping[str, Any]) -> tuple:
    return tuple(r[k] for k in PAIRED_KEY)


def _match(ours: list[dict], theirs: list[dict], report: PairedReport) -> list[tuple[dict, dict]]:
    """Rows with the same PAIRED_KEY; where a side holds several (checkpoints or protocols), paired by checkpoint
    name and protocol, the rest reported as skipped."""
    groups: dict[tuple, tuple[list[dict], list[dict]]] = {}
    for side, rows in ((0, ours), (1, theirs)):
        for r in rows:
            groups.setdefault(_key(r), ([], []))[side].append(r)
    pairs = []
    for key, (a, b) in groups.items():
        if not b:
            report.only_ours += [{k: r[k] for k in PAIRED_KEY + ["checkpoint_name", "protocol"]} for r in a]
            continue
        if not a:
            report.only_theirs += [{k: r[k] for k in PAIRED_KEY + ["checkpoint_name", "protocol"]} for r in b]
            continue
        if len(a) == 1 and len(b) == 1:
            pairs.append((a[0], b[0]))
            continue
        by_name = {(r["checkpoint_name"], r["protocol"]): r for r in b}
        for r in a:
            partner = by_name.pop((r["checkpoint_name"], r["protocol"]), None)
            if partner is not None:
                pairs.append((r, partner))
            else:
                report.skipped.append({**dict(zip(PAIRED_KEY, key)), "reason": (
                    f"several records of this key ({len(a)} in ours, {len(b)} in {report.against}) and none of "
                    f"theirs has our checkpoint {r['checkpoint_name']!r} and protocol {r['protocol']!r}; point "
                    "--results / --against at one run each")})
    return pairs


def compare_paired(ours: pd.DataFrame, theirs: pd.DataFrame, tolerance: Tolerance, *, resamples: int = 1000,
                   level: float = stats.DEFAULT_LEVEL, alpha: float = 0.05, seed: int = 0, strict: bool = False,
                   label: str = "results") -> PairedReport:
    """Paired comparison of two deduplicated (``latest``) result sets: see the module docstring."""
    if not 0.0 < alpha < 1.0:
        raise UserError(f"--alpha must lie in (0, 1), got {alpha}")
    if int(resamples) < 1 or not 0.0 < level < 1.0:
        raise UserError(f"--resamples must be >= 1 and --level in (0, 1), got {resamples} and {level}")
    report = PairedReport(against=label, tolerance=tolerance, alpha=alpha, level=level, resamples=int(resamples),
                          seed=int(seed), strict=strict)
    cache = OutputsCache()
    for a, b in _match(ours.to_dict("records"), theirs.to_dict("records"), report):
        paired = pair_outputs(a, b, cache)
        if isinstance(paired, str):
            report.skipped.append({**{k: a[k] for k in PAIRED_KEY}, "reason": paired})
            continue
        row = {k: a[k] for k in PAIRED_KEY}
        row.update(ours=float(a["value"]), reference=float(b["value"]), checkpoint=a["checkpoint_name"],
                   ref_checkpoint=b["checkpoint_name"], protocol=a["protocol"], ref_protocol=b["protocol"],
                   samples=a["outputs"]["samples"], statistic=paired.statistic,
                   tolerance=tolerance.allowed(a["metric"], float(b["value"])),
                   **paired_test(paired, resamples, level, seed))
        row["delta"] = row["difference"]
        report.rows.append(row)
    if report.rows:
        for row, adjusted in zip(report.rows, stats.holm([r["p_value"] for r in report.rows])):
            row["p_holm"] = float(adjusted)
            row["significant"] = bool(adjusted <= alpha)
            beyond = abs(row["delta"]) > row["tolerance"] + 1e-12
            row["status"] = "differs" if row["significant"] and beyond else \
                "differs_within_tolerance" if row["significant"] else "same"
    return report


# ------------------------------------------------------------------------------------------------ ties


@dataclass(frozen=True)
class Tie:
    """Whether an entry is statistically indistinguishable from the best of its column, and how that was told."""

    tied: bool
    method: str
    p_value: float | None = None


def tie_with_best(best: Mapping[str, Any], other: Mapping[str, Any], cache: OutputsCache, *, resamples: int,
                  alpha: float = 0.05, seed: int = 0) -> Tie | None:
    """The leaderboard's tie rule (docs/uncertainty.md), in order of preference:

    1. both single runs with per-sample outputs of the same test set: the paired test of :func:`paired_test`
       (McNemar on correctness, else the paired bootstrap), tied when p > ``alpha``;
    2. both means over >= 2 seeds: Welch's t-test from mean, std and n, tied when p > ``alpha``;
    3. both with a bootstrap interval: tied when the intervals overlap (coarser: overlap can hide a paired
       difference);
    else None: not told.
    """
    if resamples > 0 and _seeds(best) <= 1 and _seeds(other) <= 1:
        paired = pair_outputs(best, other, cache)
        if not isinstance(paired, str):
            t = paired_test(paired, resamples, 1.0 - alpha, seed)
            return Tie(t["p_value"] > alpha, t["test"], t["p_value"])
    if _seeds(best) >= 2 and _seeds(other) >= 2 and _finite(best.get("std")) and _finite(other.get("std")):
        from scipy.stats import ttest_ind_from_stats

        r = ttest_ind_from_stats(best["value"], best["std"], _seeds(best), other["value"], other["std"],
                                 _seeds(other), equal_var=False)
        p = float(r.pvalue) if math.isfinite(r.pvalue) else (1.0 if best["value"] == other["value"] else 0.0)
        return Tie(p > alpha, "Welch's t-test over seeds", p)
    if all(_finite(x.get("ci_low")) and _finite(x.get("ci_high")) for x in (best, other)):
        overlap = best["ci_low"] <= other["ci_high"] and other["ci_low"] <= best["ci_high"]
        return Tie(bool(overlap), "overlapping intervals")
    return None


def _seeds(r: Mapping[str, Any]) -> int:
    n = r.get("n_seeds")
    return int(n) if _finite(n) else 1
