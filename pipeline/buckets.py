"""Size buckets: pick the output resolution for a reference frame, resize and centre-crop it.

A bucket table maps a size name (`infinitetalk-480`, `infinitetalk-720`) to [H, W] pairs. The
reference keys each pair by its aspect ratio H/W rounded to two decimals and picks the key
closest to the source's H/W (ties: the first in table order). The frame is scaled so that it
covers the target (`scale = max(Ht/H, Wt/W)`, sizes rounded up), resized with PIL's bilinear
filter, and centre-cropped the way torchvision's `center_crop` does. Masks (two speakers) go
through the same geometry with nearest-neighbour sampling.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor


def bucket_key(height: int, width: int) -> float:
    """The reference's table key of a bucket: H/W rounded to 2 decimals."""
    return round(height / width, 2)


def closest_bucket(
    buckets: Mapping[str, Sequence[tuple[int, int]]], size: str, src_height: int, src_width: int
) -> tuple[int, int]:
    """The (H, W) of bucket table `size` whose aspect ratio is closest to the source's."""
    if size not in buckets:
        raise ValueError(f"unknown size {size!r}; this model has {sorted(buckets)}")
    if src_height <= 0 or src_width <= 0:
        raise ValueError(f"source size must be positive, got {src_width}x{src_height}")
    ratio = src_height / src_width
    table = list(buckets[size])
    best = min(range(len(table)), key=lambda i: (abs(bucket_key(*table[i]) - ratio), i))
    return table[best]


def _cover_size(src_h: int, src_w: int, target: tuple[int, int]) -> tuple[int, int]:
    scale = max(target[0] / src_h, target[1] / src_w)
    return math.ceil(scale * src_h), math.ceil(scale * src_w)


def _crop_box(h: int, w: int, target: tuple[int, int]) -> tuple[int, int]:
    """Top-left corner of a centred crop (torchvision's rounding)."""
    return int(round((h - target[0]) / 2.0)), int(round((w - target[1]) / 2.0))


def resize_and_crop(image: Image.Image, target: tuple[int, int]) -> np.ndarray:
    """RGB PIL image -> uint8 [Ht, Wt, 3]: cover-resize (bilinear) then centre crop."""
    fh, fw = _cover_size(image.height, image.width, target)
    resized = np.asarray(image.convert("RGB").resize((fw, fh), resample=Image.Resampling.BILINEAR))
    top, left = _crop_box(fh, fw, target)
    return np.array(resized[top : top + target[0], left : left + target[1]], copy=True, order="C")


def to_model_frame(pixels: np.ndarray) -> Tensor:
    """uint8 [H, W, 3] -> float32 [3, 1, H, W] in [-1, 1] (the reference's `(x/255 - 0.5) * 2`)."""
    x = torch.from_numpy(np.array(pixels, dtype=np.uint8, copy=True)).permute(2, 0, 1).float()  # [3, H, W]
    return ((x / 255 - 0.5) * 2).unsqueeze(1)  # [3, 1, H, W]


def resize_and_crop_masks(masks: Tensor, target: tuple[int, int]) -> Tensor:
    """Masks [C, H, W] -> [C, Ht, Wt]: cover-resize (nearest) then centre crop."""
    _, h, w = masks.shape
    fh, fw = _cover_size(h, w, target)
    resized = F.interpolate(masks[None].float(), size=(fh, fw), mode="nearest")[0]  # [C, fh, fw]
    top, left = _crop_box(fh, fw, target)
    return resized[:, top : top + target[0], left : left + target[1]].contiguous()
