"""The ADM center crop (the official ``--transform=center-crop-dhariwal``).

Halve the image with a BOX filter while its short side is at least twice the target, resize
with BICUBIC so the short side equals the target (sizes rounded), then crop the centre
(offsets rounded down). Same PIL calls in the same order as guided-diffusion / REPA, so the
pixels are identical.

Images are first made 8-bit RGB by :func:`to_rgb8`: PIL's own ``convert("RGB")`` clips 16-bit
grey values (``I;16``, ``I``) to 255 instead of scaling them, which turned 16-bit PNGs white.
"""
from __future__ import annotations

import numpy as np
from PIL import Image


# single-channel modes holding 16-bit samples (PIL opens 16-bit grey PNG, PGM and TIFF as
# one of these); 16-bit RGB(A) files open as 8-bit "RGB"/"RGBA" already (PIL keeps the
# high byte)
_WIDE_GREY = {"I;16", "I;16L", "I;16B", "I;16N", "I"}


def to_rgb8(image: Image.Image) -> Image.Image:
    """``image`` as 8-bit RGB. 16-bit grey becomes its high byte (``v >> 8``: 0..65535 onto
    0..255, within rounding of ``v / 257``); mode ``I`` (32-bit integers, what PIL gives for
    16-bit PNGs) is read as 16-bit, values outside 0..65535 clipped. Other modes go through
    PIL's ``convert("RGB")``."""
    if image.mode in _WIDE_GREY:
        grey = np.asarray(image)
        if image.mode != "I" and grey.dtype.itemsize != 2:
            raise ValueError(f"unexpected {grey.dtype} pixels for an image of mode {image.mode}")
        grey = (np.clip(grey.astype(np.int64), 0, 65535) >> 8).astype(np.uint8)
        return Image.fromarray(np.repeat(grey[..., None], 3, axis=-1))
    return image if image.mode == "RGB" else image.convert("RGB")


def center_crop_dhariwal(image: Image.Image | np.ndarray, size: int) -> np.ndarray:
    """RGB uint8 [size, size, 3] ADM center crop of ``image`` (a PIL image or an HWC array)."""
    if size <= 0:
        raise ValueError(f"size must be a positive number of pixels; got {size}")
    pil = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
    pil = to_rgb8(pil)
    while min(pil.size) >= 2 * size:
        pil = pil.resize(tuple(s // 2 for s in pil.size), resample=Image.Resampling.BOX)
    scale = size / min(pil.size)
    pil = pil.resize(tuple(round(s * scale) for s in pil.size), resample=Image.Resampling.BICUBIC)
    arr = np.asarray(pil)
    top = (arr.shape[0] - size) // 2
    left = (arr.shape[1] - size) // 2
    return np.array(arr[top:top + size, left:left + size])  # a writable, contiguous copy
