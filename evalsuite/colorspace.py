"""Input colour spaces a trunk can be trained on (recorded as ``input_space`` in checkpoint metadata).

``rgb``: ImageNet mean/std normalisation. ``lab``: CIE L*a*b* (D65), scaled to
roughly [-1, 1] per channel (L/50 - 1, a/110, b/110). ``gray``: the L channel
scaled like ``lab`` and repeated on three channels (colorization trunks).
"""

from __future__ import annotations

import torch

INPUT_SPACES = ("rgb", "lab", "gray")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_RGB_TO_XYZ = torch.tensor(
    [[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169], [0.019334, 0.119193, 0.950227]]
)
_WHITE_D65 = torch.tensor([0.950456, 1.0, 1.088754])


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """sRGB in [0, 1], shape (..., 3, H, W) -> L in [0, 100], a/b roughly in [-110, 110]."""
    lin = torch.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    xyz = torch.einsum("ij,...jhw->...ihw", _RGB_TO_XYZ.to(rgb), lin)
    xyz = xyz / _WHITE_D65.to(rgb).view(3, 1, 1)
    eps = 0.008856
    f = torch.where(xyz > eps, xyz.clamp_min(1e-12) ** (1 / 3), 7.787 * xyz + 16 / 116)
    fx, fy, fz = f.unbind(-3)
    L = torch.where(xyz[..., 1, :, :] > eps, 116 * fy - 16, 903.3 * xyz[..., 1, :, :])
    a = 500 * (fx - fy)
    b = 200 * (fy - fz)
    return torch.stack([L, a, b], dim=-3)


def lab_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`rgb_to_lab` (clipped to [0, 1])."""
    L, a, b = lab.unbind(-3)
    fy = (L + 16) / 116
    fx = fy + a / 500
    fz = fy - b / 200
    eps = 0.008856

    def finv(t: torch.Tensor) -> torch.Tensor:
        return torch.where(t**3 > eps, t**3, (t - 16 / 116) / 7.787)

    xyz = torch.stack([finv(fx), finv(fy), finv(fz)], dim=-3) * _WHITE_D65.to(lab).view(3, 1, 1)
    lin = torch.einsum("ij,...jhw->...ihw", torch.linalg.inv(_RGB_TO_XYZ).to(lab), xyz).clamp(0, 1)
    rgb = torch.where(lin > 0.0031308, 1.055 * lin.clamp_min(1e-12) ** (1 / 2.4) - 0.055, 12.92 * lin)
    return rgb.clamp(0, 1)


def to_input_space(rgb: torch.Tensor, space: str, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """Turn an RGB tensor in [0, 1] into the network input of ``space``."""
    if space == "rgb":
        m = torch.tensor(mean, dtype=rgb.dtype, device=rgb.device).view(3, 1, 1)
        s = torch.tensor(std, dtype=rgb.dtype, device=rgb.device).view(3, 1, 1)
        return (rgb - m) / s
    lab = rgb_to_lab(rgb)
    scaled = torch.stack([lab[..., 0, :, :] / 50 - 1, lab[..., 1, :, :] / 110, lab[..., 2, :, :] / 110], dim=-3)
    if space == "lab":
        return scaled
    if space == "gray":
        return scaled[..., :1, :, :].expand(*scaled.shape[:-3], 3, *scaled.shape[-2:]).contiguous()
    raise ValueError(f"unknown input space {space!r}; known: {', '.join(INPUT_SPACES)}")
