"""The three Inception-v3 activations the metrics use, and their sizes.

===========  ======  ===========================================================================
name         dims    what it is (TF graph name in ADM's evaluator)
===========  ======  ===========================================================================
``pool``     2048    ``pool_3``: global average pool of the last block (FID, precision/recall)
``spatial``  2023    ``mixed_6/conv``: first 7 of 192 channels of a 17×17 map, flattened in
                     TensorFlow's H, W, C order, 17·17·7 = 2023 (sFID)
``logits``   1008    ``pool_3 · W`` of the ``softmax`` layer, *without* its bias (IS)
===========  ======  ===========================================================================
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

POOL_DIM = 2048
SPATIAL_CHANNELS = 7
SPATIAL_SIZE = 17
SPATIAL_DIM = SPATIAL_SIZE * SPATIAL_SIZE * SPATIAL_CHANNELS  # 2023
NUM_LOGITS = 1008  # the 2015 Inception graph has 1008 outputs (1000 classes + 8 unused)


@dataclass
class Activations:
    """Per-image activations, float32, one row per image (see the module docstring)."""

    pool: np.ndarray
    spatial: np.ndarray
    logits: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.pool)
        for name, arr, dim in (("pool", self.pool, POOL_DIM),
                               ("spatial", self.spatial, SPATIAL_DIM),
                               ("logits", self.logits, NUM_LOGITS)):
            if arr.ndim != 2 or arr.shape != (n, dim):
                raise ValueError(f"Activations.{name}: expected shape ({n}, {dim}), "
                                 f"got {tuple(arr.shape)}")

    def __len__(self) -> int:
        return len(self.pool)

    @staticmethod
    def concatenate(parts: list["Activations"]) -> "Activations":
        if not parts:
            return Activations(np.zeros((0, POOL_DIM), np.float32),
                               np.zeros((0, SPATIAL_DIM), np.float32),
                               np.zeros((0, NUM_LOGITS), np.float32))
        return Activations(np.concatenate([p.pool for p in parts]),
                           np.concatenate([p.spatial for p in parts]),
                           np.concatenate([p.logits for p in parts]))
