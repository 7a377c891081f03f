"""One text-to-image batch: per-sample noise -> the t2i ODE/SDE sampler -> float64 latents.

The samplers are ``repa_fast.transport.samplers_t2i``'s, unchanged (the official
``samplers_t2i.py`` grids, float64 state and CFG pairing: ``context=[c; c_empty]``). Around them,
as :mod:`.sample_batch` does for class-conditional SiTs:

* the model call (:class:`TextVelocity`) passes the text context as ``model(x, t,
  context=c)``, keeps the velocity ``[0]``, runs under autocast when asked and can be
  ``torch.compile``d (:class:`~.sample_batch.ModelCall`'s options);
* guidance uses the empty caption's context, given once ([L, D] or [1, L, D]) and repeated to
  the batch (the official ``y_null.repeat(N, 1, 1)``);
* every random number of sample ``i`` comes from its own generator
  (:func:`~.seeding.index_generator`), in this order::

      z    = randn(C, H, W)   float32   the initial latents
      dW_k = randn(C, H, W)   float64   SDE step k = 0 .. num_steps - 2

  (no label draw: the caption comes from the data). A sample therefore does not depend on the
  other samples of its batch (up to floating-point rounding of batched kernels), on the number
  of processes or on resuming; the official ``generate_t2i.py`` draws ``z`` and the SDE noise
  from one global RNG per rank seeded ``global_seed + rank``.

The configuration is :class:`~.sample_batch.SamplerConfig`: ``generate_t2i.py`` has the same
flags and defaults as ``generate.py`` (``--mode ode``, ``--num-steps 50``, ``--cfg-scale 1.5``,
``--guidance-low 0``, ``--guidance-high 1``, ``--heun``, ``--path-type linear``).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..transport.samplers_t2i import euler_maruyama_sampler, euler_sampler
from .sample_batch import ModelCall, SamplerConfig
from .seeding import PerSampleNoise, index_generator

MODES = ("ode", "sde")


class TextVelocity(ModelCall):
    """``velocity(x, t, context) -> (v,)``: the call the t2i samplers make,
    ``model(x, t, context=context)[0]`` (the official MMDiT returns ``(v, zs)``), through
    ``model.forward_with_hidden`` where the model has it (``repa_fast.models.MMDiT``: the same
    output without running the REPA projectors, useless for sampling).

    ``autocast_dtype``, ``compile`` and ``compile_mode`` as :class:`~.sample_batch.ModelCall`.
    Under CUDA graphs the output buffer is reused by the next replay, which is safe because the
    sampler converts the (float32) output to float64, a copy, right away.
    """

    def __init__(self, model: torch.nn.Module, *, autocast_dtype: Optional[torch.dtype] = None,
                 compile: bool = False, compile_mode: str = "default"):
        super().__init__(model, autocast_dtype=autocast_dtype, compile=compile,
                         compile_mode=compile_mode)
        self._skip_projectors = hasattr(model, "forward_with_hidden")

    def _output(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        if self._skip_projectors:
            return self.model.forward_with_hidden(x, t, context=context)[0]
        return self.model(x, t, context=context)[0]

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor):
        return (self.call(x, t, context),)


def initial_noise(indices: Sequence[int], global_seed: int, shape: Sequence[int]):
    """``(latents [B, *shape] float32, generators)`` of these sample indices: sample ``i``'s
    ``z = randn(shape)`` from :func:`~.seeding.index_generator` ``(global_seed, i)``, its
    generator left where its SDE noise starts."""
    generators, latents = [], []
    for index in indices:
        gen = index_generator(global_seed, index)
        latents.append(torch.randn(tuple(shape), generator=gen))
        generators.append(gen)
    return torch.stack(latents), generators


def null_context_batch(null_context: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """The empty caption's context ([L, D], [1, L, D] or already [N, L, D]) as [N, L, D] on
    ``context``'s device and dtype (a view, no copy, when it needs repeating)."""
    if not torch.is_tensor(context) or context.dim() != 3:
        raise ValueError(f"context must be a tensor [N, L, D]; got "
                         f"{_shape(context)}")
    n, row = context.shape[0], context.shape[1:]
    if torch.is_tensor(null_context):
        null = null_context.to(device=context.device, dtype=context.dtype)
        if null.shape == row:
            return null.unsqueeze(0).expand(n, *row)
        if null.shape == (1, *row):
            return null.expand(n, *row)
        if null.shape == context.shape:
            return null
    raise ValueError(f"null_context (the empty caption's context) must be [L, D], [1, L, D] or "
                     f"[N, L, D] with context's [N, L, D] = {list(context.shape)}; got "
                     f"{_shape(null_context)}")


def _shape(value) -> str:
    return f"shape {list(value.shape)}" if torch.is_tensor(value) else repr(type(value).__name__)


def sample_t2i_latents(velocity: TextVelocity, latents: torch.Tensor, context: torch.Tensor,
                       null_context: Optional[torch.Tensor],
                       generators: Sequence[torch.Generator],
                       config: SamplerConfig) -> torch.Tensor:
    """Run the configured t2i sampler on one batch; float64 samples [B, C, H, W].

    ``context`` [B, L, D] is the batch's captions, ``null_context`` the empty caption's
    (:func:`null_context_batch`; may be None when ``cfg_scale <= 1``). SDE noise for row ``j``
    comes from ``generators[j]`` (continuing after its initial draw, :func:`initial_noise`).
    The result equals :func:`repa_fast.transport.samplers_t2i.euler_sampler` /
    ``euler_maruyama_sampler`` fed the same latents and noise.
    """
    if config.mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}; got {config.mode!r}")
    if len(generators) != latents.shape[0]:
        raise ValueError(f"generators must hold one generator per sample of latents, "
                         f"{latents.shape[0]}; got {len(generators)}")
    null = None
    if null_context is not None or config.cfg_scale > 1.0:
        null = null_context_batch(null_context, context)
    kwargs = dict(num_steps=config.num_steps, heun=config.heun, cfg_scale=config.cfg_scale,
                  guidance_low=config.guidance_low, guidance_high=config.guidance_high,
                  path_type=config.path_type)
    if config.mode == "ode":
        return euler_sampler(velocity, latents, context, null, **kwargs)
    noise = PerSampleNoise(generators)
    samples = euler_maruyama_sampler(velocity, latents, context, null, noise_fn=noise, **kwargs)
    # The sampler draws once per step but the last; anything else means it changed how it
    # draws noise, and the samples would no longer follow the per-sample streams.
    if noise.draws != config.num_steps - 1:
        raise RuntimeError(f"euler_maruyama_sampler drew noise {noise.draws} times for "
                           f"{config.num_steps} steps (expected {config.num_steps - 1}): "
                           f"per-sample seeding needs updating")
    return samples
