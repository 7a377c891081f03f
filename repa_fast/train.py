"""REPA training: ``python -m repa_fast.train`` (one process), ``torchrun ... -m repa_fast.train``
(DDP), or ``deepspeed repa_fast/train.py --ds_config configs/ds/zero2.json ...`` (ZeRO 1-3).

One flat loop around :class:`repa_fast.training.step.TrainStep`, the official recipe step for
step::

    x      = sample_posterior(moments)                      (latents from stored VAE moments)
    zs     = [encoder(images) for each encoder]             (frozen, no grad)
    loss   = velocity MSE + proj_coeff · proj_loss          (SILoss; fused alignment op)
    clip grad norm, AdamW step, EMA update

for SiT (class labels), DiT (its Gaussian diffusion's loss instead) and MMDiT (text-to-image:
caption contexts in place of labels, dropped to the empty caption's for CFG).

Around it: ``training.build`` builds the run (checks, data, models, resumed state, the engine:
plain/DDP or DeepSpeed behind one interface, ``training.engine``), ``training.stats`` keeps the
running sums and logs, ``training.checkpointer`` saves, postpones saves and stops a run of
non-finite steps, ``training.samples`` writes the EMA sample grids.

No host synchronisation between the log and checkpoint steps (plain and DDP paths): random
draws are made on the device, losses and gradient norms are summed on the device and read
every ``--log-every`` steps (``tests/test_train_no_sync.py`` records every op that reads device
data on the host and finds none). A step whose loss or gradient norm is not finite is
skipped on the device (the fused AdamW kernel and the EMA lerp take a ``found_inf`` flag: no
weight, moment or EMA change) and counted; when a log or checkpoint step finds
``--max-nonfinite-steps`` skipped in a row, the run stops before saving, with the last good
checkpoint intact. Checkpoints (atomic) resume exactly: same batches, same random draws, same
losses. SIGTERM saves and exits.
``--preset demo`` trains on a built-in shapes data set on the CPU in a few minutes,
``--preset demo-t2i`` on its captioned version.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Optional

# run as a file (deepspeed repa_fast/train.py; DALI reader processes see it as __mp_main__)
if __name__ in ("__main__", "__mp_main__") and not __package__:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    __package__ = "repa_fast"

from .distributed import Distributed
from .errors import USAGE_AND_VALUE, UsageError, report
from .training.build import build_run
from .training.checkpointer import Checkpointer
from .training.config import TrainConfig, parse_args
from .training.data import check_labels
from .training.stats import RunningStats
from .training.step import TrainStep, make_loss
from .training.stop import Aborted, Interrupted, StopRequest


def train(config: TrainConfig, dist: Optional[Distributed] = None) -> dict:
    """Run training; returns the last logged metrics."""
    dist = dist or Distributed()
    run = build_run(config, dist)  # checks the config, builds, resumes
    step, loader, last = run.step, run.data.loader, config.max_train_steps
    empty = run.data.empty_context  # text-to-image: the CFG dropout's empty caption
    train_step = TrainStep(config, dist.device, run.engine, run.forward, run.encoders,
                           make_loss(config), run.ema, run.data.x_shape,
                           latents_scale=run.data.latents_scale, rank=dist.rank,
                           world_size=dist.world_size,
                           empty_context=None if empty is None else empty.to(dist.device))
    stats = RunningStats(config, dist, run.model, run.log, run.reporter, step,
                         run.skipped_steps, run.data.context_shape)
    saver = Checkpointer(config, dist, run.engine, run.ema, loader, run.ckpt_dir,
                         last_saved=step if run.resumed else None)
    align = alignment_log(config, run, dist)
    logged = {}
    batches = iter(loader)
    stop = StopRequest(dist.world_size).__enter__()
    try:
        while step < last:
            t0 = time.perf_counter()
            # labels, or a text-to-image set's contexts (then the caption indices follow)
            images, moments, cond = next(batches)[:3]
            wait = time.perf_counter() - t0
            if not run.data.text_to_image:
                check_labels(cond, config.num_classes, run.data.data_dir)
            out = train_step(step, images, moments, cond)
            # skipped steps count as steps (their batch is consumed), as with fp16 loss scaling
            step += 1
            stats.add(step, out, images.shape[0], wait)
            if step % config.log_every == 0 or step == last:
                logged = stats.log(step, loader.skipped_samples)
                saver.check_nonfinite(step, stats)
            if align is not None and step % config.log_alignment_every == 0:
                record = align.measure(run.model, run.encoders[0], step)
                run.log.write(record)
                run.reporter.scalars(record, step)
            if saver.pending or step % config.checkpointing_steps == 0 or step == last:
                saver.save_if_good(step, stats)
            if dist.main and (step % config.sampling_steps == 0 or step == last):
                run.grids.write(step)
            signum = stop.poll() if step < last else None
            if signum is not None:
                raise saver.interrupted(signum, step, stats)
        saver.check_final(step, stats)  # the last steps were skipped: no final checkpoint
        if dist.main and step >= last:  # what the last step owes, also after a late kill
            run.grids.write(step, only_missing=True)
            saver.finish(step)
    finally:
        stop.__exit__(*sys.exc_info())
        stats.close()
    return logged


def alignment_log(config: TrainConfig, run, dist: Distributed):
    """The ``--log-alignment-every`` measurer (rank 0; None when off or on other ranks)."""
    if config.log_alignment_every is None or not dist.main:
        return None
    if getattr(run.engine, "stage", 0) == 3:
        raise UsageError("--log-alignment-every measures on rank 0 alone, which ZeRO-3's "
                         "partitioned weights do not allow: use ZeRO-1/2 or leave it out")
    from .training.alignment_log import AlignmentLog
    return AlignmentLog(config, run.data.data_dir, run.data.latents_scale, dist.device)


def main(argv=None) -> int:
    """Exit codes: 0 done, 2 a flag or input file that cannot work, 1 the machine refused
    (disk full, permissions), 3 too many non-finite steps in a row, 130/143 stopped by
    SIGINT/SIGTERM (after saving). ``REPA_FAST_DEBUG=1`` adds the traceback to errors."""
    config = None
    try:
        config = parse_args(argv)
        logged = train(config, Distributed())
    except FloatingPointError as error:
        print(f"error: {error}", file=sys.stderr)
        return 3
    except Interrupted as stopped:
        return stopped.exit_code
    except Aborted as error:
        print(f"interrupted: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("interrupted before training started: nothing to save", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 -- usage and environment errors; bugs re-raise
        code = report(error, usage=USAGE_AND_VALUE)
        if code is None:
            raise
        return code
    if int(os.environ.get("RANK", 0)) == 0:
        run = os.path.join(config.output_dir, config.exp_name)
        if logged:
            losses = ("" if logged["loss"] is None else
                      f", loss {logged['loss']:.4f}, proj_loss {logged['proj_loss']:.4f}")
            print(f"done: step {logged['step']}{losses}; checkpoints, samples and "
                  f"metrics.jsonl in {run}")
        else:
            print(f"done: nothing left to train (step {config.max_train_steps} reached; raise "
                  f"--max-train-steps to go on); checkpoints, samples and metrics.jsonl in {run}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
