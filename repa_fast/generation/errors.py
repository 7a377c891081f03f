"""The error type of bad generation inputs (``python -m repa_fast.generate`` exits with code 2)."""


class UsageError(ValueError):
    """A flag or a checkpoint that cannot work; the message names the flag, what is expected
    and what was given."""
