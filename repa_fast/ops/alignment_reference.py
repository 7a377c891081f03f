"""Reference (pure PyTorch) REPA alignment loss: projector MLP, patch-token pooling, cosine.

    p    = W3·silu(W2·silu(W1·h + b1) + b2) + b3           per SiT token h ∈ R^D
    loss = mean over batch and pooled tokens of -<p/max(|p|, ε), z/max(|z|, ε)>,  ε = 1e-12

When the SiT grid and the encoder grid differ by an integer factor k per side, the finer side is
average-pooled over k×k patches (``p`` when the SiT grid is finer, the target otherwise). With
equal grids this is the official ``proj_loss``. NaN or Inf inputs give a NaN loss (never a
finite number). Runs on every device and dtype; the cosine stage is computed in at least
float32 (float64 inputs stay float64).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from ..transport.losses import projection_loss


def _square_side(tokens: int, argument: str) -> int:
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise ValueError(f"{argument} must be a square number of tokens (a row-major square "
                         f"grid), or pass the grid size explicitly; got {tokens} tokens")
    return side


def _check_grid(grid: Optional[int], tokens: int, argument: str) -> int:
    if grid is None:
        return _square_side(tokens, argument)
    if grid * grid != tokens:
        raise ValueError(f"{argument}_grid={grid} needs {grid * grid} tokens; got {tokens}")
    return grid


def pool_ratio(hidden_grid: int, target_grid: int) -> tuple[int, int]:
    """``(k_hidden, k_target)``: the pooling factor of each side (1 = not pooled)."""
    if hidden_grid == target_grid:
        return 1, 1
    if hidden_grid % target_grid == 0:
        return hidden_grid // target_grid, 1
    if target_grid % hidden_grid == 0:
        return 1, target_grid // hidden_grid
    fits = sorted({d for d in range(1, hidden_grid + 1) if hidden_grid % d == 0}
                  | {hidden_grid * m for m in (2, 3, 4)})
    raise ValueError(f"the SiT grid ({hidden_grid}x{hidden_grid}) and the target grid "
                     f"({target_grid}x{target_grid}) must differ by an integer factor per side; "
                     f"target grids that would work with this SiT grid: {fits}")


def avg_pool_tokens(x: torch.Tensor, grid: int, k: int) -> torch.Tensor:
    """Average-pool row-major grid tokens [B, grid², C] over k×k patches -> [B, (grid/k)², C]."""
    if k == 1:
        return x
    b, _, c = x.shape
    g = grid // k
    return x.reshape(b, g, k, g, k, c).mean(dim=(2, 4)).reshape(b, g * g, c)


def _check_inputs(hidden, target, w1, b1, w2, b2, w3, b3, target_prefix_tokens):
    named = dict(hidden=hidden, target=target, w1=w1, b1=b1, w2=w2, b2=b2, w3=w3, b3=b3)
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor; got dtype {t.dtype}")
        if t.device != hidden.device:
            raise ValueError(f"{name} must be on the device of hidden ({hidden.device}); "
                             f"got {t.device}")
    if hidden.dim() != 3 or target.dim() != 3:
        raise ValueError(f"hidden and target must be [B, T, C]; got {list(hidden.shape)} and "
                         f"{list(target.shape)}")
    if hidden.shape[0] != target.shape[0]:
        raise ValueError(f"target must have the batch size of hidden ({hidden.shape[0]}); "
                         f"got {target.shape[0]}")
    if hidden.shape[0] == 0:
        raise ValueError("hidden must hold at least one sample; got an empty batch")
    d, z = hidden.shape[-1], target.shape[-1]
    p = w1.shape[0] if w1.dim() == 2 else -1
    expect = dict(w1=(p, d), b1=(p,), w2=(p, p), b2=(p,), w3=(z, p), b3=(z,))
    for name, shape in expect.items():
        if tuple(named[name].shape) != shape:
            raise ValueError(f"{name} must have shape {list(shape)} (nn.Linear layout, hidden "
                             f"size {d}, projector dim {p}, target dim {z}); got "
                             f"{list(named[name].shape)}")
    if not 0 <= target_prefix_tokens < target.shape[1]:
        raise ValueError(f"target_prefix_tokens must be in [0, {target.shape[1]}) (target has "
                         f"{target.shape[1]} tokens); got {target_prefix_tokens}")


def check_call(hidden, target, w1, b1, w2, b2, w3, b3, hidden_grid: Optional[int],
               target_grid: Optional[int], target_prefix_tokens: int) -> tuple[int, int]:
    """Validate one call of the op (every backend runs this first); returns the SiT and target
    grid sides ``(hg, tg)``, which differ by an integer factor."""
    _check_inputs(hidden, target, w1, b1, w2, b2, w3, b3, target_prefix_tokens)
    hg = _check_grid(hidden_grid, hidden.shape[1], "hidden")
    tg = _check_grid(target_grid, target.shape[1] - target_prefix_tokens, "target")
    pool_ratio(hg, tg)  # raises for grids that do not divide
    return hg, tg


def project(hidden: torch.Tensor, w1, b1, w2, b2, w3, b3) -> torch.Tensor:
    """The projector MLP ``Linear-SiLU-Linear-SiLU-Linear`` on [B, T, D] tokens."""
    return F.linear(F.silu(F.linear(F.silu(F.linear(hidden, w1, b1)), w2, b2)), w3, b3)


def repa_alignment_loss_reference(hidden: torch.Tensor, target: torch.Tensor,
                                  w1: torch.Tensor, b1: torch.Tensor,
                                  w2: torch.Tensor, b2: torch.Tensor,
                                  w3: torch.Tensor, b3: torch.Tensor, *,
                                  hidden_grid: Optional[int] = None,
                                  target_grid: Optional[int] = None,
                                  target_prefix_tokens: int = 0) -> torch.Tensor:
    """The alignment loss (module docstring) by plain PyTorch ops; a scalar of at least float32."""
    _check_inputs(hidden, target, w1, b1, w2, b2, w3, b3, target_prefix_tokens)
    target = target[:, target_prefix_tokens:]
    hg = _check_grid(hidden_grid, hidden.shape[1], "hidden")
    tg = _check_grid(target_grid, target.shape[1], "target")
    k_hidden, k_target = pool_ratio(hg, tg)
    p = avg_pool_tokens(project(hidden, w1, b1, w2, b2, w3, b3), hg, k_hidden)
    z = avg_pool_tokens(target, tg, k_target)
    return projection_loss([z], [p])
