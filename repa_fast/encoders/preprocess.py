"""Raw uint8 images -> encoder input, exactly as the official ``preprocess_raw_image``.

With ``r`` the raw side (256 or 512) and ``N(m, s): x -> (x - m) / s`` per channel:

=======================  ==========================================================
family                   steps (``x / 255.`` first, float32)
=======================  ==========================================================
clip                     bicubic resize to ``224·(r // 256)``, then N(CLIP mean/std)
dinov2, jepa             N(ImageNet mean/std), then bicubic resize to ``224·(r // 256)``
mocov3, mae, dinov1      N(ImageNet mean/std), no resize (the model sees ``r`` px)
=======================  ==========================================================

The resize is ``F.interpolate(x, size, mode='bicubic')`` (align_corners=False, no antialias),
and the order of resize and normalisation follows the official code (it changes rounding).
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)   # timm IMAGENET_DEFAULT_MEAN
IMAGENET_STD = (0.229, 0.224, 0.225)    # timm IMAGENET_DEFAULT_STD
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# family -> (mean, std, resize?, resize before normalising?)
_RECIPES = {
    "clip": (CLIP_MEAN, CLIP_STD, True, True),
    "dinov2": (IMAGENET_MEAN, IMAGENET_STD, True, False),
    "jepa": (IMAGENET_MEAN, IMAGENET_STD, True, False),
    "mocov3": (IMAGENET_MEAN, IMAGENET_STD, False, False),
    "mae": (IMAGENET_MEAN, IMAGENET_STD, False, False),
    "dinov1": (IMAGENET_MEAN, IMAGENET_STD, False, False),
}


def input_side(family: str, resolution: int) -> int:
    """Side of the image the backbone sees for raw images of side ``resolution``."""
    _, _, resize, _ = _RECIPES[family]
    return 224 * (resolution // 256) if resize else resolution


def _normalize(x: torch.Tensor, mean: Tuple[float, ...], std: Tuple[float, ...]) -> torch.Tensor:
    # Same ops as torchvision's Normalize (sub then div by float32 tensors), so bit-identical.
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


def preprocess_raw_image(x: torch.Tensor, family: str) -> torch.Tensor:
    """``x``: [B, 3, r, r] raw pixels (uint8, or float in [0, 255]) -> float32 encoder input."""
    if family not in _RECIPES:
        raise ValueError(f"family: expected one of {sorted(_RECIPES)}, got {family!r}")
    mean, std, resize, resize_first = _RECIPES[family]
    size = input_side(family, x.shape[-1])
    x = x.to(torch.float32) / 255.0
    if resize and resize_first:
        x = F.interpolate(x, size, mode="bicubic")
    x = _normalize(x, mean, std)
    if resize and not resize_first:
        x = F.interpolate(x, size, mode="bicubic")
    return x
