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


def exit_with_parent(parent: int) -> None:
    """Start a thread that ends this process once ``parent`` is gone (orphans are adopted, so
    ``getppid`` changes): a pool worker holds both ends of its task queue, never sees
    end-of-file there, and would otherwise wait forever after a ``kill -9`` of its parent."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_S)
        os._exit(1)
    threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()
