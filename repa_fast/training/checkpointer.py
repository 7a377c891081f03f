"""Saving a run's checkpoints: what goes into them, when a save waits, and when the run stops.

A checkpoint ``checkpoints/NNNNNNN.pt`` (atomic, written by rank 0) holds the weights, the EMA,
the flags, the step, every rank's RNG state (each draws its own noise), the loader's position,
the Triton tiles used, the draw device and the skipped-step total, plus the optimizer state
(plain path) or, under DeepSpeed, beside it the optimizer partitions in
``checkpoints/deepspeed/NNNNNNN``. ``--save-safetensors`` adds weight-only copies;
``--keep-last`` prunes older ones.

A save due on a step that follows skipped (non-finite) steps waits for the next good step:
their weights may be huge but finite already. ``--max-nonfinite-steps`` skipped steps in a row
stop the run (FloatingPointError) before any save past them.
"""
from __future__ import annotations

import os
import signal
from typing import Optional

import torch

from ..distributed import Distributed
from .checkpoint_files import (checkpoint_path, list_checkpoints, prune, rng_state,
                               save_atomic, save_safetensors)
from .config import TrainConfig
from .ema import EMA
from .engine import Engine
from .stats import RunningStats
from .step import draw_device_name
from .stop import Interrupted
from .tiles import tile_api


def write(text: str) -> None:
    """A line above the progress bar."""
    from tqdm import tqdm
    tqdm.write(text)


class Checkpointer:
    """Saves into ``ckpt_dir``; ``last_saved`` is the step whose checkpoint exists (None: none
    yet in this run), ``pending`` whether a due save waits for a good step."""

    def __init__(self, config: TrainConfig, dist: Distributed, engine: Engine, ema: EMA,
                 loader, ckpt_dir: str, last_saved: Optional[int]):
        self.config, self.dist, self.engine, self.ema, self.loader = (
            config, dist, engine, ema, loader)
        self.ckpt_dir, self.ds_dir = ckpt_dir, os.path.join(ckpt_dir, "deepspeed")
        self.last_saved, self.pending = last_saved, False
        self.autotune = tile_api()

    def save(self, step: int, stats: RunningStats) -> None:
        """Checkpoint ``step`` now (a collective: every rank calls it)."""
        dist = self.dist
        # every rank's RNG state: each draws its own noise and times
        rngs = [rng_state()]
        if dist.world_size > 1:
            rngs = [None] * dist.world_size
            torch.distributed.all_gather_object(rngs, rng_state())
        weights = self.engine.full_state_dict()
        optimizer = self.engine.save(self.ds_dir, step)  # ZeRO: its partitions (collective)
        if dist.main:
            autotune = self.autotune
            state = dict(model=weights, ema=self.ema.state_dict(), args=self.config.to_dict(),
                         steps=step, rng=rngs, loader=self.loader.state_dict(),
                         kernel_tiles=autotune.export_tiles(used_only=True) if autotune
                         else {}, draw_device=draw_device_name(dist.device),
                         skipped_steps=stats.skipped_steps(), **optimizer)
            save_atomic(state, checkpoint_path(self.ckpt_dir, step))
            if self.config.save_safetensors:
                save_safetensors(state, os.path.join(self.ckpt_dir, f"{step:07d}"))
            prune(self.ckpt_dir, self.config.keep_last)
        self.last_saved = step
        dist.barrier()

    def check_nonfinite(self, step: int, stats: RunningStats) -> None:
        """FloatingPointError once ``--max-nonfinite-steps`` steps in a row were skipped,
        naming the checkpoint to resume from (checked at ``step``)."""
        worst = int(stats.worst_run)
        if worst < self.config.max_nonfinite_steps:
            return
        first = int(stats.worst_start)
        before = [s for s in list_checkpoints(self.ckpt_dir) if s < first]
        where = (f"The last checkpoint saved before it is "
                 f"{checkpoint_path(self.ckpt_dir, before[-1])}: lower --learning-rate or check "
                 f"the data, then --resume {before[-1]}" if before else
                 "No checkpoint was saved before it: lower --learning-rate or check the data "
                 "and start again (--overwrite)")
        raise FloatingPointError(
            f"{worst} steps in a row had a non-finite loss or gradient (checked at step "
            f"{step}; the first skipped step was {first}); stopping. {where}")

    def save_if_good(self, step: int, stats: RunningStats) -> bool:
        """Save ``step`` unless its latest steps were skipped: their weights may already be
        huge but finite (what made the losses overflow); the save waits for a good step."""
        self.check_nonfinite(step, stats)  # never save past the stop condition
        run = int(stats.skip_run)
        if run:
            if not self.pending:
                write(f"step {step}: checkpoint postponed: the last {run} step(s) were skipped "
                      f"(non-finite loss or gradient); it is saved at the next good step")
            self.pending = True
            return False
        self.save(step, stats)
        self.pending = False
        return True

    def interrupted(self, signum: int, step: int, stats: RunningStats) -> Interrupted:
        """SIGINT/SIGTERM after ``step``: save it if good; the exception to raise."""
        saved = step if self.last_saved == step or self.save_if_good(step, stats) else None
        name = signal.Signals(signum).name
        text = (f"{name}: saved step {step} and stopped" if saved is not None else
                f"{name}: stopped at step {step} without saving (the latest steps were "
                f"skipped); checkpoints: {list_checkpoints(self.ckpt_dir)}")
        write(text)
        return Interrupted(signum, step, saved, text)

    def check_final(self, step: int, stats: RunningStats) -> None:
        """The final step's save still waits (its last steps were skipped): an error."""
        if not self.pending:
            return
        self.check_nonfinite(step, stats)
        raise FloatingPointError(
            f"the last {int(stats.skip_run)} step(s) had a non-finite loss or gradient, so no "
            f"checkpoint was saved at the final step {step}; checkpoints: "
            f"{list_checkpoints(self.ckpt_dir)}. Lower --learning-rate or check the data, then "
            f"resume from the last one")

    def finish(self, step: int) -> None:
        """The final checkpoint's safetensors copies when missing (rank 0), also for a run
        resumed after it was killed past its last checkpoint."""
        stem, saved = (os.path.join(self.ckpt_dir, f"{step:07d}"),
                       checkpoint_path(self.ckpt_dir, step))
        if self.config.save_safetensors and os.path.exists(saved) and \
                not all(os.path.exists(f"{stem}-{k}.safetensors") for k in ("model", "ema")):
            # from the file: under ZeRO-3 this rank alone does not hold the full weights
            save_safetensors(torch.load(saved, map_location="cpu", weights_only=True), stem)
