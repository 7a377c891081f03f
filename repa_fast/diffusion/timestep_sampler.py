"""Which training timesteps to draw (DiT's ``timestep_sampler.py``, the uniform one)."""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch


class UniformSampler:
    """t uniform over the diffusion's steps, each with importance weight 1.

    ``sample`` draws with ``np.random.choice(T, size=N, p=w/Σw)`` from numpy's global stream,
    as the original does, so the same numpy seed gives the same timesteps; pass ``rng`` (a
    ``np.random.Generator``) for a private stream instead.
    """

    def __init__(self, diffusion):
        self.diffusion = diffusion
        self._weights = np.ones([diffusion.num_timesteps])

    def weights(self) -> np.ndarray:
        return self._weights

    def sample(self, batch_size: int, device=None, rng: Optional[np.random.Generator] = None):
        """(timesteps [N] long, weights [N] float32); weight = 1 / (T · p_t)."""
        w = self.weights()
        p = w / np.sum(w)
        choice = np.random.choice if rng is None else rng.choice
        indices_np = choice(len(p), size=(batch_size,), p=p)
        indices = torch.from_numpy(indices_np).long().to(device)
        weights = torch.from_numpy(1 / (len(p) * p[indices_np])).float().to(device)
        return indices, weights


SCHEDULE_SAMPLERS = {"uniform": UniformSampler}


def create_named_schedule_sampler(name: str, diffusion):
    """The sampler called ``name``; only ``uniform`` (the one DiT's training uses) is here."""
    if name not in SCHEDULE_SAMPLERS:
        raise ValueError(f"schedule sampler must be one of {', '.join(SCHEDULE_SAMPLERS)}; "
                         f"got {name!r}")
    return SCHEDULE_SAMPLERS[name](diffusion)
