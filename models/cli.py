"""What the command-line tools share: bad input ends in one line that says what was wrong, not a traceback.

tokenzoo raises ``ValueError`` and the ``FileNotFoundError`` / ``FileExistsError`` family for input a user can fix
(DESIGN contract 8). Each tool validates its arguments inside ``user_errors(parser)``, which turns those into
argparse's usage error (the message on one line, exit code 2), before any heavy work starts. Work that follows
validation runs outside it, so an unexpected error inside the library still shows its traceback.
"""
import argparse
import contextlib
from typing import Iterator

__all__ = ["USER_ERRORS", "user_errors"]

USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError)


@contextlib.contextmanager
def user_errors(parser: argparse.ArgumentParser) -> Iterator[None]:
    """Report the errors of ``USER_ERRORS`` raised in the block as ``parser.error`` (exit code 2)."""
    try:
        yield
    except USER_ERRORS as e:
        parser.error(str(e))
