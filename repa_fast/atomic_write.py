"""Atomic file writes: a file under its final name is either the old one or the complete new one.

A writer fills ``<path>.tmp`` in the same directory, flushes it to disk when asked (``fsync``,
then the directory's entry too), and renames it over ``path`` (``os.replace``: atomic within one
POSIX file system). On any error, KeyboardInterrupt included, the temporary file is removed and
the error re-raised; ``path`` is untouched. Used by checkpoints, data shards, generated samples,
evaluation caches and results.
"""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from typing import IO, Any, Iterator, Union

PathLike = Union[str, "os.PathLike[str]"]


def temporary_name(path: PathLike, unique: bool = False) -> str:
    """``path.tmp``; with ``unique``, ``path.<pid>.tmp`` so processes writing the same file
    at once (two evaluations filling one cache) never share a temporary file."""
    path = os.fspath(path)
    return f"{path}.{os.getpid()}.tmp" if unique else f"{path}.tmp"


def _fsync_directory(path: str) -> None:
    # the rename itself is durable only once the directory entry is on disk (POSIX)
    if os.name != "posix":
        return
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(tmp: PathLike, path: PathLike, *, sync: bool = True) -> None:
    """Put the complete, closed file ``tmp`` under its final name ``path``: flushed to disk
    first (``sync``), then renamed, then the rename itself made durable."""
    if sync:
        with open(tmp, "rb+") as written:
            os.fsync(written.fileno())
    os.replace(tmp, path)
    if sync:
        _fsync_directory(os.fspath(path))


@contextmanager
def atomic_path(path: PathLike, *, sync: bool = True, unique: bool = False) -> Iterator[str]:
    """Yield a temporary path for the caller (or a library: ``torch.save``, ``save_file``)
    to write; when the block ends without error it is published over ``path``
    (:func:`publish`)."""
    path = os.fspath(path)
    tmp = temporary_name(path, unique)
    try:
        yield tmp
        publish(tmp, path, sync=sync)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextmanager
def atomic_open(path: PathLike, mode: str = "wb", *, sync: bool = True,
                unique: bool = False) -> Iterator[IO]:
    """``open(path, mode)`` whose content appears under ``path`` only when the block ends
    without error (see :func:`atomic_path`)."""
    if not mode.startswith("w"):
        raise ValueError(f"mode must be a write mode ('w', 'wb', ...); got {mode!r}")
    with atomic_path(path, sync=sync, unique=unique) as tmp:
        with open(tmp, mode) as f:
            yield f


def write_json_atomic(path: PathLike, obj: Any, *, sync: bool = True, **dump_kwargs) -> None:
    """``json.dump(obj)`` to ``path`` atomically (indent 1 unless ``dump_kwargs`` say)."""
    dump_kwargs.setdefault("indent", 1)
    with atomic_open(path, "w", sync=sync) as f:
        json.dump(obj, f, **dump_kwargs)
        f.write("\n")
