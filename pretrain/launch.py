"""Optional Slurm launcher (``submitit``, the ``cluster`` extra): one task per GPU, the process group set up
from the Slurm job environment exactly as ``torchrun`` would, then the same :func:`pretrain.trainer.train`.
Requeued/preempted jobs resume from ``<out>.state.pt``.

    from pretrain.launch import submit
    job = submit(TrainConfig(method="swav", data_root="/datasets", epochs=100, device="cuda",
                             out="swav.safetensors"), nodes=2, gpus_per_node=8, partition="learnfair")
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from evalsuite.errors import UserError

from .trainer import TrainConfig, train


class _Job:
    """Picklable callable run by submitit on every task; checkpoint() makes preemption requeue the job."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg

    def __call__(self):
        import submitit

        env = submitit.JobEnvironment()
        if env.num_tasks > 1:
            os.environ.update(RANK=str(env.global_rank), LOCAL_RANK=str(env.local_rank),
                              WORLD_SIZE=str(env.num_tasks), MASTER_ADDR=env.hostnames[0],
                              MASTER_PORT=os.environ.get("MASTER_PORT", "29511"))
        return train(replace(self.cfg, progress=False, resume=True))

    def checkpoint(self, *args, **kwargs):
        import submitit

        return submitit.helpers.DelayedSubmission(_Job(self.cfg))


def submit(cfg: TrainConfig, nodes: int = 1, gpus_per_node: int = 1, partition: str | None = None,
           timeout_min: int = 60 * 24, folder: str | Path = "slurm_logs", cluster: str | None = None,
           cpus_per_task: int = 8, **slurm):
    """Submit ``cfg`` as a Slurm job (``cluster="debug"`` runs it in this process, for tests)."""
    try:
        import submitit
    except ImportError:
        raise UserError("the Slurm launcher needs submitit: pip install 'evalsuite[cluster]'") from None
    ex = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
    params = dict(nodes=nodes, tasks_per_node=gpus_per_node, timeout_min=timeout_min, cpus_per_task=cpus_per_task)
    if cluster != "debug" and cluster != "local":
        params["gpus_per_node"] = gpus_per_node
        if partition:
            params["slurm_partition"] = partition
        params.update({f"slurm_{k}": v for k, v in slurm.items()})
    ex.update_parameters(name=f"pretrain-{cfg.method}", **params)
    return ex.submit(_Job(cfg))
