"""The measured effect of every deviation from the published protocols that remains an option, side by side in
one run: each module of ``benchmarks/fidelity/`` (one per task; ``measure(args)`` with its defaults for missing
arguments) runs on the data we have; the figures are printed and written to benchmarks/out/bench_fidelity.json.

    python -m benchmarks.bench_fidelity                 # every task
    python -m benchmarks.bench_fidelity --only svm,features
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import time
from types import SimpleNamespace

from benchmarks import fidelity
from benchmarks.common import write_json


def modules() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(fidelity.__path__) if not m.name.startswith("_"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", help=f"comma-separated subset of: {', '.join(modules())}")
    a = ap.parse_args(argv)
    names = a.only.split(",") if a.only else modules()
    out = {"tasks": {}}
    for name in names:
        mod = importlib.import_module(f"benchmarks.fidelity.{name}")
        print(f"=== {name}", flush=True)
        t0 = time.perf_counter()
        result = mod.measure(SimpleNamespace())
        getattr(mod, "_print", print)(result)
        out["tasks"][name] = {**result, "seconds_total": round(time.perf_counter() - t0, 1)}
    write_json("bench_fidelity", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
