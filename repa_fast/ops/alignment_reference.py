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
row. Arguments are checked by :func:`repa_fast.ops.alignment_common.check_call`; pooling and
:func:`normalize` live there too (the fused backends and ``transport.losses`` share them).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .alignment_common import EPS, avg_pool_tokens, check_call, normalize, pool_ratio

__all__ = ["EPS", "avg_pool_tokens", "check_call", "cosine_loss", "normalize", "pool_ratio",
           "project", "reference_loss", "repa_alignment_loss_reference"]


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
