"""The ``goyal19`` semi_supervised protocol beside google-research/simclr: the README's command for fine-tuning the
whole network on 1 % of the ImageNet labels, under ``run.py``'s defaults. Elements that are not protocol fields (the
input normalisation, the head's input) are in docs/tasks/semi_supervised.md."""

from __future__ import annotations

_REPO = "google-research/simclr"
README = f"{_REPO}:README.md"
RUN = f"{_REPO}:run.py"
MODEL = f"{_REPO}:model.py"
MODEL_UTIL = f"{_REPO}:model_util.py"
DATA_UTIL = f"{_REPO}:data_util.py"
LARS = f"{_REPO}:lars_optimizer.py"
RESNET = f"{_REPO}:resnet.py"
SUBSETS = f"{_REPO}:imagenet_subsets/1percent.txt"
OURS = "ours: a setting of this implementation, no effect on the number"

#: field -> (reference value, "repo:path", same / deviation: ... / ours: ...)
CONFORMANCE: dict[str, tuple[str, str, str]] = {
    "dataset": ("--dataset=imagenet2012_subset/1pct --eval_split=validation (TFDS ImageNet-1k)", README, "same"),
    "data_path": ("--data_dir", README, OURS),
    "train_split": ("--train_split train", RUN, "same"),
    "val_split": ("--eval_split=validation", README, "same"),
    "label_fraction": ("1pct: the 12811 images of 1percent.txt (floor of 1 % of 1281167; 811 classes x 13, "
                       "189 x 12)", SUBSETS,
                       "ours: the benchmark's variant (records carry labels=1% or labels=10%); SimCLR publishes "
                       "both, 10percent.txt lists 128116 images"),
    "subset_file": ("the images listed in imagenet_subsets/1percent.txt", README,
                    "ours: the list is read when subset_file names it; without it a seeded class-balanced sample "
                    "of the same size and per-class counts stands in (other images: the records' subset.source "
                    "says which was used)"),
    "subset_seed": ("a fixed list", SUBSETS, "ours: the stand-in sample's seed, unused with subset_file"),
    "epochs": ("--train_epochs=60 for 1 % (README); 30 for 10 % (SimCLRv2 paper)", README, "same"),
    "batch_size": ("--train_batch_size=1024", README, "same"),
    "micro_batch": ("--global_bn=True: BatchNorm statistics over the whole batch (cross-replica mean and variance)",
                    RESNET, "same"),
    "optimizer": ("--optimizer=lars (LARSOptimizer, classic momentum; batch_normalization, bias and "
                  "head_supervised excluded from adaptation and decay)", MODEL_UTIL, "same"),
    "lr": ("--learning_rate=0.005", README, "same"),
    "lr_scaling": ("--learning_rate_scaling=sqrt: 0.005 x sqrt(1024) = 0.16", MODEL_UTIL, "same"),
    "lr_schedule": ("learning_rate_schedule: cosine_decay to 0 over get_train_steps = N x epochs // batch + 1 steps",
                    MODEL_UTIL, "same"),
    "lr_milestones": ("none: a cosine schedule", MODEL_UTIL, "same"),
    "lr_gamma": ("none: a cosine schedule", MODEL_UTIL, "ours: used by lr_schedule=multistep only"),
    "warmup_epochs": ("--warmup_epochs=0", README, "same"),
    "momentum": ("--momentum 0.9", RUN, "same"),
    "nesterov": ("LARSOptimizer(use_nesterov=False) (get_optimizer)", MODEL_UTIL, "same"),
    "lars_eta": ("EETA_DEFAULT = 0.001", LARS, "same"),
    "weight_decay": ("--weight_decay=0", README, "same"),
    "head_lr_mult": ("one learning rate for every variable", MODEL_UTIL, "same"),
    "head_init": ("--zero_init_logits_layer=True: head_supervised's kernel and bias set to zeros", MODEL, "same"),
    "train_augmentation": ("preprocess_for_train(color_distort=False): crop_and_resize (sample_distorted_bounding_box"
                           ", area 0.08-1, aspect 3/4-4/3, min_object_covered 0.1, 100 attempts; resize_bicubic) + "
                           "random_flip_left_right", DATA_UTIL,
                           "deviation: the box is drawn by our sampler with TF's constraints, not TF's kernel, and "
                           "PIL's bicubic filter antialiases where resize_bicubic does not; not measured"),
    "precision": ("float32 (no bfloat16 in the TF code)", RUN, "same"),
    "image_size": ("--image_size=224", README, "same"),
    "resize_mode": ("preprocess_for_eval: the central crop, then resized to 224", DATA_UTIL, "same"),
    "resize": ("CROP_PROPORTION = 0.875 of the shorter side (= 224 of 256)", DATA_UTIL, "same"),
    "interpolation": ("resize_bicubic of the 87.5 % crop (no antialiasing)", DATA_UTIL,
                      "deviation: PIL bicubic (antialiased) resizes the whole image's shorter side to 256, then the "
                      "224 centre is cut: the same region, other resampling; not measured"),
    "topk": ("label_top_1_accuracy, label_top_5_accuracy (metric_fn)", MODEL, "same"),
    "eval_batch_size": ("--eval_batch_size 256", RUN, "ours: evaluation batching, no effect (running BatchNorm "
                                                      "averages)"),
    "workers": ("tf.data AUTOTUNE", f"{_REPO}:data.py", OURS),
}
