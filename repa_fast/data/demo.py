"""A built-in data set for the demo: coloured shapes, procedurally generated, 32×32.

Class ``c`` = shape ``c % 3`` (disc, square, triangle) in colour ``c // 3`` (red, green, blue,
yellow), of a random size (radius 0.25–0.36 of the side) near the centre (±10 % of the side),
on a random dark background, so a small SiT learns the classes in minutes on a CPU. The demo
trains in pixel space: the stored "moments" are ``concat(x, 0)`` with x = image/127.5 − 1, so
``sample_posterior(moments, 1, 0)`` returns x itself and the training loop is the one used
with VAE latents.
"""
from __future__ import annotations

import io
import json
import os

import numpy as np

from ..atomic_write import write_json_atomic
from ..errors import UsageError
from .shards import FORMAT, INDEX, ShardWriter, shard_name
from .encode import encode_image

SHAPES = ("disc", "square", "triangle")
COLOURS = {"red": (230, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 240),
           "yellow": (240, 220, 40)}
NUM_CLASSES = len(SHAPES) * len(COLOURS)
# 2: shapes near the centre (1: anywhere, radius 0.22-0.36); an older set is written again
DATA_VERSION = 2


def draw(label: int, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """HWC uint8 image of class ``label``."""
    shape = SHAPES[label % len(SHAPES)]
    colour = np.array(list(COLOURS.values())[label // len(SHAPES)], dtype=np.float64)
    image = np.empty((size, size, 3))
    image[:] = rng.uniform(0, 60, 3)
    r = rng.uniform(0.25, 0.36) * size
    cy, cx = size / 2 + rng.uniform(-0.1, 0.1, 2) * size
    image[shape_mask(shape, cy, cx, r, size)] = colour * rng.uniform(0.8, 1.0)
    return np.clip(image + rng.normal(0, 4, image.shape), 0, 255).astype(np.uint8)


def shape_mask(shape: str, cy: float, cx: float, r: float, size: int) -> np.ndarray:
    """bool [size, size]: the pixels (centres) inside ``shape`` of radius ``r`` at (cy, cx)."""
    y, x = np.mgrid[:size, :size] + 0.5
    if shape == "disc":
        return (y - cy) ** 2 + (x - cx) ** 2 <= r ** 2
    if shape == "square":
        return (abs(y - cy) <= r * 0.85) & (abs(x - cx) <= r * 0.85)
    # upward triangle
    return (y <= cy + r * 0.8) & (abs(x - cx) <= (y - (cy - r)) * 0.6) & (y >= cy - r)


def make_demo_dataset(dest: str, num_samples: int = 2400, size: int = 32, seed: int = 0,
                      shard_size: int = 600) -> str:
    """Write the shapes data set as prepared shards (PNG, pixel-space moments) to ``dest``;
    reuses it when ``dest`` already holds this one (same version, size and count), writes it
    again over an older demo set. Returns ``dest``."""
    if os.path.exists(os.path.join(dest, INDEX)):
        with open(os.path.join(dest, INDEX)) as f:
            index = json.load(f)
        if (index.get("demo_version"), index.get("resolution"), index.get("num_samples")) == \
                (DATA_VERSION, size, num_samples):
            return dest
        if index.get("tool") != "repa_fast demo" or index.get("source_kind") != "demo":
            raise UsageError(f"{dest} holds a data set that is not the built-in demo's; "
                             f"move it, or train with another --output-dir")
        print(f"{dest}: an older or other-sized demo set (version "
              f"{index.get('demo_version', 1)}, {index.get('resolution')} px): written again",
              flush=True)
        os.remove(os.path.join(dest, INDEX))  # first: a half-removed set is never read as whole
        for shard in index.get("shards", []):
            for name in (shard["name"], shard["name"][:-len(".tar")] + ".json"):
                if os.path.exists(os.path.join(dest, name)):
                    os.remove(os.path.join(dest, name))
    os.makedirs(dest, exist_ok=True)
    rng = np.random.default_rng(seed)
    shards = []
    for s, start in enumerate(range(0, num_samples, shard_size)):
        writer = ShardWriter(dest, s)
        count = min(shard_size, num_samples - start)
        for i in range(start, start + count):
            label = i % NUM_CLASSES
            pixels = draw(label, rng, size)
            x = pixels.transpose(2, 0, 1).astype(np.float32) / 127.5 - 1
            moments = io.BytesIO()
            np.save(moments, np.concatenate([x, np.zeros_like(x)]))
            writer.add(f"{i:08d}", encode_image(pixels, "png", 95), "png", moments.getvalue(),
                       label)
        meta = writer.commit([])
        shards.append(dict(name=shard_name(s) + ".tar", num_samples=count, size=meta["size"],
                           checksum=meta["checksum"]))
    write_json_atomic(os.path.join(dest, INDEX), dict(
        format=FORMAT, tool="repa_fast demo", source="procedural shapes", source_kind="demo",
        demo_version=DATA_VERSION,
        resolution=size, image_format="png", num_samples=num_samples, num_skipped=0,
        num_classes=NUM_CLASSES, label_range=[0, min(num_samples, NUM_CLASSES) - 1],
        vae=dict(path=None, scaling_factor=1.0, latent_channels=3, fingerprint="pixel space"),
        shards=shards))
    return dest
