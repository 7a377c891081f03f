"""Stopping a training run on SIGINT or SIGTERM: save first, then exit.

Ctrl-C in a terminal, Slurm and container runtimes signal the whole process group; the
loader's helper processes ignore the signals (:mod:`repa_fast.data.child_process`) and the
training loop decides. The first signal asks the loop to save and stop after a step; a second
one aborts at once without saving. ``python -m repa_fast.train`` exits with 128 + the signal
number: 130 (SIGINT), 143 (SIGTERM).

With several processes every rank must save the same step (the save is collective), so each
step every rank posts its flag in an all-reduce (MAX) on a CPU (gloo) group, without waiting,
and reads the result of the previous step's all-reduce: all ranks stop after the same step,
one step after the first signal, and the step never waits on the network or the GPU.
"""
from __future__ import annotations

import signal
import sys
from typing import Optional

import torch


class Interrupted(Exception):
    """Training stopped by a signal after saving (``saved``: the checkpoint's step, or None
    when the latest steps were skipped and nothing could be saved)."""

    def __init__(self, signum: int, step: int, saved: Optional[int], message: str):
        super().__init__(message)
        self.signum, self.step, self.saved = signum, step, saved

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class Aborted(KeyboardInterrupt):
    """A second signal: stopped at once, nothing saved."""

    def __init__(self, signum: int):
        super().__init__(f"second {signal.Signals(signum).name}: stopped without saving")
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopRequest:
    """Context manager: SIGINT/SIGTERM handlers while training; :meth:`poll` once per step."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, world_size: int = 1):
        self.signum: Optional[int] = None
        self.world_size = world_size
        self.previous: dict = {}
        self.group = None
        self.pending = None  # (work, flag) of the all-reduce posted last step
        if world_size > 1:
            # a CPU group: the flag never touches the GPU (no host sync, no NCCL stream);
            # collective: every rank builds it at the same point
            default_is_gloo = torch.distributed.get_backend() == "gloo"
            self.group = None if default_is_gloo else torch.distributed.new_group(backend="gloo")

    def __enter__(self):
        for signum in self.SIGNALS:
            self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, exc_type=None, *exc):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        if self.pending is not None and exc_type is None:
            self.pending[0].wait()  # no collective left in flight
        self.pending = None

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise Aborted(signum)
        self.signum = signum
        when = "this step" if self.world_size == 1 else "the next step (all processes agree)"
        print(f"\n{signal.Signals(signum).name}: saving at the end of {when}, then stopping "
              f"(send it again to stop at once without saving)", file=sys.stderr, flush=True)

    def poll(self) -> Optional[int]:
        """The signal to stop on after this step, or None. One process: its own. Several:
        the largest any rank had received one step earlier (collective: every rank calls it
        once per step)."""
        if self.world_size == 1:
            return self.signum
        agreed = None
        if self.pending is not None:
            work, flag = self.pending
            work.wait()
            agreed = int(flag[0]) or None
        flag = torch.tensor([self.signum or 0], dtype=torch.int32)
        work = torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX,
                                            group=self.group, async_op=True)
        self.pending = (work, flag)
        return agreed
