"""The error type of bad generation inputs (``python -m repa_fast.generate`` exits with code 2):
the package-wide :class:`repa_fast.errors.UsageError`."""
from ..errors import UsageError

__all__ = ["UsageError"]
