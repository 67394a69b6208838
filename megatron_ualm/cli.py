"""What every command-line entry point shares: user mistakes end in ONE line on stderr and
exit status 2, and megatron-core's import-time chatter is kept off stderr.

    @exit_on_user_error
    def main(argv=None) -> int:
        setup_logging()
        args = ArgumentParser(...).parse_args(argv)
        ...

A :class:`~megatron_ualm.errors.UserError` raised anywhere below ``main`` is printed as
``error: <file or setting>: <what is wrong>; <what to do>``; any other exception is a bug
and keeps its traceback.
"""
from __future__ import annotations

import argparse
import functools
import logging
import sys
import warnings

from megatron_ualm.errors import UserError, one_line

__all__ = ["USER_ERROR_EXIT", "ArgumentParser", "exit_on_user_error", "quiet_megatron", "setup_logging"]

USER_ERROR_EXIT = 2  # the status argparse uses for usage errors, too


def exit_on_user_error(main):
    """Decorate a CLI ``main``: a UserError it raises is printed as one line ``error: ...``
    on stderr and ``main`` returns 2."""
    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as exc:
            print(f"error: {one_line(exc)}", file=sys.stderr, flush=True)
            return USER_ERROR_EXIT
    return wrapper


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with a usage mistake reported as one line (``error: ...; see --help``)."""

    def error(self, message):
        self.exit(USER_ERROR_EXIT, f"error: {one_line(message)}; see {self.prog} --help\n")


def quiet_megatron() -> None:
    """Keep megatron-core's narration (every index it opens, every fallback it takes) and its
    import-time warnings that Transformer Engine / Apex are absent off stderr."""
    logging.getLogger("megatron.core").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*not installed.*")


def setup_logging(fmt: str = "%(asctime)s %(levelname)s %(name)s: %(message)s") -> None:
    """INFO logging on stderr, megatron-core kept quiet (:func:`quiet_megatron`)."""
    logging.basicConfig(level=logging.INFO, format=fmt)
    quiet_megatron()
