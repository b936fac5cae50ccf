"""knn task end to end: presets, independent recomputation of the reported numbers, CLI, bad data."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import tasks.knn.task as knn
from evalsuite.checkpoints import load_checkpoint
from evalsuite.errors import BadData, BadFeatures, UserError
from evalsuite.protocols import apply_overrides, parse_overrides
from tasks.knn.centroid import task as centroid
from tasks.knn.search import Neighbours
from tests.helpers import make_context, read_records, run_cli_with_task

TAPS = ["res4", "res5"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ckpt():
    return load_checkpoint("random:resnet18", seed=0)


def make_ctx(data_root: Path, out: Path, ckpt, cache: Path, overrides=(), preset="quick", layers=TAPS):
    return make_context("knn", data_root, out, overrides=overrides, preset=preset, checkpoint=ckpt,
                        cache_dir=cache, layers=layers)


def test_presets_follow_the_protocols():
    g, v, q = (knn.task.default_protocol(p) for p in ("goyal19", "vissl", "quick"))
    assert (g.k, g.temperature) == (20, 0.07)  # DINO
    assert (v.k, v.temperature) == (200, 0.1)  # VISSL / NPID-style k
    for p in (g, v):
        assert p.ks == (10, 20, 100, 200) and p.retrieval_ks == (1, 10, 100)
        assert (p.pooling, p.normalize, p.metric, p.index) == ("avg", True, "ip", "flat")
        assert (p.resize_mode, p.resize, p.image_size) == ("center_crop", 256, 224)
        assert p.layers == ("conv1", "res2", "res3", "res4", "res5")
    # DINO: Resize(256, interpolation=3) = bicubic; VISSL's kNN configs: Resize(256), torchvision's bilinear
    assert (g.interpolation, v.interpolation, q.interpolation) == ("bicubic", "bilinear", "bilinear")
    assert q.image_size < g.image_size and max(q.ks) <= 20
    # the recorded form keeps JSON lists and nulls
    assert q.to_dict()["ks"] == [5, 10, 20] and q.to_dict()["resize"] is None and q.to_dict()["use_gpu"] == "auto"
    # dino21: goyal19 (DINO's eval_knn.py already) run as DINO does: ImageNet, the network's output, weighted votes
    d = knn.task.default_protocol("dino21")
    assert d.to_dict() == {**g.to_dict(), "dataset": "imagenet", "layers": ["res5"], "majority_vote": False,
                           "retrieval": False}


def test_overrides_are_cast_to_the_declared_types():
    p = apply_overrides({"knn": knn.task.default_protocol("quick")},
                        parse_overrides(["knn.ks=[3,7]", "knn.retrieval_depth=all", "knn.use_gpu=false",
                                         "knn.temperature=1", "knn.layers=null"]))["knn"]
    assert (p.ks, p.retrieval_depth, p.use_gpu, p.layers) == ((3, 7), "all", False, None)
    assert p.temperature == 1.0 and isinstance(p.temperature, float)
    for bad in ("knn.index=lsh", "knn.retrieval_mode=loo", "knn.k=many"):
        field = bad.split("=")[0].split(".")[1]
        with pytest.raises(UserError, match=re.escape(f"--set {bad}: {field} must be")):
            apply_overrides({"knn": knn.task.default_protocol("quick")}, parse_overrides([bad]))


def test_centroid_protocol_records_exactly_the_pinned_params():
    """tests/regression pins the centroid records' params: the typed protocol must record the same JSON."""
    pinned = {"dataset": "imagefolder", "data_path": None, "train_split": "train", "layers": None, "pooling": "avg",
              "image_size": 64, "resize_mode": "square", "resize": None, "interpolation": "bilinear",
              "test_split": "val"}
    quick = centroid.default_protocol("quick")
    assert quick.to_dict() == pinned and list(quick.to_dict()) == list(pinned)
    for preset in ("goyal19", "vissl"):
        assert centroid.default_protocol(preset).to_dict() == {**pinned, "image_size": 224}
    assert quick.layers is None and quick.test_split == "val"


def test_conformance_covers_every_goyal19_field():
    from evalsuite.conformance import task_conformance
    from evalsuite.protocols import field_paths

    for task in (knn.task, centroid):
        table = task_conformance(task)
        assert set(field_paths(task.default_protocol("goyal19"))) == set(table), task.name
        for _ref, source, status in table.values():
            assert status == "same" or status.startswith(("deviation: ", "ours: ")), status
            assert status.startswith("ours: ") or source.startswith("facebookresearch/dino:")
    assert all(s.startswith("ours: ") for _, _, s in task_conformance(centroid).values())
    assert task_conformance(knn.task)["interpolation"][2] == "same"


def test_alexnet_records_say_they_are_not_comparable(tiny_imagefolder, tmp_path):
    """torchvision's AlexNet is not the benchmark's CaffeNet: every knn and centroid record says so."""
    alex = load_checkpoint("random:alexnet", seed=0)
    ctx = make_context("knn", tiny_imagefolder, tmp_path / "out", preset="quick", checkpoint=alex,
                       cache_dir=tmp_path / "cache", layers=["conv5"], overrides=["knn.retrieval=false"])
    records = knn.task.run(ctx)
    ctx = make_context("centroid", tiny_imagefolder, tmp_path / "out", preset="quick", checkpoint=alex,
                       cache_dir=tmp_path / "cache", layers=["conv5"])
    records += centroid.run(ctx)
    assert records and all(r.params["comparable_to_published"] is False for r in records)
    assert all("CaffeNet" in r.params["not_comparable_reason"] for r in records)
    # compare flags (and --strict refuses) a record whose deviations are not empty
    assert all("arch" in r.deviations for r in records)
    # the leaderboard marks the checkpoint wherever its label is shown, with the reason on hover
    from evalsuite.results import append_results
    from leaderboard.site import build_site

    append_results(tmp_path / "runs" / "results.jsonl", records)
    build_site([tmp_path / "runs"], tmp_path / "site")
    pages = [tmp_path / "site" / "index.html", *(tmp_path / "site" / "checkpoints").glob("*.html")]
    for page in pages:
        text = page.read_text()
        assert 'class="not-comparable"' in text and "CaffeNet" in text, page


def test_reported_numbers_equal_an_independent_recomputation(tiny_imagefolder, tmp_path, ckpt):
    ctx = make_ctx(tiny_imagefolder, tmp_path / "out", ckpt, tmp_path / "cache")
    results = knn.task.run(ctx)
    by = {(r.layer, r.metric): r.value for r in results}
    assert {r.layer for r in results} == set(TAPS)
    expected = {"top1", "top5", "retrieval_mAP@20", "retrieval_precision@1", "retrieval_precision@10",
                "retrieval_recall@10"} | {f"{m}@k{k}" for m in ("top1", "top5", "majority_top1", "majority_top5")
                                          for k in (5, 10, 20)}
    assert expected <= {m for (_, m) in by}
    r0 = results[0]
    assert (r0.params["num_train"], r0.params["num_val"], r0.params["num_classes"]) == (48, 24, 8)
    assert r0.params["k_searched"] == 20 and r0.params["search"]["backend"] == "faiss-cpu"
    assert (r0.params["k"], r0.params["temperature"]) == (10, 0.07)
    assert "comparable_to_published" not in r0.params  # a ResNet is comparable

    # recompute res5 from the cached features with plain numpy: cosine, sort, exp(sim/T) vote
    train = ctx.open_dataset("imagefolder", "train")
    val = ctx.open_dataset("imagefolder", "val")
    f_tr = ctx.features(train, ["res5"], pooling="avg")["res5"].astype(np.float64)
    f_va = ctx.features(val, ["res5"], pooling="avg")["res5"].astype(np.float64)
    f_tr /= np.linalg.norm(f_tr, axis=1, keepdims=True)
    f_va /= np.linalg.norm(f_va, axis=1, keepdims=True)
    sims = f_va @ f_tr.T
    top1_hits, maj_hits, p1, ap = [], [], [], []
    for i in range(len(val)):
        order = sorted(range(len(train)), key=lambda j: (-sims[i, j], j))
        votes = np.zeros(8)
        for j in order[:10]:
            votes[train.labels[j]] += np.exp(sims[i, j] / 0.07)
        top1_hits.append(int(np.argmax(votes)) == val.labels[i])
        counts = np.bincount(train.labels[order[:20]], minlength=8)
        maj_hits.append(int(np.argmax(counts)) == val.labels[i])
        rel = [train.labels[j] == val.labels[i] for j in order[:20]]
        p1.append(rel[0])
        hits, s = 0, 0.0
        for n, r in enumerate(rel, 1):
            if r:
                hits += 1
                s += hits / n
        ap.append(s / min(6, 20))  # 6 train images per class
    assert by[("res5", "top1")] == pytest.approx(100 * np.mean(top1_hits), abs=1e-9)
    assert by[("res5", "top1")] == by[("res5", "top1@k10")]
    assert by[("res5", "majority_top1@k20")] == pytest.approx(100 * np.mean(maj_hits))
    assert by[("res5", "retrieval_precision@1")] == pytest.approx(100 * np.mean(p1))
    assert by[("res5", "retrieval_mAP@20")] == pytest.approx(100 * np.mean(ap))
    for t in TAPS:
        assert by[(t, "top5")] >= by[(t, "top1")]

    again = knn.task.run(make_ctx(tiny_imagefolder, tmp_path / "out2", ckpt, tmp_path / "cache"))
    assert [r.value for r in again] == [r.value for r in results]  # deterministic


def dino_knn_classifier(train_features, train_labels, test_features, test_labels, k, T, num_classes):
    """facebookresearch/dino eval_knn.py's knn_classifier, in its own torch operations (one chunk of queries)."""
    similarity = torch.mm(test_features, train_features.t())
    distances, indices = similarity.topk(k, largest=True, sorted=True)
    retrieved = torch.gather(train_labels.view(1, -1).expand(len(test_labels), -1), 1, indices)
    one_hot = torch.zeros(len(test_labels) * k, num_classes).scatter_(1, retrieved.view(-1, 1), 1)
    probs = (one_hot.view(len(test_labels), -1, num_classes) * distances.div(T).exp().view(len(test_labels), -1, 1)
             ).sum(1)
    correct = probs.sort(1, True)[1].eq(test_labels.view(-1, 1))
    return (100.0 * correct[:, :1].sum().item() / len(test_labels),
            100.0 * correct[:, :min(5, k)].sum().item() / len(test_labels))


def test_dino21_on_a_vit_is_dinos_eval_knn(tmp_path):
    """dino21 on a random ViT-Tiny and a synthetic ImageNet (official layout): the block11 features are the model's
    output as DINO reads it (timm's forward_features: every block then the final norm, [CLS]) on torchvision's
    Resize(bicubic) + CenterCrop, and top-1 / top-5 are eval_knn.py's knn_classifier on them."""
    from torchvision import transforms as T

    from evalsuite.colorspace import IMAGENET_MEAN, IMAGENET_STD
    from evalsuite.data.synthetic import write_imagenet

    write_imagenet(tmp_path / "data", seed=1, image_size=40, train_per_class=6, val_per_class=3)
    vit = load_checkpoint("random:vit_tiny_patch16", seed=0)
    ctx = make_ctx(tmp_path / "data", tmp_path / "out", vit, tmp_path / "cache", preset="dino21", layers=None,
                   overrides=["knn.ks=[10,20]", "knn.image_size=32", "knn.resize=36"])
    results = knn.task.run(ctx)
    by = {(r.layer, r.metric): r.value for r in results}
    # a ViT has no res5: its last block (DINO's feature) and last4; weighted votes only, no retrieval records
    assert set(by) == {(t, m) for t in ("block11", "last4") for m in ("top1", "top5", "top1@k10", "top5@k10",
                                                                      "top1@k20", "top5@k20")}
    assert all(r.dataset == "imagenet" and r.params["pool_op"].startswith("cls(") for r in results)
    train, val = ctx.open_dataset("imagenet", "train"), ctx.open_dataset("imagenet", "val")
    tf = T.Compose([T.Resize(36, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(32), T.ToTensor(),
                    T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    trunk = vit.build_trunk().eval()
    with torch.no_grad():
        ref = trunk.forward_features(torch.stack([tf(val.load_image(i)) for i in range(len(val))]))[:, 0]
    cached = {s.split: ctx.features(s, ["block11"], pooling="avg")["block11"] for s in (train, val)}
    np.testing.assert_allclose(cached["val"].astype(np.float32), ref.numpy(), rtol=2e-3, atol=2e-3)  # fp16 cache
    f_tr, f_va = (torch.nn.functional.normalize(torch.from_numpy(cached[s].astype(np.float32)), dim=1, p=2)
                  for s in ("train", "val"))
    for k in (10, 20):
        top1, top5 = dino_knn_classifier(f_tr, torch.from_numpy(train.labels), f_va, torch.from_numpy(val.labels),
                                         k, 0.07, 8)
        assert (by[("block11", f"top1@k{k}")], by[("block11", f"top5@k{k}")]) == pytest.approx((top1, top5))
    assert by[("block11", "top1")] == by[("block11", "top1@k20")]


def test_leave_one_out_retrieval_never_returns_the_query(tiny_imagefolder, tmp_path, ckpt, monkeypatch):
    seen = []
    real = knn.search

    def spy(queries, bank, k, config=None, exclude_self=False, **kw):
        nb = real(queries, bank, k, config, exclude_self=exclude_self, **kw)
        seen.append((exclude_self, nb))
        return nb

    monkeypatch.setattr(knn, "search", spy)
    ctx = make_ctx(tiny_imagefolder, tmp_path / "out", ckpt, tmp_path / "cache", layers=["res5"],
                   overrides=["knn.retrieval_mode=leave_one_out", "knn.retrieval_depth=all"])
    by = {r.metric: r.value for r in knn.task.run(ctx)}
    loo = [nb for flag, nb in seen if flag]
    assert len(loo) == 1 and loo[0].ids.shape == (24, 23)
    assert not (loo[0].ids == np.arange(24)[:, None]).any()
    # whole-ranking AP within val (3 per class -> R = 2 after leaving the query out)
    yv = ctx.open_dataset("imagefolder", "val").labels
    rel = yv[loo[0].ids] == yv[:, None]
    ap = [np.mean([rel[i, : n + 1].sum() / (n + 1) for n in np.flatnonzero(rel[i])]) for i in range(24)]
    assert by["retrieval_mAP@23"] == pytest.approx(100 * np.mean(ap))


def test_approximate_index_records_its_recall(tiny_imagefolder, tmp_path, ckpt):
    ctx = make_ctx(tiny_imagefolder, tmp_path / "out", ckpt, tmp_path / "cache", layers=["res5"],
                   overrides=["knn.index=hnsw", "knn.retrieval=false"])
    results = knn.task.run(ctx)
    rec = [r for r in results if r.metric == "index_recall@20"]
    assert len(rec) == 1 and 0 <= rec[0].value <= 100
    assert rec[0].params["search"]["index"] == "hnsw" and rec[0].params["search"]["recall_queries"] == 24
    assert not any(r.metric.startswith("retrieval_") for r in results)


def test_k_larger_than_the_bank_is_a_clear_error(tiny_imagefolder, tmp_path, ckpt):
    ctx = make_ctx(tiny_imagefolder, tmp_path / "out", ckpt, tmp_path / "cache", preset="goyal19",
                   overrides=["knn.image_size=32", "knn.resize=null"])
    with pytest.raises(UserError, match="k=200 is larger than the bank \\(48 train samples\\)"):
        knn.task.run(ctx)


def test_nan_features_are_refused_naming_the_split_and_tap(tiny_imagefolder, tmp_path, ckpt):
    ctx = make_ctx(tiny_imagefolder, tmp_path / "out", ckpt, tmp_path / "cache", layers=["res5"])
    real = ctx.features

    def poisoned(dataset, taps, **kw):
        out = real(dataset, taps, **kw)
        if dataset.split == "val":
            out["res5"] = out["res5"].astype(np.float32)
            out["res5"][3, 0] = np.nan
        return out

    ctx.features = poisoned
    with pytest.raises(BadFeatures, match=r"val res5 features contain NaN/Inf in 1\+? row.*row 3"):
        knn.task.run(ctx)


def fake_split(root, split, labels, classes):
    return SimpleNamespace(root=Path(root), split=split, labels=np.asarray(labels), classes=classes)


def test_unseen_query_labels_and_class_mismatch_are_clear_errors():
    p = knn.task.default_protocol("quick")
    train = fake_split("/d", "train", [0, 0, 1], ["a", "b", "c"])
    with pytest.raises(BadData, match="val has labels never seen in train.*: c"):
        knn._targets(train, fake_split("/d", "val", [0, 2], ["a", "b", "c"]), p)
    with pytest.raises(BadData, match="different class lists"):
        knn._targets(train, fake_split("/d", "val", [0], ["a", "b"]), p)
    ml_tr = SimpleNamespace(root=Path("/d"), label_matrix=np.array([[1, -1], [1, -1]]), classes=["x", "y"])
    ml_va = SimpleNamespace(root=Path("/d"), label_matrix=np.array([[1, 1]]), classes=["x", "y"])
    with pytest.raises(BadData, match="never positive in train: y"):
        knn._targets(ml_tr, ml_va, p)
    with pytest.raises(BadData, match="neither single labels nor a label matrix"):
        knn._targets(SimpleNamespace(root=Path("/d")), SimpleNamespace(root=Path("/d")), p)


def test_multilabel_metrics_from_neighbours():
    """VOC-style targets: class-mean AP of the vote and retrieval relevance = a shared positive label."""
    p = knn.task.default_protocol("quick").replace(k=2, ks=(2,), retrieval_ks=(1, 2), retrieval_depth=2)
    train_lm = np.array([[1, -1], [-1, 1], [1, 1], [-1, -1]])
    val_lm = np.array([[1, -1], [-1, 1], [0, 1]])  # 0 = difficult: ignored for that class
    targets = knn._targets(SimpleNamespace(root=Path("/d"), label_matrix=train_lm),
                           SimpleNamespace(root=Path("/d"), label_matrix=val_lm), p)
    nb = Neighbours(np.array([[0.9, 0.5], [0.8, 0.1], [0.7, 0.6]], np.float32), np.array([[0, 3], [1, 2], [2, 3]]))
    plan = knn._plan(p, 4, 3)
    cls = knn.classification_metrics(nb, targets, p, plan)
    from sklearn.metrics import average_precision_score

    w = np.exp(nb.scores.astype(np.float64) / 0.07)
    pos = (train_lm > 0)[nb.ids]
    scores = (w[:, :, None] * pos).sum(1)
    ap0 = average_precision_score([1, 0], scores[:2, 0])
    ap1 = average_precision_score([0, 1, 1], scores[:, 1])
    assert cls["mAP"] == pytest.approx(100 * (ap0 + ap1) / 2)
    ret = knn.retrieval_metrics(nb, None, None, targets, p, plan, None, False)
    # relevance: q0 {0} -> [T, F]; q1 {1} -> [T, T]; q2 {1} (class 0 is difficult, not positive) -> [T, F]
    assert ret["retrieval_precision@1"] == pytest.approx(100.0)
    assert ret["retrieval_precision@2"] == pytest.approx(100 * (0.5 + 1 + 0.5) / 3)
    # R: q0 shares with train 0, 2 -> 2; q1 with 1, 2 -> 2; q2 with 1, 2 -> 2
    assert ret["retrieval_recall@2"] == pytest.approx(100 * (0.5 + 1 + 0.5) / 3)
    assert ret["retrieval_mAP@2"] == pytest.approx(100 * (0.5 + 1 + 0.5) / 3)


def test_cli_run_writes_result_records(tiny_imagefolder, tmp_path, cache_dir):
    rc = run_cli_with_task(knn.task, ["--layers", "res5", "--data-root", str(tiny_imagefolder),
                                      "--out", str(tmp_path / "runs")])
    assert rc == 0
    rows = read_records(tmp_path / "runs")
    metrics = {r["metric"] for r in rows}
    assert {"top1", "top5", "majority_top1@k20", "retrieval_mAP@20", "retrieval_precision@10"} <= metrics
    assert all(r["task"] == "knn" and r["layer"] == "res5" and r["protocol"] == "quick" for r in rows)
    assert all(r["params"]["k"] == 10 and r["params"]["temperature"] == 0.07 for r in rows)
    assert all(0.0 <= r["value"] <= 100.0 for r in rows)


def test_cli_k_too_large_exits_2(tiny_imagefolder, tmp_path, cache_dir, capsys):
    rc = run_cli_with_task(knn.task, ["--set", "knn.k=100", "--layers", "res5", "--data-root", str(tiny_imagefolder),
                                      "--out", str(tmp_path / "runs")])
    assert rc == 2
    assert "k=100 is larger than the bank" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "results.jsonl").exists()


def test_multilabel_voc_end_to_end(tmp_path, ckpt):
    """Synthetic VOC2007 (real VOCdevkit layout): class-mean AP of the vote, multi-label retrieval."""
    from sklearn.metrics import average_precision_score

    from evalsuite.data.synth_voc import write_voc2007

    root = tmp_path / "data"
    write_voc2007(root, seed=0, scale=0.02, image_size=48)
    ctx = make_ctx(root, tmp_path / "out", ckpt, tmp_path / "cache", layers=["res5"],
                   overrides=["knn.dataset=voc2007", "knn.train_split=trainval", "knn.val_split=test", "knn.k=5",
                              "knn.ks=[5,10]", "knn.retrieval_depth=10", "knn.image_size=48"])
    by = {r.metric: r for r in knn.task.run(ctx)}
    assert {"mAP", "mAP@k5", "mAP@k10", "majority_mAP@k5", "retrieval_mAP@10", "retrieval_precision@1"} <= set(by)
    assert not any(m.startswith("top") for m in by)
    assert by["mAP"].params["multilabel"] is True and by["mAP"].params["num_classes"] == 20
    # recompute mAP@k5 from the cached features: cosine top-5, exp(sim/T) votes per positive label
    tr, te = ctx.open_dataset("voc2007", "trainval"), ctx.open_dataset("voc2007", "test")
    f = [ctx.features(d, ["res5"], pooling="avg")["res5"].astype(np.float64) for d in (tr, te)]
    f = [x / np.linalg.norm(x, axis=1, keepdims=True) for x in f]
    sims = f[1] @ f[0].T
    order = np.lexsort((np.broadcast_to(np.arange(len(tr)), sims.shape), -sims), axis=-1)[:, :5]
    w = np.exp(np.take_along_axis(sims, order, 1) / 0.07)
    scores = (w[:, :, None] * (tr.label_matrix > 0)[order]).sum(1)
    lm = te.label_matrix
    aps = [average_precision_score(lm[lm[:, c] != 0, c] > 0, scores[lm[:, c] != 0, c])
           for c in range(20) if (lm[:, c] > 0).any()]
    assert by["mAP"].value == pytest.approx(100 * np.mean(aps), rel=1e-6)
