"""Helpers shared by the diffusion's parts: per-timestep table look-up and the per-sample mean."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


def extract_into_tensor(table: np.ndarray, t: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """``table[t]`` as float32, broadcast to ``shape`` ([N, 1, ...] filled out to ``shape``).

    The look-up happens in float64 and only the gathered values are cast, exactly as DiT's
    ``_extract_into_tensor``, so the numbers (and seeded results) are the same as theirs.
    """
    values = torch.from_numpy(table).to(device=t.device)[t].float()
    while values.dim() < len(shape):
        values = values[..., None]
    return values + torch.zeros(shape, device=t.device)


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over all non-batch dimensions."""
    return x.mean(dim=list(range(1, x.dim())))
