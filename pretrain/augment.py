"""View pipelines of the joint-embedding methods (torchvision ``transforms.v2``, on PIL images or tensors).

Each pipeline maps one image to a float RGB tensor in [0, 1]; normalisation / colour-space conversion is
done on the batch by the method (``Method.preprocess``). Presets follow the papers:

- ``simclr`` (Chen et al. 2020, App. A): RandomResizedCrop(0.08-1), flip, colour jitter (0.8, s=1:
  0.8/0.8/0.8/0.2) p=0.8, grayscale p=0.2, Gaussian blur p=0.5 (kernel 10% of the side, sigma 0.1-2).
- ``moco_v1`` (He et al. 2020): crop(0.2-1), grayscale p=0.2, jitter 0.4/0.4/0.4/0.4, flip.
- ``moco_v2`` (Chen et al. 2020): crop(0.2-1), jitter 0.4/0.4/0.4/0.1 p=0.8, grayscale 0.2, blur p=0.5, flip.
- ``byol`` (Grill et al. 2020, Table 6): asymmetric: view 1 blur p=1.0, solarize p=0; view 2 blur p=0.1,
  solarize p=0.2; jitter 0.4/0.4/0.2/0.1 p=0.8, grayscale 0.2, crop(0.08-1), flip.
- ``swav`` multi-crop (Caron et al. 2020): 2 global crops (0.14-1) at the full size + N local crops
  (0.05-0.14) at 96/224 of the size, SimCLR colour distortion and blur.
- ``dino`` multi-crop (Caron et al. 2021, :func:`dino_crops`): 2 global crops (0.4-1), the first always
  blurred, the second blurred p=0.1 and solarized p=0.2, + N local crops (0.05-0.4, blur p=0.5) at 96/224 of
  the size; jitter 0.4/0.4/0.2/0.1 p=0.8, grayscale 0.2, flip.
- ``exemplar`` (Dosovitskiy et al. 2014): heavy crop/scale, rotation, colour and contrast changes.
- ``basic`` (supervised / clustering): RandomResizedCrop + flip. ``center``: resize + centre crop (eval).
- ``cifar_symmetric``, ``cifar_symmetric_weak``, ``cifar_asymmetric``: solo-learn's CIFAR views
  (vturrisi/solo-learn scripts/pretrain/cifar/augmentations/{symmetric,symmetric_weak,asymmetric}.yaml, built by
  solo/data/pretrain_dataloader.py build_transform_pipeline), in :data:`CIFAR_VIEWS`: RandomResizedCrop(0.08-1,
  bicubic), jitter p=0.8, grayscale 0.2, flip, and PIL's blur of sigma 0.1-2.0 px whatever the size.

``gray`` (the presets with colour distortion, ``COLOUR_PRESETS``) sets every view's grayscale probability
(the papers' 0.2): ``evalsuite pretrain --view-gray 1`` removes colour from both views, for data whose
colours are drawn per instance and so tell images apart without saying anything about their class.
``jitter`` scales the same presets' colour-jitter amplitudes (brightness, contrast, saturation, hue; hue
capped at 0.5), as SimCLR's colour strength s does: ``--view-jitter 0.5`` halves them. ``blur`` sets every
view's blur probability (``--view-blur 0``: no blur, as solo-learn's 2021 CIFAR scripts).

The blur's kernel (10% of the side) and sigma range are the papers' at 224 px and scale with the view
size: sigma 0.1-2.0 px at 224 is 0.03-0.57 px at 64, the same blur relative to the image. Unscaled, a
2 px sigma at 64 px (7 at 224) wipes out fine texture. solo-learn's CIFAR views keep PIL's unscaled 0.1-2.0 px
(``blur_px`` of :func:`simclr_view`), as its code does.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torchvision.transforms import v2 as T

from .batch_views import BatchViews, ColourViewSpec


def _tensor() -> list:
    return [T.ToImage(), T.ToDtype(torch.float32, scale=True)]


def blur_sigma(size: int) -> tuple[float, float]:
    """The papers' sigma range (0.1-2.0 px at 224 px) scaled to a view of ``size`` px."""
    return 0.1 * size / 224, 2.0 * size / 224


def blur_kernel(size: int, sigma: tuple[float, float] | None = None) -> tuple[int, tuple[float, float]]:
    """Kernel size and sigma range (px) of the views' blur: the papers' sigma range scaled to the size with a kernel
    of ~10% of the side, or a fixed ``sigma`` range in pixels with a kernel reaching 3 sigma (PIL's blur, as
    solo-learn)."""
    if sigma is None:
        return max(3, int(0.1 * size) // 2 * 2 + 1), blur_sigma(size)  # odd kernel, ~10% of the side
    half = min(math.ceil(3 * sigma[1]), max(1, (size - 1) // 2))  # reflect padding must stay inside the view
    return 2 * half + 1, tuple(sigma)


def _blur(size: int, p: float, sigma: tuple[float, float] | None = None) -> T.Transform:
    k, s = blur_kernel(size, sigma)
    return T.RandomApply([T.GaussianBlur(k, sigma=s)], p=p)


def simclr_view(size: int, scale=(0.08, 1.0), s: float = 1.0, blur: float = 0.5, solarize: float = 0.0,
                jitter=(0.8, 0.8, 0.8, 0.2), gray: float = 0.2, interpolation: str = "bilinear",
                blur_px: tuple[float, float] | None = None) -> T.Compose:
    """Crop, flip, colour jitter (p=0.8, amplitudes ``jitter`` x ``s``), grayscale, blur, solarize; the crop
    resamples with ``interpolation`` and the blur's sigma is ``blur_px`` px (None: the papers' scaled range).
    The pipeline carries its parameters as ``.spec`` (a :class:`pretrain.batch_views.ColourViewSpec`), from which
    the batched views draw the same view for a whole batch."""
    b, c, sat, hue = (j * s for j in jitter)
    crop = T.RandomResizedCrop(size, scale=scale, interpolation=T.InterpolationMode(interpolation), antialias=True)
    ops = [crop, T.RandomHorizontalFlip(),
           T.RandomApply([T.ColorJitter(b, c, sat, min(hue, 0.5))], p=0.8), T.RandomGrayscale(p=gray)]
    if blur > 0:
        ops.append(_blur(size, blur, blur_px))
    ops += _tensor()
    if solarize > 0:
        ops.append(T.RandomSolarize(threshold=0.5, p=solarize))
    pipeline = T.Compose(ops)
    kernel, sigma = blur_kernel(size, blur_px)
    pipeline.spec = ColourViewSpec(size=size, scale=tuple(scale), jitter=(b, c, sat, min(hue, 0.5)), gray=gray,
                                   blur=blur, blur_kernel=kernel, blur_sigma=sigma, solarize=solarize,
                                   interpolation=interpolation)
    return pipeline


def basic_view(size: int, scale=(0.08, 1.0)) -> T.Compose:
    return T.Compose([T.RandomResizedCrop(size, scale=scale, antialias=True), T.RandomHorizontalFlip(), *_tensor()])


def resized_crop_view(size: int, resize: int, flip: bool = True) -> T.Compose:
    """Resize to ``resize`` x ``resize`` (the aspect ratio is not kept), a random ``size`` crop, a flip: CPC's image
    view (van den Oord et al. 2018, Sec. 3.2: 256 px crops of a 300 x 300 image; Henaff et al. 2020: 260 of 300)."""
    ops = [T.Resize((resize, resize), antialias=True), T.RandomCrop(size)]
    return T.Compose([*ops, *([T.RandomHorizontalFlip()] if flip else []), *_tensor()])


def center_view(size: int) -> T.Compose:
    return T.Compose([T.Resize(int(round(size * 256 / 224)), antialias=True), T.CenterCrop(size), *_tensor()])


class ViewTransform:
    """Applies one pipeline per view: ``image -> [view_0, view_1, ...]``."""

    def __init__(self, pipelines: Sequence[Callable], name: str = "custom"):
        self.pipelines = list(pipelines)
        self.name = name

    def __call__(self, image) -> list[torch.Tensor]:
        return [p(image) for p in self.pipelines]

    def __len__(self) -> int:
        return len(self.pipelines)

    def describe(self) -> dict:
        return {"preset": self.name, "views": [repr(p) for p in self.pipelines]}

    def batched(self) -> BatchViews | None:
        """The same views drawn for a whole batch (:mod:`pretrain.batch_views`), or None when a pipeline is not a
        colour-distortion view or a subclass applies them its own way."""
        specs = [getattr(p, "spec", None) for p in self.pipelines]
        if type(self).__call__ is not ViewTransform.__call__ or any(s is None for s in specs):
            return None  # a subclass that combines its pipelines its own way (multitask), or a non-colour view
        return BatchViews(specs, self.name, [repr(p) for p in self.pipelines])


def multi_crop(size: int, n_global: int = 2, n_local: int = 6, local_size: int | None = None,
               global_scale=(0.14, 1.0), local_scale=(0.05, 0.14), gray: float = 0.2,
               jitter: float = 1.0, blur: float = 0.5, scale: float | None = None) -> ViewTransform:
    """SwAV multi-crop: ``n_global`` crops at ``size`` and ``n_local`` at ``local_size`` (default 96/224);
    ``gray``, ``jitter`` (colour strength s), ``blur`` and ``scale`` (the global crops') as in :func:`preset`."""
    local_size = local_size or max(8, int(round(size * 96 / 224)))
    global_scale = global_scale if scale is None else (scale, global_scale[1])
    common = dict(gray=gray, s=jitter, blur=blur)
    views = [simclr_view(size, scale=global_scale, **common) for _ in range(n_global)]
    views += [simclr_view(local_size, scale=local_scale, **common) for _ in range(n_local)]
    return ViewTransform(views, f"multicrop({n_global}x{size}+{n_local}x{local_size})")


def dino_crops(size: int, n_local: int = 8, local_size: int | None = None, global_scale=(0.4, 1.0),
               local_scale=(0.05, 0.4), gray: float = 0.2, jitter: float = 1.0,
               blur: float | None = None, scale: float | None = None) -> ViewTransform:
    """DINO's multi-crop (dino main_dino.py, DataAugmentationDINO): two global crops at ``size``, ``n_local``
    local crops at ``local_size`` (default 96/224 of the size); ``gray``, ``jitter``, ``blur`` (None: DINO's
    1.0 / 0.1 / 0.5 for the first, second and local crops) and ``scale`` (the global crops') as in :func:`preset`."""
    local_size = local_size or max(8, int(round(size * 96 / 224)))
    global_scale = global_scale if scale is None else (scale, global_scale[1])
    common = dict(jitter=(0.4, 0.4, 0.2, 0.1), gray=gray, s=jitter)
    b1, b2, bl = (1.0, 0.1, 0.5) if blur is None else (blur,) * 3
    views = [simclr_view(size, scale=global_scale, blur=b1, **common),
             simclr_view(size, scale=global_scale, blur=b2, solarize=0.2, **common)]
    views += [simclr_view(local_size, scale=local_scale, blur=bl, **common) for _ in range(n_local)]
    return ViewTransform(views, f"dino(2x{size}+{n_local}x{local_size})")


@dataclass(frozen=True)
class CifarView:
    """One view of a solo-learn CIFAR augmentation file (its YAML fields; colour jitter at p=0.8, flip p=0.5)."""

    jitter: tuple[float, float, float, float]  # brightness, contrast, saturation, hue
    blur: float  # gaussian_blur.prob (PIL's blur, sigma 0.1-2.0 px)
    solarize: float  # solarization.prob
    scale: tuple[float, float] = (0.08, 1.0)  # rrc crop_min_scale, crop_max_scale
    gray: float = 0.2  # grayscale.prob


#: solo-learn's CIFAR views (vturrisi/solo-learn@9187ea3 scripts/pretrain/cifar/augmentations/*.yaml), one
#: CifarView per view; crop_size 32 is the trainer's --image-size
CIFAR_VIEWS: dict[str, tuple[CifarView, ...]] = {
    # symmetric.yaml: SimCLR, SwAV
    "cifar_symmetric": (CifarView((0.8, 0.8, 0.8, 0.2), blur=0.5, solarize=0.0),) * 2,
    # symmetric_weak.yaml: MoCo v2+, SimSiam
    "cifar_symmetric_weak": (CifarView((0.4, 0.4, 0.4, 0.1), blur=0.5, solarize=0.0),) * 2,
    # asymmetric.yaml: BYOL, Barlow Twins, DINO
    "cifar_asymmetric": (CifarView((0.4, 0.4, 0.2, 0.1), blur=0.0, solarize=0.0),
                         CifarView((0.4, 0.4, 0.2, 0.1), blur=0.0, solarize=0.2)),
}
#: solo-learn's GaussianBlur (solo/data/pretrain_dataloader.py): PIL's blur of radius ~U(0.1, 2.0) px at any size
SOLO_BLUR_PX = (0.1, 2.0)


def cifar_view(size: int, view: CifarView, gray: float | None = None, s: float = 1.0,
               blur: float | None = None, scale: float | None = None) -> T.Compose:
    """One solo-learn CIFAR view: RandomResizedCrop (bicubic), flip, jitter, grayscale, blur, solarize; ``scale``
    replaces the crop's smallest area fraction."""
    crop = view.scale if scale is None else (scale, view.scale[1])
    return simclr_view(size, scale=crop, s=s, jitter=view.jitter, solarize=view.solarize,
                       blur=view.blur if blur is None else blur, gray=view.gray if gray is None else gray,
                       interpolation="bicubic", blur_px=SOLO_BLUR_PX)


def preset(name: str, size: int, n_views: int = 2, gray: float | None = None, jitter: float | None = None,
           blur: float | None = None, scale: float | None = None, **kw) -> ViewTransform:
    """The named augmentation preset with ``n_views`` views (multi-crop presets use their own counts);
    ``gray`` replaces the grayscale probability of the colour-distortion presets, ``jitter`` scales their
    colour-jitter amplitudes (SimCLR's strength s: 1 = the paper's, 0.5 = half), ``blur`` replaces their blur
    probability and ``scale`` the smallest area fraction of their (global) crops, and of ``basic``'s crop."""
    from evalsuite.errors import UserError

    for opt, value in zip(VIEW_OPTIONS, (gray, jitter, blur, scale)):
        if value is not None and opt not in preset_options(name):
            takes = [p for p in PRESETS if opt in preset_options(p)]
            raise UserError(f"augmentation preset {name!r} has no colour step; view {opt} applies to "
                            + (f"{', '.join(takes[:-1])} and {takes[-1]}" if len(takes) > 1 else takes[0]))
    g = {} if gray is None else {"gray": float(gray)}
    if blur is not None:
        g["blur"] = float(blur)
    crop = {} if scale is None else {"scale": (float(scale), 1.0)}
    if name == "swav":
        return multi_crop(size, **g, **({} if jitter is None else {"jitter": float(jitter)}), scale=scale, **kw)
    if jitter is not None:
        g["s"] = float(jitter)
    if name in CIFAR_VIEWS:
        specs = CIFAR_VIEWS[name]
        return ViewTransform([cifar_view(size, specs[i % len(specs)], scale=scale, **g) for i in range(n_views)],
                             name)
    if name == "simclr":
        one = lambda: simclr_view(size, **{**crop, **g})
    elif name == "moco_v1":
        one = lambda: simclr_view(size, jitter=(0.4, 0.4, 0.4, 0.4), **{"scale": (0.2, 1.0), "blur": 0.0, **crop, **g})
    elif name == "moco_v2":
        one = lambda: simclr_view(size, jitter=(0.4, 0.4, 0.4, 0.1), **{"scale": (0.2, 1.0), **crop, **g})
    elif name == "byol":
        kinds = [dict(blur=1.0, solarize=0.0), dict(blur=0.1, solarize=0.2)]
        views = [simclr_view(size, jitter=(0.4, 0.4, 0.2, 0.1), **{**kinds[i % 2], **crop, **g})
                 for i in range(n_views)]
        return ViewTransform(views, name)
    elif name == "exemplar":
        one = lambda: T.Compose([T.RandomResizedCrop(size, scale=(0.3, 1.0), ratio=(0.7, 1.4), antialias=True),
                                 T.RandomHorizontalFlip(), T.RandomRotation(20),
                                 T.RandomApply([T.ColorJitter(0.6, 0.6, 0.6, 0.1)], p=0.9), *_tensor()])
    elif name == "basic":
        one = lambda: basic_view(size, **crop)
    elif name == "center":
        one = lambda: center_view(size)
    else:
        raise UserError(f"unknown augmentation preset {name!r}; known: {', '.join(PRESETS)}")
    return ViewTransform([one() for _ in range(n_views)], name)


PRESETS = ("simclr", "moco_v1", "moco_v2", "byol", "swav", *CIFAR_VIEWS, "exemplar", "basic", "center")
#: the view options of :func:`preset` (the trainer's ``--view-gray / -jitter / -blur / -scale``)
VIEW_OPTIONS = ("gray", "jitter", "blur", "scale")
COLOUR_PRESETS = ("simclr", "moco_v1", "moco_v2", "byol", "swav", *CIFAR_VIEWS)


def preset_options(name: str) -> tuple[str, ...]:
    """The view options preset ``name`` takes: all with colour distortion, the crop's bound alone with ``basic``."""
    return VIEW_OPTIONS if name in COLOUR_PRESETS else ("scale",) if name == "basic" else ()
