"""EMA sample grids written during training: 16 samples of fixed noise and labels (drawn once
from ``--seed``, so every grid of a run, resumed or not, shows the same samples), 50 Euler ODE
steps without guidance (DiT: 50 DDPM steps of the respaced diffusion, through ``DiT.predict``,
their noise from a generator seeded with ``--seed``), decoded and tiled as
``samples/NNNNNNN.png`` by rank 0.

Text-to-image (MMDiT): the 16 fixed captions of :func:`repa_fast.data.grid_samples` in place of
labels, 50 Euler ODE steps with CFG 4.0 against the empty caption (the official
``train_t2i.py``'s grid), and ``samples/captions.txt`` listing the cells' captions row by row."""
from __future__ import annotations

import math
import os
from typing import Optional

import numpy as np
import torch

GRID_SAMPLES = 16
GRID_STEPS = 50
T2I_GRID_CFG = 4.0  # the official train_t2i.py's grid guidance


@torch.no_grad()
def ddpm_samples(ema_model, noise: torch.Tensor, labels: torch.Tensor, seed: int) -> torch.Tensor:
    """DiT samples from ``noise`` by DDPM over ``GRID_STEPS`` respaced steps of DiT's training
    diffusion, no guidance, unclipped x̂_0 as DiT's ``sample.py``; the per-step noise comes from
    a generator of its own (the training's random state is not touched)."""
    from ..diffusion import create_diffusion
    from .dit_loss import DIFFUSION_STEPS
    diffusion = create_diffusion(str(GRID_STEPS), diffusion_steps=DIFFUSION_STEPS)
    gen = torch.Generator(device=noise.device).manual_seed(seed)
    return diffusion.p_sample_loop(ema_model.predict, noise.shape, noise=noise,
                                   clip_denoised=False, model_kwargs=dict(y=labels),
                                   device=noise.device, generator=gen)


@torch.no_grad()
def t2i_samples(ema_model, noise: torch.Tensor, contexts: torch.Tensor,
                empty_context: torch.Tensor) -> torch.Tensor:
    """MMDiT samples from ``noise`` and caption ``contexts`` [n, L, D]: the official t2i
    Euler sampler, 50 steps, CFG 4.0 against ``empty_context`` [L, D], the projectors not run
    (``forward_with_hidden``)."""
    from ..generation.t2i_sampling import TextVelocity
    from ..transport.samplers_t2i import euler_sampler
    null = empty_context.to(contexts.dtype).expand(contexts.shape[0], *empty_context.shape)
    return euler_sampler(TextVelocity(ema_model), noise, contexts, null, num_steps=GRID_STEPS,
                         cfg_scale=T2I_GRID_CFG).float()


@torch.no_grad()
def sample_grid(ema_model, noise: torch.Tensor, labels: torch.Tensor, latents_scale: float,
                vae, path: str, ddpm_seed: Optional[int] = None,
                empty_context: Optional[torch.Tensor] = None) -> torch.Tensor:
    """EMA samples (50-step ODE, CFG 1.0; with ``ddpm_seed``, a DiT's 50 DDPM steps; with
    ``empty_context``, ``labels`` are caption contexts: :func:`t2i_samples`) from fixed noise
    and labels, decoded, as one PNG (⌈√n⌉ columns, row-major, empty cells black); returns the
    grid (uint8 [3, H, W])."""
    from ..generation.output import make_grid, save_png_atomic
    from ..generation.sample_batch import to_uint8
    from ..transport.samplers import euler_sampler
    if empty_context is not None:
        samples = t2i_samples(ema_model, noise, labels, empty_context)
    elif ddpm_seed is None:
        samples = euler_sampler(ema_model, noise, labels, num_steps=GRID_STEPS)
    else:
        samples = ddpm_samples(ema_model, noise, labels, ddpm_seed)
    images = to_uint8(samples, vae, latents_scale)
    n = images.shape[0]
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    empty = np.zeros((rows * cols - n, *images.shape[1:]), dtype=np.uint8)
    grid = make_grid(np.concatenate([images, empty]), rows, cols)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    # atomic: a grid cut short by a kill must not count as written (write(only_missing=True))
    save_png_atomic(grid, path)
    return torch.from_numpy(grid).permute(2, 0, 1)


class SampleGrids:
    """The run's grids: :meth:`write` at ``--sampling-steps`` and at the end (rank 0 only;
    ``reporter`` shows them on the dashboards)."""

    def __init__(self, config, run_dir: str, ema, vae, latents_scale: float, x_shape: tuple,
                 device: torch.device, reporter, data=None):
        self.run_dir, self.ema, self.vae, self.latents_scale = run_dir, ema, vae, latents_scale
        self.reporter = reporter
        from .config import is_dit
        self.ddpm_seed = config.seed if is_dit(config) else None
        # from a generator of their own: the training's random state is not touched
        gen = torch.Generator().manual_seed(config.seed)
        self.noise = torch.randn(GRID_SAMPLES, *x_shape, generator=gen).to(device)
        self.empty_context, self.captions = None, None
        if data is not None and data.text_to_image:  # the data set's fixed captions
            from ..data import grid_samples
            fixed = grid_samples(data.data_dir, GRID_SAMPLES)
            self.labels = torch.from_numpy(fixed.contexts).float().to(device)
            self.empty_context = data.empty_context.to(device)
            self.captions = [text if text is not None else f"(sample {key}, caption {k})"
                             for text, key, k in zip(fixed.captions, fixed.keys,
                                                     fixed.caption_index.tolist())]
        else:
            self.labels = (torch.arange(GRID_SAMPLES) % config.num_classes).to(device)

    def path(self, step: int) -> str:
        return os.path.join(self.run_dir, "samples", f"{step:07d}.png")

    def write(self, step: int, only_missing: bool = False) -> None:
        """The grid of ``step``; ``only_missing``: unless it exists (the final grid, also
        owed by a run resumed after it was killed past its last sampling step)."""
        if only_missing and os.path.exists(self.path(step)):
            return
        from tqdm import tqdm
        tqdm.write(f"writing the sample grid of step {step} ({GRID_STEPS} sampling steps)...")
        if self.captions is not None:
            self.write_captions()
        grid = sample_grid(self.ema.model, self.noise, self.labels, self.latents_scale,
                           self.vae, self.path(step), self.ddpm_seed, self.empty_context)
        self.reporter.image("samples/ema", grid, step)

    def write_captions(self) -> None:
        """``samples/captions.txt``: the grid cells' captions, row by row (the same for every
        grid of the run)."""
        from ..atomic_write import atomic_open
        cols = math.ceil(math.sqrt(len(self.captions)))
        lines = [f"row {i // cols + 1}, column {i % cols + 1}: {caption}"
                 for i, caption in enumerate(self.captions)]
        path = os.path.join(self.run_dir, "samples", "captions.txt")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with atomic_open(path, "w", sync=False) as f:
            f.write("\n".join(lines) + "\n")
