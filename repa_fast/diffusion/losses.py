"""Training losses of the Gaussian diffusion: the ε-MSE and the variational bound's terms."""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from .kinds import LossType, ModelMeanType
from .likelihoods import discretized_gaussian_log_likelihood, normal_kl
from .tensors import mean_flat


class DiffusionLosses:
    """Mixed into :class:`~.gaussian.GaussianDiffusion`; uses its tables and ``p_mean_variance``."""

    def _vb_terms_bpd(self, model: Callable, x_start: torch.Tensor, x_t: torch.Tensor,
                      t: torch.Tensor, clip_denoised: bool = True,
                      model_kwargs: Optional[dict] = None) -> dict:
        """One term of the bound, in bits per dimension, shape [N]:

        * t > 0: KL(q(x_{t-1} | x_t, x_0) ‖ p(x_{t-1} | x_t)), the posterior with its clipped
          log variance;
        * t = 0: the decoder's -log p(x_0 | x_1) over the 256 discrete bins.

        Returns ``{"output": [N], "pred_xstart": x̂_0}``.
        """
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self.p_mean_variance(model, x_t, t, clip_denoised=clip_denoised,
                                   model_kwargs=model_kwargs)
        kl = normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])
        kl = mean_flat(kl) / math.log(2.0)
        decoder_nll = -discretized_gaussian_log_likelihood(
            x_start, means=out["mean"], log_scales=0.5 * out["log_variance"])
        decoder_nll = mean_flat(decoder_nll) / math.log(2.0)
        return {"output": torch.where(t == 0, decoder_nll, kl), "pred_xstart": out["pred_xstart"]}

    def training_losses(self, model: Callable, x_start: torch.Tensor, t: torch.Tensor,
                        model_kwargs: Optional[dict] = None,
                        noise: Optional[torch.Tensor] = None) -> dict:
        """Per-sample losses at timesteps ``t`` (indices into this diffusion's steps), shape [N].

        MSE losses (DiT's default): ``mse = mean_flat((target - mean_output)²)`` with target ε
        (x_0 or the posterior mean for the other mean types); a learned σ adds ``vb``, the bound's
        term computed on the output with its mean half detached, so the bound trains only the
        variance (Nichol & Dhariwal's hybrid loss); RESCALED_MSE scales ``vb`` by T/1000.
        ``loss = mse (+ vb)``.

        KL losses: ``loss`` is the bound's term alone (times T for RESCALED_KL).
        """
        model_kwargs = {} if model_kwargs is None else model_kwargs
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise=noise)
        terms = {}

        if self.loss_type.is_vb():
            terms["loss"] = self._vb_terms_bpd(model, x_start, x_t, t, clip_denoised=False,
                                               model_kwargs=model_kwargs)["output"]
            if self.loss_type == LossType.RESCALED_KL:
                terms["loss"] = terms["loss"] * self.num_timesteps
            return terms

        model_output = model(x_t, t, **model_kwargs)
        if self.model_var_type.learned:
            B, C = x_t.shape[:2]
            if model_output.shape != (B, C * 2, *x_t.shape[2:]):
                raise ValueError(f"a learned-variance model must output {2 * C} channels "
                                 f"(mean and variance); got shape {list(model_output.shape)}")
            model_output, var_values = torch.split(model_output, C, dim=1)
            # the bound must not pull the mean away from the MSE's optimum: detach it
            frozen_out = torch.cat([model_output.detach(), var_values], dim=1)
            terms["vb"] = self._vb_terms_bpd(lambda *args, r=frozen_out: r, x_start, x_t, t,
                                             clip_denoised=False)["output"]
            if self.loss_type == LossType.RESCALED_MSE:
                # ADM's factor: without 1/1000 the bound's term outweighs the MSE
                terms["vb"] = terms["vb"] * (self.num_timesteps / 1000.0)

        if self.model_mean_type == ModelMeanType.PREVIOUS_X:
            target = self.q_posterior_mean_variance(x_start, x_t, t)[0]
        elif self.model_mean_type == ModelMeanType.START_X:
            target = x_start
        else:
            target = noise
        if model_output.shape != target.shape:
            raise ValueError(f"the model's mean output must have the input's shape "
                             f"{list(target.shape)}; got {list(model_output.shape)}")
        terms["mse"] = mean_flat((target - model_output) ** 2)
        terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        return terms
