"""Run every ``benchmarks/bench_*.py`` in turn (each prints its ratios and writes JSON under benchmarks/out/)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

#: arguments for scripts whose defaults are the real sizes
SMALL = {"bench_scale": ["--quick"], "bench_stats": ["--quick"]}


def main() -> int:
    failed = []
    for script in sorted(Path(__file__).resolve().parent.glob("bench_*.py")):
        print(f"=== {script.stem}", flush=True)
        cmd = [sys.executable, "-m", f"benchmarks.{script.stem}", *SMALL.get(script.stem, [])]
        if subprocess.run(cmd).returncode != 0:
            failed.append(script.stem)
    if failed:
        print("failed: " + ", ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
