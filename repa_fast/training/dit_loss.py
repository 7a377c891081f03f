"""DiT's training objective with REPA: the Gaussian diffusion's hybrid loss (ε-MSE + the
variational bound's term for the learned σ) of ``create_diffusion(timestep_respacing="")``,
DiT's default (1000 steps, linear betas), plus the alignment loss of the model's projectors.

Called like :class:`repa_fast.transport.SILoss` (the step treats both alike): it returns the
per-sample diffusion loss [N] and the projection loss (a scalar); the timesteps (int64 [N],
``torch.randint(0, 1000, (N,))`` as DiT's ``train.py``) and the noise are the step's draws.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..diffusion import create_diffusion
from ..transport.losses import projection_loss

DIFFUSION_STEPS = 1000  # create_diffusion's default, the T of DiT's training


class DiTLoss:
    """``fused`` as SILoss's: the model computes the alignment loss (``align_to``) or, off,
    returns the projections and :func:`projection_loss` compares them."""

    def __init__(self, fused: bool = True):
        self.diffusion = create_diffusion(timestep_respacing="", diffusion_steps=DIFFUSION_STEPS)
        self.fused = fused

    def __call__(self, model, images: torch.Tensor, model_kwargs: Optional[dict] = None,
                 zs: Optional[list] = None, *, time: torch.Tensor, noise: torch.Tensor):
        model_kwargs = {} if model_kwargs is None else model_kwargs
        zs = [] if zs is None else list(zs)
        found = {}

        def eps_model(x_t, t, **kwargs):
            # the diffusion wants one tensor; the projection loss leaves by ``found``
            if zs and self.fused:
                out, found["proj"] = model(x_t, t, **kwargs, align_to=zs)
            else:
                out, zs_tilde = model(x_t, t, **kwargs)
                found["proj"] = (projection_loss(zs, zs_tilde) if zs
                                 else torch.zeros((), device=images.device))
            # the diffusion's maths in float32 as the original's (under autocast the model's
            # output is bf16/fp16, and the learned-σ term would otherwise start in that dtype)
            return out.float()

        terms = self.diffusion.training_losses(eps_model, images, time, model_kwargs,
                                               noise=noise.to(images.device, images.dtype))
        return terms["loss"], found["proj"]
