"""The conformance table: every field of every task's ``goyal19`` protocol beside the published reference, and
of every other preset that follows a reference of its own (``dino21``: DINO's eval_knn.py / eval_linear.py).

A task offers ``conformance``: ``{field: (reference value, "repo:path", status)}`` where status is ``same``,
``deviation: <measured effect>`` or ``ours: <why the reference has no such element>`` (a task package keeps it in
its ``conformance.py``), and may offer ``preset_conformance``: ``{preset: such a table}`` for its other faithful
presets, and ``reference_variants``: ``{preset: ({field: value, ...}, ...)}``, settings the reference itself uses
for some architectures (DINO's ViT-B linear features), which are not deviations. A task with no ``goyal19``
version (the transfer tasks: ``ericsson21``) names its published preset as ``base_preset``: its ``conformance``
is that preset's table, and its ``quick`` records are held against it. ``python -m evalsuite.conformance``
writes ``docs/protocols.md`` from the presets themselves, so the table cannot drift from the code; ``--check`` fails
when the page is stale.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import registry
from .protocols import check_preset, field_paths

PAGE = Path(__file__).resolve().parents[1] / "docs" / "protocols.md"
MISSING = "missing: no conformance entry"


@dataclass(frozen=True)
class Row:
    task: str
    field: str
    ours: Any
    reference: str
    source: str
    status: str
    preset: str = "goyal19"

    @property
    def changes_the_number(self) -> bool:
        """A deviation from the reference that moves the published metric (``ours:`` rows do not compare)."""
        return self.status.startswith("deviation")


def _value(protocol: Any, path: str) -> Any:
    cur = protocol
    for part in path.split("."):
        cur = getattr(cur, part)
    return cur


def _offered(task: Any, attribute: str, module_name: str) -> Any:
    """The task's ``attribute``, else ``module_name`` of its package's ``conformance`` module, else None."""
    value = getattr(task, attribute, None)
    if value is None:
        import importlib

        package = type(task).__module__.rsplit(".", 1)[0]
        try:
            value = getattr(importlib.import_module(f"{package}.conformance"), module_name)
        except (ImportError, AttributeError):
            value = None
    return value


def base_preset(task: Any) -> str:
    """The preset of a task's ``conformance`` table and the one its other presets are measured against: goyal19,
    or the task's ``base_preset`` (``ericsson21`` for the transfer tasks, which have no goyal19 version)."""
    return getattr(task, "base_preset", "goyal19")


def task_conformance(task: Any, preset: str = "goyal19") -> dict[str, tuple[str, str, str]]:
    """The task's table for ``preset`` (its base preset's, or one of its ``preset_conformance``; {} when it has
    none)."""
    if preset == base_preset(task):
        return dict(_offered(task, "conformance", "CONFORMANCE") or {})
    return dict((_offered(task, "preset_conformance", "PRESET_CONFORMANCE") or {}).get(preset, {}))


def reference_preset(task: Any, preset: str) -> str:
    """The preset whose published reference a ``preset`` record is held against: ``preset`` itself when the task
    has a table for it (dino21), else its base preset (vissl and quick records are compared with the goyal19
    reference, a transfer task's quick records with ericsson21's)."""
    base = base_preset(task)
    return preset if preset != base and task_conformance(task, preset) else base


def deviations(task: Any, protocol: Any, preset: str = "goyal19") -> list[str]:
    """Fields of ``protocol`` (run under ``preset``) that make its numbers differ from the published ones: the
    reference preset's known deviations (status ``deviation``) and fields set away from a value the reference
    shares (status ``same``); a reference variant (``reference_variants``) counts as the reference."""
    ref_preset = reference_preset(task, preset)
    table = task_conformance(task, ref_preset)
    base = task.default_protocol(ref_preset)
    variants = (_offered(task, "reference_variants", "REFERENCE_VARIANTS") or {}).get(ref_preset, ())
    found = [_flagged(protocol, reference, table) for reference in [base, *(base.replace(**v) for v in variants)]]
    return min(found, key=len)


def _flagged(protocol: Any, reference: Any, table: dict[str, tuple[str, str, str]]) -> list[str]:
    out = []
    for path in field_paths(protocol):
        status = table.get(path, ("", "", MISSING))[2]
        try:
            changed = _value(protocol, path) != _value(reference, path)
        except AttributeError:
            changed = False
        if status.startswith("deviation") or (status == "same" and changed):
            out.append(path)
    return out


def conformance_presets(task: Any) -> list[str]:
    """The base preset (goyal19, or the task's own) and the other presets the task has a reference table for."""
    return [base_preset(task), *(_offered(task, "preset_conformance", "PRESET_CONFORMANCE") or {})]


def rows(task_names: list[str] | None = None, preset: str = "goyal19") -> list[Row]:
    """One row per field of each task's ``preset`` protocol beside that preset's reference (fields without an entry
    are marked missing); tasks without a table for ``preset`` have no rows (a task always has its base preset's)."""
    check_preset(preset)
    out = []
    for name in task_names or registry.task_names():
        task = registry.get_task(name)
        if preset not in conformance_presets(task):
            continue
        protocol = task.default_protocol(preset)
        table = task_conformance(task, preset)
        for path in field_paths(protocol):
            ref, source, status = table.get(path, ("", "", MISSING))
            value = _value(protocol, path)
            out.append(Row(name, path, json.loads(json.dumps(value)), ref, source, status, preset))
    return out


def _cell(text: Any) -> str:
    shown = text if isinstance(text, str) else json.dumps(text)
    return shown.replace("|", "\\|").replace("\n", " ")


def render(all_rows: list[Row]) -> str:
    lines = [
        "# Protocol conformance",
        "",
        "Generated by `python -m evalsuite.conformance` from the `goyal19` presets, the other presets that follow a",
        "published reference of their own (`dino21`; `ericsson21`, the transfer tasks, which have no `goyal19`",
        "version), and each task's `conformance.py`; do not edit by hand. One row per protocol field: the reference",
        "value and the file it comes from, our value, and whether they are the same. `deviation` rows change the",
        "number (with the measured effect where we have it); `ours` rows are settings the reference does not have.",
        "`evalsuite compare` flags a record compared with a published number when a field it changed, or a",
        "`deviation` row, makes the two not comparable (a `dino21` record is held against the `dino21` table, a",
        "`vissl` or `quick` one against `goyal19`'s, a transfer task's `quick` one against `ericsson21`'s).",
    ]
    for task, preset in dict.fromkeys((r.task, r.preset) for r in all_rows):
        mine = [r for r in all_rows if (r.task, r.preset) == (task, preset)]
        same = sum(r.status.startswith("same") for r in mine)
        title = task if preset == "goyal19" else f"{task} ({preset})"
        lines += ["", f"## {title}", "", f"{same} of {len(mine)} fields as in the reference.", "",
                  f"| field | reference | source | ours ({preset}) | status |", "|---|---|---|---|---|"]
        lines += [f"| `{r.field}` | {_cell(r.reference)} | {_cell(r.source)} | `{_cell(r.ours)}` | {_cell(r.status)} |"
                  for r in mine]
    return "\n".join(lines) + "\n"


# each task page's preset table, between these markers, is written from the presets too
TASK_PAGES = PAGE.parent / "tasks"
BEGIN, END = "<!-- presets:{task} (generated by python -m evalsuite.conformance) -->", "<!-- /presets -->"


def preset_table(task_name: str) -> str:
    """``| field | goyal19 | vissl | quick |`` for one task, ``=`` where a preset keeps its base preset's value
    (goyal19's, or the task's ``base_preset``); a preset the task refuses has no column."""
    from .errors import UserError
    from .protocols import PRESETS

    task = registry.get_task(task_name)
    protocols = {}
    for preset in PRESETS:
        try:
            protocols[preset] = task.default_protocol(preset)
        except UserError:
            continue
    base_name = base_preset(task)
    base = protocols[base_name]
    lines = ["| field | " + " | ".join(f"`{p}`" for p in protocols) + " |", "|---" * (len(protocols) + 1) + "|"]
    for path in field_paths(base):
        cells = []
        for preset, protocol in protocols.items():
            value = json.loads(json.dumps(_value(protocol, path)))
            same = preset != base_name and value == json.loads(json.dumps(_value(base, path)))
            cells.append("=" if same else f"`{_cell(json.dumps(value))}`")
        lines.append(f"| `{path}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def with_preset_tables(text: str) -> str:
    """A task page with every marked preset table rewritten from the code."""
    out, rest = [], text
    while (start := rest.find("<!-- presets:")) >= 0:
        task = rest[start + len("<!-- presets:"):].split(" ", 1)[0]
        end = rest.find(END, start)
        out.append(rest[:start] + BEGIN.format(task=task) + "\n" + preset_table(task) + "\n")
        rest = rest[end:]
    return "".join(out) + rest


def generated_pages() -> dict[Path, str]:
    """Every page this module writes: docs/protocols.md and the task pages with preset tables."""
    from .protocols import PRESETS

    pages = {PAGE: render([r for preset in PRESETS for r in rows(preset=preset)])}
    for page in sorted(TASK_PAGES.glob("*.md")):
        text = page.read_text(encoding="utf-8")
        if "<!-- presets:" in text:
            pages[page] = with_preset_tables(text)
    return pages


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m evalsuite.conformance", description=__doc__)
    ap.add_argument("--check", action="store_true",
                    help="exit 1 when docs/protocols.md or a task page's preset table is not what the code says")
    a = ap.parse_args(argv)
    pages = generated_pages()
    if a.check:
        stale = [p for p, text in pages.items() if not p.is_file() or p.read_text(encoding="utf-8") != text]
        for p in pages:
            print(f"{p}: {'stale: run python -m evalsuite.conformance' if p in stale else 'up to date'}")
        return 1 if stale else 0
    from .io import atomic_write_text

    for p, text in pages.items():
        if not p.is_file() or p.read_text(encoding="utf-8") != text:
            atomic_write_text(p, text)
            print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
