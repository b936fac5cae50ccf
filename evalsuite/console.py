"""What the suite prints: the help formatter, progress bars (tqdm, the one progress library), notes and
warnings as one line each in the suite's own style, and plain-text tables."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Sequence
from typing import Any


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Every command's ``--help``: examples kept as written, defaults shown."""


def add_command(sub, name: str, *, help: str, description: str | None = None,
                epilog: str | None = None) -> argparse.ArgumentParser:
    """A (sub)command parser added to ``sub`` (what ``add_subparsers`` returns) with the suite's help style."""
    return sub.add_parser(name, help=help, description=description, epilog=epilog, formatter_class=HelpFormatter)


def progress(iterable: Iterable | None = None, *, desc: str = "", total: int | None = None, enabled: bool = True,
             unit: str = "it", initial: int = 0, leave: bool = False):
    """A tqdm bar (disabled when ``enabled`` is false); usable as an iterator or with ``update``."""
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, total=total, disable=not enabled, unit=unit, initial=initial, leave=leave)


def note(message: str) -> None:
    """One informational line on stderr."""
    print(f"evalsuite: note: {message}", file=sys.stderr)


def warn(message: str) -> None:
    """One warning line on stderr (never a Python warning with its source line)."""
    print(f"evalsuite: warning: {message}", file=sys.stderr)


def table(rows: Sequence[Sequence[Any]], columns: Sequence[str], right: Sequence[str] = ()) -> str:
    """A plain-text table: header, rule, one line per row; ``right`` names the right-aligned columns."""
    cells = [[str(c) for c in columns]] + [["" if v is None else str(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]

    def line(r: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if c in right else v.ljust(w) for v, w, c in zip(r, widths, columns)).rstrip()

    return "\n".join([line(cells[0]), "  ".join("-" * w for w in widths)] + [line(r) for r in cells[1:]])
