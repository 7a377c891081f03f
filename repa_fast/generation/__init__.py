"""Sampling many images from a SiT or DiT checkpoint (the pieces of
``python -m repa_fast.generate``).

* :mod:`.seeding` — per-sample random streams (labels, initial noise, SDE noise);
* :mod:`.loading` — checkpoints (official REPA and DiT, ours, bare state dicts) -> a configured
  SiT or DiT;
* :mod:`.sample_batch` — the model call (bf16 autocast, ``torch.compile``) and one batch's
  sampling;
* :mod:`.dit_sampling` — a DiT batch through the Gaussian diffusion (DDPM, DDIM), as DiT's
  ``sample_ddp.py``;
* :mod:`.output` — atomic PNGs, the streamed ADM ``.npz``, the settings record, grids.
"""
from .errors import UsageError
from .dit_sampling import DiTOutput, DiTSamplerConfig, sample_dit_latents
from .loading import ModelSpec, build_model, inspect_weights, load_checkpoint, resolve_spec
from .output import (check_settings, existing_indices, make_grid, png_path, save_png_atomic,
                     write_npz_from_pngs)
from .sample_batch import COMPILE_MODES, SamplerConfig, Velocity, sample_latents, to_uint8
from .seeding import PerSampleNoise, index_generator, index_seed, initial_draws

__all__ = [
    "COMPILE_MODES", "DiTOutput", "DiTSamplerConfig", "ModelSpec", "PerSampleNoise",
    "SamplerConfig", "UsageError", "Velocity",
    "build_model", "check_settings", "existing_indices", "index_generator", "index_seed",
    "initial_draws", "inspect_weights", "load_checkpoint", "make_grid", "png_path",
    "resolve_spec", "sample_dit_latents", "sample_latents", "save_png_atomic", "to_uint8",
    "write_npz_from_pngs",
]
