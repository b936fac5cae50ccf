"""`evalsuite watch`: every checkpoint dropped in the folder is evaluated exactly once (across restarts), a file still
being written is waited for, not failed; the step of each checkpoint and the curves page."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from evalsuite.checkpoints import save_checkpoint
from evalsuite.cli import main
from evalsuite.errors import UserError
from evalsuite.results import training_step
from evalsuite.trunks import build_trunk
from evalsuite.watch import PAGE_FILE, STATE_FILE, Watcher, WatchOptions
from leaderboard.curves import collect_curves

# the cheapest real evaluation: the spectrum task on res5 at 16 px, no second view
CHEAP = ["image_size=16", "spectrum.alignment_view=none"]
METRICS = 3  # rankme, alpha_req, uniformity


def _options(ckpts: Path, out: Path, data: Path, **kw) -> WatchOptions:
    return WatchOptions(directory=ckpts, out=out, tasks="spectrum", layers=["res5"], overrides=CHEAP, data_root=data,
                        settle=0.0, progress=False, **kw)


def _drop(folder: Path, step: int) -> Path:
    """A checkpoint of ours written at ``step`` (random weights seeded by the step)."""
    return save_checkpoint(folder / f"ckpt_{step}.safetensors", build_trunk("resnet18", seed=step).state_dict(),
                           {"method": "test", "arch": "resnet18", "steps": step})


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def _evaluated_once_each(out: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in _records(out):
        counts[r["checkpoint_name"]] = counts.get(r["checkpoint_name"], 0) + 1
    return counts


def test_three_checkpoints_in_sequence_are_evaluated_once_each_across_restarts(tmp_path, tiny_imagefolder,
                                                                             capsys) -> None:
    ckpts, out = tmp_path / "ckpts", tmp_path / "watch"
    ckpts.mkdir()
    watcher = Watcher(_options(ckpts, out, tiny_imagefolder), command=main)
    _drop(ckpts, 100)
    assert watcher.poll() == []  # first sight: not yet known to be complete
    assert watcher.process(watcher.poll()) == 1
    _drop(ckpts, 200)
    watcher.poll()
    assert watcher.process(watcher.poll()) == 1
    assert watcher.process(watcher.poll()) == 0  # nothing new

    _drop(ckpts, 300)
    restarted = Watcher(_options(ckpts, out, tiny_imagefolder), command=main)  # a new watcher on the same state
    assert restarted.run_once() == 1  # only the new checkpoint
    # and the CLI, a third watcher: nothing left to do
    assert main(["watch", str(ckpts), "--out", str(out), "--tasks", "spectrum", "--layers", "res5", "--set", CHEAP[0],
                 "--set", CHEAP[1], "--data-root", str(tiny_imagefolder), "--once", "--settle", "0",
                 "--no-progress"]) == 0
    assert "0 checkpoint(s) evaluated" in capsys.readouterr().out

    assert _evaluated_once_each(out) == {"ckpt_100": METRICS, "ckpt_200": METRICS, "ckpt_300": METRICS}
    state = json.loads((out / STATE_FILE).read_text())
    assert sorted((e["name"], e["status"], e["step"]) for e in state["files"].values()) == [
        ("ckpt_100.safetensors", "done", 100), ("ckpt_200.safetensors", "done", 200),
        ("ckpt_300.safetensors", "done", 300)]
    page = (out / PAGE_FILE).read_text()
    assert "spectrum: rankme" in page and "data:image/svg+xml;base64," in page
    assert all(f">{s}</td><td>ckpt_{s}<" in page for s in (100, 200, 300))

    # a rename or copy of an evaluated file is the same content: not evaluated again
    shutil.copy(ckpts / "ckpt_100.safetensors", ckpts / "copy.safetensors")
    again = Watcher(_options(ckpts, out, tiny_imagefolder))
    assert again.run_once() == 0 and len(_records(out)) == 3 * METRICS
    statuses = {e["name"]: e["status"] for e in json.loads((out / STATE_FILE).read_text())["files"].values()}
    assert statuses["copy.safetensors"] == "duplicate"


def test_a_partial_file_is_skipped_then_picked_up(tmp_path, tiny_imagefolder, capsys) -> None:
    ckpts, out = tmp_path / "ckpts", tmp_path / "watch"
    ckpts.mkdir()
    whole = _drop(tmp_path, 500).read_bytes()
    target = ckpts / "ckpt_500.safetensors"
    target.write_bytes(whole[: len(whole) // 2])  # the trainer is half-way through writing it
    (ckpts / ".ckpt_600.safetensors.x1.tmp").write_bytes(whole[:100])  # an atomic write in progress: never looked at
    watcher = Watcher(_options(ckpts, out, tiny_imagefolder))
    watcher.poll()
    ready = watcher.poll()
    assert ready == [target]  # its size stayed the same between two polls...
    assert watcher.process(ready) == 0  # ...but it does not load: waited for, not failed
    assert "does not load" in capsys.readouterr().err
    assert not (out / "results.jsonl").exists()
    assert not (out / STATE_FILE).exists() or not json.loads((out / STATE_FILE).read_text())["files"]
    assert watcher.poll() == []  # not tried again while it stays the same

    with open(target, "ab") as f:
        f.write(whole[len(whole) // 2:])  # the rest arrives
    assert watcher.poll() == []  # it changed since the last poll
    assert watcher.process(watcher.poll()) == 1
    assert _evaluated_once_each(out) == {"ckpt_500": METRICS}
    [entry] = json.loads((out / STATE_FILE).read_text())["files"].values()
    assert entry["status"] == "done" and entry["size"] == len(whole) and entry["step"] == 500


def test_a_state_written_with_other_settings_is_refused(tmp_path, tiny_imagefolder) -> None:
    ckpts, out = tmp_path / "ckpts", tmp_path / "watch"
    ckpts.mkdir()
    Watcher(_options(ckpts, out, tiny_imagefolder))._save_state()
    with pytest.raises(UserError, match=r"other settings: tasks='spectrum' \(now 'knn'\)"):
        Watcher(WatchOptions(directory=ckpts, out=out, tasks="knn", layers=["res5"], overrides=CHEAP))
    with pytest.raises(UserError, match="unknown task 'nope'"):
        Watcher(WatchOptions(directory=ckpts, out=tmp_path / "other", tasks="nope"))
    with pytest.raises(UserError, match="does not exist"):
        Watcher(WatchOptions(directory=tmp_path / "missing"))


def test_the_training_step_comes_from_the_metadata_then_the_file_name() -> None:
    assert training_step({"steps": 40, "epochs": 3}, "last.safetensors") == (40, "metadata:steps")
    assert training_step({"global_step": 7}, "ckpt_9.pt") == (7, "metadata:global_step")
    assert training_step({}, "runs/epoch=3-step=500.ckpt") == (500, "file name")
    assert training_step({}, "iter_2000.pth") == (2000, "file name")
    assert training_step(None, "checkpoint_0005.pth.tar") == (5, "file name")
    for name in ("resnet50.pth", "moco_v2_800ep.pth.tar", "split.pt", "last.ckpt"):
        assert training_step({}, name) == (None, ""), name


def test_curves_place_each_record_at_its_step_and_keep_the_latest() -> None:
    def rec(step, layer, metric, value, created="2025-01-01T00:00:00Z", ck=None):
        return {"task": "spectrum", "dataset": "imagefolder", "split": "train", "protocol": "quick", "layer": layer,
                "metric": metric, "value": value, "created": created, "checkpoint_id": ck or f"id{step}",
                "checkpoint": f"ckpts/ckpt_{step}.safetensors", "checkpoint_name": f"ckpt_{step}",
                "checkpoint_meta": {"steps": step}}

    records = [rec(200, "res5", "rankme", 3.0), rec(100, "res5", "rankme", 2.0), rec(100, "res4", "rankme", 1.5),
               rec(100, "res5", "rankme", 2.5, created="2025-01-02T00:00:00Z"),  # re-run: the later record wins
               rec(100, "res5", "uniformity", -1.0), rec(100, "res5", "alpha_req", 1.1),
               {**rec(0, "res5", "rankme", 9.0), "checkpoint": "last.pt", "checkpoint_meta": {}, "checkpoint_id": "x"}]
    curves, unplaced = collect_curves(records)  # headline only: rankme
    assert unplaced == 1 and [c.metric for c in curves] == ["rankme"]
    [c] = curves
    assert c.layers == ["res4", "res5"] and not c.lower_is_better
    assert [(r["step"], r["values"]) for r in c.rows] == [(100, {"res5": 2.5, "res4": 1.5}), (200, {"res5": 3.0})]
    curves, _ = collect_curves(records, ["headline", "uniformity"])
    assert [(c.metric, c.lower_is_better) for c in curves] == [("rankme", False), ("uniformity", True)]
