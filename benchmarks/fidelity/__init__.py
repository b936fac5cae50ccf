"""Protocol fidelity measurements: one module per task, each exposing ``measure(args) -> dict``, the effect of
every deviation from the published reference that remains as a named option (see each task's Conformance table).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence


def arg_parser(doc: str | None) -> argparse.ArgumentParser:
    """A fidelity module's command line: its docstring as help, plus ``--device`` and ``--threads``."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device")
    ap.add_argument("--threads", type=int, help="torch threads")
    return ap


def run_cli(ap: argparse.ArgumentParser, argv: Sequence[str] | None, measure: Callable[[argparse.Namespace], dict],
            show: Callable[[dict], None], name: str) -> int:
    """Parse, measure, print, and write benchmarks/out/<name>.json (``--out-name`` when the module offers it)."""
    import torch

    from benchmarks.common import write_json

    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = measure(args)
    show(result)
    write_json(getattr(args, "out_name", None) or name, result)
    return 0
