"""``create_diffusion``: DiT's constructor of the (respaced) Gaussian diffusion."""
from __future__ import annotations

from typing import Optional, Sequence, Union

from .kinds import LossType, ModelMeanType, ModelVarType
from .respace import SpacedDiffusion, space_timesteps
from .schedules import get_named_beta_schedule


def create_diffusion(timestep_respacing: Optional[Union[str, Sequence[int]]],
                     noise_schedule: str = "linear", use_kl: bool = False,
                     sigma_small: bool = False, predict_xstart: bool = False,
                     learn_sigma: bool = True, rescale_learned_sigmas: bool = False,
                     diffusion_steps: int = 1000) -> SpacedDiffusion:
    """The diffusion DiT trains (``timestep_respacing=""``: all 1000 steps) and samples with
    (``"250"``, ``"ddim50"``...).

    * loss: the bound alone times T with ``use_kl``, else ε-MSE (+ the bound's term for a
      learned σ, scaled by T/1000 with ``rescale_learned_sigmas``);
    * mean: ε, or x_0 with ``predict_xstart``;
    * variance: learned range between β̃_t and β_t with ``learn_sigma`` (the model outputs 2C
      channels), else fixed β̃_t (``sigma_small``) or β_t.
    """
    betas = get_named_beta_schedule(noise_schedule, diffusion_steps)
    if use_kl:
        loss_type = LossType.RESCALED_KL
    elif rescale_learned_sigmas:
        loss_type = LossType.RESCALED_MSE
    else:
        loss_type = LossType.MSE
    if timestep_respacing is None or timestep_respacing == "":
        timestep_respacing = [diffusion_steps]
    if learn_sigma:
        var_type = ModelVarType.LEARNED_RANGE
    else:
        var_type = ModelVarType.FIXED_SMALL if sigma_small else ModelVarType.FIXED_LARGE
    return SpacedDiffusion(
        use_timesteps=space_timesteps(diffusion_steps, timestep_respacing),
        betas=betas,
        model_mean_type=ModelMeanType.START_X if predict_xstart else ModelMeanType.EPSILON,
        model_var_type=var_type,
        loss_type=loss_type,
    )
