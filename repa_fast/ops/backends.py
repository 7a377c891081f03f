"""Registry of the alignment-op backends: name -> why it is unavailable (None when usable)."""
from __future__ import annotations

from typing import Callable, Optional

ENV_VAR = "REPA_FAST_OPS_BACKEND"


def _reference_problem() -> Optional[str]:
    return None  # plain PyTorch: runs on every device and dtype


# Ordered by preference; later issues add the Triton and native backends here.
REGISTRY: dict[str, Callable[[], Optional[str]]] = {
    "reference": _reference_problem,
}


def describe_backends() -> list[tuple[str, Optional[str]]]:
    """``(name, reason)`` per op backend; reason None means usable."""
    return [(name, problem()) for name, problem in REGISTRY.items()]
