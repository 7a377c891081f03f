"""Interpolants, time sampling and losses of REPA/SiT training (official ``loss.py`` semantics)."""
from .losses import SILoss, denoising_loss, mean_flat, projection_loss
from .paths import PATH_TYPES, interpolant, interpolate
from .timesteps import WEIGHTINGS, sample_time

__all__ = [
    "PATH_TYPES", "SILoss", "WEIGHTINGS", "denoising_loss", "interpolant", "interpolate",
    "mean_flat", "projection_loss", "sample_time",
]
