"""The text-to-image demo set (``--preset demo-t2i``): captioned coloured shapes, 32×32.

Each image holds one shape (circle, square, triangle) in one colour (red, green, blue,
yellow), small or large, in one of the nine cells of a 3×3 grid, on a random dark background
with a little noise. Its captions are made from what was drawn — the shape, colour and size
drawn, and the cell of the centre of the shape's bounding box as it came out in pixels —,
three or four per image, e.g. ``"a red circle"``, ``"a red circle on the left"``, ``"a small
red circle on the left"``, ``"on the left there is a small red circle"``.

The contexts come from :func:`demo_text_encoder`, a :class:`~repa_fast.data.text_encoders.
WordTextEncoder` over the captions' 21 words with L = 16 tokens (the longest caption has 10
words, 12 tokens with ``<bos>``/``<eos>``; CLIP's 77 would only add padding to every
demo step) and D = 64 (seed 0): different captions give different contexts, so a model can
learn to follow them. As in :mod:`repa_fast.data.demo` the set is in pixel space (the
"moments" are ``concat(x, 0)``, ``x = image/127.5 - 1``).
"""
from __future__ import annotations

import io
import os

import numpy as np

from ..atomic_write import write_json_atomic
from .captions import npy_bytes, t2i_index_fields, write_empty_context
from .demo import COLOURS, shape_mask
from .encode import encode_image
from .shards import INDEX, ShardWriter, shard_name
from .text_encoders import WordTextEncoder

SHAPES = {"disc": "circle", "square": "square", "triangle": "triangle"}  # drawn -> said
SIZES = {"small": (0.12, 0.17), "large": (0.23, 0.29)}  # radius / image side
ROWS, COLUMNS = ("top", "middle", "bottom"), ("left", "center", "right")
WORDS = sorted(set(" ".join(list(SHAPES.values()) + list(COLOURS) + list(SIZES) + [
    "a there is on the left right at top bottom in middle"]).split()))
CONTEXT_LENGTH, CONTEXT_WIDTH = 16, 64


def demo_text_encoder() -> WordTextEncoder:
    """The demo's text encoder: words of the demo captions, L = 16, D = 64, seed 0."""
    return WordTextEncoder(WORDS, length=CONTEXT_LENGTH, width=CONTEXT_WIDTH, layers=2, seed=0)


def where(row: str, column: str) -> str:
    """``"at the top left"``, ``"on the left"``, ``"at the top"``, ``"in the middle"``..."""
    if row == "middle":
        return "in the middle" if column == "center" else f"on the {column}"
    return f"at the {row}" if column == "center" else f"at the {row} {column}"


def cell(mask: np.ndarray) -> tuple[str, str]:
    """(row, column) of the centre of ``mask``'s bounding box in the 3×3 grid."""
    ys, xs = np.nonzero(mask)
    size = mask.shape[0]
    cy, cx = (ys.min() + ys.max() + 1) / 2, (xs.min() + xs.max() + 1) / 2
    return ROWS[min(int(cy * 3 // size), 2)], COLUMNS[min(int(cx * 3 // size), 2)]


def draw_captioned(rng: np.random.Generator, size: int = 32) -> tuple[np.ndarray, dict]:
    """An HWC uint8 image and what it shows: shape, colour, size, row, column (the words
    its captions use)."""
    shape = list(SHAPES)[rng.integers(len(SHAPES))]
    colour = list(COLOURS)[rng.integers(len(COLOURS))]
    size_word = list(SIZES)[rng.integers(len(SIZES))]
    r = rng.uniform(*SIZES[size_word]) * size
    row, column = rng.integers(3, size=2)
    third = size / 3
    cy = rng.uniform(max(r, row * third), min(size - r, (row + 1) * third))
    cx = rng.uniform(max(r, column * third), min(size - r, (column + 1) * third))
    image = np.empty((size, size, 3))
    image[:] = rng.uniform(0, 60, 3)
    mask = shape_mask(shape, cy, cx, r, size)
    image[mask] = np.array(COLOURS[colour], dtype=np.float64) * rng.uniform(0.8, 1.0)
    pixels = np.clip(image + rng.normal(0, 4, image.shape), 0, 255).astype(np.uint8)
    row_word, column_word = cell(mask)  # as drawn (the pixels' box), not as aimed
    return pixels, dict(shape=SHAPES[shape], colour=colour, size=size_word, row=row_word,
                        column=column_word)


def captions_of(facts: dict, count: int = 4) -> list[str]:
    """The first ``count`` (3 or 4) captions of an image showing ``facts``."""
    thing = f"{facts['colour']} {facts['shape']}"
    place = where(facts["row"], facts["column"])
    return [f"a {thing}", f"a {thing} {place}", f"a {facts['size']} {thing} {place}",
            f"{place} there is a {facts['size']} {thing}"][:count]


def make_demo_t2i_dataset(dest: str, num_samples: int = 2400, size: int = 32, seed: int = 0,
                          shard_size: int = 600) -> str:
    """Write the captioned shapes set as prepared text-to-image shards (PNG, pixel-space
    moments, captions and their demo-encoder contexts, the empty context) to ``dest``;
    reuses it when ``dest`` already holds one. Returns ``dest``."""
    if os.path.exists(os.path.join(dest, INDEX)):
        return dest
    os.makedirs(dest, exist_ok=True)
    encoder = demo_text_encoder()
    rng = np.random.default_rng(seed)
    shards, captions_total = [], 0
    for s, start in enumerate(range(0, num_samples, shard_size)):
        writer = ShardWriter(dest, s)
        count = min(shard_size, num_samples - start)
        for i in range(start, start + count):
            pixels, facts = draw_captioned(rng, size)
            captions = captions_of(facts, 3 + int(rng.integers(2)))
            x = pixels.transpose(2, 0, 1).astype(np.float32) / 127.5 - 1
            moments = io.BytesIO()
            np.save(moments, np.concatenate([x, np.zeros_like(x)]))
            writer.add_captioned(f"{i:08d}", encode_image(pixels, "png", 95), "png",
                                 moments.getvalue(), captions, npy_bytes(encoder(captions)),
                                 len(captions))
            captions_total += len(captions)
        meta = writer.commit([])
        shards.append(dict(name=shard_name(s) + ".tar", num_samples=count, size=meta["size"],
                           checksum=meta["checksum"]))
    empty = write_empty_context(dest, encoder([""])[0])
    write_json_atomic(os.path.join(dest, INDEX), dict(
        tool="repa_fast demo", source="procedural captioned shapes", source_kind="demo",
        resolution=size, image_format="png", num_samples=num_samples, num_skipped=0,
        vae=dict(path=None, scaling_factor=1.0, latent_channels=3, fingerprint="pixel space"),
        shards=shards, **t2i_index_fields(empty, encoder.identity, captions_total)))
    return dest
