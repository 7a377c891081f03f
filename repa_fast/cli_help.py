"""The commands' shared ``--help`` formatting."""
from __future__ import annotations

import argparse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every flag's default, except None: those flags' help says where the value comes
    from (the checkpoint, a preset, ...)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)
