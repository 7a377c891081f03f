"""Helper processes (PyTorch loader workers, DALI reader processes, ``prepare`` workers) and
signals. Ctrl-C in a terminal, Slurm and container runtimes signal the whole process group;
the main process decides what happens (training saves, then stops), so helpers ignore
SIGINT and SIGTERM and leave when the main process shuts them down or is gone."""
from __future__ import annotations

import os
import signal
import threading
import time

PARENT_POLL_S = 0.5


def leave_signals_to_parent(*unused) -> None:
    """Ignore SIGINT and SIGTERM in this (helper) process. Takes and ignores arguments, so it
    serves as a DataLoader ``worker_init_fn``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class SignalGuard:
    """A DataLoader ``worker_init_fn``: SIGINT ignored; SIGTERM ignored until the parent calls
    :meth:`release` (when its loader ends, and at interpreter exit). The parent's own shutdown
    stops a worker with SIGTERM (``Process.terminate``: multiprocessing's exit handler does
    so for workers a lingering traceback kept alive, then waits for them); a worker that
    ignored it for good would hang the exit. Built in the parent before the workers start
    (the flag is shared memory inherited by them)."""

    def __init__(self, context=None):
        import atexit
        import multiprocessing
        self.released = (context or multiprocessing).RawValue("b", 0)
        # runs before multiprocessing's own exit handler (registered earlier: LIFO)
        atexit.register(self.release)

    def release(self) -> None:
        self.released.value = 1

    def __call__(self, *unused) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        released = self.released

        def on_sigterm(signum, frame):
            if released.value:
                os._exit(0)  # the parent is shutting its workers down
        signal.signal(signal.SIGTERM, on_sigterm)


def exit_with_parent(parent: int) -> None:
    """Start a thread that ends this process once ``parent`` is gone (orphans are adopted, so
    ``getppid`` changes): a pool worker holds both ends of its task queue, never sees
    end-of-file there, and would otherwise wait forever after a ``kill -9`` of its parent."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_S)
        os._exit(1)
    threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()
