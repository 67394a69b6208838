"""User errors: mistakes in what a user passed (a path, a file, a setting), told apart from bugs.

Every exception the project raises for such a mistake derives from :class:`UserError`
(``ConfigError``, ``ConversionError``, ``DatasetMismatchError``, ...); its message reads
``<file or setting>: <what is wrong>; <what to do>``. The command-line entry points print
it as one line and exit with status 2 (``megatron_ualm.cli``); anything else is a bug and
keeps its traceback.
"""
from __future__ import annotations

__all__ = ["UserError", "one_line"]


class UserError(Exception):
    """A mistake in the user's input; the message names the file or setting and the fix."""


def one_line(message) -> str:
    """``str(message)`` with its lines joined by '; '."""
    return "; ".join(line.strip() for line in str(message).splitlines() if line.strip())
