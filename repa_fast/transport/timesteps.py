"""Training-time sampling as in the official ``SILoss``."""
from __future__ import annotations

import math
from typing import Optional

import torch

from .paths import check_path_type

WEIGHTINGS = ("uniform", "lognormal")


def sample_time(batch_size: int, weighting: str = "uniform", path_type: str = "linear",
                generator: Optional[torch.Generator] = None, device=None,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Times [batch_size, 1, 1, 1] in (0, 1).

    * ``uniform``: ``t ~ U(0, 1)``;
    * ``lognormal``: EDM's ``s = exp(n)``, ``n ~ N(0, 1)``, mapped to the time with that noise
      level, ``t = s / (1 + s)`` (linear) or ``2/π·atan(s)`` (cosine).

    Drawn on the generator's device (the CPU by default, as the official code does, so the
    same seed gives the same times), then moved to ``device``.
    """
    check_path_type(path_type)
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {', '.join(WEIGHTINGS)}; got {weighting!r}")
    shape = (batch_size, 1, 1, 1)
    draw_device = generator.device if generator is not None else "cpu"
    if weighting == "uniform":
        t = torch.rand(shape, generator=generator, device=draw_device)
    else:
        sigma = torch.randn(shape, generator=generator, device=draw_device).exp()
        t = sigma / (1 + sigma) if path_type == "linear" else 2 / math.pi * torch.atan(sigma)
    return t.to(device=device, dtype=dtype)
