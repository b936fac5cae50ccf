"""Read result records into one table and aggregate them.

One row per record after :func:`load_results`; :func:`deduplicate` then keeps one row per
``KEY`` = (checkpoint, task, dataset, split, layer, metric, variant, protocol):

* ``latest`` (default): the record with the latest ``created`` stamp wins; ties go to the
  record read last (later file on the command line, later line). ``n_runs`` counts the
  records of the key and ``params_conflict`` says whether they disagreed on hyper-parameters.
* ``mean`` (the leaderboard's default): mean ± sample std over seeds of the records that share the latest
  record's hyper-parameters (the latest record per seed counts once); ``n_seeds`` is their number.
  Re-runs with other hyper-parameters are not averaged in (they are a different protocol). A mean over
  several seeds has no single run's bootstrap interval or per-sample outputs: its ``ci_*`` and ``outputs``
  are cleared (docs/uncertainty.md).

"The same hyper-parameters" is the same ``protocol_hash`` (the resolved protocol; ``params`` also hold what
a task measured, such as a training curve, which differs from seed to seed); records older than that field
compare their ``params``.

``variant`` separates numbers that differ only by a scalar parameter a task reports one
record per value of (``k`` in the low-shot SVM and kNN tasks, ``shots``): ``k=<v>``.

:func:`best_layer` picks, per (checkpoint, protocol, task, dataset, split, metric, variant),
the layer with the best value (the highest, or the lowest for error metrics), the view of the
Goyal et al. 2019 per-layer tables.

:func:`rank_table` is the transfer view (Ericsson et al. 2021): checkpoints x datasets of one task at each
checkpoint's best layer, the mean over the datasets and the average rank across checkpoints.

:func:`spectrum_correlations` sets the spectrum task's label-free metrics against kNN top-1 / VOC07 SVM mAP across
checkpoints (each at the labelled result's best tap) with Spearman's rank correlation (issue #29).

Each row also carries ``checkpoint_name`` (the record's, or for older records the checkpoint's file
name without its suffixes), from ``checkpoint_load``, ``partial`` (loaded with ``--allow-partial``)
and ``missing`` (how many trunk keys were left at random init), and ``tuned_on_test`` /
``tuned_on_test_params`` (the record's; for records older than those fields, from the params that say it:
``test_set_tuned`` of the low-shot SVM, ``report_epoch=best_val`` of a linear probe).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from evalsuite.errors import BadData, UserError
from evalsuite.results import Result, find_result_files, iter_numbered_records

KEY = ["ckpt", "task", "dataset", "split", "layer", "metric", "variant", "protocol"]
GROUP_BEST = ["ckpt", "protocol", "task", "dataset", "split", "metric", "variant"]
VARIANT_PARAMS = ("k", "shots", "labels")
REQUIRED_STR = ("task", "layer", "metric")
LOWER_IS_BETTER_TOKENS = ("error", "err", "loss", "median_angle", "mean_angle", "rmse", "distance")
LAYER_ORDER = ["input", "pixels", "conv1", "conv2", "conv3", "conv4", "conv5", "res2", "res3", "res4", "res5",
               "res5_onwards", "final", "pool", "fc6", "fc7", "fc8", "h", "g(h)", "finetune_all"]
STR_FIELDS = ["task", "dataset", "split", "layer", "metric", "checkpoint_id", "checkpoint", "checkpoint_format",
              "checkpoint_name", "method", "arch", "pretrain_data", "protocol", "note", "dataset_fingerprint", "host",
              "created", "run_id", "protocol_hash"]
DICT_FIELDS = ("params", "checkpoint_meta", "versions", "checkpoint_load")
UNKNOWN = ("", "unknown")  # metadata a foreign checkpoint does not carry
#: the dataset of a multi-dataset task's summary records (linear_transfer's mean over its datasets)
SUMMARY_DATASET = "all"
#: tasks whose per-dataset numbers make a checkpoints x datasets table with the mean and the average rank
RANKED_TASKS = ("linear_transfer", "fewshot")
# evalsuite.checkpoints.NAME_SUFFIXES (not imported: that module loads torch)
NAME_SUFFIXES = (".tar", ".pth", ".pt", ".pyth", ".ckpt", ".safetensors", ".torch", ".pkl", ".bin")


def lower_is_better(metric: str) -> bool:
    """Error-like metrics (angle errors, losses, distances) are better when lower."""
    m = str(metric).lower()
    return any(t in m for t in LOWER_IS_BETTER_TOKENS)


def layer_sort_key(layer: str) -> tuple[int, str]:
    try:
        return (LAYER_ORDER.index(layer), layer)
    except ValueError:
        return (len(LAYER_ORDER), layer)


def _layer_rank(layer: str) -> str:
    i, name = layer_sort_key(layer)
    return f"{i:03d}{name}"


def variant_of_params(params: dict) -> str:
    for name in VARIANT_PARAMS:
        v = params.get(name) if isinstance(params, dict) else None
        if isinstance(v, (int, str)) and not isinstance(v, bool) and str(v) not in ("", "all"):
            return f"{name}={v}"
    return ""


def _check_record(rec: dict, path: Path, lineno: int) -> dict:
    where = f"line {lineno}"
    for name in REQUIRED_STR:
        if not isinstance(rec.get(name), str) or not rec[name]:
            raise BadData(f"{where}: field {name!r} must be a non-empty string", path)
    v = rec.get("value")
    if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
        raise BadData(f"{where}: value must be a number or null, got {v!r}", path)
    if isinstance(v, float) and not math.isfinite(v):
        raise BadData(f"{where}: value is not finite", path)
    for name in DICT_FIELDS:
        if rec.get(name) is None:
            rec[name] = {}
        elif not isinstance(rec[name], dict):
            raise BadData(f"{where}: field {name!r} must be an object", path)
    for name in STR_FIELDS:
        x = rec.get(name)
        rec[name] = "" if x is None else str(x)
    return rec


def _record_defaults() -> dict:
    return Result(task="", dataset="", split="", layer="", metric="", value=None).__dict__


def load_results(paths: Iterable[str | Path], skipped: dict[str, list[int]] | None = None) -> pd.DataFrame:
    """Read every ``results.jsonl`` under ``paths`` (files or directories) into one DataFrame.

    A file that is not valid JSONL, or a record with a missing/invalid field, raises a
    :class:`~evalsuite.errors.UserError` naming the file and line (the CLI turns it into exit code 2).
    With a ``skipped`` dict, unreadable lines (e.g. cut off by a crash) are skipped instead and their
    numbers listed there per file; records with invalid fields are still refused.
    """
    files = find_result_files(list(paths))
    rows = []
    defaults = _record_defaults()
    for f in files:
        lines: list[int] | None = None if skipped is None else []
        try:
            for lineno, rec in iter_numbered_records(f, lines):
                rec = {**defaults, **rec}
                rows.append(_check_record(rec, f, lineno))
                rows[-1]["source_file"] = str(f)
        except OSError as e:
            raise UserError(f"cannot read results file ({e.strerror})", f) from None
        if lines:
            skipped[str(f)] = lines
    return frame_from_records(rows)


def frame_from_records(rows: list[dict]) -> pd.DataFrame:
    cols = list(_record_defaults()) + ["source_file"]
    df = pd.DataFrame(rows, columns=cols)
    df["order"] = range(len(df))
    df["value"] = pd.to_numeric(df["value"], errors="coerce").astype(float)
    df["params_json"] = [json.dumps(p, sort_keys=True, default=str) for p in df["params"]]
    # what "the same hyper-parameters" compares: the resolved protocol's hash, else (older records) the params
    df["proto_key"] = [h or pj for h, pj in zip(df["protocol_hash"], df["params_json"])]
    tuned = [tuned_on_test_params(t, tp, p) for t, tp, p in zip(df["tuned_on_test"], df["tuned_on_test_params"],
                                                                 df["params"])]
    df["tuned_on_test_params"] = tuned
    df["tuned_on_test"] = [bool(t) for t in tuned]
    df["variant"] = [variant_of_params(p) for p in df["params"]]
    df["ckpt"] = [cid or (f"spec:{c}" if c else f"method:{m}")
                  for cid, c, m in zip(df["checkpoint_id"], df["checkpoint"], df["method"])]
    df["checkpoint_name"] = [n or name_from_spec(c) for n, c in zip(df["checkpoint_name"], df["checkpoint"])]
    df["partial"] = [load.get("partial") is True for load in df["checkpoint_load"]]
    df["missing"] = [missing_count(load) for load in df["checkpoint_load"]]
    # a trunk that is not the benchmark's (evalsuite.trunks.published_comparability): why, else ""
    df["not_comparable"] = [str(p.get("not_comparable_reason", "")) if isinstance(p, dict) else ""
                            for p in df["params"]]
    df["seed"] = df["seed"].astype(object).where(df["seed"].notna(), None)
    return df


def name_from_spec(spec: str) -> str:
    """A checkpoint's name for records without one, as ``evalsuite.checkpoints.checkpoint_name`` gives it:
    the file name without the usual suffixes (``moco_v2_800ep.pth.tar`` -> ``moco_v2_800ep``), else the spec."""
    name = Path(str(spec)).name
    while (suffix := Path(name).suffix.lower()) in NAME_SUFFIXES and len(name) > len(suffix):
        name = name[: -len(suffix)]
    return name


def tuned_on_test_params(flag: Any, names: Any, params: dict) -> list[str]:
    """The hyper-parameters a record's protocol chose on the test set: the record's ``tuned_on_test_params``, else
    (records written before that field) what its params say: ``test_set_tuned`` (lowshot_svm's cost) and
    ``report_epoch == "best_val"`` (a linear probe's epoch)."""
    out = [str(n) for n in names] if isinstance(names, list) else []
    if flag is True and not out:
        out = ["unnamed"]
    if isinstance(params, dict):
        if params.get("test_set_tuned") is True and "cost" not in out:
            out.append("cost")
        if params.get("report_epoch") == "best_val" and "epoch" not in out:
            out.append("epoch")
    return out


def missing_count(load: dict) -> int:
    """How many trunk keys a (partial) load left at random init, from a record's ``checkpoint_load``."""
    n = load.get("missing")
    if isinstance(n, int) and not isinstance(n, bool):
        return n
    keys = load.get("missing_keys")
    return len(keys) if isinstance(keys, list) else 0


def partial_note(missing: int) -> str:
    """The flag shown for a result of a partially loaded checkpoint."""
    return f"partial load: {missing} missing key{'' if missing == 1 else 's'}"


def deduplicate(df: pd.DataFrame, mode: str = "latest") -> pd.DataFrame:
    """One row per KEY; see the module docstring for the ``latest`` and ``mean`` rules."""
    if mode not in ("latest", "mean"):
        raise UserError(f"unknown duplicate rule {mode!r}; use latest or mean")
    if df.empty:
        out = df.copy()
        for c, dt in (("n_runs", int), ("n_seeds", int), ("params_conflict", bool), ("std", float)):
            out[c] = pd.Series(dtype=dt)
        return out
    d = df.sort_values(["created", "order"], kind="stable")
    grouped = d.groupby(KEY, sort=False, dropna=False)
    latest = grouped.tail(1).set_index(KEY)
    stats = grouped.agg(n_runs=("order", "size"), n_params=("proto_key", "nunique"))
    out = latest.join(stats)
    out["params_conflict"] = out.pop("n_params") > 1
    out["std"] = float("nan")
    out["n_seeds"] = 1
    if mode == "mean":
        # records that share the latest record's hyper-parameters, latest per seed
        d2 = d.join(latest["proto_key"].rename("latest_params"), on=KEY)
        same = d2[d2["proto_key"] == d2["latest_params"]].copy()
        same["seed_key"] = same["seed"].map(lambda s: "none" if s is None else str(s))
        per_seed = same.groupby(KEY + ["seed_key"], sort=False, dropna=False).tail(1)
        agg = per_seed.groupby(KEY, sort=False, dropna=False)["value"].agg(["mean", "std", "count"])
        n = per_seed.groupby(KEY, sort=False, dropna=False).size()
        out["value"] = agg["mean"]
        out["std"] = agg["std"].where(n > 1)
        out["n_seeds"] = n
        several = out["n_seeds"] > 1  # a mean: no single run's interval or outputs describe it
        for c in ("ci_low", "ci_high", "ci_level"):
            out[c] = out[c].where(~several)
        out["outputs"] = [None if s else o for o, s in zip(out["outputs"], several)]
    out = out.reset_index()
    out["lower_is_better"] = out["metric"].map(lower_is_better)
    return out.sort_values(["task", "dataset", "metric", "ckpt", "protocol", "layer"], kind="stable",
                           key=lambda s: s.map(_layer_rank) if s.name == "layer" else s).reset_index(drop=True)


def best_layer(agg: pd.DataFrame) -> pd.DataFrame:
    """Per (checkpoint, protocol, task, dataset, split, metric, variant): the row of the best layer."""
    d = agg[agg["value"].notna()].copy()
    if d.empty:
        return d
    d["_score"] = d["value"].where(~d["lower_is_better"], -d["value"])
    idx = d.groupby(GROUP_BEST, sort=False, dropna=False)["_score"].idxmax()
    return d.loc[idx].drop(columns="_score").reset_index(drop=True)


def checkpoint_label(row) -> str:
    """A readable name for a checkpoint: method / arch / pretraining data; the checkpoint's name stands in
    for an unknown method (a foreign checkpoint), and unknown pretraining data is left out."""
    method = row.get("method") or ""
    head = (row.get("checkpoint_name") or "unnamed") if method in UNKNOWN else method
    parts = [head, row.get("arch") or "?"]
    if row.get("pretrain_data") not in UNKNOWN:
        parts.append(row["pretrain_data"])
    return " / ".join(parts)


def _distinct_labels(t: pd.DataFrame) -> list[str]:
    """Labels that tell checkpoints apart: a shared label gets the checkpoint's name, then its short sha256."""
    labels = [checkpoint_label(r) for r in t.to_dict("records")]
    for extra in (t["checkpoint_name"], t["checkpoint_id"].str[:8]):
        seen = pd.Series(labels).duplicated(keep=False)
        labels = [f"{lab} ({x})" if dup and x and x not in lab else lab
                  for lab, dup, x in zip(labels, seen, extra)]
    return labels


def checkpoint_table(agg: pd.DataFrame) -> pd.DataFrame:
    """One row per checkpoint (latest record's metadata).

    ``partial``/``missing``/``checkpoint_load`` come from the latest partially loaded row when the
    checkpoint has one (a result on the leaderboard came from a partial load), else the latest row.
    """
    meta = ["method", "arch", "pretrain_data", "checkpoint", "checkpoint_format", "checkpoint_meta", "checkpoint_id",
            "checkpoint_name"]
    if agg.empty:
        return pd.DataFrame(columns=["ckpt", "label", *meta, "checkpoint_load", "partial", "missing", "not_comparable",
                                     "n_numbers"])
    d = agg.sort_values(["created", "order"], kind="stable")
    last = d.groupby("ckpt", sort=False).tail(1).set_index("ckpt")
    t = last[meta].copy()
    # the partial rows again after all rows: the last row per checkpoint is its latest partial one, if any
    load = pd.concat([d, d[d["partial"]]]).groupby("ckpt", sort=False).tail(1).set_index("ckpt")
    for c in ("checkpoint_load", "partial", "missing"):
        t[c] = load[c]
    t["not_comparable"] = last["not_comparable"]
    t["n_numbers"] = agg.groupby("ckpt").size()
    t["label"] = _distinct_labels(t)
    return t.reset_index().sort_values(["label", "ckpt"]).reset_index(drop=True)


def export_columns() -> list[str]:
    return ["method", "arch", "pretrain_data", "checkpoint_name", "checkpoint", "checkpoint_id", "partial", "missing",
            "task", "dataset", "split", "layer", "metric", "variant", "protocol", "value", "std", "n_seeds", "ci_low",
            "ci_high", "ci_level", "tuned_on_test", "tuned_on_test_params", "n_runs", "params_conflict",
            "lower_is_better", "note", "created", "params_json", "source_file"]


@dataclass
class RankTable:
    """Checkpoints x datasets of one task: ``columns`` the (dataset, metric, variant) of each number; ``rows`` one per
    (ckpt, protocol) with ``layer`` (the layer shown), a column per entry of ``columns`` (NaN: not run), ``mean``
    (over the row's numbers), ``n`` (how many) and ``avg_rank``."""

    task: str
    columns: list[tuple[str, str, str]]
    rows: pd.DataFrame


def rank_table(agg: pd.DataFrame, task: str) -> RankTable:
    """The transfer view of ``task`` (higher is better for every metric it has): per (checkpoint, protocol) the layer
    with the most numbers, then the best mean over them; its numbers, their mean, and the average rank: per column,
    the checkpoints of the same protocol ranked (1 = best, ties share the mean of their ranks), averaged over the
    columns the row has (Ericsson et al. 2021's "average rank", which needs several checkpoints). The summary
    records (``SUMMARY_DATASET``) are not columns: their mean is the row's ``mean``."""
    d = agg[(agg["task"] == task) & (agg["dataset"] != SUMMARY_DATASET) & agg["value"].notna()]
    columns = sorted({(r["dataset"], r["metric"], r["variant"]) for r in d.to_dict("records")},
                     key=lambda c: (c[0], _variant_number(c[2]), c[1]))
    names = ["ckpt", "protocol", "layer", *map(str, columns), "mean", "n", "avg_rank"]
    rows = []
    for (ck, protocol), g in d.groupby(["ckpt", "protocol"], sort=True):
        best = None
        for layer, lg in g.groupby("layer", sort=False):
            values = {(r["dataset"], r["metric"], r["variant"]): r["value"] for r in lg.to_dict("records")}
            key = (len(values), sum(values.values()) / len(values))
            if best is None or key > best[0]:
                best = (key, layer, values)
        (n, mean), layer, values = best
        rows.append({"ckpt": ck, "protocol": protocol, "layer": layer,
                     **{str(c): values.get(c, math.nan) for c in columns}, "mean": mean, "n": n})
    t = pd.DataFrame(rows, columns=names[:-1])
    if not t.empty:
        cells = [str(c) for c in columns]
        ranks = t.groupby("protocol")[cells].rank(ascending=False, method="average")
        t["avg_rank"] = ranks.mean(axis=1, skipna=True)
        t = t.sort_values(["protocol", "avg_rank", "ckpt"], kind="stable").reset_index(drop=True)
    else:
        t["avg_rank"] = pd.Series(dtype=float)
    return RankTable(task, columns, t)


def _variant_number(v: str) -> float:
    """``shots=20`` -> 20 (so 5-shot sorts before 20-shot); no number: -1."""
    tail = str(v).rsplit("=", 1)[-1]
    return float(tail) if tail.isdigit() else -1.0


#: the label-free metrics of the spectrum task, and the labelled results they are set against (issue #29)
LABEL_FREE_TASK = "spectrum"
LABEL_FREE_METRICS = ("rankme", "alpha_req", "uniformity", "alignment")
LABELLED_TARGETS = (("knn", "top1"), ("voc07_svm", "mAP"))
MIN_CORRELATION_CHECKPOINTS = 3


@dataclass
class Correlation:
    """One label-free metric against one labelled result across checkpoints: ``points`` one (ckpt, layer, label-free
    value, labelled value) per checkpoint; ``rho`` / ``p_value``: scipy's Spearman rank correlation over them (NaN
    when one side is constant). ``spectrum`` = (dataset, protocol) of the label-free records, ``target`` = (task,
    metric, dataset, split, variant, protocol) of the labelled ones."""

    metric: str
    spectrum: tuple[str, str]
    target: tuple[str, str, str, str, str, str]
    points: list[tuple[str, str, float, float]]
    rho: float
    p_value: float


def spectrum_correlations(agg: pd.DataFrame, min_checkpoints: int = MIN_CORRELATION_CHECKPOINTS) -> list[Correlation]:
    """Per label-free metric and labelled result (kNN top-1, VOC07 SVM mAP), the Spearman rank correlation across
    checkpoints. Each checkpoint is one point at one tap: the labelled result at its best layer (:func:`best_layer`)
    and the label-free metric at that same tap, so both numbers describe the same features; a checkpoint without
    the label-free metric at that tap is left out. Records of different protocols or datasets are never mixed (each
    combination is its own correlation); only those with at least ``min_checkpoints`` points are returned."""
    import warnings

    from scipy.stats import spearmanr

    labelled = pd.Series(False, index=agg.index)
    for task, metric in LABELLED_TARGETS:
        labelled |= (agg["task"] == task) & (agg["metric"] == metric)
    targets = best_layer(agg[labelled])
    spec = agg[(agg["task"] == LABEL_FREE_TASK) & agg["metric"].isin(LABEL_FREE_METRICS) & agg["value"].notna()]
    if targets.empty or spec.empty:
        return []
    pairs = spec[["ckpt", "layer", "metric", "dataset", "protocol", "value"]].merge(
        targets[["ckpt", "layer", "task", "metric", "dataset", "split", "variant", "protocol", "value"]],
        on=["ckpt", "layer"], suffixes=("", "_t"))
    out = []
    keys = ["metric", "dataset", "protocol", "task", "metric_t", "dataset_t", "split", "variant", "protocol_t"]
    for key, g in pairs.groupby(keys, sort=True):
        if g["ckpt"].nunique() != len(g) or len(g) < min_checkpoints:
            continue  # one point per checkpoint (the keys above make it so); too few to rank
        g = g.sort_values("ckpt")
        with warnings.catch_warnings():  # a constant side: scipy warns and returns NaN, kept as NaN
            warnings.simplefilter("ignore")
            res = spearmanr(g["value"], g["value_t"])
        out.append(Correlation(key[0], (key[1], key[2]), tuple(key[3:]),
                               list(zip(g["ckpt"], g["layer"], g["value"].astype(float), g["value_t"].astype(float))),
                               float(res.statistic), float(res.pvalue)))
    return sorted(out, key=lambda c: (LABEL_FREE_METRICS.index(c.metric), c.spectrum, c.target))
