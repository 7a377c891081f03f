"""Optional cache of an ``.npz`` batch's Inception activations, kept beside it (``--cache``).

``samples.npz`` → ``samples.inception-acts.npz`` holding ``pool``, ``spatial`` and ``logits``
of its first ``count`` images, plus a JSON ``meta`` entry that ties them to the source file
(size and modification time) and to the weights (SHA-256). A cache whose ``meta`` does not
match, or that holds fewer images than asked for, is ignored and rewritten.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np

from ..atomic_write import atomic_open
from .features import Activations

FORMAT = 1
SUFFIX = ".inception-acts.npz"


def cache_path(source: Path) -> Path:
    return source.with_name(source.name[:-len(".npz")] + SUFFIX if source.name.endswith(".npz")
                            else source.name + SUFFIX)


def _meta(source: Path, weights_sha256: str) -> dict:
    st = source.stat()
    return {"format": FORMAT, "source": source.name, "source_size": st.st_size,
            "source_mtime_ns": st.st_mtime_ns, "weights_sha256": weights_sha256}


def load_cached(source: Path, weights_sha256: str, count: int) -> Optional[Activations]:
    """The first ``count`` cached activations of ``source``, or ``None`` when there is no
    valid cache for this file and these weights."""
    path = cache_path(source)
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            if meta != _meta(source, weights_sha256) or len(data["pool"]) < count:
                return None
            return Activations(data["pool"][:count], data["spatial"][:count],
                               data["logits"][:count])
    except (OSError, ValueError, KeyError):  # unreadable or foreign file: recompute
        return None


def save_cached(source: Path, weights_sha256: str, acts: Activations) -> Path:
    """Write ``acts`` as the cache of ``source``, atomically (temp file + rename)."""
    path = cache_path(source)
    meta = json.dumps(_meta(source, weights_sha256))
    # unique: two evaluations of one folder may fill its cache at once
    with atomic_open(path, "wb", sync=False, unique=True) as f:
        np.savez(f, pool=acts.pool, spatial=acts.spatial, logits=acts.logits,
                 meta=np.array(meta))
    return path
