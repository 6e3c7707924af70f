"""What the command-line tools share: bad input ends in one line that says what was wrong, not a traceback.

tokenzoo raises ``ValueError`` and the ``FileNotFoundError`` / ``FileExistsError`` family for input a user can fix
(DESIGN contract 8). Each tool validates its arguments inside ``user_errors(parser)``, which turns those into
argparse's usage error (the message on one line, exit code 2), before any heavy work starts. Work that follows
validation runs outside it, so an unexpected error inside the library still shows its traceback.
"""
import argparse
import contextlib
import json
from typing import Any, Dict, Iterator, Optional, Sequence

__all__ = ["USER_ERRORS", "parse_model_kwargs", "user_errors"]

USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError)


@contextlib.contextmanager
def user_errors(parser: argparse.ArgumentParser) -> Iterator[None]:
    """Report the errors of ``USER_ERRORS`` raised in the block as ``parser.error`` (exit code 2)."""
    try:
        yield
    except USER_ERRORS as e:
        parser.error(str(e))


def parse_model_kwargs(items: Optional[Sequence[str]], option: str = "--model-kwargs") -> Dict[str, Any]:
    """Parse ``--model-kwargs``: one JSON object, or ``key=value`` pairs whose values are JSON or plain strings.

    Args:
        items: The command-line words, e.g. ``['{"keep_rate": 0.5}']`` or ``['keep_rate=0.5', 'drop_rate=0']``.
        option: The option's name, for the error message.

    Returns:
        Keyword arguments for the model constructor.

    Raises:
        ValueError: On malformed input.
    """
    if not items:
        return {}
    if len(items) == 1 and items[0].lstrip().startswith("{"):
        try:
            kwargs = json.loads(items[0])
        except json.JSONDecodeError as e:
            raise ValueError(f"{option} is not valid JSON: {e}") from e
        if not isinstance(kwargs, dict):
            raise ValueError(f"{option} JSON must be an object, got {items[0]!r}")
        return kwargs
    kwargs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise ValueError(f"{option} expects key=value pairs or one JSON object, got {item!r}")
        try:
            kwargs[key] = json.loads(value)
        except json.JSONDecodeError:  # bare words such as act_layer=gelu stay strings
            kwargs[key] = value
    return kwargs
