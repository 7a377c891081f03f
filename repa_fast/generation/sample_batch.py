"""One batch: per-sample streams -> ODE/SDE sampler -> uint8 images.

The samplers are ``repa_fast.transport.samplers``'s, unchanged (the official time grids, float64 state
and CFG pairing). What is added around them:

* the model call (:class:`Velocity`) returns only the velocity (``forward_with_hidden``: the
  REPA projectors, useless for sampling, are skipped), runs under bf16 autocast when asked
  (inputs, outputs and the sampler state stay float32/float64 as official) and can be
  ``torch.compile``d;
* SDE noise comes from each sample's own generator (:class:`~.seeding.PerSampleNoise`, the
  sampler's ``noise_fn``).
"""
from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from ..transport.samplers import euler_maruyama_sampler, euler_sampler
from .seeding import PerSampleNoise

# torch.compile modes that capture CUDA graphs
CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass(frozen=True)
class SamplerConfig:
    """The official sampling flags."""

    mode: str = "ode"             # "sde" (Euler-Maruyama) or "ode" (Euler, or Heun with heun)
    num_steps: int = 50
    heun: bool = False            # ODE only, as official
    cfg_scale: float = 1.5
    guidance_low: float = 0.0
    guidance_high: float = 1.0
    path_type: str = "linear"

    def to_dict(self) -> dict:
        return asdict(self)


class ModelCall(torch.nn.Module):
    """A sampler's call of the model: ``_output(x, t, y)`` (a subclass's) run under autocast in
    ``autocast_dtype`` when given (None: the inputs' dtype), and wrapped in
    ``torch.compile(mode=compile_mode, dynamic=False)`` when ``compile``: every batch has the
    same size (the last one is padded), so one graph per batch shape (guided 2B, unguided B).
    The CUDA-graph modes (``reduce-overhead``, ``max-autotune``) replay the whole forward as one
    launch; each call then starts a new step, so the previous replay's outputs are dead.
    """

    def __init__(self, model: torch.nn.Module, *, autocast_dtype: Optional[torch.dtype] = None,
                 compile: bool = False, compile_mode: str = "default"):
        super().__init__()
        self.model = model
        # the class-conditional samplers' CFG null label (a text-to-image model has none: its
        # guidance uses the empty caption's context)
        self.num_classes = getattr(model, "num_classes", None)
        self.autocast_dtype = autocast_dtype
        self._call = torch.compile(self._autocast_output, mode=compile_mode, dynamic=False) \
            if compile else self._autocast_output
        self._cudagraphs = compile and compile_mode in CUDAGRAPH_MODES

    def _output(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise TypeError(f"{type(self).__name__} must define _output")  # abstract

    def _autocast_output(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor
                         ) -> torch.Tensor:
        autocast = (torch.autocast(x.device.type, dtype=self.autocast_dtype)
                    if self.autocast_dtype is not None else contextlib.nullcontext())
        with autocast:
            return self._output(x, t, y)

    def call(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The (compiled) output; under CUDA graphs a fresh step, its buffer reused later."""
        if self._cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        return self._call(x, t, y)


class Velocity(ModelCall):
    """``velocity(x, t, y=y) -> (v,)``: the model call the ODE/SDE samplers make (projectors
    skipped). Under CUDA graphs the output buffer is reused by the next replay, which is safe
    because the sampler converts the output to float64 (a copy) right away."""

    def _output(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.model.forward_with_hidden(x, t, y)[0]

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor):
        return (self.call(x, t, y),)


def sample_latents(velocity: Velocity, latents: torch.Tensor, labels: torch.Tensor,
                   generators: Sequence[torch.Generator], config: SamplerConfig) -> torch.Tensor:
    """Run the configured sampler on one batch; float64 samples [B, C, H, W].

    SDE noise for row ``j`` comes from ``generators[j]`` (continuing after its initial draws).
    """
    kwargs = dict(num_steps=config.num_steps, heun=config.heun, cfg_scale=config.cfg_scale,
                  guidance_low=config.guidance_low, guidance_high=config.guidance_high,
                  path_type=config.path_type, null_class=velocity.num_classes)
    if config.mode == "ode":
        return euler_sampler(velocity, latents, labels, **kwargs)
    noise = PerSampleNoise(generators)
    samples = euler_maruyama_sampler(velocity, latents, labels, noise_fn=noise, **kwargs)
    # The sampler draws once per step but the last; anything else means it changed how it
    # draws noise, and the samples would no longer follow the per-sample streams.
    if noise.draws != config.num_steps - 1:
        raise RuntimeError(f"euler_maruyama_sampler drew noise {noise.draws} times for "
                           f"{config.num_steps} steps (expected {config.num_steps - 1}): "
                           f"per-sample seeding needs updating")
    return samples


def to_uint8(samples: torch.Tensor, vae=None, latents_scale: float = 0.18215) -> np.ndarray:
    """Samples -> uint8 images [B, H, W, 3] on the host.

    Pixel space (``vae`` None): ``round((clamp(x, -1, 1) + 1)·127.5)``, as the trainer's sample
    grids. Latents: the SD-VAE decodes ``x / latents_scale`` in one batched call and rounds
    (:func:`repa_fast.vae.decode`; the official code truncates instead).
    """
    x = samples.float()
    if vae is None:
        images = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    else:
        from ..vae import decode
        images = decode(vae, x, latents_scale)
    return images.permute(0, 2, 3, 1).cpu().numpy()
