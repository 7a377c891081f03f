"""What the command-line tools do with an error: one line a user can act on, and an exit code.

Exit codes (the same for ``train``, ``generate``, ``evaluate`` and ``data.prepare``):

- ``2`` usage: a flag, a path or a file given by the user cannot work (:class:`UsageError`;
  ``train`` and ``data.prepare`` also count ``ValueError`` and ``FileNotFoundError``, which
  their configuration checks raise); the message names the flag, what was expected and what
  was given.
- ``1`` environment: the machine refused (disk full, permission denied, a read-only folder, an
  I/O error): the message names the path and the cause (``OSError``, also when torch wraps it
  in a ``RuntimeError``, as ``torch.save`` does for a full disk).
- anything else is a bug: its traceback is printed as usual.

``REPA_FAST_DEBUG=1`` prints the traceback of handled errors too.
"""
from __future__ import annotations

import os
import sys
import traceback
from typing import Callable, Optional

DEBUG_ENV = "REPA_FAST_DEBUG"
EXIT_USAGE = 2
EXIT_ENVIRONMENT = 1


class UsageError(ValueError):
    """A flag, path or input file that cannot work; the message names the flag (or file), what
    is expected and what was given. Exits with code 2."""


def debugging() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def os_cause(error: BaseException) -> Optional[OSError]:
    """The ``OSError`` behind ``error``: itself, one it was raised ``from``, or the one a
    ``RuntimeError`` was raised while handling (torch's ``inline_container.cc ... unexpected
    pos`` hides ``No space left on device`` that way). Any other error raised while handling
    an ``OSError`` is a bug of its own, not the machine's refusal."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and not isinstance(error, FileNotFoundError):
            return error
        error = error.__cause__ or (error.__context__ if isinstance(error, RuntimeError)
                                    and not error.__suppress_context__ else None)
    return None


def describe_os_error(error: OSError) -> str:
    """``<path>: <cause>`` (``No space left on device``, ``Permission denied``, ...)."""
    cause = error.strerror or str(error)
    paths = [p for p in (error.filename, error.filename2) if p]
    return f"{' -> '.join(map(str, paths))}: {cause}" if paths else str(cause)


USAGE = (UsageError,)
USAGE_AND_VALUE = (UsageError, ValueError, FileNotFoundError, IsADirectoryError,
                   NotADirectoryError)


def exit_code(error: BaseException, usage: tuple = USAGE) -> Optional[int]:
    """2 for usage errors (instances of ``usage``), 1 for environment errors, None for
    anything else (a bug)."""
    if isinstance(error, usage):
        return EXIT_USAGE
    if os_cause(error) is not None:
        return EXIT_ENVIRONMENT
    return None


def message(error: BaseException) -> str:
    """The one line printed for a handled error."""
    if not isinstance(error, USAGE_AND_VALUE) and os_cause(error) is not None:
        return describe_os_error(os_cause(error))
    if isinstance(error, OSError) and error.strerror and error.filename:
        return describe_os_error(error)  # FileNotFoundError: "<path>: No such file ..."
    return str(error)


def report(error: BaseException, prog: str = "", usage: tuple = USAGE) -> Optional[int]:
    """Print ``error: <message>`` for a handled error and return its exit code; None for an
    unhandled one (the caller re-raises it). With ``$REPA_FAST_DEBUG`` set the traceback
    comes first."""
    code = exit_code(error, usage)
    if code is None:
        return None
    if debugging():
        traceback.print_exception(type(error), error, error.__traceback__)
    prefix = f"{prog}: " if prog else ""
    print(f"{prefix}error: {message(error)}", file=sys.stderr)
    return code


def run_cli(body: Callable[[], int], prog: str = "", usage: tuple = USAGE) -> int:
    """Run a command's body; handled errors become one line and their exit code."""
    try:
        return body()
    except Exception as error:  # noqa: BLE001 -- classified below; bugs re-raise
        code = report(error, prog, usage)
        if code is None:
            raise
        return code
