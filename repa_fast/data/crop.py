"""The ADM center crop (the official ``--transform=center-crop-dhariwal``).

Halve the image with a BOX filter while its short side is at least twice the target, resize
with BICUBIC so the short side equals the target (sizes rounded), then crop the centre
(offsets rounded down). Same PIL calls in the same order as guided-diffusion / REPA, so the
pixels are identical.
"""
from __future__ import annotations

import numpy as np
from PIL import Image


def center_crop_dhariwal(image: Image.Image | np.ndarray, size: int) -> np.ndarray:
    """RGB uint8 [size, size, 3] ADM center crop of ``image`` (a PIL image or an HWC array)."""
    if size <= 0:
        raise ValueError(f"size must be a positive number of pixels; got {size}")
    pil = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
    pil = pil.convert("RGB")
    while min(pil.size) >= 2 * size:
        pil = pil.resize(tuple(s // 2 for s in pil.size), resample=Image.Resampling.BOX)
    scale = size / min(pil.size)
    pil = pil.resize(tuple(round(s * scale) for s in pil.size), resample=Image.Resampling.BICUBIC)
    arr = np.asarray(pil)
    top = (arr.shape[0] - size) // 2
    left = (arr.shape[1] - size) // 2
    return np.array(arr[top:top + size, left:left + size])  # a writable, contiguous copy
