"""ODE (Euler / Heun) and SDE (Euler-Maruyama) samplers with classifier-free guidance.

Same signatures, time grids, float64 state and random-draw order as the official REPA
``samplers.py``, so a seeded call returns the same samples. Time runs from t=1 (noise) to t=0.

CFG combines ``v = v_uncond + cfg_scale·(v_cond - v_uncond)`` only while
``guidance_low <= t <= guidance_high`` (the guidance interval); outside it, and whenever
``cfg_scale <= 1``, the model runs on the conditional batch alone.

The loops (:func:`_ode`, :func:`_sde`) take the condition as a :class:`_Conditioning`: the
keyword it is passed under (``y=`` labels here, ``context=`` text in :mod:`.samplers_t2i`)
and the guided pair ``[cond; null]``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .paths import check_path_type, interpolant

NoiseFn = Callable[[torch.Tensor], torch.Tensor]


def expand_t_like_x(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """[N] times -> [N, 1, ..., 1], broadcastable against ``x``."""
    return t.view(t.size(0), *([1] * (x.dim() - 1)))


def get_score_from_velocity(vt: torch.Tensor, xt: torch.Tensor, t: torch.Tensor,
                            path_type: str = "linear") -> torch.Tensor:
    """Score ``∇log p_t(x)`` from the velocity: with ``r = α/α'``,
    ``s = (r·v - x) / (σ² - r·σ'·σ)``."""
    alpha_t, sigma_t, d_alpha_t, d_sigma_t = interpolant(expand_t_like_x(t, xt), path_type)
    reverse_alpha_ratio = alpha_t / d_alpha_t
    var = sigma_t ** 2 - reverse_alpha_ratio * d_sigma_t * sigma_t
    return (reverse_alpha_ratio * vt - xt) / var


def compute_diffusion(t_cur):
    """SDE diffusion coefficient ``w(t) = 2t``."""
    return 2 * t_cur


def _null_labels(model, y: torch.Tensor, null_class: Optional[int]) -> torch.Tensor:
    if null_class is None:
        # The official samplers hard-code 1000 (ImageNet); models here know their class count.
        null_class = getattr(model, "num_classes", 1000)
    return torch.full_like(y, null_class)


@dataclass(frozen=True)
class _Conditioning:
    """The model's condition and guidance settings for one sampler call.

    ``model(x, t, **{keyword: cond})`` unguided; guided, the batch is ``[x; x]`` with
    ``pair = [cond; null]`` (built once per call, as the official builds it per step).
    ``dtype`` is the dtype the model runs in (the latents').
    """

    keyword: str
    cond: torch.Tensor
    pair: Optional[torch.Tensor]
    cfg_scale: float
    guidance_low: float
    guidance_high: float
    dtype: torch.dtype

    @classmethod
    def build(cls, keyword: str, cond: torch.Tensor, null: Optional[torch.Tensor],
              cfg_scale: float, guidance_low: float, guidance_high: float,
              dtype: torch.dtype) -> "_Conditioning":
        pair = torch.cat([cond, null], dim=0) if cfg_scale > 1.0 else None
        return cls(keyword, cond, pair, cfg_scale, guidance_low, guidance_high, dtype)

    def guided(self, t: torch.Tensor) -> bool:
        """The official test: ``cfg_scale > 1`` and ``guidance_low <= t <= guidance_high``."""
        return self.cfg_scale > 1.0 and self.guidance_low <= t <= self.guidance_high


def _guided_drift(model, x: torch.Tensor, t_cur: torch.Tensor, cond: _Conditioning,
                  drift: Optional[Callable] = None,
                  t_guide: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One model call at time ``t_cur`` (a float64 scalar), CFG pair batched when guided.

    Guidance is on when ``t_guide`` (default ``t_cur``) lies in the interval. ``drift(v, x_in,
    t_in)`` turns the velocity into the ODE/SDE drift before guidance mixes the halves (the
    official order of operations). The model's output ``[0]`` is used.
    """
    guided = cond.guided(t_cur if t_guide is None else t_guide)
    if guided:
        model_input, c_in = torch.cat([x, x], dim=0), cond.pair
    else:
        model_input, c_in = x, cond.cond
    time_input = torch.full((model_input.size(0),), float(t_cur), dtype=torch.float64,
                            device=x.device)
    out = model(model_input.to(dtype=cond.dtype), time_input.to(dtype=cond.dtype),
                **{cond.keyword: c_in})[0]
    out = out.to(torch.float64)
    if drift is not None:
        out = drift(out, model_input, time_input)
    if guided:
        out_cond, out_uncond = out.chunk(2)
        out = out_uncond + cond.cfg_scale * (out_cond - out_uncond)
    return out


def _ode(model, latents: torch.Tensor, cond: _Conditioning, num_steps: int,
         heun: bool) -> torch.Tensor:
    """The official ``euler_sampler`` loop: ``t = linspace(1, 0, num_steps + 1)``, float64
    state, Heun's correction on all steps but the last."""
    t_steps = torch.linspace(1, 0, num_steps + 1, dtype=torch.float64)
    x_next = latents.to(torch.float64)
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next
        d_cur = _guided_drift(model, x_cur, t_cur, cond)
        x_next = x_cur + (t_next - t_cur) * d_cur
        if heun and i < num_steps - 1:
            # The corrector is guided when t_cur (not t_next) is in the interval, as official.
            d_prime = _guided_drift(model, x_next, t_next, cond, t_guide=t_cur)
            x_next = x_cur + (t_next - t_cur) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next


def _sde(model, latents: torch.Tensor, cond: _Conditioning, num_steps: int, path_type: str,
         noise_fn: Optional[NoiseFn]) -> torch.Tensor:
    """The official ``euler_maruyama_sampler`` loop: ``t = linspace(1, 0.04, num_steps)``, then
    a last noise-free Euler step to t=0; ``noise_fn(x)`` (default ``randn_like``) draws each
    step's noise before its model call."""
    draw = torch.randn_like if noise_fn is None else noise_fn
    t_steps = torch.linspace(1.0, 0.04, num_steps, dtype=torch.float64)
    t_steps = torch.cat([t_steps, torch.tensor([0.0], dtype=torch.float64)])
    x_next = latents.to(torch.float64)

    def sde_drift(diffusion):
        def drift(v, x_in, t_in):
            return v - 0.5 * diffusion * get_score_from_velocity(v, x_in, t_in, path_type)
        return drift

    for t_cur, t_next in zip(t_steps[:-2], t_steps[1:-1]):
        dt = t_next - t_cur
        x_cur = x_next
        diffusion = compute_diffusion(t_cur)
        deps = draw(x_cur) * torch.sqrt(torch.abs(dt))
        d_cur = _guided_drift(model, x_cur, t_cur, cond, drift=sde_drift(diffusion))
        x_next = x_cur + d_cur * dt + torch.sqrt(diffusion) * deps

    # Last step: the mean of the Euler-Maruyama update, without noise.
    t_cur, t_next = t_steps[-2], t_steps[-1]
    x_cur = x_next
    d_cur = _guided_drift(model, x_cur, t_cur, cond, drift=sde_drift(compute_diffusion(t_cur)))
    return x_cur + (t_next - t_cur) * d_cur


@torch.no_grad()
def euler_sampler(model, latents: torch.Tensor, y: torch.Tensor, num_steps: int = 20,
                  heun: bool = False, cfg_scale: float = 1.0, guidance_low: float = 0.0,
                  guidance_high: float = 1.0, path_type: str = "linear", *,
                  null_class: Optional[int] = None) -> torch.Tensor:
    """Probability-flow ODE on ``t = linspace(1, 0, num_steps + 1)``; Heun's correction on all
    steps but the last. ``path_type`` is unused (the velocity is the ODE drift), as official.
    Returns float64 samples; the model runs in ``latents.dtype``."""
    _check_steps(num_steps)
    y_null = _null_labels(model, y, null_class) if cfg_scale > 1.0 else None
    cond = _Conditioning.build("y", y, y_null, cfg_scale, guidance_low, guidance_high,
                               latents.dtype)
    return _ode(model, latents, cond, num_steps, heun)


@torch.no_grad()
def euler_maruyama_sampler(model, latents: torch.Tensor, y: torch.Tensor, num_steps: int = 20,
                           heun: bool = False, cfg_scale: float = 1.0, guidance_low: float = 0.0,
                           guidance_high: float = 1.0, path_type: str = "linear", *,
                           null_class: Optional[int] = None,
                           noise_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
                           ) -> torch.Tensor:
    """Reverse SDE ``dx = [v - ½w(t)·s(x, t)] dt + √w(t) dW``, ``w(t) = 2t``, on
    ``t = linspace(1, 0.04, num_steps)`` then a last noise-free Euler step to t=0.
    ``heun`` is unused, as official. Noise is drawn with ``noise_fn(x)`` (default
    ``torch.randn_like``, the official draw) before each model call (the official order);
    e.g. ``repa_fast.generation`` passes per-sample generators. Returns float64 samples."""
    _check_steps(num_steps)
    check_path_type(path_type)
    y_null = _null_labels(model, y, null_class) if cfg_scale > 1.0 else None
    cond = _Conditioning.build("y", y, y_null, cfg_scale, guidance_low, guidance_high,
                               latents.dtype)
    return _sde(model, latents, cond, num_steps, path_type, noise_fn)


def _check_steps(num_steps: int) -> None:
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer; got {num_steps!r}")
