"""Checkpoints: atomic writes, the official layout, keep-last, resume look-up.

``<output-dir>/<exp-name>/checkpoints/NNNNNNN.pt`` holds what the official ``generate.py``
loads — ``model``, ``ema``, ``args`` (a plain dict, so ``torch.load(weights_only=True)``
works), ``steps`` — plus ``opt``, ``rng`` and ``loader`` so a resumed run continues exactly.
Each file is written to ``.tmp``, flushed to disk and renamed: a crash during a save leaves the
previous checkpoints as they were. Beside each, ``NNNNNNN.pt.sha256.json`` records its size and
SHA-256 (hashed while writing); ``--resume auto`` checks them (which catches truncated files and
flipped bytes that ``torch.load`` would accept) and falls back to the newest good checkpoint,
saying which one it passed over and why. ``--save-safetensors`` also writes ``NNNNNNN-model.safetensors``
and ``NNNNNNN-ema.safetensors`` (weights only, ``args`` and ``steps`` in the metadata) for tools
that should not unpickle; ``python -m repa_fast.training.export CKPT.pt`` converts a saved file.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from typing import Optional

import torch

from ..atomic_write import atomic_path, publish, temporary_name, write_json_atomic
from ..errors import UsageError

_NAME = re.compile(r"^(\d{7})\.pt$")
CHECKSUM_SUFFIX = ".sha256.json"
# what a checkpoint of this package holds beyond the official model/ema/args/steps
RESUME_KEYS = ("model", "ema", "args", "steps", "rng", "loader")


class _HashingWriter:
    """A binary file that hashes what goes through it and keeps the ``OSError`` a write
    raised (torch wraps it in a ``RuntimeError`` that says ``unexpected pos``)."""

    def __init__(self, file):
        self.file, self.hash, self.size, self.error = file, hashlib.sha256(), 0, None

    def write(self, data) -> int:
        try:
            written = self.file.write(data)
        except OSError as error:
            self.error = error
            raise
        self.hash.update(data)
        self.size += len(data)
        return written

    def flush(self) -> None:
        self.file.flush()


def checksum_path(path: str) -> str:
    """Where the size and SHA-256 of checkpoint ``path`` are recorded at save time."""
    return path + CHECKSUM_SUFFIX


def save_atomic(obj, path: str) -> None:
    """Write ``obj`` to ``path`` so that ``path`` is either the old file or the complete new
    one, with its size and SHA-256 beside it (:func:`checksum_path`, hashed while writing).

    Order: the old checksum goes, the checkpoint is published, then its checksum is written;
    a crash between leaves a complete checkpoint without a checksum (checked by loading it),
    never a checksum that belongs to another file. A failed write raises an ``OSError``
    naming ``path`` and the cause (``No space left on device``)."""
    tmp = temporary_name(path)
    try:
        with open(tmp, "wb") as f:
            writer = _HashingWriter(f)
            try:
                torch.save(obj, writer)
            except (OSError, RuntimeError) as error:
                cause = writer.error or (error if isinstance(error, OSError) else None)
                if cause is None:
                    raise
                raise OSError(cause.errno, cause.strerror, path) from error
        record = {"bytes": writer.size, "sha256": writer.hash.hexdigest()}
        if os.path.exists(checksum_path(path)):
            os.remove(checksum_path(path))
        publish(tmp, path)
        write_json_atomic(checksum_path(path), record)
    except OSError as error:
        if error.filename in (tmp, None):
            raise OSError(error.errno, error.strerror, path) from error
        raise
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def checkpoint_problem(path: str, verify_hash: bool = True) -> Optional[str]:
    """Why ``path`` is not the file that was saved (size or, with ``verify_hash``, SHA-256
    differ from its checksum record), or None. A checkpoint without a record (written before
    records existed, or a crash right after publishing it) gives None: loading it is the
    check."""
    if not os.path.isfile(path):
        return "no such file"
    record_path = checksum_path(path)
    if not os.path.exists(record_path):
        return None
    try:
        with open(record_path) as f:
            record = json.load(f)
        expected_size, expected_hash = int(record["bytes"]), str(record["sha256"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"its checksum record {record_path} is unreadable ({error})"
    size = os.path.getsize(path)
    if size != expected_size:
        return f"it has {size} bytes, {expected_size} were written (truncated or overwritten)"
    if not verify_hash:
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    if digest.hexdigest() != expected_hash:
        return f"its SHA-256 differs from the one recorded at save time in {record_path} " \
               f"(damaged bytes)"
    return None


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
        if os.path.exists(checksum_path(checkpoint_path(directory, step))):
            os.remove(checksum_path(checkpoint_path(directory, step)))
        for key in ("model", "ema"):  # --save-safetensors copies
            path = os.path.join(directory, f"{step:07d}-{key}.safetensors")
            if os.path.exists(path):
                os.remove(path)
        shutil.rmtree(os.path.join(directory, "deepspeed", f"{step:07d}"), ignore_errors=True)


def load_checkpoint(path: str, flag: str = "--resume", verify_hash: bool = True) -> dict:
    """The training state in ``path``, verified against its checksum record (``verify_hash``:
    its SHA-256 too, else its size), loaded with ``weights_only=True`` and checked to hold what
    a resume needs; a :class:`UsageError` naming ``flag``, the file and what is wrong
    otherwise. The machine's refusals (``OSError``: I/O errors, ``MemoryError``) propagate:
    they say nothing about the file."""
    problem = checkpoint_problem(path, verify_hash)
    state = None
    if problem is None:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (OSError, MemoryError):
            raise
        except Exception as error:  # noqa: BLE001 -- zip, unpickling and tensor errors alike
            first = str(error).strip().splitlines()[0] if str(error).strip() else ""
            problem = f"it cannot be read as a checkpoint ({type(error).__name__}: {first})"
    if problem is None:
        missing = [k for k in RESUME_KEYS if not isinstance(state, dict) or k not in state]
        if missing:
            problem = (f"it is not a repa_fast training checkpoint (no {', '.join(missing)}; "
                       f"a weights-only file such as an official REPA checkpoint cannot "
                       f"resume training)")
    if problem is not None:
        raise UsageError(f"{flag} {path}: {problem}")
    return state


def resolve_resume(resume: Optional[str], directory: str) -> tuple[Optional[str], Optional[dict]]:
    """``--resume``: ``auto`` (the newest good checkpoint here, or start fresh), a step, or a
    file path; returns ``(path, state)``, ``(None, None)`` for a fresh start.

    ``auto`` verifies each checkpoint newest first (:func:`load_checkpoint`) and takes the
    first good one, warning about every damaged one it passes; when all are damaged it raises
    instead of silently starting over. An explicit step or path must be good."""
    if resume is None:
        return None, None
    if resume == "auto":
        damaged = []
        for step in reversed(list_checkpoints(directory)):
            path = checkpoint_path(directory, step)
            try:
                state = load_checkpoint(path, "--resume auto:")
            except UsageError as error:
                damaged.append((path, str(error).split(f"{path}: ", 1)[-1]))
                continue
            for bad, why in damaged:
                warnings.warn(f"--resume auto: skipping {bad}: {why}; resuming from the "
                              f"previous good checkpoint, {path}")
            return path, state
        if damaged:
            raise UsageError("--resume auto: every checkpoint in " + directory + " is damaged: "
                             + "; ".join(f"{p}: {why}" for p, why in damaged)
                             + ". Delete them (or move them away) to start over")
        return None, None
    path = checkpoint_path(directory, int(resume)) if resume.isdigit() else resume
    if not os.path.exists(path):
        raise UsageError(f"--resume {resume}: no checkpoint at {path} (have steps "
                         f"{list_checkpoints(directory)} in {directory})")
    return path, load_checkpoint(path)


def set_aside_after(directory: str, step: int) -> list[str]:
    """Move the checkpoints of steps after ``step`` (an abandoned continuation, or damaged ones
    a resume passed over), with their records, safetensors copies and DeepSpeed partitions,
    into ``directory/abandoned/<time>/``: never deleted, but out of reach of ``--resume auto``
    and ``--keep-last``. Returns the moved checkpoint paths (their new names)."""
    later = [s for s in list_checkpoints(directory) if s > step]
    if not later:
        return []
    import shutil
    import time
    dest = os.path.join(directory, "abandoned", time.strftime("%Y%m%d-%H%M%S"))
    os.makedirs(os.path.join(dest, "deepspeed"), exist_ok=True)
    moved = []
    for s in later:
        stem = f"{s:07d}"
        for name in (f"{stem}.pt{CHECKSUM_SUFFIX}", f"{stem}-model.safetensors",
                     f"{stem}-ema.safetensors", os.path.join("deepspeed", stem), f"{stem}.pt"):
            if os.path.exists(os.path.join(directory, name)):
                shutil.move(os.path.join(directory, name), os.path.join(dest, name))
        moved.append(os.path.join(dest, f"{stem}.pt"))
    return moved


def rng_state() -> dict:
    state = dict(torch=torch.get_rng_state())
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
