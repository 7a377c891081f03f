"""Fused ops of repa_fast and their backend registry.

The REPA alignment loss has a pure-PyTorch reference,
:func:`repa_fast.transport.projection_loss`, which runs everywhere. Accelerated backends
register here with a function saying why they cannot run.
"""
from .backends import ENV_VAR, describe_backends

__all__ = ["ENV_VAR", "describe_backends"]
