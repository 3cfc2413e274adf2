"""Errors a user can act on. The command line prints them without a traceback and exits 2."""

from __future__ import annotations

import difflib
from typing import Iterable


class DriveprivError(Exception):
    """A user mistake: what was wrong, where, and what to do. Never shown with a traceback."""


class ConfigError(DriveprivError):
    """A configuration (YAML file, --set override or option) is invalid."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """Return ' Did you mean 'x'?' for the closest choice, or '' when none is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" Did you mean '{close[0]}'?" if close else ""
