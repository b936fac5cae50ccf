"""The optional submitit launcher runs the same trainer (submitit's in-process debug executor)."""

from __future__ import annotations

import pytest

from evalsuite.checkpoints import load_checkpoint
from pretrain import TrainConfig


def test_submitit_debug_executor_trains(tiny_imagefolder, tmp_path):
    pytest.importorskip("submitit")
    from pretrain.launch import submit

    cfg = TrainConfig(method="supervised", data_root=str(tiny_imagefolder), out=str(tmp_path / "s.safetensors"),
                      batch_size=8, image_size=32, epochs=1, max_steps_per_epoch=1, progress=False)
    job = submit(cfg, cluster="debug", folder=tmp_path / "logs", timeout_min=5)
    out = job.result()
    assert load_checkpoint(out).metadata["method"] == "supervised"
