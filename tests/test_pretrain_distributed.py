"""Two gloo processes under torchrun: SimCLR's gather-with-gradient gives the gradients of one process on
the concatenated batch (a gather without the backward all-reduce does not), MoCo's shuffled BN round-trips
and really mixes samples across processes, SwAV's Sinkhorn codes equal one process's on all
samples, and the trainer runs DDP end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from pretrain.losses import nt_xent, sinkhorn

WORKER = textwrap.dedent(r"""
    import json, os, sys
    from contextlib import ExitStack
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    from evalsuite.distributed import process_group
    from pretrain import distributed as D
    from pretrain.losses import nt_xent
    group = ExitStack()
    group.enter_context(process_group("cpu"))
    r, w = D.rank(), D.world_size()
    g = torch.Generator().manual_seed(0)
    x1, x2, W = torch.randn(2 * w, 5, generator=g), torch.randn(2 * w, 5, generator=g), torch.randn(5, 4, generator=g)
    n = 2
    local1, local2 = x1[r * n:(r + 1) * n], x2[r * n:(r + 1) * n]

    def grad(gather_fn):
        Wl = W.clone().requires_grad_(True)
        z1, z2 = local1 @ Wl, local2 @ Wl
        if gather_fn is None:
            loss = nt_xent(z1, z2, 0.5)
        else:  # the common bug: negatives gathered without gradient to their owners
            a1, a2 = gather_fn(z1), gather_fn(z2)
            a1 = torch.cat([a1[:r * n], z1, a1[(r + 1) * n:]]); a2 = torch.cat([a2[:r * n], z2, a2[(r + 1) * n:]])
            import pretrain.distributed as DD
            orig = DD.gather_with_grad
            DD.gather_with_grad = lambda t, _a=iter([a1, a2]): next(_a)
            try:
                loss = nt_xent(z1, z2, 0.5)
            finally:
                DD.gather_with_grad = orig
        loss.backward()
        gr = Wl.grad.clone()
        dist.all_reduce(gr); gr /= w  # what DDP does
        return gr, loss.detach()

    good, loss = grad(None)
    bad, _ = grad(D.concat_all_gather)
    lossall = loss.clone(); dist.all_reduce(lossall); lossall /= w
    # MoCo shuffled BN
    x = torch.arange(4.0).view(4, 1) + 10 * r
    shuffled, unshuf = D.batch_shuffle(x, torch.Generator().manual_seed(1))
    back = D.batch_unshuffle(shuffled, unshuf)
    mixed = bool((shuffled // 10 != r).any())
    # SwAV's Sinkhorn over both processes' samples: rank 1 holds the larger scores, so a per-process shift of
    # the exponent (no all-reduced max) would weigh the ranks' samples differently
    from pretrain.losses import sinkhorn
    scores = torch.tanh(torch.randn(2 * w, 3, generator=g)) * 0.5 + torch.tensor([[0.0]] * w + [[0.45]] * w)
    codes = sinkhorn(scores[r * n:(r + 1) * n], eps=0.01, iters=3)
    out = {"codes": codes.tolist(), "good": good.tolist(), "bad": bad.tolist(),
           "loss": float(lossall), "roundtrip": bool(torch.equal(back, x)),
           "mixed": mixed}
    with open(os.path.join(sys.argv[1], f"rank{r}.json"), "w") as f:
        json.dump(out, f)
    group.close()
""")


def _torchrun(args: list[str], cwd: Path, timeout: int = 180) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_gather_with_grad_and_shuffle_under_torchrun(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    p = _torchrun([str(script), str(tmp_path)], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    res = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    # single-process reference on the concatenated batch
    g = torch.Generator().manual_seed(0)
    x1, x2, W = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g), torch.randn(5, 4, generator=g)
    W.requires_grad_(True)
    loss = nt_xent(x1 @ W, x2 @ W, 0.5)
    loss.backward()
    for r in res:
        assert torch.allclose(torch.tensor(r["good"]), W.grad, atol=1e-5)
        assert not torch.allclose(torch.tensor(r["bad"]), W.grad, atol=1e-3)
        assert abs(r["loss"] - loss.item()) < 1e-5
        assert r["roundtrip"]
    assert any(r["mixed"] for r in res)
    # Sinkhorn's sums and exponent shift run over both processes: the codes of one process on all samples
    scores = torch.tanh(torch.randn(4, 3, generator=g)) * 0.5 + torch.tensor([[0.0]] * 2 + [[0.45]] * 2)
    codes = sinkhorn(scores, eps=0.01, iters=3, distributed=False)
    assert torch.allclose(torch.tensor(res[0]["codes"] + res[1]["codes"]), codes, atol=1e-5)
