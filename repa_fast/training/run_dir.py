"""One run per experiment folder (``<output-dir>/<exp-name>``).

A run without ``--resume`` must not start where another run left checkpoints or a log: its
records would mix with the old ones and a later ``--resume auto`` could load the old run's
newer checkpoint. :func:`check_run_dir` refuses such a folder before anything is built;
``--overwrite`` lets the run start there, and :func:`clear_run_dir` deletes the old run's
files just before the new run writes its first file (so a run refused by a later check,
a wrong ``--data-dir`` say, has deleted nothing).
"""
from __future__ import annotations

import os
import shutil

from ..errors import UsageError
from .checkpoint_files import list_checkpoints

RUN_FILES = ("checkpoints", "metrics.jsonl", "samples", "tensorboard", "wandb_run_id")


def previous_run(run_dir: str) -> list[str]:
    """What of another run ``run_dir`` holds: its checkpoints' steps and/or its log."""
    found = []
    steps = list_checkpoints(os.path.join(run_dir, "checkpoints"))
    if steps:
        found.append(f"checkpoints {steps}")
    log = os.path.join(run_dir, "metrics.jsonl")
    if os.path.exists(log) and os.path.getsize(log):
        found.append("metrics.jsonl")
    return found


def check_run_dir(run_dir: str, resume, overwrite: bool) -> None:
    """Raise a :class:`UsageError` when a fresh run (no ``--resume``, no ``--overwrite``)
    would start in a folder holding another run."""
    if resume is not None or overwrite:
        return
    found = previous_run(run_dir)
    if found:
        raise UsageError(f"--output-dir/--exp-name: {run_dir} already holds a run "
                         f"({', '.join(found)}); continue it with --resume auto, choose another "
                         f"--exp-name, or pass --overwrite to delete it and start over")


def clear_run_dir(run_dir: str) -> list[str]:
    """``--overwrite``: delete the previous run's checkpoints, log, samples and dashboards;
    returns what was found (for the message)."""
    found = previous_run(run_dir)
    for name in RUN_FILES:
        path = os.path.join(run_dir, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)
    return found
