"""``evalsuite leaderboard build`` and ``evalsuite compare``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from evalsuite.console import add_command, warn
from evalsuite.errors import UserError
from evalsuite.results import UnreadableLine, skipped_lines_message

SKIP_HELP = ("skip unreadable lines of results.jsonl (e.g. cut off by a crash), counted and reported in one line "
             "per file; without it such a line is an error")

EPILOG_BUILD = """\
examples:
  evalsuite leaderboard build --results runs/ --out site/
  evalsuite leaderboard build --results runs/a runs/b/results.jsonl --out site/ --duplicates latest
  xdg-open site/index.html     # works offline from file://
  # a run crashed mid-write: leave out its cut-off line (reported on stderr)
  evalsuite leaderboard build --results runs/ --out site/ --skip-bad-lines
"""

EPILOG_CURVES = """\
examples:
  evalsuite leaderboard curves --results runs/watch --out runs/watch/curves.html
  evalsuite leaderboard curves --results runs/watch --metrics headline,alpha_req,uniformity,alignment
"""

EPILOG_COMPARE = """\
examples:
  # does my reproduction still match the published numbers (goyal19 protocol, within 1 point)?
  evalsuite compare --results runs/ --against references --tolerance 1.0
  # accept mmselfsup's copies of the Goyal scripts as the same protocol; per-metric tolerance
  evalsuite compare --results runs/ --against references --accept-protocol goyal19=mmselfsup --tolerance mAP=0.5
  # regression check against pinned results: every expected row must match (strict), JSON report
  evalsuite compare --results runs/new --against tests/regression/quick --tolerance 0.01 --strict \\
                    --report compare.json
  # is run A significantly different from run B on the same test images? (per-sample outputs, Holm-corrected)
  evalsuite compare --results runs/a --against runs/b --paired --tolerance 0.5 --report paired.json
exit codes: 0 all compared rows within tolerance; 1 a row outside tolerance (with --strict also a protocol
mismatch, a result of a partially loaded checkpoint, a missing row, or nothing compared at all); 2 bad input.
With --paired: 1 only for a difference that is outside the tolerance and significant after Holm's correction
(with --strict also a matched row that could not be compared, or none compared).
"""


def add_leaderboard_command(sub) -> None:
    p = add_command(sub, "leaderboard", help="aggregate results into a static HTML leaderboard", epilog=EPILOG_BUILD)
    lsub = p.add_subparsers(dest="leaderboard_command", metavar="SUBCOMMAND", required=True)
    b = add_command(lsub, "build", help="build the static site (HTML, SVG plots, CSV, Markdown)", epilog=EPILOG_BUILD,
                    description="Read results.jsonl files, keep one number per (checkpoint, task, dataset, split, "
                                "layer, metric, variant, protocol) and write a static site.")
    b.add_argument("--results", nargs="+", type=Path, required=True, metavar="PATH",
                   help="results.jsonl files or directories searched for them")
    b.add_argument("--out", type=Path, default=Path("site"), help="output directory (replaced atomically)")
    b.add_argument("--duplicates", choices=["latest", "mean"], default="mean",
                   help="re-runs of one key: mean ± std over seeds (one seed: its latest record), or the latest "
                        "record")
    b.add_argument("--tie-resamples", type=int, default=1000,
                   help="bootstrap resamples of the paired tests behind the 'tied for first' marks (0: tell ties "
                        "from seeds and intervals only, faster)")
    b.add_argument("--tie-alpha", type=float, default=0.05,
                   help="an entry is tied with a column's best when the test's p-value is above this")
    b.add_argument("--no-plots", action="store_true", help="skip the per-layer SVG plots")
    b.add_argument("--no-references", action="store_true", help="do not show published reference numbers")
    b.add_argument("--title", default="evalsuite leaderboard", help="page title")
    b.add_argument("--skip-bad-lines", action="store_true", help=SKIP_HELP)
    b.set_defaults(func=cmd_build)
    c = add_command(lsub, "curves", help="one HTML page of metric-vs-training-step curves (evalsuite watch's page)",
                    epilog=EPILOG_CURVES,
                    description="Place every record at its checkpoint's training step (the checkpoint's metadata, "
                                "else its file name) and write one self-contained page: a plot per task and metric, "
                                "one line per layer, and the numbers.")
    c.add_argument("--results", nargs="+", type=Path, required=True, metavar="PATH",
                   help="results.jsonl files or directories searched for them")
    c.add_argument("--out", type=Path, default=Path("curves.html"), help="the page (written atomically)")
    c.add_argument("--metrics", default="headline",
                   help="comma-separated metrics to plot; 'headline' is each task's headline metrics")
    c.add_argument("--title", default="evalsuite: metrics per training step", help="page title")
    c.add_argument("--refresh", type=int, default=0, metavar="SECONDS",
                   help="the page reloads itself every SECONDS in a browser (0: never)")
    c.set_defaults(func=cmd_curves)


def cmd_build(a: argparse.Namespace) -> int:
    from .site import build_site

    with _bad_line_hint():
        rep = build_site(a.results, a.out, mode=a.duplicates, plots=not a.no_plots,
                         references=not a.no_references, title=a.title, skip_bad_lines=a.skip_bad_lines,
                         tie_resamples=a.tie_resamples, tie_alpha=a.tie_alpha)
    _report_skipped(rep.skipped)
    print(f"{rep.n_records} records -> {rep.n_rows} numbers, {rep.n_checkpoints} checkpoint(s), "
          f"{len(rep.tasks)} task(s); {len(rep.pages)} pages in {rep.timings['total_s']:.1f}s")
    print(f"open {(rep.out / 'index.html').resolve().as_uri()}")
    return 0


def cmd_curves(a: argparse.Namespace) -> int:
    from .curves import write_curves_page

    with _bad_line_hint():
        curves = write_curves_page(a.results, a.out, [m for m in a.metrics.split(",") if m], a.title, a.refresh)
    print(f"{len(curves)} curve(s) -> {a.out}")
    return 0


@contextmanager
def _bad_line_hint() -> Iterator[None]:
    """Adds the way out to the one-line error about an unreadable results line."""
    try:
        yield
    except UnreadableLine as e:
        raise UserError(f"{e.message}; --skip-bad-lines skips unreadable lines", e.path) from None


def _load(paths: list[Path], skip_bad_lines: bool):
    """load_results, reporting skipped lines (with ``skip_bad_lines``) or hinting at the flag."""
    from .aggregate import load_results

    skipped: dict[str, list[int]] = {}
    with _bad_line_hint():
        df = load_results(paths, skipped=skipped if skip_bad_lines else None)
    _report_skipped(skipped)
    return df


def _report_skipped(skipped: dict[str, list[int]]) -> None:
    for path, lines in skipped.items():
        warn(skipped_lines_message(path, lines))


def add_compare_command(sub) -> None:
    p = add_command(sub, "compare", help="compare results with published numbers or other results (regressions)",
                    epilog=EPILOG_COMPARE,
                    description="Match result rows by (method, arch, pretrain data, task, layer, metric, variant) "
                                "and protocol, print ours vs reference with the delta, and exit non-zero when a "
                                "compared row is outside tolerance.")
    p.add_argument("--results", nargs="+", type=Path, required=True, metavar="PATH",
                   help="our results.jsonl files or directories")
    p.add_argument("--against", nargs="+", required=True, metavar="references|PATH",
                   help="'references' (the published numbers shipped with the package) or other results")
    p.add_argument("--tolerance", action="append", default=[], metavar="[METRIC=]NUMBER",
                   help="absolute tolerance in the metric's units (default 0.5); METRIC=N for one metric; "
                        "repeatable")
    p.add_argument("--rel-tolerance", type=float, default=0.0, help="plus this fraction of |reference|")
    p.add_argument("--accept-protocol", action="append", default=[], metavar="OURS=THEIRS",
                   help="treat our preset OURS as the reference protocol THEIRS (e.g. goyal19=mmselfsup)")
    p.add_argument("--ignore-field", action="append", default=[], metavar="FIELD",
                   help="leave a field out of the match (arch, pretrain_data, method; against results also "
                        "checkpoint_name, dataset, split)")
    p.add_argument("--ignore-param", action="append", default=[], metavar="NAME",
                   help="against results: a params key whose difference is not a protocol mismatch")
    p.add_argument("--duplicates", choices=["latest", "mean"], default="latest", help="rule for re-runs")
    p.add_argument("--strict", action="store_true",
                   help="also fail on protocol mismatches and on reference rows without a result")
    p.add_argument("--all-missing", action="store_true",
                   help="against references: list every published row without a result (default: only those of "
                        "the methods/archs/data in the results)")
    p.add_argument("--skip-bad-lines", action="store_true", help=SKIP_HELP)
    p.add_argument("--paired", action="store_true",
                   help="against results: test each difference on the per-sample outputs of both runs (paired "
                        "bootstrap interval and p-value, McNemar on per-sample correctness, Holm over all rows); "
                        "rows match by task, dataset, split, layer, metric and variant; --ignore-field, "
                        "--ignore-param and --accept-protocol do not apply (docs/uncertainty.md)")
    p.add_argument("--resamples", type=int, default=1000, help="--paired: bootstrap resamples")
    p.add_argument("--level", type=float, default=0.95, help="--paired: level of the difference's interval")
    p.add_argument("--alpha", type=float, default=0.05,
                   help="--paired: a difference is significant when its Holm-adjusted p-value is at most this")
    p.add_argument("--seed", type=int, default=0, help="--paired: seed of the bootstrap resamples")
    p.add_argument("--report", type=Path, help="write the machine-readable JSON report here")
    p.add_argument("--json", action="store_true", help="print the JSON report instead of the table")
    p.set_defaults(func=cmd_compare)


def cmd_compare(a: argparse.Namespace) -> int:
    import json

    from .aggregate import deduplicate
    from .compare import Tolerance, compare_to_references, compare_to_results

    tol = Tolerance.parse(a.tolerance, relative=a.rel_tolerance)
    accept = []
    for item in a.accept_protocol:
        ours, sep, theirs = item.partition("=")
        if not sep or not ours or not theirs:
            raise UserError(f"--accept-protocol expects OURS=THEIRS, got {item!r}")
        accept.append((ours.strip(), theirs.strip()))
    if a.paired and (a.against == ["references"] or a.duplicates == "mean"):
        raise UserError("--paired compares two runs' per-sample outputs: --against takes result paths, and "
                        "--duplicates mean does not apply (a mean over seeds has no single run's outputs)")
    ours = deduplicate(_load(a.results, a.skip_bad_lines), a.duplicates)
    if ours.empty:
        raise UserError("no result records found", a.results[0])
    if a.paired:
        from .paired import compare_paired

        if "references" in a.against:
            raise UserError("--against takes either 'references' or result paths, not both")
        other = deduplicate(_load(a.against, a.skip_bad_lines), "latest")
        rep = compare_paired(ours, other, tol, resamples=a.resamples, level=a.level, alpha=a.alpha, seed=a.seed,
                             strict=a.strict, label=" ".join(map(str, a.against)))
    elif a.against == ["references"]:
        rep = compare_to_references(ours, tol, accept=accept, ignore=a.ignore_field, all_missing=a.all_missing,
                                    strict=a.strict)
    else:
        if "references" in a.against:
            raise UserError("--against takes either 'references' or result paths, not both")
        other = deduplicate(_load(a.against, a.skip_bad_lines), a.duplicates)
        rep = compare_to_results(ours, other, tol, ignore_params=a.ignore_param, ignore=a.ignore_field,
                                 strict=a.strict, label=" ".join(map(str, a.against)))
    if a.report:
        rep.write_json(a.report)
    if a.json:
        json.dump(rep.to_dict(), sys.stdout, indent=2, sort_keys=True, default=str)
        print()
    else:
        print(rep.format_text())
    return rep.exit_code
