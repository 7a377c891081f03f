"""Resuming a run (``--resume auto``, a step or a file): which checkpoint every rank loads, the
weights it restores, and each rank's random state (the official ``seed · world + rank``, then
the saved one), so the resumed run draws and trains exactly as the uninterrupted one."""
from __future__ import annotations

import warnings
from typing import Optional

import torch

from ..distributed import Distributed
from ..errors import UsageError
from .checkpoint_files import load_checkpoint, resolve_resume, set_rng_state
from .config import TrainConfig
from .ema import EMA
from .step import draw_device_name


def resume_state(resume: Optional[str], ckpt_dir: str, dist: Distributed):
    """``(path, state)`` to resume from (``(None, None)``: a fresh start). Rank 0 chooses
    and verifies (``--resume auto`` may pass over damaged files); the other ranks load the
    file it chose, checking its size only: every rank resumes the same step, and the file
    is hashed once."""
    if dist.main:
        try:
            path, state = resolve_resume(resume, ckpt_dir)
        except Exception as error:  # noqa: BLE001 -- every rank stops, not only rank 0
            dist.broadcast((None, f"{error}"))
            raise
        dist.broadcast((path, None))
        return path, state
    path, problem = dist.broadcast(None)
    if problem is not None:
        raise UsageError(f"rank 0 could not resume: {problem}")
    if path is None:
        return None, None
    return path, load_checkpoint(path, f"--resume {resume}:", verify_hash=False)


def load_weights(config: TrainConfig, model: torch.nn.Module, ema: EMA, resume: Optional[str],
                 state: Optional[dict]) -> None:
    """The checkpoint's weights and EMA; a fresh start's EMA equals the initial weights."""
    if state is None:
        ema.update(model, decay=0.0)
        return
    try:
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
    except RuntimeError as error:  # another --model, --encoder-depth, --projector-dim...
        raise UsageError(f"--resume {resume}: its weights do not fit this run's model "
                         f"(--model {config.model}; the checkpoint was trained with "
                         f"--model {state['args'].get('model')}): "
                         f"{str(error).splitlines()[0]}") from None


def seed_rank(config: TrainConfig, dist: Distributed, resume: Optional[str],
              state: Optional[dict]) -> None:
    """This rank's random state: ``seed · world + rank`` (every rank draws different noise
    and times, as official), or the one the checkpoint saved for this rank."""
    torch.manual_seed(config.seed * dist.world_size + dist.rank)
    if state is None:
        return
    rngs = state["rng"]
    if len(rngs) != dist.world_size:
        raise ValueError(f"--resume: {resume} was saved by {len(rngs)} processes, this run "
                         f"has {dist.world_size}; exact resume needs the same number")
    set_rng_state(rngs[dist.rank])
    here = draw_device_name(dist.device)
    if state.get("draw_device", here) != here:
        warnings.warn(f"--resume: {resume} was trained on {state['draw_device']}, this run is "
                      f"on {here}: the random draws (noise, times) follow the device, so the "
                      f"losses will not repeat the uninterrupted run's")
