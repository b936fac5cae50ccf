"""Sharded extraction as a submitit array job: each task extracts a disjoint set of cache shards, a task killed
part-way is resubmitted and resumes from its finished shards, and the cache ends byte-identical (manifest and
every shard) to one process's extraction."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from evalsuite.cache import CacheEntry, FeatureCache
from evalsuite.checkpoints import load_checkpoint
from evalsuite.cli import main
from evalsuite.data import open_dataset
from evalsuite.extract_array import ArrayExtraction, ExtractPart, Recipe, run_array
from evalsuite.features import FeatureExtractor, Transform

TAPS = ("res4", "res5")
SETTINGS = {"device": "cpu", "precision": "fp32", "batch_size": 4, "workers": 0, "decode": "cpu"}


@pytest.fixture(autouse=True)
def _pickle_this_module_by_value():
    """The local executor's task processes cannot import this test module: submitit (cloudpickle) sends
    DiesOnce by value."""
    import sys

    import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


class DiesOnce(ExtractPart):
    """Array task 1's first run writes one shard file, then dies: ``hard``, its process ends as under ``kill -9``
    (no exception, no cleanup); otherwise it raises. It notes which file it wrote (and its inode) in ``marker``. Any
    later run is the real task."""

    def __init__(self, marker: Path, hard: bool):
        self.marker, self.hard = marker, hard

    def __call__(self, recipe_path: str, part: int, parts: int):
        if part != 1 or self.marker.exists():
            return super().__call__(recipe_path, part, parts)
        real = CacheEntry.write_shard

        def write_then_die(entry, i, array):
            real(entry, i, array)
            path = entry.shard_path(i)
            self.marker.write_text(json.dumps({"shard": i, "path": str(path), "inode": path.stat().st_ino}))
            if self.hard:
                os._exit(1)
            raise RuntimeError("pre-empted after one shard")

        CacheEntry.write_shard = write_then_die
        try:
            return super().__call__(recipe_path, part, parts)
        finally:  # the debug launcher runs tasks in this process
            CacheEntry.write_shard = real


def _files(root: Path) -> dict[str, bytes]:
    """Every cache file (key.json, shards, manifest) by its path under the cache root."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("launcher, hard", [
    ("debug", False),  # tasks in this process; task 1 raises
    pytest.param("local", True, marks=pytest.mark.slow),  # task processes (what a Slurm node runs); task 1 is killed
])
def test_killed_array_task_is_resubmitted_and_the_cache_equals_one_process(launcher, hard, tiny_imagefolder,
                                                                           tmp_path, monkeypatch) -> None:
    monkeypatch.setattr("pdb.post_mortem", lambda *a, **k: None)  # submitit's debug jobs open pdb on an error
    ds = open_dataset("imagefolder", tiny_imagefolder / "imagefolder", "train")  # 48 images: 6 shards of 8 rows
    transform = Transform(size=32)
    ck = load_checkpoint("random:resnet18", seed=0)
    one = FeatureExtractor(ck.build_trunk(), ck.sha256, ck.arch, cache=FeatureCache(tmp_path / "one", shard_rows=8),
                           progress=False, **SETTINGS)
    one.features(ds, TAPS, "goyal", transform)

    recipe = Recipe(checkpoint={"spec": "random:resnet18", "seed": 0}, extractor=SETTINGS,
                    cache_root=str(tmp_path / "array"), shard_rows=8, dataset=ds, taps=TAPS, pooling="goyal",
                    transform=transform)
    marker = tmp_path / "killed.json"
    said: list[str] = []
    entries = run_array(recipe, ArrayExtraction(tasks=2, launcher=launcher, folder=tmp_path / "submitit"),
                        worker=DiesOnce(marker, hard), echo=said.append)

    killed = json.loads(marker.read_text())
    assert killed["shard"] == 1  # task 1 of 2 owns shards 1, 3, 5: it died after writing its first
    assert "round 1 of 3" in said[0] and "array task(s) 1 failed" in said[1] and "round 2 of 3" in said[2]
    assert ("the task ended without a result" if hard else "pre-empted after one shard") in said[1]
    assert len(said) == 3  # task 0 ran once, task 1 twice
    # the resubmitted task kept the shard its killed run had finished (same file, not rewritten)
    assert Path(killed["path"]).stat().st_ino == killed["inode"]
    assert sorted(entries) == list(TAPS) and all(e.is_complete() for e in entries.values())
    assert _files(tmp_path / "array") == _files(tmp_path / "one")  # manifests, shard bytes and hashes, keys
    assert len([f for f in _files(tmp_path / "one") if f.endswith(".npy")]) == 2 * 6


def test_an_array_task_creating_an_entry_keeps_the_other_tasks_temporaries(tiny_imagefolder, tmp_path) -> None:
    """Two tasks that start together both find key.json missing. The one that writes it first must not delete the
    other's temporary files (its key.json or shard in flight): only the launcher cleans up, once no task runs."""
    ds = open_dataset("imagefolder", tiny_imagefolder / "imagefolder", "train")
    ck = load_checkpoint("random:resnet18", seed=0)
    ex = FeatureExtractor(ck.build_trunk(), ck.sha256, ck.arch, cache=FeatureCache(tmp_path, shard_rows=8),
                          progress=False, **SETTINGS)
    transform = Transform(size=32)
    entries, _ = ex.cache_entries(ds, ("res5",), "goyal", transform)
    entry = entries["res5"]
    entry.dir.mkdir(parents=True)
    in_flight = [entry.dir / ".key.json.other.tmp", entry.dir / f".{entry.shard_path(1).name}.other.tmp"]
    for f in in_flight:
        f.write_bytes(b"the other task is writing this")
    ex.extract_part(ds, ("res5",), "goyal", transform, part=0, parts=2)
    assert all(f.is_file() for f in in_flight)
    assert entry.missing_shards() == [1, 3, 5]  # task 0 wrote its shards 0, 2, 4


def test_extract_cli_array_matches_one_process_and_run_uses_it_for_large_splits(tiny_imagefolder, tmp_path,
                                                                               capsys) -> None:
    """`evalsuite extract --launcher debug --array 3` writes what `evalsuite extract` writes; `evalsuite run
    --launcher debug --array 2 --array-min-images 40` extracts the 48-image train split as an array job and the
    24-image val split in its task's process, with the value of a plain run."""
    base = ["extract", "--checkpoint", "random:resnet18", "--dataset", "imagefolder", "--root",
            str(tiny_imagefolder / "imagefolder"), "--split", "val", "--image-size", "32", "--layers", "res5",
            "--shard-rows", "8", "--batch-size", "4", "--precision", "fp32", "--no-progress"]
    assert main([*base, "--cache-dir", str(tmp_path / "one")]) == 0
    assert main([*base, "--cache-dir", str(tmp_path / "arr"), "--launcher", "debug", "--array", "3",
                 "--log-dir", str(tmp_path / "logs")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == f"res5: 24 x 512 (fp32) cached under {tmp_path / 'arr'}" and out[-1].split(" cached")[0] == \
        out[0].split(" cached")[0]
    assert _files(tmp_path / "arr") == _files(tmp_path / "one")

    run = ["run", "--checkpoint", "random:resnet18", "--tasks", "centroid", "--protocol", "quick", "--set",
           "image_size=32", "--layers", "res5", "--data-root", str(tiny_imagefolder), "--no-progress"]
    assert main([*run, "--out", str(tmp_path / "plain"), "--cache-dir", str(tmp_path / "c1")]) == 0
    assert main([*run, "--out", str(tmp_path / "launched"), "--cache-dir", str(tmp_path / "c2"),
                 "--launcher", "debug", "--array", "2", "--array-min-images", "40"]) == 0
    jobs = sorted(p.name.rsplit("-", 1)[0] for p in (tmp_path / "launched" / "submitit" / "extract").iterdir())
    assert jobs == ["imagefolder-train"]
    value = [json.loads(x)["value"] for x in (tmp_path / "launched" / "results.jsonl").read_text().splitlines()]
    assert value == [json.loads((tmp_path / "plain" / "results.jsonl").read_text())["value"]]
    assert _files(tmp_path / "c2") == _files(tmp_path / "c1")


def test_array_options_need_a_launcher(tmp_path, capsys) -> None:
    rc = main(["run", "--checkpoint", "random:resnet18", "--tasks", "centroid", "--array", "4",
               "--out", str(tmp_path / "o")])
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert rc == 2 and err == ["evalsuite: error: --array and --array-min-images need --launcher local, debug or "
                               "slurm"]


@pytest.mark.parametrize("parts, expected", [([0, 1, 2, 5], "0-2,5"), ([3], "3"), ([1, 3, 4], "1,3-4")])
def test_task_ranges_are_written_compactly(parts, expected) -> None:
    from evalsuite.extract_array import _ranges

    assert _ranges(parts) == expected


def test_slurm_array_submission_script(tmp_path, monkeypatch) -> None:
    """On Slurm the tasks are one sbatch array (faked sbatch): N tasks, all at once, each with the extraction's
    resources."""
    from evalsuite.launch import extraction_resources, make_executor

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\necho srun 23.02\n")
    (bin_dir / "sbatch").write_text(f"#!/bin/sh\ncp \"$1\" {tmp_path}/submitted.sh\necho Submitted batch job 77\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    resources = extraction_resources("cuda", workers=8)
    assert resources == {"gpus": 1, "cpus": 9, "mem_gb": 32, "timeout_min": 720}
    ex = make_executor("slurm", tmp_path / "sub" / "%j", resources, "evalsuite-extract", slurm_partition="gpu",
                       array_parallelism=3)
    jobs = ex.map_array(ExtractPart(), ["recipe.pkl"] * 3, [0, 1, 2], [3] * 3)
    assert [j.job_id for j in jobs] == ["77_0", "77_1", "77_2"]
    script = (tmp_path / "submitted.sh").read_text()
    for line in ("#SBATCH --array=0-2%3", "#SBATCH --gpus-per-node=1", "#SBATCH --cpus-per-task=9",
                 "#SBATCH --partition=gpu", "#SBATCH --signal=USR2@90"):
        assert line in script, line
