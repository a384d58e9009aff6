"""``import learn2learn`` quietly: the one way this package imports learn2learn.

learn2learn imports the unmaintained ``gym``, which prints a deprecation banner to stderr on import;
none of it is actionable for a user of these data modules. learn2learn is imported only when a data
set is read (not by ``import datamodules``), so that the sine tasks and the CLI start fast.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import warnings
from types import ModuleType

__all__ = ["import_learn2learn"]


def import_learn2learn() -> ModuleType:
    """``import learn2learn`` without the banner that its ``gym`` import prints."""
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return importlib.import_module("learn2learn")
