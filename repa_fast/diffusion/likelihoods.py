"""Gaussian KL and the discretised Gaussian likelihood of the variational bound (in nats)."""
from __future__ import annotations

import math

import torch


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(μ₁, e^{v₁}) ‖ N(μ₂, e^{v₂})) elementwise, broadcasting; scalars are allowed but one
    argument must be a tensor:

        KL = ½ (-1 + v₂ - v₁ + e^{v₁ - v₂} + (μ₁ - μ₂)² e^{-v₂})
    """
    like = next((x for x in (mean1, logvar1, mean2, logvar2) if isinstance(x, torch.Tensor)), None)
    if like is None:
        raise TypeError("normal_kl needs at least one tensor argument")
    # exp() needs tensors; scalars take the dtype and device of the first tensor given
    logvar1, logvar2 = (v if isinstance(v, torch.Tensor) else torch.tensor(v).to(like)
                        for v in (logvar1, logvar2))
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """Φ(x) ≈ ½ (1 + tanh(√(2/π) (x + 0.044715 x³))), the approximation ADM uses (kept, not
    erf, so that the bound's values match theirs)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


def discretized_gaussian_log_likelihood(x: torch.Tensor, *, means: torch.Tensor,
                                        log_scales: torch.Tensor) -> torch.Tensor:
    """log P(bin of x) under N(means, e^{2·log_scales}), for x uint8 images mapped to [-1, 1].

    The bin of x is [x - 1/255, x + 1/255]; the outermost bins reach to ∓∞ (x < -0.999 or
    x > 0.999), so the 256 probabilities sum to 1. Probabilities are clamped at 1e-12 before
    the log.
    """
    if not x.shape == means.shape == log_scales.shape:
        raise ValueError(f"x, means and log_scales must have one shape; got {list(x.shape)}, "
                         f"{list(means.shape)} and {list(log_scales.shape)}")
    centred = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centred + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_std * (centred - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus,
                       torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))
