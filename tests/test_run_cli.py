"""`evalsuite run` on a first try: the plan before the work, --dry-run, bad numbers, a mistyped data root,
a compact summary, --debug after the sub-command, and commands that start without torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from evalsuite.cli import main

REPO = Path(__file__).resolve().parents[1]


def _run(argv, capsys) -> tuple[int, str, list[str]]:
    rc = main(argv)
    cap = capsys.readouterr()
    return rc, cap.out, [x for x in cap.err.splitlines() if x.strip()]


@pytest.mark.parametrize("option, value, needle", [
    ("--batch-size", "0", "must be a positive integer, got 0"),
    ("--batch-size", "-4", "must be a positive integer, got -4"),
    ("--workers", "-1", "must be 0 or more, got -1"),
])
def test_bad_numbers_are_one_line_exit_2(tmp_path, capsys, option, value, needle) -> None:
    with pytest.raises(SystemExit) as e:
        main(["run", "--checkpoint", "random:resnet18", option, value, "--out", str(tmp_path / "o")])
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert e.value.code == 2 and len(err) == 1 and needle in err[0] and option in err[0]
    assert not (tmp_path / "o").exists()


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, tiny_imagefolder, capsys) -> None:
    rc, out, _ = _run(["run", "--checkpoint", "random:resnet18", "--tasks", "centroid,knn", "--protocol", "quick",
                       "--data-root", str(tiny_imagefolder), "--out", str(tmp_path / "o"), "--dry-run"], capsys)
    assert rc == 0 and out.startswith("plan (quick preset, cpu):")
    assert "centroid" in out and "knn" in out and not (tmp_path / "o").exists()


def test_a_task_that_refuses_the_preset_is_skipped_in_all_mode_and_fails_when_named(tmp_path, tiny_imagefolder,
                                                                                      capsys) -> None:
    """detection has no faithful vissl preset (VISSL's is a detectron2 Faster R-CNN): --tasks all skips it with
    the reason and runs the rest (a --set aimed at it is dropped with it); --tasks detection fails in one line."""
    rc, out, err = _run(["run", "--checkpoint", "random:resnet18", "--tasks", "all", "--protocol", "vissl",
                         "--set", "detection.lr=0.1", "--data-root", str(tiny_imagefolder),
                         "--out", str(tmp_path / "o"), "--dry-run"], capsys)
    skipped = [x for x in err if "skipped detection" in x]
    assert rc == 0 and len(skipped) == 1 and "detectron2" in skipped[0]
    assert "centroid" in out and "knn" in out
    rc, _, err = _run(["run", "--checkpoint", "random:resnet18", "--tasks", "detection", "--protocol", "vissl",
                       "--data-root", str(tiny_imagefolder), "--out", str(tmp_path / "o")], capsys)
    assert rc == 2 and len(err) == 1 and "detectron2" in err[0] and not (tmp_path / "o").exists()


def test_tasks_without_a_dino21_protocol_are_skipped_in_all_mode(tmp_path, capsys, monkeypatch) -> None:
    """--protocol dino21 --tasks all runs the tasks that have DINO's protocol and skips the others with their one
    line; a task without it named on its own fails in that line."""
    from evalsuite import registry
    from evalsuite.data.synthetic import write_imagenet

    write_imagenet(tmp_path / "data", seed=0, image_size=24, train_per_class=3, val_per_class=1)
    monkeypatch.setattr(registry, "task_names", lambda: ["centroid", "imagenet_linear", "knn", "voc07_svm"])
    rc, out, err = _run(["run", "--checkpoint", "random:resnet18", "--tasks", "all", "--protocol", "dino21",
                         "--set", "voc07_svm.costs=[1]", "--data-root", str(tmp_path / "data"),
                         "--out", str(tmp_path / "o"), "--dry-run"], capsys)
    assert rc == 0 and out.startswith("plan (dino21 preset, cpu):") and "imagenet_linear" in out and "knn" in out
    skipped = sorted(x.split("skipped ", 1)[1].split(":")[0] for x in err if "skipped " in x)
    assert skipped == ["centroid", "voc07_svm"] and all("has no dino21 protocol" in x for x in err if "skipped" in x)
    rc, _, err = _run(["run", "--checkpoint", "random:resnet18", "--tasks", "voc07_svm", "--protocol", "dino21",
                       "--data-root", str(tmp_path / "data"), "--out", str(tmp_path / "o")], capsys)
    assert rc == 2 and len(err) == 1 and "voc07_svm has no dino21 protocol" in err[0] and not (tmp_path / "o").exists()


def test_a_data_root_that_does_not_exist_fails_before_any_work(tmp_path, capsys) -> None:
    wrong = tmp_path / "datasets_typo"
    rc, out, err = _run(["run", "--checkpoint", "random:resnet18", "--tasks", "all", "--protocol", "quick",
                         "--data-root", str(wrong), "--out", str(tmp_path / "o"), "--no-progress"], capsys)
    assert rc == 2 and len(err) == 1 and err[0].startswith(f"evalsuite: error: {wrong}: the data root does not exist")
    assert out == "" and not (tmp_path / "o").exists()


def test_every_task_skipped_for_missing_data_fails_naming_where_it_looked(tmp_path, capsys, monkeypatch) -> None:
    from evalsuite import registry

    monkeypatch.setattr(registry, "task_names", lambda: ["centroid", "knn", "voc07_svm"])  # the data tasks
    empty = tmp_path / "datasets"
    empty.mkdir()
    rc, _, err = _run(["run", "--checkpoint", "random:resnet18", "--tasks", "all", "--protocol", "quick",
                       "--data-root", str(empty), "--out", str(tmp_path / "o"), "--no-progress"], capsys)
    assert rc == 2 and err[-1].startswith("evalsuite: error: every requested task was skipped")
    assert str(empty / "imagefolder") in err[-1] and str(empty / "VOCdevkit" / "VOC2007") in err[-1]
    skips = [x for x in err[:-1] if x.startswith("evalsuite: note: skipped ")]
    assert [x.split()[3] for x in skips] == ["centroid:", "knn:", "voc07_svm:"]  # as each was skipped, first
    assert not (tmp_path / "o" / "results.jsonl").exists()


def test_summary_is_compact_and_verbose_prints_every_record(tmp_path, tiny_imagefolder, cache_dir, capsys) -> None:
    argv = ["run", "--checkpoint", "random:resnet18", "--tasks", "knn", "--protocol", "quick", "--data-root",
            str(tiny_imagefolder), "--out", str(tmp_path / "o"), "--no-progress", "--precision", "fp32"]
    rc, out, _ = _run(argv, capsys)
    records = (tmp_path / "o" / "results.jsonl").read_text().splitlines()
    body = out[out.index("task "):].splitlines()
    assert rc == 0 and len(records) > 40
    rows = [x for x in body[2:] if x.startswith("knn ")]
    assert 1 <= len(rows) <= 4 and all(x.split()[-1] == str(len(records)) for x in rows)
    rc, out, _ = _run(argv + ["--verbose"], capsys)
    assert rc == 0 and len([x for x in out.splitlines() if x.startswith("knn ")]) == len(records)


def test_debug_after_the_subcommand_shows_the_traceback(tmp_path) -> None:
    proc = subprocess.run([sys.executable, "-m", "evalsuite", "run", "--checkpoint", str(tmp_path / "nope.pth"),
                           "--debug"], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "Traceback" in proc.stderr


@pytest.mark.parametrize("argv", [["--help"], ["run", "--help"], ["leaderboard", "build", "--help"],
                                  ["compare", "--help"], ["data", "check", "--kind", "voc2007", "--root", "/nope"]])
def test_commands_that_need_no_torch_do_not_import_it(argv) -> None:
    code = ("import sys\nfrom evalsuite.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')")
    proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert proc.stdout.strip().splitlines()[-1] == "NO-TORCH", proc.stderr[-2000:]
