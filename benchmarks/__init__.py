"""Speed and memory benchmarks: ratios measured side by side in one run, printed and written as JSON."""

# evalsuite before any benchmark imports torch, as the CLI does (its process-wide settings, e.g.
# MKL_DISABLE_FAST_MM, take effect only then)
import evalsuite  # noqa: E402,F401
