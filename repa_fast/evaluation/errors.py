"""The one error type the evaluator raises for bad input (the CLI turns it into exit code 2)."""
from __future__ import annotations

from ..errors import UsageError


class EvaluationInputError(UsageError):
    """Bad input: a file, array or setting that cannot be evaluated.

    The message names the argument (``--samples``, ``--ref``, ``--inception-weights``, ...),
    what was expected and what was given, so a user can fix the call without reading code.
    """
