"""Discrete Gaussian diffusion (DDPM/ADM) as DiT's ``diffusion`` package: schedules, the hybrid
training loss with a learned σ, DDPM and DDIM sampling, timestep respacing."""
from .factory import create_diffusion
from .gaussian import GaussianDiffusion
from .kinds import LossType, ModelMeanType, ModelVarType
from .likelihoods import approx_standard_normal_cdf, discretized_gaussian_log_likelihood, normal_kl
from .respace import SpacedDiffusion, space_timesteps
from .schedules import NOISE_SCHEDULES, betas_for_alpha_bar, get_named_beta_schedule
from .tensors import extract_into_tensor, mean_flat
from .timestep_sampler import UniformSampler, create_named_schedule_sampler

__all__ = [
    "GaussianDiffusion", "LossType", "ModelMeanType", "ModelVarType", "NOISE_SCHEDULES",
    "SpacedDiffusion", "UniformSampler", "approx_standard_normal_cdf", "betas_for_alpha_bar",
    "create_diffusion", "create_named_schedule_sampler", "discretized_gaussian_log_likelihood",
    "extract_into_tensor", "get_named_beta_schedule", "mean_flat", "normal_kl", "space_timesteps",
]
