"""The ``goyal19`` places205_linear protocol beside fair_self_supervision_benchmark's ResNet-50 Places205 linear
benchmark (the Caffe2 code Goyal et al. 2019 ran); elements that are not protocol fields (image decoding and
resizing, shuffling, the heads fair_ssb trains but no table reports) are in docs/tasks/places205_linear.md."""

from __future__ import annotations

_REPO = "facebookresearch/fair_self_supervision_benchmark"
CONFIG = f"{_REPO}:configs/benchmark_tasks/image_classification/places205/resnet50_supervised_finetune_linear.yaml"
DEFAULTS = f"{_REPO}:self_supervision_benchmark/core/config.py"
CATALOG = f"{_REPO}:self_supervision_benchmark/data/dataset_catalog.py"
DATA_INPUT = f"{_REPO}:self_supervision_benchmark/data/data_input.py"
DATA_TRANSFORMATION = f"{_REPO}:self_supervision_benchmark/data/data_transformation.py"
MODEL = f"{_REPO}:self_supervision_benchmark/modeling/supervised/resnet_supervised_finetune_linear.py"
BUILDER = f"{_REPO}:self_supervision_benchmark/modeling/model_builder.py"

#: the measured effect of the schedule deviation (benchmarks/fidelity/linear.py; see the docs page)
SCHEDULE_EFFECT = ("14 epochs stepped at 4/8/12 (VISSL's port) instead of 14.63 stepped at 4.18/8.36/12.54, 4.3% "
                   "fewer iterations; measured, random ResNet-18, per tap fair_ssb's minus ours: synthetic Places "
                   "-1.0 to +1.7 top-1 points (3 seeds, spread 0.6-3.0), CIFAR-10 dev photos -0.7 to +1.6 "
                   "(2 seeds): within the seed-to-seed spread")

#: field -> (reference value, "repo:path", same / deviation: ... / ours: ...)
CONFORMANCE: dict[str, tuple[str, str, str]] = {
    "dataset": ("DATASET: places205", CONFIG, "same"),
    "data_path": ("data and label files named in the dataset catalog", CATALOG,
                  "ours: where the reader looks; no effect on the numbers"),
    "train_split": ("TRAIN.DATA_TYPE: train", CONFIG, "same"),
    "val_split": ("TEST.DATA_TYPE: val", CONFIG, "same"),
    "layers": ("heads on conv1, pool1, res2..res5, pool5; the paper's tables report conv1, res2..res5", MODEL, "same"),
    "pooling": ("AveragePool kernel/stride/pad per tap: conv1 10/10/4, res2 16/8/0, res3 13/5/0, res4 8/3/0, "
                "res5 6/1/0", MODEL, "same"),
    "image_size": ("TRAIN.CROP_SIZE / TEST.CROP_SIZE: 224", DEFAULTS, "same"),
    "resize_mode": ("val: shorter side scaled, then the centre crop (transform_image)", DATA_INPUT, "same"),
    "resize": ("TEST.SCALE: 256", DEFAULTS, "same"),
    "interpolation": ("cv2.resize INTER_LINEAR on float pixels, no antialiasing (scale)", DATA_TRANSFORMATION, "same"),
    "train_views": ("every training image is loaded and augmented again at every iteration", DATA_INPUT, "same"),
    "augmented_views": ("a fresh random view of every image in every epoch (ours: one cached view per epoch, "
                        "14 for 14 epochs)", DATA_INPUT, "same"),
    "train_augmentation": ("DATA_TRANSFORMS [random_sized_crop, horizontal_flip]; DATA_PROCESSING [color_jitter "
                           "0.4/0.4/0.4, lighting 0.1, color_normalization]", CONFIG, "same"),
    "epochs": ("SOLVER.NUM_ITERATIONS 140000 x TRAIN.BATCH_SIZE 256 = 14.63 epochs of 2,448,873 images", CONFIG,
               f"deviation: {SCHEDULE_EFFECT}"),
    "batch_size": ("TRAIN.BATCH_SIZE: 256", CONFIG, "same"),
    "lr": ("SOLVER.BASE_LR: 0.01", CONFIG, "same"),
    "lr_milestones": ("SOLVER.STEP_SIZES [40000, 40000, 40000]: epochs 4.18, 8.36, 12.54", CONFIG,
                      f"deviation: {SCHEDULE_EFFECT}"),
    "lr_gamma": ("SOLVER.GAMMA: 0.1", CONFIG, "same"),
    "momentum": ("SOLVER.MOMENTUM: 0.9", CONFIG, "same"),
    "nesterov": ("SOLVER.NESTEROV: True", CONFIG, "same"),
    "weight_decay": ("SOLVER.WEIGHT_DECAY 1e-4 on the FC weight and bias (NO_BIAS_DECAY: False)", BUILDER, "same"),
    "bn": ("SpatialBN on the pooled C x g x g map: statistics per channel", MODEL, "same"),
    "bn_eps": ("MODEL.BN_EPSILON: 1.0000001e-5", CONFIG, "same"),
    "bn_momentum": ("MODEL.BN_MOMENTUM: 0.9 (Caffe2: running = 0.9 running + 0.1 batch = PyTorch's 0.1)", CONFIG,
                    "same"),
    "bn_affine": ("MODEL.BN_NO_SCALE_SHIFT: True (scale 1, shift 0, never updated)", BUILDER, "same"),
    "init": ("FC weight_init GaussianFill, bias_init ConstantFill 0", MODEL, "same"),
    "init_std": ("MODEL.FC_INIT_STD: 0.01", CONFIG, "same"),
    "topk": ("METRICS.TYPE: topk (top-1, top-5)", DEFAULTS, "same"),
}
