"""Per-layer line plots (the "which layer transfers best" picture of Goyal et al. 2019, Fig. 2/3).

Static SVG written by matplotlib's Agg/SVG backend: no JavaScript, no network. Labels come from
user files, so mathtext is switched off (a ``$`` in a method name stays text) and matplotlib's
SVG writer escapes the text; the page embeds the file with ``<img>``, where an SVG cannot run script.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402

RC = {"svg.hashsalt": "evalsuite-leaderboard", "svg.fonttype": "none", "text.parse_math": False,
      "font.size": 9, "axes.grid": True, "grid.alpha": 0.3}


Bounds = tuple[float, float] | None


def layer_plot(path: Path, layers: list[str], ours: list[tuple[str, list[float | None]]
                                                         | tuple[str, list[float | None], list[Bounds]]],
               published: list[tuple[str, list[float | None]]], metric: str, title: str,
               lower_is_better: bool = False, max_lines: int = 12) -> Path:
    """Write one SVG: x = layers in trunk order, one solid line per checkpoint, dashed for published.

    ``ours``/``published``: (label, value per layer or None); ours may add (low, high) per layer or None, drawn as
    error bars (the bootstrap interval, or mean ± std over seeds). At most ``max_lines`` of each are drawn
    (the best at their best layer); the page's table lists all of them.
    """
    def best(vals):
        v = [x for x in vals if x is not None]
        if not v:
            return float("inf")
        return min(v) if lower_is_better else -max(v)

    ours = sorted(ours, key=lambda t: best(t[1]))[:max_lines]
    published = sorted(published, key=lambda t: best(t[1]))[:max_lines]
    with plt.rc_context(RC):
        fig, ax = plt.subplots(figsize=(7.0, 3.6))
        x = list(range(len(layers)))
        for label, vals, *bounds in ours:
            line = _line(ax, x, vals, label, "-", "o")
            if bounds and line is not None:
                _error_bars(ax, x, vals, bounds[0], line.get_color())
        for label, vals in published:
            _line(ax, x, vals, f"published: {label}", "--", "s", alpha=0.8)
        ax.set_xticks(x)
        ax.set_xticklabels(layers)
        ax.set_xlabel("layer")
        ax.set_ylabel(metric + (" (lower is better)" if lower_is_better else ""))
        ax.set_title(title)
        if ours or published:
            ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, format="svg", metadata={"Date": None, "Creator": "evalsuite leaderboard"})
        plt.close(fig)
    return path


def _line(ax, x, vals, label, style, marker, alpha=1.0):
    pts = [(i, v) for i, v in zip(x, vals) if v is not None]
    if not pts:
        return None
    xs, ys = zip(*pts)
    (line,) = ax.plot(xs, ys, linestyle=style, marker=marker, markersize=3.5, linewidth=1.4, label=_short(label),
                      alpha=alpha)
    return line


def _error_bars(ax, x, vals, bounds: list[Bounds], color) -> None:
    """Vertical bars from low to high at the layers that have both a value and bounds."""
    pts = [(i, v, b) for i, v, b in zip(x, vals, bounds) if v is not None and b is not None]
    if pts:
        xs, ys, bs = zip(*pts)
        # a percentile interval need not contain its point estimate: clip rather than draw a negative bar
        err = [[max(0.0, y - b[0]) for y, b in zip(ys, bs)], [max(0.0, b[1] - y) for y, b in zip(ys, bs)]]
        ax.errorbar(xs, ys, yerr=err, fmt="none", ecolor=color, elinewidth=1.0, capsize=2.5, alpha=0.8)


def _short(label: str, n: int = 48) -> str:
    return label if len(label) <= n else label[: n - 1] + "…"


def step_plot(series: list[tuple[str, list[tuple[int, float]]]], metric: str, title: str,
              lower_is_better: bool = False) -> str:
    """One SVG as text: x = training step, one line per ``(label, [(step, value), ...])`` (e.g. per layer)."""
    import io

    with plt.rc_context(RC):
        fig, ax = plt.subplots(figsize=(7.0, 3.2))
        for label, points in series:
            if points:
                xs, ys = zip(*sorted(points))
                _line(ax, list(xs), list(ys), label, "-", "o")
        ax.set_xlabel("training step")
        ax.set_ylabel(metric + (" (lower is better)" if lower_is_better else ""))
        ax.set_title(title)
        if series:
            ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": "evalsuite watch"})
        plt.close(fig)
    return buf.getvalue().decode("utf-8")


def scatter_plot(path: Path, points: list[tuple[str, float, float]], xlabel: str, ylabel: str, title: str) -> Path:
    """Write one SVG: one dot per ``(label, x, y)`` (a checkpoint), labelled beside it (the label-free metric
    against a labelled result, :func:`leaderboard.aggregate.spectrum_correlations`)."""
    with plt.rc_context(RC):
        fig, ax = plt.subplots(figsize=(4.8, 3.6))
        for label, x, y in points:
            ax.plot([x], [y], linestyle="none", marker="o", markersize=4.5)
            ax.annotate(_short(label, 28), (x, y), xytext=(4, 3), textcoords="offset points", fontsize=6)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, format="svg", metadata={"Date": None, "Creator": "evalsuite leaderboard"})
        plt.close(fig)
    return path
