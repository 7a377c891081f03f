"""Reading a backend request: an explicit argument, else an environment variable, else auto."""
from __future__ import annotations

import os
from typing import Optional, Sequence


def check_choice(name: str, choices: Sequence[str], argument: str) -> str:
    """``name`` if it is one of ``choices``, else a ValueError naming ``argument``."""
    if name not in choices:
        raise ValueError(f"{argument} must be one of {', '.join(choices)}; got {name!r}")
    return name


def requested_choice(explicit: Optional[str], choices: Sequence[str], argument: str,
                     env_var: str) -> str:
    """The argument if given (checked as ``argument``), else ``$env_var`` (checked as the
    variable), else ``"auto"``."""
    if explicit is not None:
        return check_choice(explicit, choices, argument)
    return check_choice(os.environ.get(env_var) or "auto", choices, env_var)
