"""Published reference numbers shipped with the package (``leaderboard/references/*.csv``).

The CSVs are verbatim copies of the shared extraction (see ``references/PROVENANCE.md``):
columns ``method, arch, pretrain_data, task, protocol, layer, metric, value, source_paper,
seed_file, quote``. This module loads them and adds the columns the comparison needs:

* ``source_key``: the protocol's source key (text before the first ``:``, e.g. ``goyal19``,
  ``mmselfsup``, ``swav20``), compared with our records' preset name;
* ``variant``: ``k=<k>`` for the low-shot rows (parsed from ``, k=<k>,``), ``labels=<p>%`` for the
  semi-supervised rows (``, labels=<p>%,`` or ``with <p>% of labels``), ``shots=<k>`` for the few-shot rows
  (``, shots=<k>,``), empty otherwise (the full-data ``k=all`` row is the plain task);
* ``dataset``: for a task that runs several datasets (``linear_transfer``, ``fewshot``), the one the number is
  for (``, dataset=<name>,`` in the protocol, the suite's dataset name); empty otherwise (any dataset matches);
* ``suite_task``: the suite's task name for the reference task (``lowshot`` -> ``lowshot_svm``,
  ``voc_detection`` -> ``detection``, ``nyuv2_surface_normals`` -> ``surface_normals``);
* ``ambiguous``: the row's quote carries an ``ambiguous:`` note (read it before trusting the number);
* ``value_num``: ``value`` as a float (``value`` itself stays the printed string).
"""

from __future__ import annotations

import re
from functools import lru_cache
from importlib import resources

REFERENCE_COLUMNS = ["method", "arch", "pretrain_data", "task", "protocol", "layer", "metric", "value",
                     "source_paper", "seed_file", "quote"]

# reference task name -> the suite's task name (identity when absent)
REF_TO_SUITE_TASK = {
    "lowshot": "lowshot_svm",
    "voc_detection": "detection",
    "nyuv2_surface_normals": "surface_normals",
    "imagenet_semisupervised": "semi_supervised",
}
SUITE_TO_REF_TASK = {v: k for k, v in REF_TO_SUITE_TASK.items()}

_K_RE = re.compile(r", k=(all|\d+),")
_LABELS_RE = re.compile(r", labels=(\d+(?:\.\d+)?)%,|with (\d+(?:\.\d+)?)% of labels")
_SHOTS_RE = re.compile(r", shots=(\d+),")
_DATASET_RE = re.compile(r", dataset=([\w:./-]+),")


def source_key(protocol: str) -> str:
    """``'goyal19: linear SVM ...'`` -> ``'goyal19'``."""
    return str(protocol).split(":", 1)[0].strip()


def variant_of(protocol: str) -> str:
    """The row's variant: ``k=<k>`` (low-shot), ``labels=<p>%`` (semi-supervised fraction) or ``shots=<k>``
    (few-shot episodes), else empty."""
    m = _K_RE.search(str(protocol))
    if m and m.group(1) != "all":
        return f"k={m.group(1)}"
    m = _LABELS_RE.search(str(protocol))
    if m:
        return f"labels={m.group(1) or m.group(2)}%"
    m = _SHOTS_RE.search(str(protocol))
    return f"shots={m.group(1)}" if m else ""


def dataset_of(protocol: str) -> str:
    """The suite dataset a row is for (``, dataset=<name>,`` in its protocol), else empty: any dataset."""
    m = _DATASET_RE.search(str(protocol))
    return m.group(1) if m else ""


def reference_files() -> list[str]:
    root = resources.files("leaderboard") / "references"
    return sorted(p.name for p in root.iterdir() if p.name.endswith(".csv"))


@lru_cache(maxsize=4)
def _load(files: tuple[str, ...]):
    import pandas as pd

    root = resources.files("leaderboard") / "references"
    frames = []
    for name in files:
        with (root / name).open("r", encoding="utf-8") as f:
            df = pd.read_csv(f, dtype=str, keep_default_na=False)
        missing = [c for c in REFERENCE_COLUMNS if c not in df.columns]
        if missing:
            raise ValueError(f"reference file {name} lacks columns {missing}")
        df["file"] = name
        frames.append(df)
    df = pd.concat(frames, ignore_index=True)
    df["source_key"] = df["protocol"].map(source_key)
    df["variant"] = df["protocol"].map(variant_of)
    df["dataset"] = df["protocol"].map(dataset_of)
    df["suite_task"] = df["task"].map(lambda t: REF_TO_SUITE_TASK.get(t, t))
    df["ambiguous"] = df["quote"].str.contains(r"\|\| ambiguous:", regex=True)
    df["value_num"] = pd.to_numeric(df["value"], errors="coerce")
    return df


def load_references(files: list[str] | None = None):
    """All reference rows (or those of the named CSV files) as a DataFrame (a copy; safe to modify)."""
    names = tuple(sorted(files)) if files else tuple(reference_files())
    return _load(names).copy()


def references_for_tasks(tasks):
    """Reference rows whose suite task is one of ``tasks`` and whose value is a number."""
    df = load_references()
    return df[df["suite_task"].isin(set(tasks)) & df["value_num"].notna()].reset_index(drop=True)
