"""How the ``metasgd`` commands end on a user's mistake: one line, ``metasgd <command>: <what, given, fix>``.

A mistake of the user's (a bad argument, a missing file, data that does not fit the model) ends in that one
line and exit status 1; anything else is a bug of ours and keeps its traceback. ``METASGD_TRACEBACK=1`` shows
the traceback of user errors too.
"""

from __future__ import annotations

import os

from lightning.fabric.utilities.exceptions import MisconfigurationException

from datamodules.downloads import DownloadError
from datamodules.images import ImageReadError

from ..training.base import SetupError
from ..training.checkpointing import CheckpointCorruptError

__all__ = ["TRACEBACK_VARIABLE", "ArgumentsRefused", "UserError", "one_line", "show_tracebacks", "user_error_message"]

#: Set to 1 to see the traceback of user errors too (e.g. to report a message that looks wrong).
TRACEBACK_VARIABLE = "METASGD_TRACEBACK"


class UserError(ValueError):
    """A mistake in the command's arguments, found by the command itself; the message says what to do."""


class ArgumentsRefused(ValueError):
    """A constructor refused its arguments from the command line or config (raised from the constructor's error)."""


#: Errors whose message is written for the user: the mistake, what was given, the fix.
_USER_ERRORS = (UserError, ArgumentsRefused, SetupError, CheckpointCorruptError, DownloadError, ImageReadError,
                FileNotFoundError, NotADirectoryError)


def show_tracebacks() -> bool:
    return os.environ.get(TRACEBACK_VARIABLE, "").strip().lower() not in ("", "0", "false", "no")


def one_line(message: object) -> str:
    return " ".join(str(message).split())


def user_error_message(error: BaseException) -> str | None:
    """The one line to print for ``error`` if it is a user's mistake (in it or its causes), else None (a bug)."""
    chain, seen = [], error
    while seen is not None and seen not in chain:
        chain.append(seen)
        seen = seen.__cause__
    for link in chain:
        if isinstance(link, _USER_ERRORS):
            text = one_line(link)
            if isinstance(link, FileNotFoundError) and link.filename is not None and str(link.filename) not in text:
                text = f"{text}: {link.filename}"  # e.g. "[Errno 2] No such file or directory" alone
            return text
    return None


def refused_arguments(error: BaseException) -> ArgumentsRefused | None:
    """The message of the constructor error behind an instantiation failure, as :class:`ArgumentsRefused`, or None.

    jsonargparse wraps a constructor's ``ValueError`` in its own (e.g. "Does not validate against any of the
    Union subtypes ...", with the whole ``Namespace``); the constructor's own message is the deepest cause.
    Lightning's Trainer refuses arguments with ``MisconfigurationException``.
    """
    refused, seen = None, error
    while seen is not None:
        if isinstance(seen, (ValueError, MisconfigurationException)):
            refused = seen
        seen = seen.__cause__
    if refused is None:
        return None
    text = str(refused)
    if "Does not validate against any of the Union subtypes" in text:  # no cause chained: its first listed error
        errors = [line.strip()[2:] for line in text.splitlines() if line.strip().startswith("- ")]
        text = errors[0] if errors else text
    return ArgumentsRefused(one_line(text))
