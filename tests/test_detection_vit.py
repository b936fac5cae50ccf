"""Detection on ViT trunks: ViTDet's simple feature pyramid, FPN's RoI level assignment, the frozen trunk, layer-wise
lr decay, and the task's records on a tiny random ViT."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

import tasks.detection.task as det
from evalsuite.errors import UserError
from evalsuite.trunks import arch_info, build_trunk
from tasks.detection.fast_rcnn import TorchvisionFastRCNN, pad_batch, params_checksum
from tasks.detection.vitdet import (
    ChannelLayerNorm,
    MultiLevelRoIAlign,
    ViTDetFastRCNN,
    assign_levels,
)
from tests.test_detection import make_ctx, synth_voc, tiny_records, tiny_train_cfg  # noqa: F401 (fixture)

QUICK = det.task.default_protocol("quick")
ARCH = "vit_tiny_patch16"


def vit_config(backbone: str = "frozen", box_head: str = "2fc", pool_size: int = 4, lr_decay: float = 1.0):
    p = QUICK.replace(vit=QUICK.vit.replace(backbone=backbone, box_head=box_head, pool_size=pool_size,
                                            lr_decay=lr_decay))
    return det.vit_model_config(p, arch_info(ARCH))


def vit_backend(**kw) -> TorchvisionFastRCNN:
    torch.manual_seed(0)
    return TorchvisionFastRCNN(build_trunk(ARCH, seed=0), 2, vit_config(**kw))


# ----------------------------------------------------------------------------- pyramid


def test_simple_feature_pyramid_gives_strides_4_8_16_32_from_the_stride_16_grid():
    """A 64 x 96 image is a 4 x 6 grid of 16 px patches; the pyramid's maps are 16 x 24, 8 x 12, 4 x 6 and 2 x 3
    (strides 4, 8, 16, 32), 256 channels each."""
    torch.manual_seed(0)
    model = ViTDetFastRCNN(build_trunk(ARCH, seed=0), 2, vit_config(box_head="4conv1fc", pool_size=7))
    assert model.strides == (4.0, 8.0, 16.0, 32.0) and model.size_divisibility == 32
    images = torch.randn(2, 3, 64, 96)
    feats = model.body(images)
    assert [tuple(f.shape) for f in feats] == [(2, 256, 16, 24), (2, 256, 8, 12), (2, 256, 4, 6), (2, 256, 2, 3)]
    # the identity level reads the last block's patch tokens (after the final norm) in row-major grid order
    with torch.no_grad():
        tokens = model.trunk.forward_features(images)  # timm's own forward: CLS then the patches, final norm
        grid = tokens[:, 1:].reshape(2, 4, 6, 192).permute(0, 3, 1, 2)
        torch.testing.assert_close(feats[2], model.pyramid.stages[2](grid))
    # the stage layouts (detectron2's SimpleFeaturePyramid): deconv/LN/GELU/deconv, deconv, -, max-pool; 1x1 + 3x3
    kinds = [[type(m).__name__ for m in s] for s in model.pyramid.stages]
    convs = ["Conv2d", "ChannelLayerNorm", "Conv2d", "ChannelLayerNorm"]
    assert kinds == [["ConvTranspose2d", "ChannelLayerNorm", "GELU", "ConvTranspose2d", *convs],
                     ["ConvTranspose2d", *convs], convs, ["MaxPool2d", *convs]]
    assert [s[0].out_channels for s in model.pyramid.stages[:2]] == [96, 96] and \
        model.pyramid.stages[0][3].out_channels == 48
    # a patch-14 trunk (DINOv2's, with 4 register tokens): strides 3.5, 7, 14, 28 and sides in whole 28 px cells
    p14 = ViTDetFastRCNN(build_trunk("vit_tiny_patch14_reg4", seed=0), 2, vit_config())
    assert p14.strides == (3.5, 7.0, 14.0, 28.0) and p14.size_divisibility == 28 and p14.prefix == 5
    assert [tuple(f.shape[-2:]) for f in p14.body(torch.randn(1, 3, 56, 84))] == [(16, 24), (8, 12), (4, 6), (2, 3)]


def test_channel_layernorm_is_layernorm_over_channels():
    x = torch.randn(2, 8, 3, 5)
    ln = ChannelLayerNorm(8)
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5)
        ln.bias.uniform_(-1, 1)
    ref = F.layer_norm(x.permute(0, 2, 3, 1), (8,), ln.weight, ln.bias, eps=1e-6).permute(0, 3, 1, 2)
    torch.testing.assert_close(ln(x), ref)


def test_images_are_padded_to_whole_coarsest_cells():
    a, b = torch.ones(3, 72, 100), torch.ones(3, 64, 40)
    x = pad_batch([a, b], 32)
    assert x.shape == (2, 3, 96, 128)
    assert x[0, :, :72, :100].eq(1).all() and x[0, :, 72:].eq(0).all() and x[0, :, :, 100:].eq(0).all()
    assert pad_batch([a, b]).shape == (2, 3, 72, 100)  # ResNets: no padding beyond the largest image


# ----------------------------------------------------------------------------- RoI levels


def test_roi_level_assignment_is_fpn_eqn_1():
    """floor(4 + log2(sqrt(w h) / 224)) clamped to p2..p5, as an index from p2 (computed here by hand)."""
    boxes = torch.tensor([
        [0.0, 0.0, 224.0, 224.0],  # 224: p4
        [10.0, 10.0, 122.0, 122.0],  # 112: p3
        [0.0, 0.0, 56.0, 56.0],  # 56: p2
        [0.0, 0.0, 448.0, 448.0],  # 448: p5
        [0.0, 0.0, 1000.0, 900.0],  # 949: p6, clamped to p5
        [0.0, 0.0, 8.0, 8.0],  # 8: p-0.8, clamped to p2
        [0.0, 0.0, 223.0, 224.0],  # 223.5: just under 224, p3
        [0.0, 0.0, 112.0, 448.0],  # sqrt area 224: p4
        [0.0, 0.0, 111.0, 112.0],  # 111.5: p2
    ])
    assert assign_levels(boxes).tolist() == [2, 1, 0, 3, 3, 0, 1, 2, 0]
    sizes = torch.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
    by_formula = [min(5, max(2, math.floor(4 + math.log2(float(s) / 224)))) - 2 for s in sizes]
    assert assign_levels(boxes).tolist() == by_formula


def test_each_roi_is_pooled_on_its_level_with_aligned_roi_align():
    """Sides 30 x 40 (p2), 130 (p3), 225 x 230 (p4) and 460 (p5): each RoI equals torchvision's aligned RoIAlign
    on its own level at that level's scale."""
    torch.manual_seed(0)
    strides = (4.0, 8.0, 16.0, 32.0)
    feats = [torch.randn(2, 3, 512 // int(s), 512 // int(s)) for s in strides]
    rois = torch.tensor([[0, 10.0, 10.0, 40.0, 50.0], [1, 0.0, 0.0, 130.0, 130.0], [0, 5.0, 20.0, 230.0, 250.0],
                         [1, 30.5, 2.0, 490.5, 462.0]])
    out = MultiLevelRoIAlign(7, strides)(feats, rois)
    for k, level in enumerate([0, 1, 2, 3]):
        ref = roi_align(feats[level], rois[k: k + 1], (7, 7), 1 / strides[level], 0, aligned=True)
        torch.testing.assert_close(out[k: k + 1], ref)


# ----------------------------------------------------------------------------- training


def test_frozen_vit_does_not_change_while_pyramid_and_head_do():
    be = vit_backend()
    model = be.model
    before = {n: params_checksum(getattr(model, n)) for n in ("trunk", "pyramid", "box_head", "cls_score")}
    rep = be.fit(tiny_records(4), tiny_train_cfg(max_iter=3))
    after = {n: params_checksum(getattr(model, n)) for n in before}
    assert after["trunk"] == before["trunk"]
    assert all(after[n] != before[n] for n in ("pyramid", "box_head", "cls_score"))
    assert all(not p.requires_grad and p.grad is None for p in model.trunk.parameters())
    assert model.training and not model.trunk.training  # a frozen trunk stays in eval mode while the head trains
    assert np.isfinite([rep.losses[-1]["loss_cls"], rep.losses[-1]["loss_box"]]).all()
    b, lab, s = be.predict(tiny_records(1), det.test_config(QUICK.replace(test_scale=64, test_max_size=96)))[0]
    assert b.shape[1] == 4 and len(b) == len(lab) == len(s) > 0


def test_finetuned_vit_changes_with_layerwise_lr_decay():
    """detectron2's get_vit_lr_decay_rate: block i gets decay ** (depth - i), the embeddings decay ** (depth + 1),
    the head 1; Detectron's bias rule (2x lr, no weight decay) on top."""
    be = vit_backend(backbone="finetune", lr_decay=0.5)
    before = params_checksum(be.model.trunk)
    cfg = tiny_train_cfg(max_iter=2)
    groups = be.param_groups(cfg)
    mult = {id(p): (g["lr_mult"], g["weight_decay"]) for g in groups for p in g["params"]}
    named = dict(be.model.named_parameters())
    assert mult[id(named["trunk.blocks.11.attn.qkv.weight"])] == (0.5, cfg.weight_decay)
    assert mult[id(named["trunk.blocks.0.mlp.fc1.weight"])] == (0.5 ** 12, cfg.weight_decay)
    assert mult[id(named["trunk.blocks.0.mlp.fc1.bias"])] == (2 * 0.5 ** 12, 0.0)
    assert mult[id(named["trunk.pos_embed"])] == mult[id(named["trunk.cls_token"])] == (0.5 ** 13, cfg.weight_decay)
    assert mult[id(named["trunk.norm.weight"])] == mult[id(named["cls_score.weight"])] == (1.0, cfg.weight_decay)
    assert mult[id(named["cls_score.bias"])] == (2.0, 0.0) and len(mult) == len(named)
    be.fit(tiny_records(2), cfg)
    assert params_checksum(be.model.trunk) != before and be.model.trunk.training


def test_resnet_param_groups_are_unchanged():
    """ResNets keep Detectron's two groups: weights, then biases at 2x lr without weight decay."""
    cfg = tiny_train_cfg()
    be = TorchvisionFastRCNN(build_trunk("resnet18", seed=0), 2, det.model_config(QUICK))
    groups = be.param_groups(cfg)
    assert [(g["lr_mult"], g["weight_decay"]) for g in groups] == [(1.0, cfg.weight_decay), (2.0, 0.0)]
    assert be.divisor == 1


def test_bad_vit_settings_and_a_resnet_trunk_are_refused():
    with pytest.raises(UserError, match="box_head"):
        ViTDetFastRCNN(build_trunk(ARCH, seed=0), 2, dataclasses.replace(vit_config(), box_head="3fc"))
    with pytest.raises(UserError, match="needs a ViT trunk"):
        ViTDetFastRCNN(build_trunk("resnet18", seed=0), 2, vit_config())


# ----------------------------------------------------------------------------- the task


def test_quick_task_on_a_tiny_vit_records_the_head(synth_voc, tmp_path):  # noqa: F811 (fixture)
    # 64 px training and test scales (quick: 128), a 4 x 4 grid of 16 px patches: the head, not the size, is tested
    ctx = make_ctx(synth_voc, tmp_path, ["detection.max_iter=3", "detection.max_test_images=2",
                                         "detection.proposals=sliding_window", "detection.train_scales=[64]",
                                         "detection.train_max_size=96", "detection.test_scale=64",
                                         "detection.test_max_size=96"], checkpoint=f"random:{ARCH}")
    plan = det.task.plan(ctx)
    assert plan.train_iterations == 3
    results = det.task.run(ctx)
    r = results[0]
    assert r.metric == "mAP" and r.layer == "finetune_above_block11" and r.arch == ARCH
    assert r.params["backbone"] == "frozen" and r.params["iterations_run"] == 3
    assert r.params["model"]["box_head"] == "2fc" and r.params["model"]["pool_size"] == 7
    assert r.params["model"]["tap"] == "block11"
    head = r.params["head"]
    assert "simple feature pyramid on block11" in head and "strides 4, 8, 16, 32" in head and "2fc" in head
    assert r.params["comparable_to_published"] is False and "ResNet-50-C4" in r.params["not_comparable_reason"]
    assert "arch" in r.deviations and r.params["not_applied"] == ["freeze_at", "pooler", "pool_size"]
    curve = r.params["train_curve"]
    assert np.isfinite([curve["last"]["loss_cls"], curve["last"]["loss_box"]]).all()
    assert len([x for x in results if x.metric.startswith("AP/")]) == 20
    assert all(x.params["head"] == head for x in results)
