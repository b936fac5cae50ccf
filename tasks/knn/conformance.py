"""The ``goyal19`` and ``dino21`` knn protocols beside DINO's ``eval_knn.py`` (Caron et al. 2021), the weighted kNN
both follow (``dino21`` as DINO runs it: ImageNet, the network's output, weighted votes only); and the centroid
sanity task, which no paper defines (every row ``ours``). Elements that are not protocol fields (the extraction
precision, the transform's colour handling) are in docs/tasks/knn.md."""

from __future__ import annotations

DINO = "facebookresearch/dino:eval_knn.py"
DINO_VIT = "facebookresearch/dino:vision_transformer.py"

_APPROX = "ours: approximate-index setting, unused by the exact (flat) search of goyal19"
_RETRIEVAL = "ours: DINO's eval_knn.py reports classification only; retrieval metrics are extra records"

#: field -> (reference value, "repo:path", same / deviation: ... / ours: ...)
CONFORMANCE: dict[str, tuple[str, str, str]] = {
    "dataset": ("ImageFolder of data_path/train and data_path/val (ImageNet)", DINO, "same"),
    "data_path": ("--data_path", DINO, "ours: where the reader looks; no effect on the numbers"),
    "train_split": ("train", DINO, "same"),
    "val_split": ("val", DINO, "same"),
    "layers": ("the network's output: a ResNet-50 with fc = nn.Identity(), i.e. res5 globally average-pooled",
               DINO, "ours: conv1..res4 are extra rows; the res5 row is DINO's number"),
    "pooling": ("torchvision ResNet avgpool (global average) before the removed fc", DINO, "same"),
    "image_size": ("CenterCrop(224)", DINO, "same"),
    "resize_mode": ("Resize(256) then CenterCrop(224)", DINO, "same"),
    "resize": ("Resize(256): the shorter side to 256", DINO, "same"),
    "interpolation": ("Resize(256, interpolation=3): PIL bicubic", DINO, "same"),
    "normalize": ("nn.functional.normalize(features, dim=1, p=2)", DINO, "same"),
    "metric": ("torch.mm(features, train_features): cosine on normalised features", DINO, "same"),
    "k": ("nb_knn 20 (the reported 20-NN)", DINO, "same"),
    "temperature": ("--temperature 0.07; votes weighted exp(sim / T)", DINO, "same"),
    "ks": ("--nb_knn 10 20 100 200", DINO, "same"),
    "topk": ("top-1 and top-5 (correct.narrow(1, 0, min(5, k)))", DINO, "same"),
    "majority_vote": ("weighted vote only", DINO, "ours: extra majority-vote records; the weighted ones are DINO's"),
    **dict.fromkeys(("retrieval", "retrieval_mode", "retrieval_ks", "retrieval_depth"),
                    ("no retrieval", DINO, _RETRIEVAL)),
    "index": ("exact: similarity.topk over the whole bank", DINO, "same"),
    "chunk_size": ("queries in 100 chunks", DINO, "ours: batching of the exact search; no effect on the neighbours"),
    **dict.fromkeys(("nlist", "nprobe", "ivf_train_size", "hnsw_m", "ef_construction", "ef_search",
                     "recall_queries"),
                    ("exact search", DINO, _APPROX)),
    "use_gpu": ("--use_cuda True: features and search on the GPU", DINO,
                "ours: where the exact search runs; no effect beyond float summation order"),
}

#: dino21: goyal19's rows, except where the preset runs eval_knn.py as it is instead of adding rows of ours
DINO21_CONFORMANCE: dict[str, tuple[str, str, str]] = {
    **CONFORMANCE,
    "dataset": ("ImageFolder of data_path/train and data_path/val: ImageNet", DINO, "same"),
    "layers": ("the network's output model(samples): a ResNet's avgpool (fc = nn.Identity()); a ViT's [CLS] of the "
               "last block after the final norm (VisionTransformer.forward: self.norm(x)[:, 0]). Ours: res5; a ViT "
               "has no res5, so the tap rule evaluates its last block (DINO's number) and last4 (an extra row)",
               f"{DINO}, {DINO_VIT}", "same"),
    "pooling": ("ResNet: avgpool (global average); ViT: the [CLS] token (avg on a ViT reads the [CLS])",
                f"{DINO}, {DINO_VIT}", "same"),
    "majority_vote": ("weighted vote only", DINO, "same"),
    "retrieval": ("no retrieval", DINO, "same"),
    **dict.fromkeys(("retrieval_mode", "retrieval_ks", "retrieval_depth"),
                    ("no retrieval", DINO, "ours: unused (retrieval is off)")),
}

_SANITY = "ours: the centroid task is the suite's sanity check, not a published protocol"

#: the centroid task's table (it shares this package with knn, so the task names it as its ``conformance``)
CENTROID_CONFORMANCE: dict[str, tuple[str, str, str]] = {
    name: ("no published protocol", "", _SANITY)
    for name in ("dataset", "data_path", "train_split", "test_split", "layers", "pooling", "image_size",
                 "resize_mode", "resize", "interpolation")
}
