"""Attention backend dispatch (flash-attn 2/3/4, xformers, PyTorch SDPA, plain math)."""
from .backends import (
    AUTO_ORDER,
    BACKENDS,
    CHOICES,
    ENV_VAR,
    attention,
    available_backends,
    describe_backends,
    requested_backend,
    resolve_backend,
    unavailable_reason,
)

__all__ = [
    "AUTO_ORDER", "BACKENDS", "CHOICES", "ENV_VAR", "attention", "available_backends",
    "describe_backends", "requested_backend", "resolve_backend", "unavailable_reason",
]
