"""Colour-distortion views drawn for a whole batch at once, on the batch's device (CPU or GPU).

The per-image pipelines of :mod:`pretrain.augment` cost ~1.4 ms per 32 px view on one CPU thread (PIL and
``transforms.v2`` per image), as much as a small trunk's training step. :class:`BatchViews` applies the same
views, with the same random-parameter semantics as torchvision, to a uint8 batch of equal-size images in tensor
operations:

- RandomResizedCrop: torchvision's 10 tries of area x aspect ratio (log-uniform), first fit wins, else the
  centre crop clamped to the ratio range; integer boxes; resampled by ``roi_align`` (bilinear, averaging
  ceil(box / size) samples per output pixel when shrinking, like an antialiased resize). Bicubic specs are
  resampled bilinearly too (recorded in :meth:`BatchViews.describe`);
- flip p=0.5; ColorJitter with probability ``p_jitter``: brightness, contrast, saturation, hue, each factor
  uniform in torchvision's ranges, applied in a random order drawn per image (as ``ColorJitter`` does per call);
  hue through HSV; grayscale (ITU-R 601-2 luma, torchvision's weights); Gaussian blur with a sigma drawn per
  image (reflect padding, the pipeline's kernel size); solarize at 0.5.

Random parameters come from a CPU ``torch.Generator`` seeded per (seed, epoch, step, rank), so a batch is the same
on every run and after a resume, on any device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale
CROP_TRIES = 10  # torchvision RandomResizedCrop.get_params


@dataclass(frozen=True)
class ColourViewSpec:
    """The parameters of one colour-distortion view (what :func:`pretrain.augment.simclr_view` builds)."""

    size: int
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    jitter: tuple[float, float, float, float] = (0.8, 0.8, 0.8, 0.2)  # brightness, contrast, saturation, hue
    p_jitter: float = 0.8
    gray: float = 0.2
    blur: float = 0.0
    blur_kernel: int = 3
    blur_sigma: tuple[float, float] = (0.1, 2.0)  # px
    solarize: float = 0.0
    interpolation: str = "bilinear"


def _uniform(n: int, lo: float, hi: float, gen: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=gen, dtype=torch.float64) * (hi - lo) + lo


def crop_boxes(n: int, height: int, width: int, scale: Sequence[float], ratio: Sequence[float],
               gen: torch.Generator) -> torch.Tensor:
    """(n, 4) integer boxes (x0, y0, x1, y1) drawn as torchvision's ``RandomResizedCrop.get_params`` draws one."""
    area = height * width
    target = area * _uniform(n * CROP_TRIES, scale[0], scale[1], gen).view(CROP_TRIES, n)
    aspect = _uniform(n * CROP_TRIES, math.log(ratio[0]), math.log(ratio[1]), gen).view(CROP_TRIES, n).exp()
    w = (target * aspect).sqrt().round()
    h = (target / aspect).sqrt().round()
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = ok.to(torch.int8).argmax(0)  # the first try that fits
    found = ok.any(0)
    w, h = w.gather(0, first[None])[0], h.gather(0, first[None])[0]
    # no try fits: the whole image, clamped to the ratio range, centred
    in_ratio = width / height
    if in_ratio < min(ratio):
        fw, fh = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        fw, fh = round(height * max(ratio)), height
    else:
        fw, fh = width, height
    w = torch.where(found, w, torch.full_like(w, fw))
    h = torch.where(found, h, torch.full_like(h, fh))
    # torch.randint(0, H - h + 1) per image
    y0 = (torch.rand(n, generator=gen, dtype=torch.float64) * (height - h + 1)).floor()
    x0 = (torch.rand(n, generator=gen, dtype=torch.float64) * (width - w + 1)).floor()
    y0 = torch.where(found, y0, ((height - h) / 2).round())
    x0 = torch.where(found, x0, ((width - w) / 2).round())
    return torch.stack([x0, y0, x0 + w, y0 + h], dim=1)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) -> (N, 1, H, W) luma."""
    r, g, b = x.unbind(1)
    return (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b).unsqueeze(1)


def _blend(a: torch.Tensor, b: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (factor * a + (1 - factor) * b).clamp(0, 1)


def rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    maxc, minc = x.amax(1), x.amin(1)
    eq = maxc == minc
    cr = maxc - minc
    ones = torch.ones_like(maxc)
    s = cr / torch.where(eq, ones, maxc)
    div = torch.where(eq, ones, cr)
    rc, gc, bc = (maxc - r) / div, (maxc - g) / div, (maxc - b) / div
    h = ((maxc == r) * (bc - gc) + ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
         + ((maxc != g) & (maxc != r)) * (4.0 + gc - rc))
    return torch.stack([torch.fmod(h / 6.0 + 1.0, 1.0), s, maxc], dim=1)


def hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    h, s, v = x.unbind(1)
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.to(torch.int64) % 6
    p, q, t = (v * (1 - s)).clamp(0, 1), (v * (1 - s * f)).clamp(0, 1), (v * (1 - s * (1 - f))).clamp(0, 1)
    table = torch.stack([torch.stack(c, 1) for c in ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v),
                                                      (v, p, q))], 0)  # (6, N, 3, H, W)
    return table.gather(0, i[None, :, None].expand(1, -1, 3, -1, -1))[0]


def adjust(x: torch.Tensor, op: int, factor: torch.Tensor) -> torch.Tensor:
    """One ColorJitter op on (n, 3, H, W): 0 brightness, 1 contrast, 2 saturation (factors), 3 hue (shift)."""
    f = factor.view(-1, 1, 1, 1).to(x.dtype)
    if op == 0:
        return (x * f).clamp(0, 1)
    if op == 1:
        return _blend(x, grayscale(x).mean(dim=(1, 2, 3), keepdim=True), f)
    if op == 2:
        return _blend(x, grayscale(x), f)
    hsv = rgb_to_hsv(x)
    hsv = torch.cat([torch.remainder(hsv[:, :1] + f, 1.0), hsv[:, 1:]], dim=1)
    return hsv_to_rgb(hsv)


def colour_jitter(x: torch.Tensor, amplitudes: Sequence[float], gen: torch.Generator) -> torch.Tensor:
    """torchvision ColorJitter on every image of x, each with its own factors and op order."""
    n = x.shape[0]
    b, c, s, h = amplitudes
    factors = [_uniform(n, max(0.0, 1 - a), 1 + a, gen) for a in (b, c, s)] + [_uniform(n, -h, h, gen)]
    order = torch.rand(n, 4, generator=gen).argsort(dim=1)  # a random permutation per image
    active = [a > 0 for a in (b, c, s, h)]
    for k in range(4):
        for op in range(4):
            if not active[op]:
                continue
            sel = (order[:, k] == op).nonzero().flatten()
            if len(sel):
                idx = sel.to(x.device)
                x = x.index_copy(0, idx, adjust(x[idx], op, factors[op][sel].to(x.device)))
    return x


def gaussian_blur(x: torch.Tensor, kernel: int, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur of each image with its own sigma (torchvision's kernel, reflect padding)."""
    n, ch = x.shape[:2]
    half = (kernel - 1) * 0.5
    t = torch.linspace(-half, half, kernel, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (t[None] / sigma.to(x).view(-1, 1)) ** 2)
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(ch, 0)  # (n * ch, kernel)
    pad = kernel // 2
    y = F.pad(x.reshape(1, n * ch, *x.shape[2:]), (pad, pad, pad, pad), mode="reflect")
    y = F.conv2d(y, k[:, None, None, :], groups=n * ch)
    y = F.conv2d(y, k[:, None, :, None], groups=n * ch)
    return y.view_as(x)


def _where(mask: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.where(mask.to(a.device).view(-1, 1, 1, 1), a, b)


def apply_view(spec: ColourViewSpec, images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One view of every image: uint8 (N, 3, H, W) -> float (N, 3, size, size) in [0, 1]."""
    n, _, height, width = images.shape
    boxes = crop_boxes(n, height, width, spec.scale, spec.ratio, gen)
    rois = torch.cat([torch.arange(n, dtype=torch.float64)[:, None], boxes], dim=1)
    x = roi_align(images.float() / 255, rois.to(images.device, torch.float32), (spec.size, spec.size),
                  spatial_scale=1.0, sampling_ratio=-1, aligned=True).clamp(0, 1)
    x = _where(torch.rand(n, generator=gen) < 0.5, x.flip(3), x)
    jit = torch.rand(n, generator=gen) < spec.p_jitter
    if jit.any() and any(a > 0 for a in spec.jitter):
        idx = jit.nonzero().flatten()
        x = x.index_copy(0, idx.to(x.device), colour_jitter(x[idx.to(x.device)], spec.jitter, gen))
    x = _where(torch.rand(n, generator=gen) < spec.gray, grayscale(x).expand_as(x), x)
    if spec.blur > 0:
        blur = torch.rand(n, generator=gen) < spec.blur
        sigma = _uniform(n, *spec.blur_sigma, gen)
        if blur.any():
            idx = blur.nonzero().flatten()
            d = idx.to(x.device)
            x = x.index_copy(0, d, gaussian_blur(x[d], spec.blur_kernel, sigma[idx]))
    if spec.solarize > 0:
        x = _where(torch.rand(n, generator=gen) < spec.solarize, torch.where(x >= 0.5, 1 - x, x), x)
    return x


class BatchViews:
    """The views of a :class:`pretrain.augment.ViewTransform` whose pipelines all carry a :class:`ColourViewSpec`,
    drawn for a uint8 batch at once; ``views`` are the per-image pipelines' descriptions (what the specs came from)."""

    def __init__(self, specs: Sequence[ColourViewSpec], name: str, views: Sequence[str] = ()):
        self.specs, self.name, self.views = list(specs), name, list(views)

    def __call__(self, images: torch.Tensor, gen: torch.Generator) -> list[torch.Tensor]:
        return [apply_view(s, images, gen) for s in self.specs]

    def describe(self) -> dict:
        return {"preset": self.name, "views": self.views, "batched": True,
                "resample": "roi_align bilinear, ceil(box / size) samples per output pixel",
                "specs": [asdict(s) for s in self.specs]}


def view_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of one image's views (per-image views) or one batch's (``index`` = step), in torch's seed range."""
    return ((seed * 1_000_003 + epoch) * 10_000_019 + index) % (2**63 - 1)


def step_generator(seed: int, epoch: int, step: int, rank: int) -> torch.Generator:
    """The CPU generator of one batch's view parameters."""
    return torch.Generator().manual_seed((view_seed(seed, epoch, step) * 131 + rank) % (2**63 - 1))
