"""What the loop logs: running sums kept on the device between log steps, read on the host only
when a log step reduces them (``--log-every``), written to ``metrics.jsonl``, the dashboards
and the progress bar::

    loss, proj_loss, grad_norm = Σ over finite steps / their number   (means over all ranks)
    skipped_steps              = the run's total of non-finite (skipped) steps
    images_per_sec             = global images since the last log / seconds
    mfu                        = images_per_sec · FLOPs per image / world size / peak FLOP/s

and, for the stop rule, the current and the longest run of consecutive skipped steps.
"""
from __future__ import annotations

import time
from typing import Optional

import torch

from ..distributed import Distributed
from .config import TrainConfig
from .metrics import MetricsLog, Reporter, flops_per_image, peak_tflops
from .step import StepOutput


class RunningStats:
    """Device sums of one log window, the skipped-step runs, and the progress bar."""

    def __init__(self, config: TrainConfig, dist: Distributed, model, log: MetricsLog,
                 reporter: Reporter, step: int, skipped_steps: int,
                 context_shape: Optional[tuple] = None):
        from tqdm import tqdm
        device = dist.device
        self.config, self.world_size, self.log_file, self.reporter = (
            config, dist.world_size, log, reporter)
        self.flops = flops_per_image(model, context_shape)
        self.peak = peak_tflops(device)
        self.bar = tqdm(total=config.max_train_steps, initial=step, disable=not dist.main,
                        dynamic_ncols=True, desc=config.exp_name)
        # loss, proj_loss, grad_norm over finite steps; finite and skipped step counts
        self.sums, self.counts = torch.zeros(3, device=device), torch.zeros(2, device=device)
        self.skip_run = torch.zeros((), device=device)    # skipped steps in a row, up to now
        self.worst_run = torch.zeros((), device=device)   # the longest such run
        self.worst_start = torch.zeros((), device=device)  # and its first step
        self.skipped_total = skipped_steps  # up to the last log step
        self.window_start, self.window_images, self.data_wait = time.perf_counter(), 0, 0.0

    def add(self, step: int, out: StepOutput, batch: int, data_wait: float) -> None:
        """Step ``step`` (counted from 1) is done: ``out`` its StepOutput, ``batch`` this
        rank's samples, ``data_wait`` the seconds spent waiting for them. No host read."""
        found_inf = out.found_inf
        self.data_wait += data_wait
        self.window_images += batch * self.world_size
        bad = found_inf.bool()
        values = torch.stack([out.loss, out.proj_loss, out.grad_norm]).float()
        self.sums += torch.where(bad, torch.zeros_like(values), values)
        self.counts += torch.stack([1 - found_inf, found_inf])
        self.skip_run = (self.skip_run + 1) * found_inf
        self.worst_start = torch.where(self.skip_run > self.worst_run, step + 1 - self.skip_run,
                                       self.worst_start)
        self.worst_run = torch.maximum(self.worst_run, self.skip_run)
        self.bar.update(1)

    def skipped_steps(self) -> int:
        """The run's skipped steps up to now (a host read)."""
        return self.skipped_total + int(self.counts[1])

    def log(self, step: int, skipped_samples: int) -> dict:
        """Reduce the window's sums over ranks, write the record and the bar's postfix, start
        a new window; returns the record."""
        sums, counts = self.sums, self.counts
        if self.world_size > 1:  # the global batch's means, not this rank's
            torch.distributed.all_reduce(sums)
            sums /= self.world_size
        good, skipped = counts.tolist()
        means = (sums / max(good, 1)).tolist() if good else [None] * 3
        sums.zero_()
        counts.zero_()
        self.skipped_total += int(skipped)
        elapsed = time.perf_counter() - self.window_start
        ips = self.window_images / elapsed
        logged = dict(step=step, loss=means[0], proj_loss=means[1], grad_norm=means[2],
                      images_per_sec=ips, data_wait_frac=self.data_wait / elapsed,
                      skipped_steps=self.skipped_total, skipped_samples=skipped_samples,
                      lr=self.config.learning_rate)
        if self.peak:
            logged["mfu"] = ips * self.flops / self.world_size / (self.peak * 1e12)
        self.log_file.write(logged)
        self.reporter.scalars(logged, step)
        self.bar.set_postfix(self.postfix(logged, good))
        self.window_start, self.window_images, self.data_wait = time.perf_counter(), 0, 0.0
        return logged

    def postfix(self, logged: dict, good: float) -> dict:
        """The progress bar's summary of a record (losses only if a step was finite)."""
        postfix = dict(img_s=f"{logged['images_per_sec']:.0f}",
                       wait=f"{logged['data_wait_frac']:.0%}")
        if good:
            postfix = dict(loss=f"{logged['loss']:.4f}", proj=f"{logged['proj_loss']:.4f}",
                           gnorm=f"{logged['grad_norm']:.3f}", **postfix)
        if self.skipped_total:
            postfix["skipped"] = self.skipped_total
        if "mfu" in logged:
            postfix["mfu"] = f"{logged['mfu']:.0%}"
        return postfix

    def close(self) -> None:
        self.bar.close()
        self.log_file.close()
        self.reporter.close()
