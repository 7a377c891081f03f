"""The samples an analysis looks at: a seeded choice of ``n`` samples of a prepared data set
(``python -m repa_fast.data.prepare``, or a demo set), read in batches: raw images (the
encoder's input), VAE moments (the model's clean latents) and class labels.

The choice is the first ``n`` of ``numpy.random.default_rng(seed).permutation(N)``: the same
samples for a given seed whatever the batch size or device. Damaged samples stop the analysis
with the loaders' message naming shard and key (nothing is skipped silently)."""
from __future__ import annotations

import os

import numpy as np
import torch

from ..data import DataError, SampleTable
from ..data.samples import decode_pixels
from ..errors import UsageError


def open_table(data_dir: str) -> SampleTable:
    """The data set's sample table; errors name ``--data-dir``."""
    if not os.path.isdir(data_dir):
        raise UsageError(f"--data-dir {data_dir!r} does not exist: prepare one with python -m "
                         f"repa_fast.data.prepare (or train --preset demo, which writes "
                         f"<output-dir>/demo-data)")
    try:
        table = SampleTable(data_dir)
    except (FileNotFoundError, DataError, ValueError) as error:
        raise UsageError(f"--data-dir {data_dir!r}: {error}") from error
    if table.t2i:
        raise UsageError(f"--data-dir {data_dir!r} holds captions (text-to-image); the "
                         f"analysis probes class labels: use a class-labelled set")
    return table


def choose(total: int, count: int, seed: int) -> np.ndarray:
    """The first ``min(count, total)`` of a permutation seeded with ``seed``."""
    return np.random.default_rng(seed).permutation(total)[:min(count, total)]


class SampleReader:
    """``count`` samples of the set in ``data_dir`` (all of them when it is smaller), chosen
    by ``seed``, read in batches."""

    def __init__(self, data_dir: str, count: int, seed: int):
        self.table = open_table(data_dir)
        self.index = self.table.index
        self.ids = choose(len(self.table), count, seed)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def pixel_space(self) -> bool:
        return self.index["vae"]["fingerprint"] == "pixel space"

    @property
    def latents_scale(self) -> float:
        return float(self.index["vae"]["scaling_factor"])

    @property
    def latent_shape(self) -> tuple:
        """``(C, h, w)`` of a latent (half the moments' channels)."""
        if self.table.latent_shape is None:
            raise UsageError(f"--data-dir {self.table.data_dir!r}: its index.json does not "
                             f"record the latents' shape (vae.latent_channels, resolution); "
                             f"prepare it again with python -m repa_fast.data.prepare")
        channels, height, width = self.table.latent_shape
        return channels // 2, height, width

    @property
    def labels(self) -> torch.Tensor:
        """int64 [n]: the chosen samples' labels, from the table (no read)."""
        return torch.from_numpy(self.table.label[self.ids].astype(np.int64))

    @property
    def num_classes(self) -> int:
        """The set's recorded number of classes, at least its largest chosen label + 1."""
        recorded = self.index.get("num_classes")
        top = int(self.labels.max()) + 1
        return max(int(recorded), top) if isinstance(recorded, int) else top

    def batches(self, batch_size: int):
        """``(images uint8 [b, 3, H, W], moments float32 [b, 2·C, h, w], labels int64 [b])``
        in the chosen order."""
        handles: dict = {}
        try:
            for start in range(0, len(self.ids), batch_size):
                images, moments, labels = [], [], []
                for i in self.ids[start:start + batch_size]:
                    pixels, latent, label = self.table.sample(int(i), handles, decode_pixels)
                    images.append(pixels.transpose(2, 0, 1))
                    moments.append(latent)
                    labels.append(label)
                yield (torch.from_numpy(np.stack(images)), torch.from_numpy(np.stack(moments)),
                       torch.tensor(labels, dtype=torch.int64))
        finally:
            for f in handles.values():
                f.close()
