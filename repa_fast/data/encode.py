"""Per-image work of dataset preparation, run in worker processes (PIL and numpy only)."""
from __future__ import annotations

import io
from typing import Optional

import numpy as np
from PIL import Image

from .crop import center_crop_dhariwal
from .sources import Entry, Source


def encode_image(pixels: np.ndarray, image_format: str, quality: int) -> bytes:
    """HWC uint8 -> JPEG (4:4:4 chroma, ``quality``) or lossless PNG bytes."""
    out = io.BytesIO()
    if image_format == "jpg":
        Image.fromarray(pixels).save(out, format="JPEG", quality=quality, subsampling=0)
    else:
        Image.fromarray(pixels).save(out, format="PNG", compress_level=1)
    return out.getvalue()


def process_entry(source: Source, entry: Entry, resolution: int, image_format: str,
                  quality: int
                  ) -> tuple[Entry, Optional[bytes], Optional[np.ndarray], Optional[str]]:
    """``(entry, image bytes, pixels, error)``: cropped and encoded, or why it was skipped.

    Official REPA and U-ViT folders keep their stored PNG bytes (already cropped) and need no
    pixels. An entry its source skips (``Source.problem``) is not read.
    """
    problem = source.problem(entry)
    if problem:
        return entry, None, None, problem
    try:
        if entry.latent is not None:
            data = source.read(entry)
            image = Image.open(io.BytesIO(data))
            image.load()
            if image.size != (resolution, resolution):
                return entry, None, None, (f"is {image.size[0]}x{image.size[1]}, not the "
                                           f"{resolution}x{resolution} of --resolution")
            return entry, data, None, None
        pixels = center_crop_dhariwal(source.open_image(entry), resolution)
        return entry, encode_image(pixels, image_format, quality), pixels, None
    except Exception as error:  # unreadable, truncated or odd files are skipped and reported
        return entry, None, None, f"{type(error).__name__}: {error}"
