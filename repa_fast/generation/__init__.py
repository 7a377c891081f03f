"""Sampling many images from a SiT checkpoint (the pieces of ``python -m repa_fast.generate``).

* :mod:`.seeding` — per-sample random streams (labels, initial noise, SDE noise);
* :mod:`.loading` — checkpoints (official, ours, bare state dicts) -> a configured SiT;
* :mod:`.sampler` — the model call (bf16 autocast, ``torch.compile``) and one batch's sampling;
* :mod:`.output` — atomic PNGs, the streamed ADM ``.npz``, the settings record, grids.
"""
from .errors import UsageError
from .loading import ModelSpec, build_model, inspect_weights, load_checkpoint, resolve_spec
from .output import (check_settings, existing_indices, make_grid, png_path, save_png_atomic,
                     write_npz_from_pngs)
from .sample_batch import COMPILE_MODES, SamplerConfig, Velocity, sample_latents, to_uint8
from .seeding import PerSampleNoise, index_generator, index_seed, initial_draws

__all__ = [
    "COMPILE_MODES", "ModelSpec", "PerSampleNoise", "SamplerConfig", "UsageError", "Velocity",
    "build_model", "check_settings", "existing_indices", "index_generator", "index_seed",
    "initial_draws", "inspect_weights", "load_checkpoint", "make_grid", "png_path",
    "resolve_spec", "sample_latents", "save_png_atomic", "to_uint8", "write_npz_from_pngs",
]
