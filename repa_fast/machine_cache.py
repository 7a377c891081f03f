"""The package's per-machine cache folder: ``$REPA_FAST_CACHE``, else
``${XDG_CACHE_HOME:-~/.cache}/repa_fast``. It holds what is costly to redo and safe to lose:
records of verified data shards, tuned kernel tiles, the demo's trained encoder and judge."""
from __future__ import annotations

import os

CACHE_ENV = "REPA_FAST_CACHE"


def cache_root() -> str:
    """The cache folder (not created), ``~`` expanded."""
    base = os.environ.get(CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "repa_fast")
    return os.path.expanduser(base)
