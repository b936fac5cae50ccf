"""Weighted kNN classification and image retrieval on frozen features, one search per tap.

For each tap: globally average-pooled features from the cache, L2-normalised, the val split's
k nearest train features by cosine similarity (FAISS, ``tasks.knn.search``), then

- weighted kNN (DINO's ``eval_knn.py``, after Wu et al. 2018 NPID): the k neighbours vote for
  their class with weight exp(sim / T); top-1 / top-5 for the preset's k (metrics ``top1``,
  ``top5``) and for every k in ``ks`` (``top1@k10``, ...), all from ONE search with the largest k;
- plain majority vote for the same ks (``majority_top1@k20``, ...);
- retrieval: a neighbour is relevant when it shares the query's label (multi-label data such
  as VOC: at least one positive label): ``retrieval_precision@n``, ``retrieval_recall@n`` and
  ``retrieval_mAP@D`` (AP over the first D = ``retrieval_depth`` neighbours, normalised by
  min(R, D); ``retrieval_depth="all"`` ranks the whole bank = the usual AP).
  ``retrieval_mode="leave_one_out"`` retrieves within the val split, never returning the query itself.

Multi-label datasets (``label_matrix``, e.g. voc2007) report class-mean AP of the vote scores
(``mAP``, ``mAP@k20``, ...) instead of top-n accuracy.

Presets:
- ``goyal19``: DINO's protocol (Caron et al. 2021, ``eval_knn.py``): k=20, T=0.07, cosine on
  L2-normalised global-average-pooled features, bicubic resize 256 / centre crop 224; every tap.
- ``vissl``: k=200, T=0.1, bilinear resize 256 / centre crop 224 (VISSL's
  ``configs/config/benchmark/nearest_neighbor/eval_resnet_8gpu_in1k_kNN.yaml``).
- ``dino21``: DINO's ``eval_knn.py`` as it runs, so records match the published DINO rows: goyal19's settings on
  ImageNet, the network's output only (res5 on a ResNet; a ViT's taps fall back to its last block, DINO's
  [CLS] after the final norm, and last4), weighted votes only (no majority vote, no retrieval records).
- ``quick``: 64 px, k=10, ks 5/10/20, retrieval depth 20: tiny data on a CPU.

The fidelity of each field to the reference is in :mod:`tasks.knn.conformance`.

Search options (``--set knn.index=ivf|hnsw``) trade exactness for speed on large banks; the
recall of the approximate neighbours against the exact search is recorded (``index_recall@k``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from evalsuite.errors import BadData, UserError
from evalsuite.features import check_features, l2_normalize
from evalsuite.outputs import MetricOutputs, SampleOutputs
from evalsuite.plan import TaskPlan
from evalsuite.protocols import FeatureTaskProtocol, Interpolation, Pooling, ResizeMode, preset_changes
from evalsuite.results import Result
from evalsuite.task import TaskContext
from tasks.knn import metrics as M
from tasks.knn.conformance import CONFORMANCE, DINO21_CONFORMANCE
from tasks.knn.search import Neighbours, SearchConfig, open_bank, search

DEFAULT_LAYERS = ("conv1", "res2", "res3", "res4", "res5")


@dataclass(frozen=True)
class KNNProtocol(FeatureTaskProtocol):
    """The ``goyal19`` values (DINO's kNN); the search fields are :class:`tasks.knn.search.SearchConfig`'s."""

    val_split: str = "val"
    layers: tuple[str, ...] | None = DEFAULT_LAYERS
    pooling: Pooling = "avg"
    resize_mode: ResizeMode = "center_crop"
    resize: int | None = 256
    interpolation: Interpolation = "bicubic"  # DINO: Resize(256, interpolation=3)
    normalize: bool = True
    metric: Literal["ip", "l2"] = "ip"
    k: int = 20
    temperature: float = 0.07
    ks: tuple[int, ...] = (10, 20, 100, 200)
    topk: tuple[int, ...] = (1, 5)
    majority_vote: bool = True
    retrieval: bool = True
    retrieval_mode: Literal["split", "leave_one_out"] = "split"
    retrieval_ks: tuple[int, ...] = (1, 10, 100)
    retrieval_depth: int | Literal["all"] | None = 100  # "all" / None: rank the whole bank
    index: Literal["flat", "ivf", "hnsw"] = "flat"
    chunk_size: int = 1024
    nlist: int | None = None
    nprobe: int = 16
    ivf_train_size: int | None = None  # k-means' sampled rows; None: max(39 nlist, 50k) capped at 256 nlist and N
    hnsw_m: int = 32
    ef_construction: int = 200
    ef_search: int = 128
    use_gpu: Literal["auto"] | bool = "auto"
    recall_queries: int = 1000


#: each preset as its changes to the goyal19 values
_PRESET_CHANGES: dict[str, dict[str, Any]] = {
    "goyal19": {},
    "vissl": {"k": 200, "temperature": 0.1, "interpolation": "bilinear"},
    # facebookresearch/dino eval_knn.py: model(x) is a ResNet's avgpool output or a ViT's final-norm [CLS]
    "dino21": {"dataset": "imagenet", "layers": ("res5",), "majority_vote": False, "retrieval": False},
    "quick": {"image_size": 64, "resize": None, "interpolation": "bilinear", "k": 10, "ks": (5, 10, 20),
              "retrieval_ks": (1, 10), "retrieval_depth": 20},
}


class KNNTask:
    name = "knn"
    description = ("weighted kNN (DINO/NPID) top-1/top-5, majority vote and label-sharing retrieval "
                   "(mAP, precision@n) on frozen features via FAISS")
    # weighted kNN at the protocol's k: top-1 on single-label data, class-mean AP on multi-label data
    headline_metrics = ("top1", "mAP")
    conformance = CONFORMANCE
    preset_conformance = {"dino21": DINO21_CONFORMANCE}

    def seeded(self, protocol: KNNProtocol) -> bool:
        """The exact search (``index=flat``) gives the same neighbours at any seed; an IVF index's k-means and the
        queries sampled for its recall are seeded."""
        return protocol.index != "flat"

    def default_protocol(self, preset: str) -> KNNProtocol:
        return KNNProtocol(**preset_changes(_PRESET_CHANGES, preset, self.name))

    # ------------------------------------------------------------------ run

    def run(self, ctx: TaskContext) -> list[Result]:
        p: KNNProtocol = ctx.protocol
        train, val = ctx.open_splits(p.train_split, p.val_split)
        targets = _targets(train, val, p)
        taps = ctx.taps(p.layers)
        transform = ctx.transform()
        config = SearchConfig.from_protocol(p, seed=ctx.seed)
        plan = _plan(p, len(train), len(val))
        specs = ctx.extractor.pool_specs(taps, p.pooling, transform)
        ftr = ctx.feature_stores(train, taps, pooling=p.pooling, transform=transform)  # the bank: nothing loaded yet
        fva = ctx.features(val, taps, pooling=p.pooling, transform=transform)
        results: list[Result] = []
        for tap in taps:
            queries = _float32_features(fva.pop(tap), f"{p.val_split} {tap} features", val.root)
            if p.normalize:  # DINO's F.normalize
                l2_normalize(queries, 1e-12, clamp=True, inplace=True)
            # in memory when the search fits the memory budget, else streamed from the cache (same neighbours)
            bank = open_bank(ftr.pop(tap), len(queries), plan["kmax"], config, p.normalize,
                             f"{p.train_split} {tap} features", train.root, desc=f"knn {tap}")
            nb = search(queries, bank, plan["kmax"], config, progress=ctx.progress, desc=f"knn {tap}")
            per_sample = _target_arrays(targets)  # + each metric's per-query values, filled in below
            values = classification_metrics(nb, targets, p, plan, per_sample)
            if plan["retrieval"]:
                values.update(retrieval_metrics(nb, queries, bank, targets, p, plan, config, ctx.progress,
                                                per_sample))
            samples = SampleOutputs(per_sample)
            if "recall_vs_exact" in nb.info:
                values[f"index_recall@{plan['kmax']}"] = 100.0 * nb.info["recall_vs_exact"]
            params = {
                "num_train": len(train), "num_val": len(val), "num_classes": targets["num_classes"],
                "multilabel": targets["multilabel"], "feature_dim": int(bank.shape[1]),
                "pool_op": specs[tap].op, "transform": transform.to_dict(), "search": nb.info,
                "search_config": config.to_dict(), "k_searched": plan["kmax"], "ks_reported": plan["ks"],
                "vote_weight": "exp(cosine / temperature)" if p.normalize and p.metric == "ip"
                else "exp(score / temperature)",
                "tie_break": "neighbours: score then lower bank index; classes: score then lower class index",
                "device": ctx.device,
            }
            for metric, value in values.items():
                results.append(ctx.result(p.dataset, p.val_split, tap, metric, value, params=params,
                                          dataset_fingerprint=val.fingerprint(),
                                          outputs=_metric_outputs(samples, metric)))
        return results

    def plan(self, ctx: TaskContext) -> TaskPlan:
        """Features of both splits at the protocol's size; the search runs on the cached features."""
        p: KNNProtocol = ctx.protocol
        return TaskPlan.of_splits(p, ctx.open_splits(p.train_split, p.val_split))


# ---------------------------------------------------------------------- helpers


def _float32_features(x: np.ndarray, what: str, source: Any) -> np.ndarray:
    """The C-contiguous float32 matrix FAISS searches, checked (shape, NaN/Inf) by the suite's one check."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    check_features(x, what, source)
    return x


def _targets(train, val, p: KNNProtocol) -> dict[str, Any]:
    """Labels of both splits; a clear error for unusable or inconsistent targets."""
    if hasattr(train, "labels") and getattr(train, "classes", None) is not None:
        classes = list(train.classes)
        if classes != list(getattr(val, "classes", [])):
            raise BadData(f"the {p.train_split} and {p.val_split} splits have different class lists", val.root)
        ytr, yva = np.asarray(train.labels, np.int64), np.asarray(val.labels, np.int64)
        unseen = sorted(set(np.unique(yva).tolist()) - set(np.unique(ytr).tolist()))
        if unseen:
            names = [classes[i] if 0 <= i < len(classes) else str(i) for i in unseen]
            raise BadData(f"{p.val_split} has labels never seen in {p.train_split} (kNN cannot predict "
                          f"them): {', '.join(map(str, names[:10]))}", val.root)
        return {"multilabel": False, "num_classes": len(classes), "train": ytr, "val": yva}
    if hasattr(train, "label_matrix"):
        ltr, lva = np.asarray(train.label_matrix), np.asarray(val.label_matrix)
        if ltr.shape[1] != lva.shape[1]:
            raise BadData(f"the {p.train_split} and {p.val_split} splits have different class lists", val.root)
        ptr, pva = ltr > 0, lva > 0
        unseen = np.flatnonzero(pva.any(axis=0) & ~ptr.any(axis=0))
        if len(unseen):
            classes = list(getattr(train, "classes", range(ltr.shape[1])))
            raise BadData(f"{p.val_split} has labels never positive in {p.train_split}: "
                          f"{', '.join(str(classes[i]) for i in unseen[:10])}", val.root)
        return {"multilabel": True, "num_classes": int(ltr.shape[1]), "train_pos": ptr, "val_pos": pva,
                "val_matrix": lva}
    raise BadData(f"{p.dataset} has neither single labels nor a label matrix: kNN needs labels", train.root)


def _plan(p: KNNProtocol, n_train: int, n_val: int) -> dict[str, Any]:
    """The ks to report and the single largest k to search, with a clear error when k exceeds the bank."""
    ks = sorted({int(k) for k in [p.k, *p.ks]})
    if min(ks) < 1:
        raise UserError(f"knn: every k must be >= 1, got {ks}")
    if max(ks) > n_train:
        raise UserError(f"knn: k={max(ks)} is larger than the bank ({n_train} {p.train_split} samples); "
                        f"lower knn.k / knn.ks")
    retrieval = bool(p.retrieval)
    loo = p.retrieval_mode == "leave_one_out"
    bank_n = n_val - 1 if loo else n_train
    depth = p.retrieval_depth
    depth = bank_n if depth in ("all", None) else int(depth)
    rks = sorted({int(k) for k in p.retrieval_ks})
    if retrieval and max([depth, *rks]) > bank_n:
        raise UserError(f"knn: retrieval depth {max([depth, *rks])} is larger than the retrieval bank ({bank_n} "
                        f"candidates); lower knn.retrieval_depth / knn.retrieval_ks")
    depth = max([depth, *rks]) if retrieval else 0
    kmax = max(ks) if (loo or not retrieval) else max(max(ks), depth)
    return {"ks": ks, "kmax": kmax, "retrieval": retrieval, "loo": loo, "depth": depth, "retrieval_ks": rks}


def _target_arrays(targets: dict[str, Any]) -> dict[str, np.ndarray]:
    """The val split's labels, kept with the per-sample outputs (``labels``: the VOC-style matrix)."""
    return {"labels": targets["val_matrix"]} if targets["multilabel"] else {"targets": targets["val"]}


def _metric_outputs(samples: SampleOutputs, metric: str) -> MetricOutputs | None:
    """A metric's per-sample outputs: per-query values (mean) or, multi-label, vote scores (class-mean AP)."""
    if metric not in samples.arrays:
        return None  # index_recall: a property of the search, not of the val samples
    if samples.arrays[metric].ndim == 2:
        return samples.metric("map_sklearn", scores=metric, labels="labels")
    return samples.mean(metric)


def classification_metrics(nb: Neighbours, targets: dict[str, Any], p: KNNProtocol,
                           plan: dict[str, Any], per_sample: dict[str, np.ndarray] | None = None) -> dict[str, float]:
    """Weighted (and majority) kNN metrics for every k in the plan, from one neighbour list (percent). With
    ``per_sample``, each metric's per-query arrays go there under its name: top-n hits (and ``pred``, the top-1
    class at the protocol's k), multi-label vote scores."""
    out: dict[str, float] = {}
    keep = per_sample if per_sample is not None else {}
    temperature = float(p.temperature)
    nc = targets["num_classes"]
    if targets["multilabel"]:
        pos = targets["train_pos"]
        for k in plan["ks"]:
            head = nb.head(k)
            scores = M.multilabel_vote(head.scores, pos[head.ids], temperature)
            m, _ = M.class_mean_ap(scores, targets["val_matrix"])
            if k == int(p.k):
                out["mAP"], keep["mAP"] = 100.0 * m, scores
            out[f"mAP@k{k}"], keep[f"mAP@k{k}"] = 100.0 * m, scores
            if p.majority_vote:
                scores = M.multilabel_vote(head.scores, pos[head.ids], None)
                m, _ = M.class_mean_ap(scores, targets["val_matrix"])
                out[f"majority_mAP@k{k}"], keep[f"majority_mAP@k{k}"] = 100.0 * m, scores
        return out
    ytr, yva = targets["train"], targets["val"]
    tops = [int(t) for t in p.topk if int(t) == 1 or int(t) < nc]

    def put(name: str, hit: np.ndarray) -> None:
        out[name], keep[name] = 100.0 * float(hit.mean()), hit

    for k in plan["ks"]:
        head = nb.head(k)
        labels = ytr[head.ids]
        scores = M.weighted_vote(head.scores, labels, nc, temperature)
        hits = M.topk_hits(scores, yva, tops)
        if k == int(p.k):
            keep["pred"] = np.argmax(scores, axis=1)  # rank_classes' first: the lower class index on ties
            for t in tops:
                put(f"top{t}", hits[t])
        for t in tops:
            put(f"top{t}@k{k}", hits[t])
        if p.majority_vote:
            for t, hit in M.topk_hits(M.majority_vote(labels, nc), yva, tops).items():
                put(f"majority_top{t}@k{k}", hit)
    return out


def retrieval_metrics(nb: Neighbours, queries: np.ndarray, bank: np.ndarray, targets: dict[str, Any],
                      p: KNNProtocol, plan: dict[str, Any], config: SearchConfig,
                      progress: bool, per_sample: dict[str, np.ndarray] | None = None) -> dict[str, float]:
    """Label-sharing retrieval metrics (percent): precision@n, recall@n, mAP over the first D neighbours. With
    ``per_sample``, each metric's per-query values go there under its name (NaN: a query left out of its mean)."""
    depth, loo = plan["depth"], plan["loo"]
    if loo:
        nb = search(queries, queries, depth, config, exclude_self=True, progress=progress, desc="knn retrieval")
    head = nb.head(depth)
    if targets["multilabel"]:
        qpos = targets["val_pos"]
        bpos = qpos if loo else targets["train_pos"]
        rel = M.relevance_multi(qpos, bpos, head.ids)
        nrel = M.num_relevant_multi(qpos, bpos, exclude_self=loo)
    else:
        yq = targets["val"]
        yb = yq if loo else targets["train"]
        rel = M.relevance_single(yq, yb[head.ids])
        nrel = M.num_relevant_single(yq, yb, exclude_self=loo)
    out = {f"retrieval_precision@{n}": 100.0 * v for n, v in M.precision_at_k(rel, plan["retrieval_ks"]).items()}
    out.update({f"retrieval_recall@{n}": 100.0 * v
                for n, v in M.recall_at_k(rel, nrel, plan["retrieval_ks"]).items()})
    out[f"retrieval_mAP@{depth}"] = 100.0 * M.mean_average_precision(rel, nrel)
    if per_sample is not None:
        per_sample.update({f"retrieval_precision@{n}": v
                           for n, v in M.precision_per_query(rel, plan["retrieval_ks"]).items()})
        per_sample.update({f"retrieval_recall@{n}": v
                           for n, v in M.recall_per_query(rel, nrel, plan["retrieval_ks"]).items()})
        per_sample[f"retrieval_mAP@{depth}"] = M.average_precision(rel, nrel)
    return out


task = KNNTask()
