"""The CLI end to end, and the bad-input table of the foundation issue: exit 2, one line, nothing written."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision

from evalsuite.cli import main

EVALSUITE = [sys.executable, "-m", "evalsuite"]


def run_cli(args, env_cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "EVALSUITE_CACHE": str(env_cache)}
    return subprocess.run(EVALSUITE + args, capture_output=True, text=True, env=env, timeout=300)


def test_run_random_resnet18_end_to_end(tmp_path, tiny_imagefolder, cache_dir, capsys) -> None:
    out = tmp_path / "runs"
    rc = main(["run", "--checkpoint", "random:resnet18", "--tasks", "centroid", "--protocol", "quick",
               "--data-root", str(tiny_imagefolder), "--out", str(out), "--no-progress",
               "--set", "centroid.image_size=32", "--layers", "res4,res5"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "2 result records appended" in text and "centroid" in text
    import json

    recs = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert [r["layer"] for r in recs] == ["res4", "res5"]
    r = recs[0]
    assert r["protocol"] == "quick" and r["params"]["image_size"] == 32 and r["method"] == "random"
    assert r["checkpoint_format"] == "random" and r["versions"]["torch"] and r["wall_time_s"] > 0
    assert 0 <= r["value"] <= 100


def test_run_torchvision_file_and_inspect(tmp_path, tiny_imagefolder, cache_dir, capsys) -> None:
    ck = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), ck)
    assert main(["inspect", str(ck)]) == 0
    text = capsys.readouterr().out
    assert "format:     torchvision" in text and "matched 120" in text and "fc.weight" in text
    rc = main(["run", "--checkpoint", str(ck), "--tasks", "centroid", "--protocol", "quick",
               "--data-root", str(tiny_imagefolder), "--out", str(tmp_path / "o"), "--no-progress",
               "--set", "image_size=32", "--layers", "res5"])
    assert rc == 0 and (tmp_path / "o" / "results.jsonl").exists()


def test_list_shows_tasks_presets_formats(capsys) -> None:
    assert main(["list"]) == 0
    text = capsys.readouterr().out
    assert "centroid" in text and "goyal19" in text and "vissl" in text and "moco" in text
    assert main(["list", "--presets", "--tasks-only", "centroid"]) == 0
    assert "image_size = 64" in capsys.readouterr().out


def _bad_inputs(tmp: Path, data: Path) -> dict[str, tuple[list[str], str]]:
    good = tmp / "r18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), good)
    trunc = tmp / "trunc.pth"
    trunc.write_bytes(good.read_bytes()[:4000])

    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))

    evil = tmp / "evil.pth"
    torch.save({"x": Evil()}, evil)
    nan = tmp / "nan.pth"
    sd = torchvision.models.resnet18(weights=None).state_dict()
    sd["layer4.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    torch.save(sd, nan)
    empty_root = tmp / "emptydata"
    (empty_root / "imagefolder" / "train" / "cls").mkdir(parents=True)
    (empty_root / "imagefolder" / "val" / "cls").mkdir(parents=True)
    broken = tmp / "brokendata"
    for split in ("train", "val"):
        (broken / "imagefolder" / split / "cls").mkdir(parents=True)
        (broken / "imagefolder" / split / "cls" / "x.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    base = ["run", "--tasks", "centroid", "--protocol", "quick", "--set", "image_size=32", "--no-progress"]
    d = ["--data-root", str(data)]
    return {
        "missing file": (base + ["--checkpoint", str(tmp / "nope.pth")] + d, "not found"),
        "directory": (base + ["--checkpoint", str(tmp)] + d, "directory"),
        "truncated": (base + ["--checkpoint", str(trunc)] + d, "truncated"),
        "wrong arch": (base + ["--checkpoint", str(good), "--arch", "resnet50"] + d, "resnet18"),
        "pickle code": (base + ["--checkpoint", str(evil)] + d, "trust-pickle"),
        "unknown task": (["run", "--checkpoint", "random:resnet18", "--tasks", "nosuchtask"] + d, "unknown task"),
        "unknown layer": (base + ["--checkpoint", "random:resnet18", "--layers", "res9"] + d, "unknown layer"),
        "empty dataset": (base + ["--checkpoint", "random:resnet18", "--data-root", str(empty_root)], "empty"),
        "unreadable image": (base + ["--checkpoint", "random:resnet18", "--data-root", str(broken)], "x.jpg"),
        "nan features": (base + ["--checkpoint", str(nan)] + d, "NaN"),
        "bad preset": (base[:3] + ["--protocol", "fast", "--checkpoint", "random:resnet18"] + d, "preset"),
        "bad override": (base + ["--checkpoint", "random:resnet18", "--set", "nosuch=1"] + d, "nosuch"),
    }


def _assert_refused(name: str, rc: int, stderr: str, needle: str, out: Path, cache: Path) -> None:
    assert rc == 2, (name, stderr[-2000:])
    lines = [x for x in stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("evalsuite: error:"), (name, stderr[-2000:])
    assert needle in lines[0], (name, lines[0])
    assert "Traceback" not in stderr
    assert not (out / "results.jsonl").exists(), name
    assert not list(cache.rglob("manifest.json")), name


def test_bad_inputs_exit_2_with_one_line_and_nothing_written(tmp_path, tiny_imagefolder, monkeypatch,
                                                             capsys) -> None:
    """Every case through ``main`` in this process (an unexpected exception would fail the test with its
    traceback); one case also through a real ``python -m evalsuite`` process, for the exit status itself."""
    cases = _bad_inputs(tmp_path, tiny_imagefolder)
    for name, (args, needle) in cases.items():
        out = tmp_path / f"out_{name.replace(' ', '_')}"
        cache = tmp_path / f"cache_{name.replace(' ', '_')}"
        monkeypatch.setenv("EVALSUITE_CACHE", str(cache))
        capsys.readouterr()
        rc = main(args + ["--out", str(out)])
        _assert_refused(name, rc, capsys.readouterr().err, needle, out, cache)
    args, needle = cases["missing file"]
    out, cache = tmp_path / "out_process", tmp_path / "cache_process"
    proc = run_cli(args + ["--out", str(out)], cache)
    _assert_refused("missing file (process)", proc.returncode, proc.stderr, needle, out, cache)


def test_debug_shows_traceback(tmp_path) -> None:
    proc = run_cli(["--debug", "run", "--checkpoint", str(tmp_path / "nope.pth")], tmp_path / "c")
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_help_has_examples_for_every_command() -> None:
    for cmd in ("run", "list", "inspect", "extract", "data"):
        proc = subprocess.run(EVALSUITE + [cmd, "--help"], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0 and "example" in proc.stdout, cmd


# Runs `evalsuite ARGS` and SIGKILLs itself right after the third cache shard is on disk: a kill at a known
# point instead of a race against a polling loop.
KILL_AFTER_THIRD_SHARD = """
import os, signal, sys
from evalsuite import cache
from evalsuite.cli import main
write_shard = cache.CacheEntry.write_shard
def write_then_die(self, i, array):
    out = write_shard(self, i, array)
    if i == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return out
cache.CacheEntry.write_shard = write_then_die
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_extract_resumes_after_kill_9(tmp_path) -> None:
    """Extraction SIGKILLed after its third shard; the re-run finishes and equals an uninterrupted run."""
    import signal

    import numpy as np

    from evalsuite.data.synthetic import write_imagefolder

    root = write_imagefolder(tmp_path / "d" / "imagefolder", seed=1, per_class=12, size=64)
    args = ["extract", "--checkpoint", "random:resnet18", "--dataset", "imagefolder", "--root", str(root),
            "--split", "train", "--layers", "res5", "--pooling", "avg", "--image-size", "64", "--batch-size", "4",
            "--shard-rows", "8", "--precision", "fp32", "--no-progress"]
    env = {**os.environ, "EVALSUITE_CACHE": str(tmp_path / "killed")}
    killed = subprocess.run([sys.executable, "-c", KILL_AFTER_THIRD_SHARD, *args], env=env, capture_output=True,
                            timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-2000:]
    shards_before = list((tmp_path / "killed").rglob("shard_*.npy"))
    assert len(shards_before) == 3 and not list((tmp_path / "killed").rglob("manifest.json"))
    assert subprocess.run(EVALSUITE + args, env=env, capture_output=True, timeout=300).returncode == 0
    env2 = {**os.environ, "EVALSUITE_CACHE": str(tmp_path / "clean")}
    assert subprocess.run(EVALSUITE + args, env=env2, capture_output=True, timeout=300).returncode == 0

    def load(cache_root):
        man = next(Path(cache_root).rglob("manifest.json"))
        return np.concatenate([np.load(p) for p in sorted(man.parent.glob("shard_*.npy"))])

    np.testing.assert_array_equal(load(tmp_path / "killed"), load(tmp_path / "clean"))



@pytest.mark.slow
def test_torchrun_two_gloo_processes_equal_one(tmp_path, tiny_imagefolder) -> None:
    import numpy as np

    root = tiny_imagefolder / "imagefolder"
    args = ["--checkpoint", "random:resnet18", "--dataset", "imagefolder", "--root", str(root), "--split",
            "train", "--layers", "res3,res5", "--pooling", "goyal", "--image-size", "32", "--batch-size", "4",
            "--no-progress"]
    env1 = {**os.environ, "EVALSUITE_CACHE": str(tmp_path / "one")}
    p1 = subprocess.run(EVALSUITE + ["extract"] + args, env=env1, capture_output=True, text=True, timeout=300)
    assert p1.returncode == 0, p1.stderr
    env2 = {**os.environ, "EVALSUITE_CACHE": str(tmp_path / "two"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "evalsuite", "extract"] + args
    p2 = subprocess.run(cmd, env=env2, capture_output=True, text=True, timeout=300)
    assert p2.returncode == 0, p2.stderr[-3000:]
    mans1 = sorted(p.parent.name for p in (tmp_path / "one").rglob("manifest.json"))
    mans2 = sorted(p.parent.name for p in (tmp_path / "two").rglob("manifest.json"))
    assert mans1 == mans2 and len(mans1) == 2  # same keys: same entries
    for key in mans1:
        a = next((tmp_path / "one").rglob(key))
        b = next((tmp_path / "two").rglob(key))
        xa = np.concatenate([np.load(p) for p in sorted(a.glob("shard_*.npy"))])
        xb = np.concatenate([np.load(p) for p in sorted(b.glob("shard_*.npy"))])
        np.testing.assert_array_equal(xa, xb)
