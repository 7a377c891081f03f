"""Interpolant paths ``x_t = α(t)·x₀ + σ(t)·ε`` between data (t=0) and noise (t=1)."""
from __future__ import annotations

import math

import torch

PATH_TYPES = ("linear", "cosine")


def check_path_type(path_type: str) -> str:
    if path_type not in PATH_TYPES:
        raise ValueError(f"path_type must be one of {', '.join(PATH_TYPES)}; got {path_type!r}")
    return path_type


def interpolant(t: torch.Tensor, path_type: str = "linear"):
    """``(α, σ, dα/dt, dσ/dt)`` at ``t``, each shaped like ``t``.

    * linear: ``α = 1 - t``, ``σ = t``;
    * cosine: ``α = cos(πt/2)``, ``σ = sin(πt/2)``.
    """
    check_path_type(path_type)
    if path_type == "linear":
        return 1 - t, t, -torch.ones_like(t), torch.ones_like(t)
    half_pi = math.pi / 2
    return (torch.cos(t * half_pi), torch.sin(t * half_pi),
            -half_pi * torch.sin(t * half_pi), half_pi * torch.cos(t * half_pi))


def interpolate(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, path_type: str = "linear"):
    """``(x_t, v_t)``: the noisy input and the velocity target ``dα·x₀ + dσ·ε``.

    ``t`` broadcasts against ``x0`` (e.g. shape [N, 1, 1, 1]).
    """
    alpha, sigma, d_alpha, d_sigma = interpolant(t, path_type)
    return alpha * x0 + sigma * noise, d_alpha * x0 + d_sigma * noise
