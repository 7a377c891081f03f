"""Checkpoints: atomic writes, the official layout, keep-last, resume look-up.

``<output-dir>/<exp-name>/checkpoints/NNNNNNN.pt`` holds what the official ``generate.py``
loads — ``model``, ``ema``, ``args`` (a plain dict, so ``torch.load(weights_only=True)``
works), ``steps`` — plus ``opt``, ``rng`` and ``loader`` so a resumed run continues exactly.
Each file is written to ``.tmp``, flushed to disk and renamed: a crash during a save leaves the
previous checkpoints as they were. ``--save-safetensors`` also writes ``NNNNNNN-model.safetensors``
and ``NNNNNNN-ema.safetensors`` (weights only, ``args`` and ``steps`` in the metadata) for tools
that should not unpickle; ``python -m repa_fast.training.export CKPT.pt`` converts a saved file.
"""
from __future__ import annotations

import os
import re
from typing import Optional

import torch

from ..atomic_write import atomic_open, atomic_path

_NAME = re.compile(r"^(\d{7})\.pt$")


def save_atomic(obj, path: str) -> None:
    """Write ``obj`` to ``path`` so that ``path`` is either the old file or the complete new one."""
    with atomic_open(path, "wb") as f:
        torch.save(obj, f)


def save_safetensors(state: dict, stem: str) -> list[str]:
    """``stem-model.safetensors`` and ``stem-ema.safetensors`` from a checkpoint dict (its
    ``model``, ``ema``, ``args`` and ``steps``), each written atomically; returns the paths."""
    import json

    from safetensors.torch import save_file
    metadata = {"args": json.dumps(state.get("args", {})), "steps": str(state.get("steps", ""))}
    paths = []
    for key in ("model", "ema"):
        if key not in state:
            continue
        path = f"{stem}-{key}.safetensors"
        tensors = {k: v.detach().contiguous().cpu() for k, v in state[key].items()}
        with atomic_path(path) as tmp:
            save_file(tensors, tmp, metadata={**metadata, "weights": key})
        paths.append(path)
    return paths


def checkpoint_path(directory: str, step: int) -> str:
    return os.path.join(directory, f"{step:07d}.pt")


def list_checkpoints(directory: str) -> list[int]:
    """Steps of the complete checkpoints in ``directory``, ascending."""
    if not os.path.isdir(directory):
        return []
    return sorted(int(m.group(1)) for m in map(_NAME.match, os.listdir(directory)) if m)


def prune(directory: str, keep_last: Optional[int]) -> None:
    """Delete all but the newest ``keep_last`` checkpoints (None: keep all), with their
    DeepSpeed partitions (``deepspeed/NNNNNNN``)."""
    if keep_last is None:
        return
    import shutil
    for step in list_checkpoints(directory)[:-keep_last]:
        os.remove(checkpoint_path(directory, step))
        for key in ("model", "ema"):  # --save-safetensors copies
            path = os.path.join(directory, f"{step:07d}-{key}.safetensors")
            if os.path.exists(path):
                os.remove(path)
        shutil.rmtree(os.path.join(directory, "deepspeed", f"{step:07d}"), ignore_errors=True)


def resolve_resume(resume: Optional[str], directory: str) -> Optional[str]:
    """``--resume``: ``auto`` (the newest here, or start fresh), a step, or a file path."""
    if resume is None:
        return None
    if resume == "auto":
        steps = list_checkpoints(directory)
        return checkpoint_path(directory, steps[-1]) if steps else None
    if resume.isdigit():
        path = checkpoint_path(directory, int(resume))
    else:
        path = resume
    if not os.path.exists(path):
        raise FileNotFoundError(f"--resume {resume}: no checkpoint at {path} (have steps "
                                f"{list_checkpoints(directory)} in {directory})")
    return path


def rng_state() -> dict:
    state = dict(torch=torch.get_rng_state())
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
