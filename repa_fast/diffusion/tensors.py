"""Helpers shared by the diffusion's parts: per-timestep table look-up and the per-sample mean."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


def gather_timesteps(table: torch.Tensor, t: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """``table[t]`` cast to float32 and broadcast to ``shape`` ([N] → [N, 1, ...] expanded).

    The look-up happens in the table's dtype (float64) and only the gathered values are cast,
    as DiT's ``_extract_into_tensor``, so the numbers (and seeded results) are the same as
    theirs. The result is a broadcast view (``expand``), where the original adds a zero tensor
    of ``shape``: the same values without the allocation; clone it before writing into it.
    ``table`` must be on ``t``'s device.
    """
    values = table[t].float()
    return values.view(*values.shape, *([1] * (len(shape) - values.dim()))).expand(*shape)


def extract_into_tensor(table: np.ndarray, t: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """:func:`gather_timesteps` of a numpy table, copied to ``t``'s device on every call, as the
    original's helper (its values; a view, see above). :class:`~.gaussian.GaussianDiffusion`
    keeps its tables on the device instead: on a GPU each blocking copy from pageable host
    memory makes the host wait for the device's queued work."""
    return gather_timesteps(torch.from_numpy(np.asarray(table)).to(t.device), t, shape)


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over all non-batch dimensions."""
    return x.mean(dim=list(range(1, x.dim())))
