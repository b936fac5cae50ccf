"""The ``goyal19`` surface_normals protocol beside the code Goyal et al. 2019 used for NYUv2 normals,
imisra/semantic-segmentation-pytorch (README_normals.md); elements that are not protocol fields (initialisation,
label padding, one device instead of 8 GPUs) are in docs/tasks/surface_normals.md."""

from __future__ import annotations

_REPO = "imisra/semantic-segmentation-pytorch"
TRAIN_SH = f"{_REPO}:scripts/train_finetune_models.sh"
TRAIN = f"{_REPO}:train_generic.py"
DATASET = f"{_REPO}:dataset_generic.py"
EVAL = f"{_REPO}:eval_generic.py"
MODELS = f"{_REPO}:models/models.py"
NORMALS_EVAL = f"{_REPO}:normals_evaluation_utils.py"
LABELS = f"{_REPO}:make_SN_labels.py"
README = f"{_REPO}:README_normals.md"
BATCHNORM = f"{_REPO}:lib/nn/modules/batchnorm.py"

#: field -> (reference value, "repo:path", same / deviation: ... / ours: ...)
CONFORMANCE: dict[str, tuple[str, str, str]] = {
    "dataset": ("NYUv2 with Ladicky et al.'s normals (--dataset nyuv2sn40)", TRAIN_SH, "same"),
    "data_path": ("NYU_ROOT_DIR, hard-coded", DATASET, "ours: where the reader looks; no effect on the numbers"),
    "train_split": ("train_SN40.json: the official 795 images", LABELS, "same"),
    "test_split": ("test_SN40.json: the official 654 images", LABELS, "same"),
    "freeze_through": ("--freeze_until layer3: conv1, bn1, layer1..layer3 frozen", TRAIN_SH, "same"),
    "output_stride": ("ptresnet50dilated, dilate_scale=8", MODELS, "same"),
    "head": ("--arch_decoder ppm (PSPNet's pyramid pooling)", TRAIN_SH, "same"),
    "head_channels": ("512 (PPM conv_last)", MODELS, "same"),
    "psp_bins": ("pool_scales=(1, 2, 3, 6)", MODELS, "same"),
    "dropout": ("Dropout2d(0.1)", MODELS, "same"),
    "target": ("per-pixel classification into the codebook, NLLLoss of log_softmax", TRAIN, "same"),
    "codebook_size": ("40 (nyuv2sn40, vocab40.mat)", DATASET, "same"),
    "codebook_decode": ("softmax-weighted sum of the codebook, renormalised (convert_discrete_to_continuous)",
                        NORMALS_EVAL, "same"),
    "codebook_file": ("vocab40.mat of Wang et al. (nyuv2_surfacenormal_metadata.zip)", README,
                      "deviation: without the file (default) the codebook is our k-means on the training normals, "
                      "recorded as codebook_source 'kmeans'; not measured (vocab40.mat is not available here)"),
    "codebook_samples": ("none: the codebook is given", README,
                         "ours: k-means sample size, used only without codebook_file"),
    "codebook_iters": ("none: the codebook is given", README,
                       "ours: k-means iterations, used only without codebook_file"),
    "train_short_sides": ("--imgSize 300 375 450 525 600, one drawn per GPU's sub-batch", TRAIN, "same"),
    "test_short_side": ("--imgSize 450", EVAL, "same"),
    "max_long_side": ("--imgMaxSize 1000", TRAIN, "same"),
    "size_multiple": ("--padding_constant 8, --segm_downsampling_rate 8", TRAIN, "same"),
    "epochs": ("--num_epoch 400", TRAIN_SH, "same"),
    "iters_per_epoch": ("--epoch_iters 50", TRAIN_SH, "same"),
    "batch_size": ("16: --batch_size_per_gpu 2 on 8 GPUs (--gpus 0-7)", TRAIN, "same"),
    "lr": ("--lr_encoder 2e-2, --lr_decoder 2e-2", TRAIN, "same"),
    "lr_policy": ("poly, set after every iteration (adjust_learning_rate)", TRAIN, "same"),
    "lr_power": ("--lr_pow 0.9", TRAIN, "same"),
    "momentum": ("--beta1 0.9 (SGD momentum)", TRAIN, "same"),
    "weight_decay": ("--weight_decay 1e-4 on conv weights only (group_weight)", TRAIN, "same"),
    "bn_momentum": ("SynchronizedBatchNorm2d momentum 0.001, bias-corrected running average", BATCHNORM, "same"),
    "eval_batch_size": ("1 (batchsize = 1)", EVAL,
                        "ours: test images of one size go through together; no effect (BatchNorm in eval mode)"),
    "cache_frozen_max_gb": ("none: every iteration runs the whole trunk", TRAIN,
                            "ours: the frozen stages' outputs are reused when they fit; identical numbers (tested)"),
    "unit_tolerance": ("none: every normal is renormalised (normalize_rows_matrix)", NORMALS_EVAL,
                       "ours: ground truth further than this from unit length is refused, the rest renormalised"),
}
