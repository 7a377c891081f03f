"""The discrete Gaussian diffusion q(x_t | x_0) and its learned reverse p(x_{t-1} | x_t), as
DiT's ``GaussianDiffusion`` (from ADM / improved DDPM).

Every per-step coefficient is a float64 numpy table indexed by t = 0..T-1 (t = 0 is the first
noising step), as the original's. Look-ups go through :meth:`GaussianDiffusion.extract`, which
copies a table to a device once and gathers there: the original copies the numpy table at every
look-up (8 per DDPM step, 16 per training step), and on a GPU each such blocking copy from
pageable host memory makes the host wait for the device's queued work.
"""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch

from .kinds import LossType, ModelMeanType, ModelVarType
from .losses import DiffusionLosses
from .sampling import DiffusionSampling
from .tensors import gather_timesteps


class GaussianDiffusion(DiffusionLosses, DiffusionSampling):
    """``betas``: β_1..β_T (float64 after conversion, each in (0, 1]).

    With α_t = 1 - β_t and ᾱ_t = ∏_{s≤t} α_s (ᾱ_prev at t = 0 is 1):

    * q(x_t | x_0) = N(√ᾱ_t x_0, (1 - ᾱ_t) I);
    * q(x_{t-1} | x_t, x_0) = N(c₁ x_0 + c₂ x_t, β̃_t I) with
      c₁ = β_t √ᾱ_{t-1} / (1 - ᾱ_t), c₂ = (1 - ᾱ_{t-1}) √α_t / (1 - ᾱ_t),
      β̃_t = β_t (1 - ᾱ_{t-1}) / (1 - ᾱ_t).
    """

    def __init__(self, *, betas, model_mean_type: ModelMeanType, model_var_type: ModelVarType,
                 loss_type: LossType):
        self.model_mean_type = model_mean_type
        self.model_var_type = model_var_type
        self.loss_type = loss_type

        betas = np.array(betas, dtype=np.float64)  # float64 throughout: ᾱ_t reaches ~4e-5
        if betas.ndim != 1 or betas.size == 0:
            raise ValueError(f"betas must be a non-empty 1-D array; got shape {list(betas.shape)}")
        if not ((betas > 0).all() and (betas <= 1).all()):
            raise ValueError(f"betas must lie in (0, 1]; got min {betas.min()} and max "
                             f"{betas.max()}")
        self.betas = betas
        self.num_timesteps = int(betas.shape[0])

        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas, axis=0)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)

        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)

        self.posterior_variance = (betas * (1.0 - self.alphas_cumprod_prev)
                                   / (1.0 - self.alphas_cumprod))
        # β̃ is 0 at t = 0: its log takes β̃_1 there instead (a one-step chain has no such value)
        self.posterior_log_variance_clipped = (
            np.log(np.append(self.posterior_variance[1], self.posterior_variance[1:]))
            if self.num_timesteps > 1 else np.array([]))
        self.posterior_mean_coef1 = (betas * np.sqrt(self.alphas_cumprod_prev)
                                     / (1.0 - self.alphas_cumprod))
        self.posterior_mean_coef2 = ((1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas)
                                     / (1.0 - self.alphas_cumprod))

        # tables the original computes inside its methods, here once so they can stay on the device
        self.one_minus_alphas_cumprod = 1.0 - self.alphas_cumprod
        self.log_betas = np.log(betas)
        self.recip_posterior_mean_coef1 = 1.0 / self.posterior_mean_coef1
        self.posterior_mean_coef2_over_coef1 = self.posterior_mean_coef2 / self.posterior_mean_coef1
        # fixed large variance: β_t, except β̃_1 at t = 0 (β_1 gives a worse decoder likelihood)
        self.fixed_large_variance = (np.append(self.posterior_variance[1], betas[1:])
                                     if self.num_timesteps > 1 else np.array([]))
        self.fixed_large_log_variance = np.log(self.fixed_large_variance)
        self._device_tables: dict = {}

    def extract(self, name: str, t: torch.Tensor, shape) -> torch.Tensor:
        """The table ``name`` (an attribute above) at timesteps ``t``, float32, broadcast to
        ``shape``. Each table is copied to ``t``'s device on first use and kept there, so a
        training or sampling step makes no host-to-device copy (no host sync on a GPU)."""
        key = (name, t.device)
        table = self._device_tables.get(key)
        if table is None:
            table = torch.from_numpy(getattr(self, name)).to(t.device)
            self._device_tables[key] = table
        return gather_timesteps(table, t, shape)

    # -- the forward process -------------------------------------------------------------------

    def q_mean_variance(self, x_start: torch.Tensor, t: torch.Tensor):
        """(mean, variance, log variance) of q(x_t | x_0), each shaped like ``x_start``."""
        mean = self.extract("sqrt_alphas_cumprod", t, x_start.shape) * x_start
        variance = self.extract("one_minus_alphas_cumprod", t, x_start.shape)
        log_variance = self.extract("log_one_minus_alphas_cumprod", t, x_start.shape)
        return mean, variance, log_variance

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor,
                 noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x_t = √ᾱ_t x_0 + √(1 - ᾱ_t) ε; ε drawn with ``randn_like`` when not given."""
        if noise is None:
            noise = torch.randn_like(x_start)
        if noise.shape != x_start.shape:
            raise ValueError(f"noise must have x_start's shape {list(x_start.shape)}; "
                             f"got {list(noise.shape)}")
        return (self.extract("sqrt_alphas_cumprod", t, x_start.shape) * x_start
                + self.extract("sqrt_one_minus_alphas_cumprod", t, x_start.shape) * noise)

    def q_posterior_mean_variance(self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """(mean, β̃_t, clipped log β̃_t) of q(x_{t-1} | x_t, x_0)."""
        if x_start.shape != x_t.shape:
            raise ValueError(f"x_start and x_t must have one shape; got {list(x_start.shape)} "
                             f"and {list(x_t.shape)}")
        mean = (self.extract("posterior_mean_coef1", t, x_t.shape) * x_start
                + self.extract("posterior_mean_coef2", t, x_t.shape) * x_t)
        variance = self.extract("posterior_variance", t, x_t.shape)
        log_variance = self.extract("posterior_log_variance_clipped", t, x_t.shape)
        return mean, variance, log_variance

    # -- the reverse process -------------------------------------------------------------------

    def _predict_xstart_from_eps(self, x_t, t, eps):
        # x_0 = x_t / √ᾱ_t - √(1/ᾱ_t - 1) ε
        return (self.extract("sqrt_recip_alphas_cumprod", t, x_t.shape) * x_t
                - self.extract("sqrt_recipm1_alphas_cumprod", t, x_t.shape) * eps)

    def _predict_eps_from_xstart(self, x_t, t, pred_xstart):
        return ((self.extract("sqrt_recip_alphas_cumprod", t, x_t.shape) * x_t - pred_xstart)
                / self.extract("sqrt_recipm1_alphas_cumprod", t, x_t.shape))

    def _predict_xstart_from_xprev(self, x_t, t, xprev):
        # invert the posterior mean: x_0 = (x_{t-1} - c₂ x_t) / c₁
        return (self.extract("recip_posterior_mean_coef1", t, x_t.shape) * xprev
                - self.extract("posterior_mean_coef2_over_coef1", t, x_t.shape)
                * x_t)

    def p_mean_variance(self, model: Callable, x: torch.Tensor, t: torch.Tensor,
                        clip_denoised: bool = True, denoised_fn: Optional[Callable] = None,
                        model_kwargs: Optional[dict] = None) -> dict:
        """p(x_{t-1} | x_t) from ``model(x, t, **model_kwargs)``: a dict with ``mean``,
        ``variance``, ``log_variance``, ``pred_xstart`` and ``extra`` (the second item when the
        model returns a pair, else None).

        For a learned range the model's extra C channels v give
        log σ² = (v+1)/2 · log β_t + (1 - (v+1)/2) · log β̃_t (clipped). The predicted x_0 goes
        through ``denoised_fn`` and then, with ``clip_denoised``, is clamped to [-1, 1] before it
        forms the mean as the posterior's.
        """
        model_kwargs = {} if model_kwargs is None else model_kwargs
        B, C = x.shape[:2]
        if t.shape != (B,):
            raise ValueError(f"t must have shape [{B}] (one timestep per sample); "
                             f"got {list(t.shape)}")
        model_output = model(x, t, **model_kwargs)
        # a model may return (output, extra); extra is passed through untouched
        model_output, extra = (model_output if isinstance(model_output, tuple)
                               else (model_output, None))

        if self.model_var_type.learned:
            if model_output.shape != (B, C * 2, *x.shape[2:]):
                raise ValueError(f"a learned-variance model must output {2 * C} channels "
                                 f"(mean and variance); got shape {list(model_output.shape)}")
            model_output, var_values = torch.split(model_output, C, dim=1)
            if self.model_var_type == ModelVarType.LEARNED:
                log_variance = var_values
            else:
                min_log = self.extract("posterior_log_variance_clipped", t, x.shape)
                max_log = self.extract("log_betas", t, x.shape)
                frac = (var_values + 1) / 2  # v ∈ [-1, 1] → [0, 1]
                log_variance = frac * max_log + (1 - frac) * min_log
            variance = torch.exp(log_variance)
        elif self.model_var_type == ModelVarType.FIXED_LARGE:
            variance = self.extract("fixed_large_variance", t, x.shape)
            log_variance = self.extract("fixed_large_log_variance", t, x.shape)
        else:
            variance = self.extract("posterior_variance", t, x.shape)
            log_variance = self.extract("posterior_log_variance_clipped", t, x.shape)

        def process_xstart(x0):
            if denoised_fn is not None:
                x0 = denoised_fn(x0)
            return x0.clamp(-1, 1) if clip_denoised else x0

        if self.model_mean_type == ModelMeanType.PREVIOUS_X:
            pred_xstart = process_xstart(self._predict_xstart_from_xprev(x, t, model_output))
            mean = model_output
        else:
            if self.model_mean_type == ModelMeanType.START_X:
                pred_xstart = process_xstart(model_output)
            else:
                pred_xstart = process_xstart(self._predict_xstart_from_eps(x, t, model_output))
            mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        return {"mean": mean, "variance": variance, "log_variance": log_variance,
                "pred_xstart": pred_xstart, "extra": extra}
