"""The ``goyal19`` spectrum protocol beside the papers that define its metrics: RankMe (Garrido et al. 2023), alpha-ReQ
(Agrawal et al. 2022, the authors' code in arnab39/reptrix) and alignment / uniformity (Wang & Isola 2020,
SsnL/align_uniform). None of them fixes a dataset, tap or image transform for a frozen-feature benchmark: those rows
are ``ours``."""

from __future__ import annotations

RANKME = "Garrido et al. 2023, RankMe (ICML), Eq. 1-2"
REPTRIX = "arnab39/reptrix:reptrix/alpha.py, reptrix/utils.py"
ALIGN_UNIFORM = "SsnL/align_uniform:align_uniform/__init__.py"

_OURS_DATA = "ours: the papers evaluate on their own training data; any dataset the suite reads"

#: field -> (reference value, "repo:path" or paper, same / deviation: ... / ours: ...)
CONFORMANCE: dict[str, tuple[str, str, str]] = {
    "dataset": ("ImageNet training images (RankMe)", RANKME, _OURS_DATA),
    "data_path": ("", "", "ours: where the reader looks; no effect on the numbers"),
    "train_split": ("the training set", RANKME, "same"),
    "num_images": ("25,600 images", RANKME, "same"),
    "layers": ("the representation (a ResNet's pooled res5) or the projector's embedding", RANKME,
               "ours: every tap of the trunk, one record each; the res5 row is RankMe's representation"),
    "pooling": ("global average pooling before the head", RANKME, "same"),
    "image_size": ("not specified", RANKME, "ours: 224, the centre crop of DINO's kNN transform"),
    "resize_mode": ("not specified", RANKME, "ours: the shorter side resized, then the centre crop"),
    "resize": ("not specified", RANKME, "ours: 256, as DINO's kNN"),
    "interpolation": ("not specified", RANKME, "ours: bilinear"),
    "rankme_eps": ("1e-7 (float32)", RANKME, "same"),
    "alpha_fit_start": ("fit_range np.arange(10, 100): first index 10", REPTRIX, "same"),
    "alpha_fit_stop": ("fit_range np.arange(10, 100): last index 99 (ours: clipped to the min(N - 1, D) non-zero "
                       "eigenvalues when there are fewer)", REPTRIX, "same"),
    "uniformity_t": ("uniform_loss(x, t=2)", ALIGN_UNIFORM, "same"),
    "uniformity_images": ("the pairs of a batch", ALIGN_UNIFORM,
                          "ours: the pairs of a seeded 4,096-image sample of the 25,600 (all of them cost N^2 x D)"),
    "alignment_alpha": ("align_loss(x, y, alpha=2)", ALIGN_UNIFORM, "same"),
    "alignment_view": ("two augmentations of the training recipe (random crop, colour jitter, grey, flip)",
                       ALIGN_UNIFORM, "ours: a deterministic second view (hflip: the mirrored image), so the number "
                                      "does not depend on the pretraining recipe"),
}
