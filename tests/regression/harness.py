"""Pinned regression cases: run the suite on synthetic data at the `quick` preset, compare with the
committed expectations (`tests/regression/<case>/results.jsonl`) through `evalsuite compare --strict`.

Regenerate the expectations after an *intended* change of a metric (and say why in the commit):

    .venv/bin/python -m tests.regression.harness            # all cases
    .venv/bin/python -m tests.regression.harness CASE_NAME  # one case
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
VOLATILE = ("host", "versions", "created", "wall_time_s", "run_id", "dataset_fingerprint")


def cases() -> list[dict]:
    return json.loads((HERE / "cases.json").read_text())


def write_data(case: dict, root: Path) -> Path:
    d = case["data"]
    if d["kind"] == "imagefolder":
        from evalsuite.data.synthetic import write_imagefolder

        write_imagefolder(root / "imagefolder", seed=d["seed"], per_class=d["per_class"], size=d["size"])
    else:  # pragma: no cover - add other kinds with their case
        raise ValueError(f"unknown data kind {d['kind']}")
    return root


def run_case(case: dict, work: Path) -> Path:
    """Run one case into WORK/out and return that results directory (deterministic: fp32, seed 0)."""
    from evalsuite.cli import main

    data = write_data(case, work / "data")
    out = work / "out"
    rc = main(["run", "--checkpoint", case["checkpoint"], "--tasks", case["tasks"], "--protocol", case["protocol"],
               "--data-root", str(data), "--out", str(out), "--cache-dir", str(work / "cache"), "--seed", "0",
               "--precision", "fp32", "--no-progress"])
    if rc != 0:
        raise RuntimeError(f"case {case['name']}: evalsuite run exited {rc}")
    return out


def expected_dir(case: dict) -> Path:
    return HERE / case["name"]


def regenerate(names: list[str]) -> None:
    for case in cases():
        if names and case["name"] not in names:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            out = run_case(case, Path(tmp))
            lines = []
            for line in (out / "results.jsonl").read_text().splitlines():
                rec = json.loads(line)
                for k in VOLATILE:
                    rec.pop(k, None)
                lines.append(json.dumps(rec, sort_keys=True))
            dest = expected_dir(case)
            dest.mkdir(exist_ok=True)
            tmp_file = dest / ".results.jsonl.tmp"
            tmp_file.write_text("\n".join(lines) + "\n")
            shutil.move(tmp_file, dest / "results.jsonl")
            print(f"{case['name']}: {len(lines)} expected values -> {dest / 'results.jsonl'}")


if __name__ == "__main__":
    regenerate(sys.argv[1:])
