"""Interpolants, time sampling and losses of REPA/SiT training (official ``loss.py`` semantics);
the samplers: :mod:`.samplers` (class-conditional, official ``samplers.py``) and
:mod:`.samplers_t2i` (text-to-image, official ``samplers_t2i.py``)."""
from . import samplers, samplers_t2i
from .losses import SILoss, denoising_loss, mean_flat, projection_loss
from .paths import PATH_TYPES, interpolant, interpolate
from .timesteps import WEIGHTINGS, sample_time

__all__ = [
    "PATH_TYPES", "SILoss", "WEIGHTINGS", "denoising_loss", "interpolant", "interpolate",
    "mean_flat", "projection_loss", "sample_time", "samplers", "samplers_t2i",
]
