"""Keep third-party noise away from our users.

learn2learn imports the unmaintained ``gym``, which prints a deprecation banner to stderr on import;
Lightning prints an advertisement and a torch-internal deprecation warning. None of it is actionable
for a user of this package.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import logging
import warnings
from types import ModuleType

__all__ = ["import_learn2learn", "silence_lightning_noise"]


def import_learn2learn() -> ModuleType:
    """``import learn2learn`` without the banner that its ``gym`` import prints."""
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return importlib.import_module("learn2learn")


class _DropMessages(logging.Filter):
    def __init__(self, *fragments: str) -> None:
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(fragment in message for fragment in self.fragments)


def silence_lightning_noise() -> None:
    """Drop Lightning's litlogger advertisement and a torch pytree deprecation warning it triggers."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_DropMessages("litlogger"))
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated.*")
