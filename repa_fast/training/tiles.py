"""Triton tiles of the fused alignment op, fixed before the first training step (tuned once,
by rank 0, at the training shapes; recorded in checkpoints and reinstalled on resume), so
nothing is tuned inside the training steps."""
from __future__ import annotations

import warnings
from typing import Optional

import torch

from ..distributed import Distributed
from .config import TrainConfig
from .step import autocast, autocast_dtype


def warm_kernels(config: TrainConfig, model, encoders: list, device: torch.device,
                 local_batch: int, dist: Distributed, tiles: Optional[dict] = None) -> None:
    """Triton tiles of the fused alignment op fixed before the first step: a resumed run's
    recorded tiles are installed; then rank 0 tunes what is missing (or loads it from the
    on-disk cache) at the training shapes, one line on stdout, and every rank takes rank 0's
    choices. Nothing is tuned inside the training steps."""
    autotune = tile_api()
    if autotune is None:  # no Triton here: nothing to tune (the op runs another backend)
        return
    if tiles:
        try:
            autotune.install_tiles(tiles)
        except ValueError as error:  # e.g. written by a version with other kernels
            warnings.warn(f"--resume: the checkpoint's kernel_tiles cannot be used ({error}); "
                          f"tiles are chosen anew, so this run may launch other tiles than the "
                          f"run it continues (results equal up to rounding)")
    if not config.fused_loss:
        return
    from ..ops.alignment import resolved_backend
    dtype = autocast_dtype(config) or torch.float32  # the GEMMs' dtype (fp32 hidden states)
    if resolved_backend(device, dtype) != "triton":
        return
    if dist.main:
        from ..ops.alignment_warmup import warm_alignment_op
        tokens = model.x_embedder.num_patches
        for projector, encoder in zip(model.projectors, encoders):
            encoder = getattr(encoder, "_orig_mod", encoder)
            # the features' dtype as the step sees it: under autocast an encoder ending in a
            # LayerNorm (DINOv2) returns fp32 whatever its weights' dtype, and the kernels'
            # tiles are keyed by it
            with torch.no_grad(), autocast(config, device):
                image = torch.zeros(1, 3, encoder.resolution, encoder.resolution,
                                    dtype=torch.uint8, device=device)
                target_dtype = encoder(image).dtype
            message = warm_alignment_op(
                projector, (local_batch, tokens, model.hidden_size),
                (local_batch, encoder.grid ** 2, encoder.embed_dim), dtype, device,
                target_dtype=target_dtype)
            print(message, flush=True)
    autotune.broadcast_tiles(src=0)


def tile_api():
    """``repa_fast.kernels.autotune``, or None where Triton is not installed."""
    try:
        from ..kernels import autotune
    except ImportError:
        return None
    return autotune
