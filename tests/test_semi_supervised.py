"""Semi-supervised fine-tuning: the labelled subset (class-balanced sample, list files), the optimiser and schedule
against hand-computed values, the model's input feature, fine-tuning moving the trunk, resume, and a quick run."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import tasks.semi_supervised.task as semi
from evalsuite.data import open_dataset
from evalsuite.errors import BadData, UserError
from evalsuite.io import ResumeState
from evalsuite.task import DataMissing
from evalsuite.trunks import build_trunk
from tasks.linear.probe import topk_accuracy
from tasks.semi_supervised.augment import TrainView
from tasks.semi_supervised.finetune import (
    LARS,
    FineTuneModel,
    FitConfig,
    Schedule,
    fine_tune,
    stream_positions,
)
from tasks.semi_supervised.subsets import balanced_counts, balanced_sample, read_subset_file, subset_size
from tests.helpers import make_context

#: 16 px crops: what the fine-tuning tests check does not depend on the size (ResNet-18's res5 is then 1 x 1)
SIZE = 16
QUICK_SMALL = [f"semi_supervised.image_size={SIZE}", "semi_supervised.batch_size=8"]


# ---------------------------------------------------------------------------------------------- the subset


def test_class_balanced_sample_counts_by_hand_and_is_fixed_by_its_seed() -> None:
    labels = np.array([0] * 10 + [1] * 7 + [2] * 5)
    # floor(0.5 x 22) = 11 images: 11 // 3 = 3 each, the first 11 % 3 = 2 classes one more
    chosen = balanced_sample(labels, 3, 0.5, seed=0)
    assert np.bincount(labels[chosen]).tolist() == [4, 4, 3]
    assert len(set(chosen.tolist())) == 11 and list(chosen) == sorted(chosen)
    assert np.array_equal(chosen, balanced_sample(labels, 3, 0.5, seed=0))
    assert not np.array_equal(chosen, balanced_sample(labels, 3, 0.5, seed=1))
    # SimCLR's published lists have this shape (imagenet_subsets/1percent.txt, 10percent.txt)
    assert subset_size(1281167, 0.01) == 12811 and subset_size(1281167, 0.1) == 128116
    assert np.bincount(balanced_counts(12811, 1000)).nonzero()[0].tolist() == [12, 13]
    assert (balanced_counts(12811, 1000) == 13).sum() == 811 and (balanced_counts(128116, 1000) == 129).sum() == 116
    assert subset_size(100, 0.29) == 29  # not 28: 0.29 x 100 is 28.999999999999996 in floating point
    with pytest.raises(UserError, match="fewer than one for each of the 3 classes"):
        balanced_sample(labels, 3, 0.1, seed=0)
    with pytest.raises(BadData, match="class 2 has 5 training images, fewer than the 6"):
        balanced_sample(labels, 3, 0.95, seed=0)  # floor(20.9) = 20: 7, 7, 6


def test_subset_file_names_become_indices_and_a_missing_name_is_one_error(tmp_path) -> None:
    ids = ["cat/n1_1.JPEG", "cat/n1_2.JPEG", "dog/n2_1.JPEG", "dog/n1_1.JPEG"]
    f = tmp_path / "list.txt"
    f.write_text("n1_2.JPEG\n\ndog/n2_1.JPEG\ncat/n1_1.JPEG\n")  # a file name, then ids; blank lines ignored
    assert read_subset_file(f, ids).tolist() == [0, 1, 2]
    f.write_text("n1_2.JPEG\nn9_9.JPEG\nn9_8.JPEG\n")
    with pytest.raises(BadData, match=r"2 of 3 names are not in the training split \(first: 'n9_9.JPEG'\)") as e:
        read_subset_file(f, ids)
    assert e.value.path == str(f) and len(str(e.value).splitlines()) == 1
    f.write_text("n1_1.JPEG\n")  # cat/ and dog/ both hold it
    with pytest.raises(BadData, match="match several training images"):
        read_subset_file(f, ids)
    f.write_text("n1_2.JPEG\ncat/n1_2.JPEG\n")
    with pytest.raises(BadData, match="listed more than once"):
        read_subset_file(f, ids)


# ---------------------------------------------------------------------------------------------- the solver


def test_lr_schedule_matches_hand_computed_values() -> None:
    # SimCLR's README command shape: sqrt scaling, no warm-up, cosine over N x epochs // batch + 1 steps
    s = Schedule(num_images=20, batch_size=8, epochs=2, lr=0.005, scaling="sqrt")
    assert s.total_steps == 6  # 40 // 8 + 1
    assert s.lr_at(0) == pytest.approx(0.0141421356, rel=1e-8)  # 0.005 x sqrt(8)
    assert s.lr_at(3) == pytest.approx(0.0070710678, rel=1e-8)  # x (1 + cos(pi/2)) / 2
    assert s.lr_at(5) == pytest.approx(0.00094734, rel=1e-4)  # x (1 + cos(5 pi/6)) / 2 = x 0.0669873
    # VISSL's shape: linear scaling, a multistep per epoch; here with one warm-up epoch (3 steps)
    m = Schedule(num_images=100, batch_size=32, epochs=4, lr=0.05, scaling="linear", kind="multistep",
                 warmup_epochs=1, milestones=(2,), gamma=0.1)
    assert (m.total_steps, m.warmup_steps) == (13, 3)
    expected = [0.0, 0.00625 / 3, 0.0125 / 3, 0.00625, 0.00625, 0.00625, 0.00625, 0.000625, 0.000625]
    assert [m.lr_at(i) for i in range(9)] == pytest.approx(expected, rel=1e-9)  # step 7 starts at image 224


def test_batches_stream_through_seeded_epochs() -> None:
    perm0 = np.random.default_rng([3, 0]).permutation(5).tolist()
    perm1 = np.random.default_rng([3, 1]).permutation(5).tolist()
    # batch 4 over 5 images: step 1 takes the last image of epoch 0 and the first three of epoch 1
    assert stream_positions(1, 4, 5, seed=3) == [(0, perm0[4])] + [(1, k) for k in perm1[:3]]


def test_lars_step_matches_the_simclr_update_by_hand() -> None:
    w = torch.nn.Parameter(torch.tensor([3.0, 4.0]))
    head = torch.nn.Parameter(torch.tensor([1.0, 1.0]))
    opt = LARS([{"params": [w], "adapt": True}, {"params": [head], "adapt": False}], lr=0.1, momentum=0.9, eta=1e-3)
    v_w, v_h, w_np, h_np = np.zeros(2), np.zeros(2), np.array([3.0, 4.0]), np.array([1.0, 1.0])
    for _ in range(2):
        g = np.array([0.6, 0.8])
        w.grad, head.grad = torch.tensor(g, dtype=torch.float32), torch.tensor(g, dtype=torch.float32)
        trust = 1e-3 * np.linalg.norm(w_np) / np.linalg.norm(g)
        v_w = 0.9 * v_w + 0.1 * trust * g  # classic momentum: the lr inside the buffer
        v_h = 0.9 * v_h + 0.1 * g  # excluded from adaptation: trust 1
        w_np, h_np = w_np - v_w, h_np - v_h
        opt.step()
    np.testing.assert_allclose(w.detach().numpy(), w_np, rtol=1e-6)
    np.testing.assert_allclose(head.detach().numpy(), h_np, rtol=1e-6)
    assert w_np[0] == pytest.approx(3.0 - 0.1 * 0.005 * 0.6 * 1.9, rel=1e-3)  # trust ~ 0.005 at both steps


def test_topk_by_hand() -> None:
    logits = np.array([[0.1, 0.5, 0.4], [0.9, 0.05, 0.05], [0.2, 0.3, 0.6]])
    # ranks of the true class: 0; 1 (a tie counts for the sample); 2
    assert topk_accuracy(logits, np.array([1, 2, 0]), (1, 2, 3)) == {1: pytest.approx(1 / 3),
                                                                     2: pytest.approx(2 / 3), 3: 1.0}


# ---------------------------------------------------------------------------------------------- the model


@pytest.mark.parametrize("arch", ["resnet18", "vit_tiny_patch16"])
def test_the_head_reads_res5_averaged_or_the_last_block_cls(arch) -> None:
    trunk = build_trunk(arch, seed=0).eval()
    model = FineTuneModel(trunk, num_classes=3, image_size=32, init="gaussian").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        if arch == "resnet18":  # torchvision's forward up to avgpool
            t = trunk.maxpool(trunk.relu(trunk.bn1(trunk.conv1(x))))
            feat = trunk.layer4(trunk.layer3(trunk.layer2(trunk.layer1(t)))).mean(dim=(2, 3))
        else:  # timm: the CLS token of the normed last block
            feat = trunk.forward_features(x)[:, 0]
        torch.testing.assert_close(model(x), model.head(feat))


@pytest.fixture(scope="module")
def untrained(tiny_imagefolder) -> FineTuneModel:
    """A ResNet-18 (seed 0) with a zero head for the tiny ImageFolder's 8 classes, built once per module: each
    fine-tuning starts from a copy (the weights a new build would have)."""
    return FineTuneModel(build_trunk("resnet18", seed=0), 8, image_size=SIZE)


def _tiny_fit(data_root: Path, untrained: FineTuneModel):
    """A fresh copy of the untrained model, half of the tiny ImageFolder's labels (24), 1 epoch of batch 8
    (4 steps)."""
    train = open_dataset("imagefolder", data_root / "imagefolder", "train")
    assert len(train.classes) == untrained.head.out_features
    indices = balanced_sample(train.labels, len(train.classes), 0.5, seed=0)
    cfg = FitConfig(Schedule(len(indices), 8, 1, lr=0.005), seed=0)
    return copy.deepcopy(untrained), train, indices, cfg


def test_one_step_moves_only_the_zero_initialised_head_then_the_trunk_moves(tiny_imagefolder, untrained) -> None:
    model, train, indices, cfg = _tiny_fit(tiny_imagefolder, untrained)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    def changed(m) -> set[str]:
        return {n.split(".")[0] for n, p in m.named_parameters() if not torch.equal(p, before[n])}

    class Stop(Exception):
        pass

    def stop_after(n):
        def hook(done):
            if done == n:
                raise Stop
        return hook

    # step 1 by hand: batch 0 of the seeded stream, zero logits, so the head's gradient is (1/C - onehot)^T feat / B
    # and (no trust ratio on the head, an empty momentum buffer) its update is -0.005 x sqrt(8) x that gradient
    keys = [(e, int(indices[k])) for e, k in stream_positions(0, 8, len(indices), seed=0)]
    x = torch.stack([TrainView(size=SIZE)(train.load_image(i), 0, e, i) for e, i in keys])
    y = torch.nn.functional.one_hot(torch.as_tensor(train.labels[[i for _, i in keys]]), len(train.classes)).float()
    with torch.no_grad():
        feat = copy.deepcopy(model.trunk).train()(x, ["res5"])["res5"].mean(dim=(2, 3))
    residual = 1 / len(train.classes) - y
    with pytest.raises(Stop):
        fine_tune(model, train, train.labels, indices, TrainView(size=SIZE), cfg, on_step=stop_after(1))
    assert changed(model) == {"head"}  # a zero head passes no gradient to the trunk
    lr0 = 0.005 * math.sqrt(8)
    torch.testing.assert_close(model.head.weight, -lr0 * residual.T @ feat / 8, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(model.head.bias, -lr0 * residual.mean(0), rtol=1e-4, atol=1e-7)
    report = fine_tune(model, train, train.labels, indices, TrainView(size=SIZE), cfg)
    assert changed(model) == {"head", "trunk"} and report.trunk_change > 0
    conv = model.trunk.conv1.weight
    assert not torch.equal(conv, before["trunk.conv1.weight"])  # fine-tuning: the first layer too


def test_resume_after_an_interruption_ends_with_the_same_weights(tiny_imagefolder, untrained, tmp_path) -> None:
    model, train, indices, cfg = _tiny_fit(tiny_imagefolder, untrained)
    full = fine_tune(model, train, train.labels, indices, TrainView(size=SIZE), cfg, save_every=2)
    expected = {k: v.clone() for k, v in model.state_dict().items()}

    state = ResumeState(tmp_path / "state.pt", {"run": "tiny"})
    model, *_ = _tiny_fit(tiny_imagefolder, untrained)

    def interrupt(done):
        if done == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fine_tune(model, train, train.labels, indices, TrainView(size=SIZE), cfg, resume=state, save_every=2,
                  on_step=interrupt)
    model, *_ = _tiny_fit(tiny_imagefolder, untrained)  # a fresh process: the checkpoint's trunk, the state on disk
    seen = []
    resumed = fine_tune(model, train, train.labels, indices, TrainView(size=SIZE), cfg, resume=state, save_every=2,
                        on_step=seen.append)
    assert resumed.resumed_from_step == 2 and seen == [3, 4]  # step 3 was lost: the last save was at 2
    assert resumed.losses == full.losses
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, expected[k], rtol=0, atol=0, msg=k)


# ---------------------------------------------------------------------------------------------- the task


def test_quick_run_records_top1_top5_with_the_subset_and_schedule(tiny_imagefolder, tmp_path) -> None:
    ctx = make_context("semi_supervised", tiny_imagefolder, tmp_path / "out", overrides=QUICK_SMALL)
    plan = semi.task.plan(ctx)
    results = semi.task.run(ctx)
    assert [(r.metric, r.layer, r.split) for r in results] == [("top1", "finetune_all", "val"),
                                                               ("top5", "finetune_all", "val")]
    top1, top5 = (r.value for r in results)
    assert 0 <= top1 <= top5 <= 100 and (top1 * 24 / 100) == pytest.approx(round(top1 * 24 / 100))  # 24 val images
    p = results[0].params
    assert p["labels"] == "50%" and p["num_labeled"] == 24 and p["subset"]["classes_with_count"] == {"3": 8}
    assert p["subset"]["source"] == "class_balanced_sample" and len(p["subset"]["ids_sha256"]) == 64
    assert p["epochs_run"] == 2 and p["steps_run"] == 24 * 2 // 8 + 1 and p["resumed_from_step"] == 0
    assert p["schedule"]["scaled_lr"] == pytest.approx(0.005 * math.sqrt(8))
    assert p["head_input"] == {"tap": "res5", "pool_op": "global_avg", "dim": 512}
    assert p["trunk_weight_change"] > 0 and p["optimizer_groups"][0]["trust_ratio"]
    assert results[0].protocol == "quick" and results[0].params["label_fraction"] == 0.5
    assert not list((tmp_path / "out" / "semi_supervised_state").glob("*.pt"))  # finished: nothing to resume
    # the plan counts what the run read and trained
    assert plan.images == {"val": 24} and plan.train_images == {"train": 24}
    assert (plan.train_iterations, plan.images_per_iteration) == (p["steps_run"], 8)
    with pytest.raises(DataMissing):
        semi.task.plan(make_context("semi_supervised", tmp_path / "no-data", tmp_path / "out2"))


def test_a_subset_file_under_the_data_root_is_read(tiny_imagefolder, tmp_path) -> None:
    train = open_dataset("imagefolder", tiny_imagefolder / "imagefolder", "train")
    listed = [i for i in train.ids if i.endswith(("00000.jpg", "00001.jpg"))]  # 2 per class
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "list.txt").write_text("\n".join(listed) + "\n")
    (tmp_path / "data" / "imagefolder").symlink_to(tiny_imagefolder / "imagefolder")
    ctx = make_context("semi_supervised", tmp_path / "data", tmp_path / "out",
                       overrides=[*QUICK_SMALL, "semi_supervised.subset_file=list.txt", "semi_supervised.epochs=1"])
    sub = semi.labelled_subset(ctx, train, len(train.classes))
    assert [train.ids[i] for i in sub.indices] == sorted(listed) and sub.record["source"] == "file"
    assert sub.record["classes_with_count"] == {"2": 8}
