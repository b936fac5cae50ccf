"""imagenet_linear (the linear task on ImageNet, the places205_linear body) and the dino21 linear preset: presets
against the references, DINO's features and reported epoch on a tiny ViT, deviations and reference variants,
comparison with DINO's published rows."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from evalsuite import conformance, registry
from evalsuite.checkpoints import load_checkpoint
from evalsuite.colorspace import IMAGENET_MEAN, IMAGENET_STD
from evalsuite.data.synthetic import write_imagenet
from evalsuite.errors import UserError
from evalsuite.protocols import field_paths
from tasks.linear import conformance as C
from tasks.linear.task import imagenet_task
from tasks.linear.task import task as places_task
from tests.helpers import make_context

TINY = ["imagenet_linear.image_size=32", "imagenet_linear.resize=36"]


@pytest.fixture(scope="module")
def imagenet_root(tmp_path_factory) -> Path:
    """A data root with a tiny synthetic ImageNet in the official layout (8 classes x 6 train / 3 val)."""
    root = tmp_path_factory.mktemp("data")
    write_imagenet(root, seed=0, image_size=40, train_per_class=6, val_per_class=3)
    return root


def test_presets_follow_the_references():
    g, v, d, q = (imagenet_task.default_protocol(p) for p in ("goyal19", "vissl", "dino21", "quick"))
    # fair_ssb legacy_tasks/imagenet_linear_tune/resnet50_*: the Places205 solver; 140k x 256 iterations run as
    # VISSL's eval_resnet_8gpu_transfer_in1k_linear.yaml: 28 epochs stepped at 8/16/24
    assert (g.dataset, g.epochs, g.lr_milestones, g.augmented_views) == ("imagenet", 28, (8, 16, 24), 28)
    assert (g.batch_size, g.lr, g.nesterov, g.weight_decay, g.bn, g.bn_affine) == (256, 0.01, True, 1e-4, "channel",
                                                                                   False)
    assert (g.lr_schedule, g.lr_base_batch, g.report_epoch) == ("step", None, "last")
    assert (v.epochs, v.lr_milestones, v.weight_decay, v.bn_affine, v.train_augmentation) == (28, (8, 16, 24), 5e-4,
                                                                                             True, "vissl")
    # DINO eval_linear.py with the README's 8 GPUs: last 4 [CLS], no BN, N(0, 0.01^2), SGD 0.9, no decay,
    # lr 0.001 per 256 at batch 1024, cosine over 100 epochs, RandomResizedCrop + flip, bicubic 256 / 224, best_acc
    assert (d.layers, d.pooling, d.bn, d.init, d.init_std) == (("last4",), "avg", "none", "gaussian", 0.01)
    assert (d.epochs, d.batch_size, d.lr, d.lr_base_batch, d.lr_schedule) == (100, 1024, 0.001, 256, "cosine")
    assert (d.momentum, d.nesterov, d.weight_decay) == (0.9, False, 0.0)
    assert (d.train_views, d.augmented_views, d.train_augmentation) == ("augmented", 100, "dino21")
    assert (d.resize_mode, d.resize, d.image_size, d.interpolation) == ("center_crop", 256, 224, "bicubic")
    assert d.report_epoch == "best_val" and d.topk == (1, 5)
    assert (q.epochs, q.image_size, q.train_views) == (4, 64, "center")
    # places205_linear: the same dino21 protocol on its own data; its goyal19 preset is unchanged
    assert places_task.default_protocol("dino21").to_dict() == {**d.to_dict(), "dataset": "places205"}
    assert (places_task.default_protocol("goyal19").epochs, places_task.default_protocol("goyal19").report_epoch) == (
        14, "last")


def test_every_field_of_every_reference_preset_has_a_conformance_entry():
    for task in (imagenet_task, places_task):
        for preset in conformance.conformance_presets(task):
            table = conformance.task_conformance(task, preset)
            assert sorted(table) == sorted(field_paths(task.default_protocol(preset))), (task.name, preset)
            for reference, source, status in table.values():
                assert reference and source and (status == "same" or status.startswith(("deviation: ", "ours: ")))
    assert all(s.startswith("facebookresearch/dino:") for _, s, _ in C.IMAGENET_DINO21.values())


def test_dino21_deviations_know_the_vit_b_variant():
    """DINO's README evaluates ViT-B on the last block's [CLS] + patch mean: that setting is the reference's, not a
    deviation; anything else set away from eval_linear.py is."""
    d = imagenet_task.default_protocol("dino21")
    assert conformance.deviations(imagenet_task, d, "dino21") == []
    assert conformance.deviations(imagenet_task, d.replace(layers=("block11",), pooling="cls+mean"), "dino21") == []
    assert conformance.deviations(imagenet_task, d.replace(layers=("block11",)), "dino21") == ["layers"]
    assert conformance.deviations(imagenet_task, d.replace(augmented_views=10, image_size=192), "dino21") == [
        "image_size", "augmented_views"]
    assert conformance.deviations(places_task, places_task.default_protocol("dino21"), "dino21") == []
    # goyal19 / vissl / quick records are held against the goyal19 reference
    assert conformance.deviations(imagenet_task, imagenet_task.default_protocol("goyal19")) == [
        "epochs", "lr_milestones", "report_epoch"]
    assert "lr_schedule" in conformance.deviations(imagenet_task, d, "quick")


def test_quick_on_the_official_layout_end_to_end(imagenet_root, tmp_path):
    ctx = make_context("imagenet_linear", imagenet_root, tmp_path / "out", layers=["res5"],
                       overrides=["imagenet_linear.image_size=32", "imagenet_linear.epochs=2"])
    results = imagenet_task.run(ctx)
    assert [(r.dataset, r.layer, r.metric) for r in results] == [("imagenet", "res5", "top1"),
                                                                 ("imagenet", "res5", "top5")]
    p = results[0].params
    assert (p["num_train"], p["num_val"], p["num_classes"]) == (48, 24, 8)
    assert p["reported_epoch"] == p["epochs_run"] == 2 and p["last_epoch_top1"] == pytest.approx(results[0].value)
    assert "val_top1_per_epoch" not in p and "benchmark_schedule" not in p


def dino_last_blocks_cls(trunk, images: torch.Tensor, n: int) -> torch.Tensor:
    """DINO's get_intermediate_layers(x, n) then torch.cat([x[:, 0] for x in output], -1), written on timm's parts:
    patch embedding, position embedding, every block, the final norm applied to each of the last n outputs."""
    x = trunk.norm_pre(trunk._pos_embed(trunk.patch_embed(images)))
    out = []
    for i, block in enumerate(trunk.blocks):
        x = block(x)
        if len(trunk.blocks) - i <= n:
            out.append(trunk.norm(x)[:, 0])
    return torch.cat(out, dim=-1)


def test_dino21_on_a_tiny_vit(imagenet_root, tmp_path):
    """dino21 on a random ViT-Tiny: the features are DINO's last-4 [CLS] (recomputed from the images with
    torchvision's val transform), the lr follows the scaled cosine, training reads a new RandomResizedCrop view
    each epoch, and the reported accuracy is the best epoch's, as eval_linear.py's best_acc."""
    from torchvision import transforms as T

    ckpt = load_checkpoint("random:vit_tiny_patch16", seed=0)
    ctx = make_context("imagenet_linear", imagenet_root, tmp_path / "out", preset="dino21", checkpoint=ckpt,
                       overrides=[*TINY, "imagenet_linear.epochs=3", "imagenet_linear.batch_size=16",
                                  "imagenet_linear.lr=0.5"])
    results = imagenet_task.run(ctx)
    assert {r.layer for r in results} == {"last4"} and {r.metric for r in results} == {"top1", "top5"}
    top1 = next(r for r in results if r.metric == "top1")
    p = top1.params
    assert (p["feature_dim"], p["pool_op"], p["bn_channels"]) == (4 * 192, "cls(skip=1,pos_embed=14x14->2x2)", None)
    assert p["solver"]["scaled_lr"] == pytest.approx(0.5 * 16 / 256)
    lr0 = 0.5 * 16 / 256
    assert p["train_curve"]["lr_per_epoch"] == pytest.approx([lr0 * (1 + math.cos(math.pi * e / 3)) / 2
                                                              for e in range(3)])
    assert p["views_extracted"] == p["views_read"] == 3 and p["train_transform"]["recipe"] == "dino21"
    assert p["transform"]["interpolation"] == "bicubic" and p["transform"]["mode"] == "center_crop"
    assert top1.value == pytest.approx(max(p["val_top1_per_epoch"]))
    assert p["reported_epoch"] == 1 + int(np.argmax(p["val_top1_per_epoch"]))
    assert top1.deviations == ["image_size", "resize", "epochs", "batch_size", "lr"]  # the test's own settings

    # the cached val features are DINO's: Resize(36, bicubic) + CenterCrop(32), the 4 last blocks' [CLS]
    val = ctx.open_dataset("imagenet", "val")
    cached = ctx.features(val, ["last4"], pooling="avg")["last4"]
    tf = T.Compose([T.Resize(36, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(32), T.ToTensor(),
                    T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    trunk = ckpt.build_trunk().eval()
    with torch.no_grad():
        ref = dino_last_blocks_cls(trunk, torch.stack([tf(val.load_image(i)) for i in range(len(val))]), 4)
    np.testing.assert_allclose(cached.astype(np.float32), ref.numpy(), rtol=2e-3, atol=2e-3)  # fp16 cache


def test_dino21_on_a_resnet_probes_the_global_average_of_every_tap(imagenet_root, tmp_path):
    """eval_linear.py reads a ResNet's output (fc = nn.Identity(): res5's global average); a ResNet has no last4, so
    the tap rule probes every tap, each globally averaged, res5 being DINO's feature."""
    ctx = make_context("imagenet_linear", imagenet_root, tmp_path, preset="dino21")
    p = ctx.protocol
    taps = ctx.taps(p.layers)
    assert taps == ["conv1", "res2", "res3", "res4", "res5"]
    specs = ctx.extractor.pool_specs(taps, p.pooling, ctx.transform())
    assert {t: (s.op, s.out_shape) for t, s in specs.items()}["res5"] == ("global_avg", (512,))
    assert {s.op for s in specs.values()} == {"global_avg"}


def test_dino21_records_match_dinos_published_rows_directly(tmp_path):
    """A dino21 imagenet_linear record on last4 of a ViT-S/16 and a dino21 knn record on block11 are compared with
    DINO's README rows (77.0, 74.5) without --accept-protocol: the record's preset is the rows' source key."""
    from evalsuite.results import Result, append_results
    from leaderboard.aggregate import deduplicate, load_results
    from leaderboard.compare import Tolerance, compare_to_references

    def record(task, layer, value, params):
        return Result(task=task, dataset="imagenet", split="val", layer=layer, metric="top1", value=value,
                      checkpoint_id="d" * 64, checkpoint="/ckpts/dino_deitsmall16_pretrain.pth", method="dino",
                      arch="vit_small_patch16", pretrain_data="imagenet1k", protocol="dino21", params=params)

    append_results(tmp_path / "results.jsonl", [record("imagenet_linear", "last4", 76.8, {}),
                                                 record("knn", "block11", 74.4, {"k": 20})])
    report = compare_to_references(deduplicate(load_results([tmp_path])), Tolerance(default=0.5))
    compared = {(r["task"], r["layer"]): r for r in report.rows if r["status"] != "protocol_mismatch"}
    assert set(compared) == {("imagenet_linear", "last4"), ("knn", "block11")}
    assert compared[("imagenet_linear", "last4")]["reference"] == 77.0
    assert compared[("knn", "block11")]["reference"] == 74.5
    assert all(r["status"] == "ok" and r["ref_protocol"].startswith("dino21: ") for r in compared.values())


def test_a_task_without_dino21_refuses_it_in_one_line():
    for name in ("centroid", "voc07_svm", "lowshot_svm", "navigation"):
        with pytest.raises(UserError) as e:
            registry.get_task(name).default_protocol("dino21")
        assert str(e.value) == (f"{name} has no dino21 protocol (DINO's evaluation (Caron et al. 2021): eval_knn.py "
                                "and eval_linear.py); its presets: goyal19, vissl, quick")
