"""surface_normals on ViT trunks: probe3d's DPT head (mbanani/probe3d evals/models/probes.py) on four frozen blocks,
trained by the task's own loop at the quick preset."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import tasks.surface_normals.task as sn
from evalsuite.checkpoints import load_checkpoint
from evalsuite.data import READERS
from evalsuite.errors import NotApplicable
from tasks.surface_normals.vit_dense import DPTHead, FrozenViTDenseModel, probe3d_blocks
from tests.helpers import make_context
from tests.test_surface_normals import PlanarScenes, mean_normal_baseline, run_interrupted

VIT = "random:vit_tiny_patch16"


@pytest.fixture()
def planar(tmp_path, monkeypatch):
    """A data root whose nyuv2 reader serves PlanarScenes (test_surface_normals.py's rooms)."""
    (tmp_path / "data" / "nyuv2").mkdir(parents=True)
    monkeypatch.setitem(READERS, "nyuv2", PlanarScenes)
    return tmp_path / "data"


def test_the_head_reads_probe3ds_four_evenly_spaced_blocks():
    """evals/models/dino.py: [n//4 - 1, n//2 - 1, n//4*3 - 1, n - 1], worked out by hand."""
    assert probe3d_blocks(12) == (2, 5, 8, 11)       # ViT-T/S/B
    assert probe3d_blocks(24) == (5, 11, 17, 23)     # ViT-L
    assert probe3d_blocks(40) == (9, 19, 29, 39)     # ViT-g
    assert probe3d_blocks(4) == (0, 1, 2, 3)
    assert probe3d_blocks(5) == (0, 1, 2, 4)
    for depth in (3, 6, 7):                          # 6 and 7: the rule picks block 2 twice
        with pytest.raises(NotApplicable, match="4 distinct blocks"):
            probe3d_blocks(depth)


def reference_dpt(state: dict[str, torch.Tensor], feats: list[torch.Tensor], k: int) -> torch.Tensor:
    """probes.py's DPT written out with functional ops on the head's weights."""
    def conv(x, name, pad):
        return F.conv2d(x, state[f"{name}.weight"], state[f"{name}.bias"], padding=pad)

    def rcu(x, name):
        return F.relu(conv(F.relu(conv(x, f"{name}.conv.0", k // 2)), f"{name}.conv.2", k // 2)) + x

    def up(x, s):
        return F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=True)

    x = [up(conv(f, f"project.{i}", 0), 2) for i, f in enumerate(feats)]
    out = rcu(x[3], "fuse.3.unit")                                      # ref_3: no skip
    for i in (2, 1, 0):
        out = rcu(rcu(x[i], f"fuse.{i}.skip_unit") + out, f"fuse.{i}.unit")
    out = conv(F.relu(conv(up(out, 4), "out_conv.0", 1)), "out_conv.2", 1)
    return up(out, 2)


def test_dpt_head_is_probe3ds_dpt():
    torch.manual_seed(0)
    head = DPTHead([8, 8, 8, 8], num_outputs=5, hidden=6, kernel_size=3)
    feats = [torch.randn(2, 8, 3, 4) for _ in range(4)]
    out = head(feats)
    assert out.shape == (2, 5, 48, 64)                                   # 2 x 4 x 2 = 16 pixels per grid cell
    torch.testing.assert_close(out, reference_dpt(head.state_dict(), feats, 3), rtol=1e-5, atol=1e-6)
    h = 6  # parameters: 1x1 projections, 7 residual units (2 + 2 + 2 + 1), two 3x3 output convs
    assert sum(p.numel() for p in head.parameters()) == 4 * (8 * h + h) + 7 * 2 * (h * h * 9 + h) + (
        h * h * 9 + h) + (h * 5 * 9 + 5)


@pytest.mark.parametrize("arch,size", [("vit_tiny_patch16", (32, 48)), ("vit_tiny_patch14_reg4", (28, 42))])
def test_frozen_features_are_the_blocks_normed_patch_tokens(arch, size):
    """Each chosen block's output with the final norm (the feature taps; probe3d reads it before the norm), CLS and
    registers dropped, as a D x h x w map; the head's output is at the input's resolution (patch 14: resized)."""
    trunk = load_checkpoint(f"random:{arch}", seed=0).build_trunk()
    torch.manual_seed(0)
    model = FrozenViTDenseModel(trunk, num_outputs=3, head_channels=8)
    outputs = {}
    hooks = [trunk.blocks[i].register_forward_hook(lambda m, a, o, i=i: outputs.__setitem__(i, o)) for i in range(12)]
    x = torch.randn(2, 3, *size)
    feats = model.frozen_features(x)
    for h in hooks:
        h.remove()
    p, prefix = trunk.patch_embed.patch_size[0], trunk.num_prefix_tokens
    gh, gw = size[0] // p, size[1] // p
    assert feats.shape == (2, 4, trunk.embed_dim, gh, gw)
    for k, b in enumerate((2, 5, 8, 11)):
        tokens = trunk.norm(outputs[b])[:, prefix:]                      # (2, gh * gw, D), row-major grid
        torch.testing.assert_close(feats[:, k], tokens.reshape(2, gh, gw, -1).permute(0, 3, 1, 2))
    assert model(x).shape == (2, 3, *size)
    with pytest.raises(ValueError, match="multiple of the"):
        model.frozen_features(torch.randn(1, 3, size[0] + 1, size[1]))


def test_the_heads_input_does_not_depend_on_the_scale_of_the_residual_stream():
    """Why the taps' normed outputs: a trunk whose residual stream is 10x larger (every additive contribution
    scaled: pre-norm blocks see the same normed inputs) feeds the head the same maps, so SGD's steps keep their
    size."""
    trunk = load_checkpoint(VIT, seed=0).build_trunk()
    scaled = load_checkpoint(VIT, seed=0).build_trunk()
    with torch.no_grad():
        for name, t in scaled.named_parameters():
            if name in ("cls_token", "pos_embed") or name.startswith("patch_embed.") or name.endswith(
                    ("attn.proj.weight", "attn.proj.bias", "mlp.fc2.weight", "mlp.fc2.bias")):
                t.mul_(10)
    x = torch.randn(1, 3, 32, 32)
    ours, big = (FrozenViTDenseModel(t, num_outputs=3, head_channels=8) for t in (trunk, scaled))
    raw = [m.trunk.forward_intermediates(x, indices=[11], norm=False, intermediates_only=True)[0] for m in (ours, big)]
    torch.testing.assert_close(raw[1], 10 * raw[0], rtol=1e-3, atol=5e-3)    # the stream is 10x larger
    torch.testing.assert_close(big.frozen_features(x), ours.frozen_features(x), rtol=1e-3, atol=1e-3)


FAST = ["surface_normals.codebook_size=12"]


def test_quick_run_on_a_tiny_vit_trains_only_the_head(planar, tmp_path, monkeypatch):
    built = {}
    real = sn.build_model

    def capture(trunk, p, num_outputs):
        model = real(trunk, p, num_outputs)
        built["model"], built["head"] = model, {k: v.clone() for k, v in model.head.state_dict().items()}
        return model

    monkeypatch.setattr(sn, "build_model", capture)
    ctx = make_context("surface_normals", planar, tmp_path / "out", overrides=FAST, checkpoint=VIT)
    plan = sn.task.plan(ctx)
    assert "DPT head" in plan.note and plan.train_iterations == 16
    results = sn.task.run(ctx)
    model = built["model"]

    # the trunk is the checkpoint's, untouched; every head weight moved
    original = load_checkpoint(VIT, seed=0).build_trunk().state_dict()
    for k, v in model.trunk.state_dict().items():
        assert torch.equal(v, original[k]), k
    for k, v in model.head.state_dict().items():
        assert not torch.equal(v, built["head"][k]), k

    # the output is at the loss's target resolution: the padded input (a multiple of 16), stride 1
    cfg = sn.TrainConfig.from_protocol(ctx.protocol, patch=16)
    data = sn.load_split(PlanarScenes("x", "train", n=2), cfg.unit_tolerance, progress=False)
    norm = sn._normalisation({})
    for short in cfg.train_short_sides:
        x = sn.train_inputs(data, [0, 1], short, cfg, norm)
        _, mask = sn.train_targets(data, [0, 1], short, cfg, model.output_stride)
        assert x.shape[-1] % 16 == 0 and x.shape[-2] % 16 == 0
        assert model(x).shape == (2, 12, *mask.shape[-2:]) == (2, 12, *x.shape[-2:])
    image = sn.test_input(PlanarScenes("x", "test").load_image(0), cfg)
    assert image.shape == (3, 48, 64)                                    # 45 x 60 rounded up to the patch
    pred = sn.predict_normals(model, image[None], [(48, 64)], cfg, norm, np.asarray(results[0].params["codebook"]))
    assert pred[0].shape == (48, 64, 3)                                  # scored at the ground truth's size

    # records: the task's metrics, the head described, not comparable with goyal19's ResNet-50 numbers
    by = {r.metric: r.value for r in results}
    assert list(by) == sn.metric_names()
    base = mean_normal_baseline(PlanarScenes("x", "train"), PlanarScenes("x", "test"))
    assert by["mean_angle_error_deg"] < base["mean_angle_error_deg"] - 25 and by["pct_within_11.25deg"] > 75
    r = json.loads(results[0].to_json())
    p = r["params"]
    assert r["layer"] == "blocks2-5-8-11" and "arch" in r["deviations"]
    assert p["vit_head"]["type"] == "dpt" and p["vit_head"]["blocks"] == [2, 5, 8, 11]
    assert p["vit_head"]["hidden_channels"] == 64 and "mbanani/probe3d:evals/models/probes.py" in p["vit_head"][
        "reference"]
    assert p["comparable_to_published"] is False and "ResNet-50" in p["not_comparable_reason"]
    assert "freeze_through" in p["unused_fields"] and p["solver"]["pad_multiple"] == 16
    assert p["frozen_stages"] == [f"block{i}" for i in range(12)] and p["trainable_stages"] == []
    h, d = 64, 192  # the head's parameters only: 4 projections from D dims, 7 residual units, 2 output convs
    assert p["trainable_parameters"] == 4 * (d * h + h) + 7 * 2 * (h * h * 9 + h) + (h * h * 9 + h) + (h * 12 * 9 + 12)
    assert p["train_curve"]["loss_per_epoch"][-1] < p["train_curve"]["loss_per_epoch"][0]


def test_an_interrupted_vit_run_resumes_to_the_same_numbers(planar, tmp_path, monkeypatch):
    # two of the quick preset's five training scales: a scale is still drawn per batch, from the restored generator
    over = [*FAST, "surface_normals.epochs=2", "surface_normals.head_channels=16",
            "surface_normals.train_short_sides=[30,45]", "surface_normals.codebook_samples=2000",
            "surface_normals.codebook_iters=5"]
    reference = sn.task.run(make_context("surface_normals", planar, tmp_path / "ref", overrides=over,
                                         checkpoint=VIT))
    run = make_context("surface_normals", planar, tmp_path / "run", overrides=over, checkpoint=VIT)
    state = run_interrupted(run, monkeypatch, after_epoch=1)
    assert state.name.startswith("blocks2-5-8-11-")
    resumed = sn.task.run(make_context("surface_normals", planar, tmp_path / "run", overrides=over,
                                       checkpoint=VIT))
    assert resumed[0].params["resumed_from_epoch"] == 1
    assert [r.value for r in resumed] == pytest.approx([r.value for r in reference], abs=1e-6)
    assert resumed[0].params["train_curve"] == reference[0].params["train_curve"]
