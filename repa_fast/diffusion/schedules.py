"""Noise schedules β_1..β_T of the discrete diffusion (DiT/ADM's named schedules), float64."""
from __future__ import annotations

import math
from typing import Callable

import numpy as np

NOISE_SCHEDULES = ("linear", "squaredcos_cap_v2")


def linear_betas(num_steps: int) -> np.ndarray:
    """Ho et al.'s linear schedule stretched to any T: ``linspace(s·1e-4, s·0.02, T)``, s = 1000/T,
    so that the total noise added stays about the same whatever the number of steps."""
    scale = 1000 / num_steps
    return np.linspace(scale * 0.0001, scale * 0.02, num_steps, dtype=np.float64)


def betas_for_alpha_bar(num_steps: int, alpha_bar: Callable[[float], float],
                        max_beta: float = 0.999) -> np.ndarray:
    """β_i = min(1 - ᾱ((i+1)/T) / ᾱ(i/T), max_beta): the betas whose cumulative product of
    (1 - β) follows the continuous ᾱ(t) on [0, 1]; the cap keeps the last steps away from β = 1."""
    betas = [min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta)
             for i in range(num_steps)]
    return np.array(betas, dtype=np.float64)


def _cosine_alpha_bar(t: float) -> float:
    # Nichol & Dhariwal's ᾱ(t) = cos²((t + s)/(1 + s) · π/2), s = 0.008
    return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2


def get_named_beta_schedule(name: str, num_steps: int) -> np.ndarray:
    """The betas of a named schedule: ``linear`` or ``squaredcos_cap_v2`` (cosine)."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"diffusion_steps must be a positive integer; got {num_steps!r}")
    if name == "linear":
        return linear_betas(num_steps)
    if name == "squaredcos_cap_v2":
        return betas_for_alpha_bar(num_steps, _cosine_alpha_bar)
    raise ValueError(f"noise_schedule must be one of {', '.join(NOISE_SCHEDULES)}; got {name!r}")
