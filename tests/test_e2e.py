"""End to end at a tiny size: pretrain -> every task -> leaderboard -> compare, then a resumed re-run.

This is `make demo` in miniature (two checkpoints, every installed task, half-size synthetic data,
shortened navigation and detection schedules), run through the real CLI.
"""

from __future__ import annotations

import json

import pytest

from evalsuite import registry
from evalsuite.cli import main

pytestmark = pytest.mark.slow

SMALL = [*(x for o in ("navigation.frames=256", "navigation.n_envs=2", "navigation.ppo.n_steps=16",
                       "navigation.ppo.batch_size=32", "navigation.eval_episodes=4", "detection.max_iter=10",
                       "detection.steps=[8]", "detection.max_test_images=8") for x in ("--set", o))]


def test_demo_pretrain_all_tasks_leaderboard_compare_and_resume(tmp_path, cache_dir, capsys) -> None:
    data, out = tmp_path / "data", tmp_path / "runs"
    args = ["demo", "--methods", "random,rotnet", "--data-scale", "0.4", "--data-root", str(data), "--out", str(out),
            "--no-progress", *SMALL]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "0 failed" in text and "leaderboard at" in text

    records = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    tasks = set(registry.task_names())
    by_ck = {}
    for r in records:
        by_ck.setdefault(r["method"], set()).add(r["task"])
    assert by_ck == {"random": tasks, "rotnet": tasks}, "every checkpoint is evaluated on every task"
    rot = next(r for r in records if r["method"] == "rotnet")
    assert rot["checkpoint_format"] == "evalsuite" and rot["checkpoint_meta"]["method"] == "rotnet"
    assert all(r["protocol"] == "quick" for r in records)

    index = (out / "site" / "index.html").read_text()
    assert "rotnet" in index and "voc07_svm" in index

    # compare: the results against themselves pass; a moved number fails
    assert main(["compare", "--results", str(out), "--against", str(out), "--tolerance", "0.01"]) == 0
    moved = tmp_path / "moved"
    moved.mkdir()
    lines = (out / "results.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    first["value"] = (first["value"] or 0) + 50
    (moved / "results.jsonl").write_text("\n".join([json.dumps(first), *lines[1:]]) + "\n")
    assert main(["compare", "--results", str(moved), "--against", str(out), "--tolerance", "0.01"]) == 1
    capsys.readouterr()

    # resume: nothing is recomputed, the records are not duplicated
    assert main(args) == 0
    text = capsys.readouterr().out
    n_steps = 1 + 1 + 2 * len(tasks) + 1
    assert f"{n_steps - 1} already done" in text  # only the leaderboard is rebuilt
    assert len((out / "results.jsonl").read_text().splitlines()) == len(records)
