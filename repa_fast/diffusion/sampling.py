"""Ancestral (DDPM) and DDIM sampling of the Gaussian diffusion.

The draws match DiT's for the same seed: the start noise is ``torch.randn(*shape)`` (unless
given), then one ``randn_like(x)`` per step, after the model call, also at the last step (where
it is masked out) and also for DDIM with η = 0. A ``generator`` replaces the global stream with
its own, drawn on the generator's device.
"""
from __future__ import annotations

from typing import Callable, Iterator, Optional

import torch


def _randn_like(x: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    if generator is None:
        return torch.randn_like(x)
    return torch.randn(x.shape, generator=generator, device=generator.device,
                       dtype=x.dtype).to(x.device)


def _nonzero_mask(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    # no noise at t = 0: the last step returns the mean
    return (t != 0).float().view(-1, *([1] * (x.dim() - 1)))


def _default_device(model, noise: Optional[torch.Tensor]):
    # DiT takes the device of the model's parameters; plain callables fall back to the noise's
    parameters = getattr(model, "parameters", None)
    first = next(iter(parameters()), None) if callable(parameters) else None
    if first is not None:
        return first.device
    return noise.device if noise is not None else torch.device("cpu")


class DiffusionSampling:
    """Mixed into :class:`~.gaussian.GaussianDiffusion`; uses its tables and ``p_mean_variance``."""

    def condition_mean(self, cond_fn, p_mean_var, x, t, model_kwargs=None):
        """Sohl-Dickstein et al.'s guidance: μ + σ² ∇ log p(y | x)."""
        gradient = cond_fn(x, t, **(model_kwargs or {}))
        return p_mean_var["mean"].float() + p_mean_var["variance"] * gradient.float()

    def condition_score(self, cond_fn, p_mean_var, x, t, model_kwargs=None):
        """Song et al.'s guidance: ε ← ε - √(1 - ᾱ_t) ∇ log p(y | x); x̂_0 and μ follow."""
        alpha_bar = self.extract("alphas_cumprod", t, x.shape)
        eps = self._predict_eps_from_xstart(x, t, p_mean_var["pred_xstart"])
        eps = eps - (1 - alpha_bar).sqrt() * cond_fn(x, t, **(model_kwargs or {}))
        out = dict(p_mean_var)
        out["pred_xstart"] = self._predict_xstart_from_eps(x, t, eps)
        out["mean"], _, _ = self.q_posterior_mean_variance(out["pred_xstart"], x, t)
        return out

    # -- DDPM ------------------------------------------------------------------------------------

    def p_sample(self, model: Callable, x: torch.Tensor, t: torch.Tensor, clip_denoised=True,
                 denoised_fn=None, cond_fn=None, model_kwargs=None,
                 generator: Optional[torch.Generator] = None,
                 noise_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> dict:
        """x_{t-1} = μ_θ + [t > 0] exp(½ log σ²) z; returns ``{"sample", "pred_xstart"}``.
        z is ``noise_fn(x)`` when given (e.g. per-sample streams), else ``randn_like`` (from
        ``generator``); drawn after the model call either way."""
        out = self.p_mean_variance(model, x, t, clip_denoised=clip_denoised,
                                   denoised_fn=denoised_fn, model_kwargs=model_kwargs)
        noise = noise_fn(x) if noise_fn is not None else _randn_like(x, generator)
        if cond_fn is not None:
            out["mean"] = self.condition_mean(cond_fn, out, x, t, model_kwargs=model_kwargs)
        sample = out["mean"] + _nonzero_mask(t, x) * torch.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def p_sample_loop(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None,
                      cond_fn=None, model_kwargs=None, device=None, progress=False,
                      generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """x_0 from x_T = ``noise`` (or a fresh draw) through all T steps, without gradients."""
        final = None
        for final in self.p_sample_loop_progressive(
                model, shape, noise=noise, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
                cond_fn=cond_fn, model_kwargs=model_kwargs, device=device, progress=progress,
                generator=generator):
            pass
        return final["sample"]

    def p_sample_loop_progressive(self, model, shape, noise=None, clip_denoised=True,
                                  denoised_fn=None, cond_fn=None, model_kwargs=None, device=None,
                                  progress=False, generator=None) -> Iterator[dict]:
        """Yields ``p_sample``'s dict at t = T-1, ..., 0."""
        step = lambda x, t: self.p_sample(  # noqa: E731
            model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn, cond_fn=cond_fn,
            model_kwargs=model_kwargs, generator=generator)
        yield from self._loop(model, shape, noise, device, progress, generator, step)

    # -- DDIM ------------------------------------------------------------------------------------

    def _ddim_prediction(self, model, x, t, clip_denoised, denoised_fn, cond_fn,
                         model_kwargs) -> tuple[dict, torch.Tensor]:
        """The model's x̂_0 (score-guided by ``cond_fn`` when given) and the ε it implies,
        ε = (√(1/ᾱ_t) x_t - x̂_0) / √(1/ᾱ_t - 1): what both DDIM directions step with."""
        out = self.p_mean_variance(model, x, t, clip_denoised=clip_denoised,
                                   denoised_fn=denoised_fn, model_kwargs=model_kwargs)
        if cond_fn is not None:
            out = self.condition_score(cond_fn, out, x, t, model_kwargs=model_kwargs)
        return out, self._predict_eps_from_xstart(x, t, out["pred_xstart"])

    def ddim_sample(self, model, x, t, clip_denoised=True, denoised_fn=None, cond_fn=None,
                    model_kwargs=None, eta: float = 0.0,
                    generator: Optional[torch.Generator] = None) -> dict:
        """DDIM's step (Song et al., eq. 12), ε re-derived from x̂_0:

            σ = η √((1 - ᾱ_prev)/(1 - ᾱ_t)) √(1 - ᾱ_t/ᾱ_prev)
            x_{t-1} = √ᾱ_prev x̂_0 + √(1 - ᾱ_prev - σ²) ε + [t > 0] σ z
        """
        out, eps = self._ddim_prediction(model, x, t, clip_denoised, denoised_fn, cond_fn,
                                         model_kwargs)
        alpha_bar = self.extract("alphas_cumprod", t, x.shape)
        alpha_bar_prev = self.extract("alphas_cumprod_prev", t, x.shape)
        sigma = (eta * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar))
                 * torch.sqrt(1 - alpha_bar / alpha_bar_prev))
        noise = _randn_like(x, generator)  # drawn even for η = 0, as DiT does
        mean_pred = (out["pred_xstart"] * torch.sqrt(alpha_bar_prev)
                     + torch.sqrt(1 - alpha_bar_prev - sigma ** 2) * eps)
        sample = mean_pred + _nonzero_mask(t, x) * sigma * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def ddim_reverse_sample(self, model, x, t, clip_denoised=True, denoised_fn=None,
                            cond_fn=None, model_kwargs=None, eta: float = 0.0) -> dict:
        """x_{t+1} by DDIM's ODE run forwards: √ᾱ_next x̂_0 + √(1 - ᾱ_next) ε (η must be 0)."""
        if eta != 0.0:
            raise ValueError(f"eta must be 0 for the reverse (deterministic) ODE; got {eta!r}")
        out, eps = self._ddim_prediction(model, x, t, clip_denoised, denoised_fn, cond_fn,
                                         model_kwargs)
        alpha_bar_next = self.extract("alphas_cumprod_next", t, x.shape)
        mean_pred = (out["pred_xstart"] * torch.sqrt(alpha_bar_next)
                     + torch.sqrt(1 - alpha_bar_next) * eps)
        return {"sample": mean_pred, "pred_xstart": out["pred_xstart"]}

    def ddim_sample_loop(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None,
                         cond_fn=None, model_kwargs=None, device=None, progress=False,
                         eta: float = 0.0, generator: Optional[torch.Generator] = None):
        """x_0 by DDIM from x_T = ``noise`` (or a fresh draw), without gradients."""
        final = None
        for final in self.ddim_sample_loop_progressive(
                model, shape, noise=noise, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
                cond_fn=cond_fn, model_kwargs=model_kwargs, device=device, progress=progress,
                eta=eta, generator=generator):
            pass
        return final["sample"]

    def ddim_sample_loop_progressive(self, model, shape, noise=None, clip_denoised=True,
                                     denoised_fn=None, cond_fn=None, model_kwargs=None,
                                     device=None, progress=False, eta: float = 0.0,
                                     generator=None) -> Iterator[dict]:
        """Yields ``ddim_sample``'s dict at t = T-1, ..., 0."""
        step = lambda x, t: self.ddim_sample(  # noqa: E731
            model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn, cond_fn=cond_fn,
            model_kwargs=model_kwargs, eta=eta, generator=generator)
        yield from self._loop(model, shape, noise, device, progress, generator, step)

    def _loop(self, model, shape, noise, device, progress, generator, step) -> Iterator[dict]:
        if not isinstance(shape, (tuple, list)):
            raise ValueError(f"shape must be a tuple or list such as (N, C, H, W); got {shape!r}")
        device = _default_device(model, noise) if device is None else device
        if noise is not None:
            img = noise
        elif generator is None:
            img = torch.randn(*shape, device=device)
        else:
            img = torch.randn(*shape, generator=generator, device=generator.device).to(device)
        indices = list(range(self.num_timesteps))[::-1]
        if progress:
            from tqdm.auto import tqdm  # optional dependency, only for the progress bar
            indices = tqdm(indices)
        for i in indices:
            t = torch.full((shape[0],), i, device=device, dtype=torch.long)  # no host copy
            with torch.no_grad():
                out = step(img, t)
                yield out
                img = out["sample"]
