"""Reference (pure PyTorch) REPA alignment loss: projector MLP, patch-token pooling, cosine.

    p    = W3·silu(W2·silu(W1·h + b1) + b2) + b3           per SiT token h ∈ R^D
    loss = mean over batch and pooled tokens of -<p/max(|p|, ε), z/max(|z|, ε)>,  ε = 1e-12

When the SiT grid and the encoder grid differ by an integer factor k per side, the finer side is
average-pooled over k×k patches (``p`` when the SiT grid is finer, the target otherwise). With
equal grids this is the official ``proj_loss`` (``F.normalize`` of both sides). NaN or Inf
inputs give a NaN loss (never a finite number). Runs on every device and dtype; the cosine
stage is computed in at least float32 (float64 inputs stay float64).

The norms do not overflow: |x|² of a float32 row overflows once |x| ≳ 1.8e19, and
``F.normalize`` then returns zeros (a silently zero loss). :func:`normalize` first divides each
row whose largest |x_i| is m ≥ 1 by 2^⌊log₂ m⌋ (ε with it), an exact power of two, so the
result is bitwise ``F.normalize``'s wherever that does not overflow, and right for every finite
row. Arguments are checked by :func:`repa_fast.ops.alignment_common.check_call`.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .alignment_common import check_call, pool_ratio

EPS = 1e-12  # F.normalize's eps

__all__ = ["avg_pool_tokens", "check_call", "cosine_loss", "normalize", "pool_ratio", "project",
           "reference_loss", "repa_alignment_loss_reference"]


def avg_pool_tokens(x: torch.Tensor, grid: int, k: int) -> torch.Tensor:
    """Average-pool row-major grid tokens [B, grid², C] over k×k patches -> [B, (grid/k)², C]."""
    if k == 1:
        return x
    b, _, c = x.shape
    g = grid // k
    return x.reshape(b, g, k, g, k, c).mean(dim=(2, 4)).reshape(b, g * g, c)


def normalize(x: torch.Tensor) -> torch.Tensor:
    """``F.normalize(x, dim=-1)`` = x / max(|x|, ε) without overflow, for every finite x.

    With m = max_i |x_i| ≥ 1 and s = 2^⌊log₂ m⌋ (so that m/s ∈ [1, 2)):
    x / max(|x|, ε) = (x/s) / max(|x/s|, ε/s), and |x/s|² ≤ 4·dim cannot overflow. Division by
    a power of two is exact, hence bitwise F.normalize where |x|² does not overflow; s is a
    constant of the row for autograd (the result does not depend on it). Rows with m < 1 (zero
    rows included) are not scaled; NaN/Inf rows stay NaN. Cost: a row maximum and one more
    elementwise division per side, small beside the projector's GEMMs.
    """
    m = x.detach().abs().amax(dim=-1, keepdim=True)
    mantissa, _ = torch.frexp(m)  # m = mantissa·2^e, mantissa ∈ [0.5, 1): m/(2·mantissa) = 2^(e−1)
    scale = torch.where(m >= 1, m / (2 * mantissa), torch.ones_like(m))
    x = x / scale
    return x / x.norm(2, -1, keepdim=True).clamp_min(EPS / scale)


def cosine_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """−mean cos(p, z) over the last dimension, F.normalize semantics (:func:`normalize`), in
    at least float32 (the official ``proj_loss`` for one encoder)."""
    dtype = torch.promote_types(torch.promote_types(p.dtype, z.dtype), torch.float32)
    with torch.autocast(p.device.type, enabled=False):
        return -(normalize(p.to(dtype)) * normalize(z.to(dtype))).sum(dim=-1).mean()


def project(hidden: torch.Tensor, w1, b1, w2, b2, w3, b3) -> torch.Tensor:
    """The projector MLP ``Linear-SiLU-Linear-SiLU-Linear`` on [B, T, D] tokens."""
    return F.linear(F.silu(F.linear(F.silu(F.linear(hidden, w1, b1)), w2, b2)), w3, b3)


def reference_loss(hidden, target, w1, b1, w2, b2, w3, b3, hidden_grid: int, target_grid: int,
                   target_prefix_tokens: int) -> torch.Tensor:
    """The loss of arguments :func:`check_call` accepted (grids resolved by it)."""
    k_hidden, k_target = pool_ratio(hidden_grid, target_grid)
    p = avg_pool_tokens(project(hidden, w1, b1, w2, b2, w3, b3), hidden_grid, k_hidden)
    z = avg_pool_tokens(target[:, target_prefix_tokens:], target_grid, k_target)
    return cosine_loss(p, z)


def repa_alignment_loss_reference(hidden: torch.Tensor, target: torch.Tensor,
                                  w1: torch.Tensor, b1: torch.Tensor,
                                  w2: torch.Tensor, b2: torch.Tensor,
                                  w3: torch.Tensor, b3: torch.Tensor, *,
                                  hidden_grid: Optional[int] = None,
                                  target_grid: Optional[int] = None,
                                  target_prefix_tokens: int = 0) -> torch.Tensor:
    """The alignment loss (module docstring) by plain PyTorch ops; a scalar of at least float32."""
    hg, tg = check_call(hidden, target, w1, b1, w2, b2, w3, b3, hidden_grid, target_grid,
                        target_prefix_tokens)
    return reference_loss(hidden, target, w1, b1, w2, b2, w3, b3, hg, tg, target_prefix_tokens)
