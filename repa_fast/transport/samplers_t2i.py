"""Text-to-image ODE (Euler / Heun) and SDE (Euler-Maruyama) samplers with CFG.

The official REPA ``samplers_t2i.py``: the loops, time grids, float64 state, guidance interval
and random-draw order of the class-conditional samplers (:mod:`.samplers`, whose loops run
here), with two changes, both the official's:

* the condition is a text context ``y`` [N, L, D] passed as ``model(x, t, context=...)``;
* the null condition ``y_null`` is an argument — the empty caption's context already repeated
  to [N, L, D] (the official ``generate_t2i.py`` passes ``y_null.repeat(N, 1, 1)``); guided
  steps run the batch ``[x; x]`` with ``context=torch.cat([y, y_null])``.

The model returns a tuple whose ``[0]`` is the velocity (MMDiT's ``(v, zs)``). As in
:mod:`.samplers`, ``euler_sampler`` ignores ``path_type`` and ``euler_maruyama_sampler`` ignores
``heun`` (the official ones do); ``y_null`` may be None when ``cfg_scale <= 1`` (never used).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .paths import check_path_type
from .samplers import (_check_steps, _Conditioning, _ode, _sde, compute_diffusion,
                       expand_t_like_x, get_score_from_velocity)

__all__ = ["compute_diffusion", "euler_maruyama_sampler", "euler_sampler", "expand_t_like_x",
           "get_score_from_velocity"]


def _check_context(latents: torch.Tensor, y: torch.Tensor, y_null: Optional[torch.Tensor],
                   cfg_scale: float) -> None:
    """``y`` [N, ...] with latents' N; ``y_null`` of ``y``'s shape (required when guided)."""
    if not torch.is_tensor(latents) or latents.dim() < 1:
        raise ValueError(f"latents must be a tensor [N, C, H, W]; got {_describe(latents)}")
    n = latents.shape[0]
    if not torch.is_tensor(y) or y.dim() < 1 or y.shape[0] != n:
        raise ValueError(f"y (the text context) must be a tensor [N, L, D] with the batch size "
                         f"of latents, N={n}; got {_describe(y)}")
    if y_null is None:
        if cfg_scale > 1.0:
            raise ValueError(f"y_null (the empty context, [N, L, D]) is required with "
                             f"cfg_scale > 1; got None (cfg_scale={cfg_scale})")
        return
    if not torch.is_tensor(y_null) or y_null.shape != y.shape:
        raise ValueError(f"y_null (the empty context) must have the shape of y, "
                         f"{list(y.shape)} (the official repeats it to the batch size); got "
                         f"{_describe(y_null)}")


def _describe(value) -> str:
    return f"shape {list(value.shape)}" if torch.is_tensor(value) else repr(type(value).__name__)


@torch.no_grad()
def euler_sampler(model, latents: torch.Tensor, y: torch.Tensor, y_null: Optional[torch.Tensor],
                  num_steps: int = 20, heun: bool = False, cfg_scale: float = 1.0,
                  guidance_low: float = 0.0, guidance_high: float = 1.0,
                  path_type: str = "linear") -> torch.Tensor:
    """Probability-flow ODE on ``t = linspace(1, 0, num_steps + 1)``, conditioned on the text
    context ``y`` [N, L, D] (``y_null``: the empty context, same shape, for CFG); Heun's
    correction on all steps but the last, guided when ``t_cur`` is in the interval.
    ``path_type`` is unused and unchecked (the velocity is the ODE drift), as official.
    Returns float64 samples; the model runs in ``latents.dtype``."""
    _check_steps(num_steps)
    _check_context(latents, y, y_null, cfg_scale)
    cond = _Conditioning.build("context", y, y_null, cfg_scale, guidance_low, guidance_high,
                               latents.dtype)
    return _ode(model, latents, cond, num_steps, heun)


@torch.no_grad()
def euler_maruyama_sampler(model, latents: torch.Tensor, y: torch.Tensor,
                           y_null: Optional[torch.Tensor], num_steps: int = 20,
                           heun: bool = False, cfg_scale: float = 1.0, guidance_low: float = 0.0,
                           guidance_high: float = 1.0, path_type: str = "linear", *,
                           noise_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
                           ) -> torch.Tensor:
    """Reverse SDE ``dx = [v - ½w(t)·s(x, t)] dt + √w(t) dW``, ``w(t) = 2t``, on
    ``t = linspace(1, 0.04, num_steps)`` then a last noise-free Euler step to t=0, conditioned
    on the text context ``y`` (``y_null`` for CFG, as :func:`euler_sampler`). ``heun`` is
    unused, as official. Noise is drawn with ``noise_fn(x)`` (default ``torch.randn_like``, the
    official draw) before each step's model call, ``num_steps - 1`` times. Returns float64."""
    _check_steps(num_steps)
    check_path_type(path_type)
    _check_context(latents, y, y_null, cfg_scale)
    cond = _Conditioning.build("context", y, y_null, cfg_scale, guidance_low, guidance_high,
                               latents.dtype)
    return _sde(model, latents, cond, num_steps, path_type, noise_fn)
