"""Colour correction: match each frame's Lab statistics to a reference frame (model.md 1.10).

Per frame and per Lab channel: `(x - mean_src) * std_ref / std_src + mean_ref` (a flat channel
becomes `mean_ref`), back to RGB, clipped, then blended `(1 - s) * src + s * corrected`. The
RGB <-> Lab conversions are the sRGB / D65 formulas scikit-image uses (same matrix, same white
point, same piecewise functions), written in torch float64 so no extra dependency is needed and
it runs on whatever device the frames are on. It is part of the chunk recurrence: the corrected
frames are the ones carried into the next chunk as motion frames.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: linear sRGB -> XYZ (scikit-image's `xyz_from_rgb`) and the D65 2-degree white point
XYZ_FROM_RGB = (
    (0.412453, 0.357580, 0.180423),
    (0.212671, 0.715160, 0.072169),
    (0.019334, 0.119193, 0.950227),
)
WHITE_D65 = (0.95047, 1.0, 1.08883)


def _matrix(device: torch.device) -> Tensor:
    return torch.tensor(XYZ_FROM_RGB, dtype=torch.float64, device=device)


def rgb_to_lab(rgb: Tensor) -> Tensor:
    """[..., 3] RGB in [0, 1] (float64) -> [..., 3] CIE Lab."""
    lin = torch.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    xyz = lin @ _matrix(rgb.device).T / torch.tensor(WHITE_D65, dtype=torch.float64, device=rgb.device)
    f = torch.where(xyz > 0.008856, xyz.clamp(min=0) ** (1 / 3), 7.787 * xyz + 16.0 / 116.0)
    fx, fy, fz = f.unbind(-1)
    return torch.stack([116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)], dim=-1)


def lab_to_rgb(lab: Tensor) -> Tensor:
    """[..., 3] CIE Lab -> [..., 3] RGB clipped to [0, 1] (float64)."""
    lightness, a, b = lab.unbind(-1)
    fy = (lightness + 16.0) / 116.0
    fx = a / 500.0 + fy
    fz = (fy - b / 200.0).clamp(min=0)  # negative z is clipped, as scikit-image does
    f = torch.stack([fx, fy, fz], dim=-1)
    xyz = torch.where(f > 0.2068966, f**3, (f - 16.0 / 116.0) / 7.787)
    xyz = xyz * torch.tensor(WHITE_D65, dtype=torch.float64, device=lab.device)
    lin = xyz @ torch.linalg.inv(_matrix(lab.device)).T
    rgb = torch.where(lin > 0.0031308, 1.055 * lin.clamp(min=0) ** (1 / 2.4) - 0.055, 12.92 * lin)
    return rgb.clamp(0.0, 1.0)


def match_colors(frames: Tensor, reference: Tensor, strength: float) -> Tensor:
    """Colour-match frames to a reference frame.

    frames: [3, T, H, W] in [-1, 1]; reference: [3, 1, H', W'] (or [3, H', W']) in [-1, 1].
    Returns [3, T, H, W] in the frames' dtype.
    """
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"colour correction strength must be in [0, 1], got {strength}")
    if strength == 0.0:
        return frames
    src = ((frames.double() + 1.0) / 2.0).clamp(0.0, 1.0).permute(1, 2, 3, 0)  # [T, H, W, 3]
    ref = ((reference.double().reshape(3, -1) + 1.0) / 2.0).clamp(0.0, 1.0).T  # [P, 3]
    ref_lab = rgb_to_lab(ref)
    mean_ref, std_ref = ref_lab.mean(0), ref_lab.std(0, correction=0)  # [3]
    lab = rgb_to_lab(src)  # [T, H, W, 3]
    mean_src = lab.mean(dim=(1, 2), keepdim=True)  # [T, 1, 1, 3]
    std_src = lab.std(dim=(1, 2), keepdim=True, correction=0)
    scaled = (lab - mean_src) * (
        std_ref / torch.where(std_src == 0, torch.ones_like(std_src), std_src)
    ) + mean_ref
    corrected_lab = torch.where(std_src == 0, mean_ref.expand_as(lab), scaled)
    corrected = lab_to_rgb(corrected_lab)
    blended = (1 - strength) * src + strength * corrected
    return (blended * 2.0 - 1.0).permute(3, 0, 1, 2).to(frames.dtype).contiguous()  # [3, T, H, W]
