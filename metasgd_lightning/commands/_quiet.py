"""Keep third-party noise away from our users.

Lightning prints an advertisement and a torch-internal deprecation warning; none of it is actionable
for a user of this package. learn2learn's import banner is silenced by the data package
(:func:`datamodules.learn2learn_import.import_learn2learn`, re-exported here for older imports).
"""

from __future__ import annotations

import logging
import warnings

from datamodules.learn2learn_import import import_learn2learn

__all__ = ["import_learn2learn", "silence_lightning_noise"]


class _DropMessages(logging.Filter):
    def __init__(self, *fragments: str) -> None:
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(fragment in message for fragment in self.fragments)


def _filter(logger_name: str, *fragments: str) -> None:
    """Drop the messages with these fragments from the logger, once however often the command runs in a process."""
    logger = logging.getLogger(logger_name)
    if not any(isinstance(f, _DropMessages) and f.fragments == fragments for f in logger.filters):
        logger.addFilter(_DropMessages(*fragments))


def silence_lightning_noise() -> None:
    """Drop Lightning's litlogger advertisement, its no-GPU and seed lines, and a torch pytree deprecation warning."""
    # "GPU available: False" and "TPU available: False" on every CPU run, and "Seed set to 0": noise, and lines
    # before a user error's one line (the seed is in the run's config.yaml; GPU lines that say True stay).
    # Lightning logs them under the names of whichever of its packages was imported last: `lightning`'s, or those of
    # the standalone pytorch_lightning and lightning_fabric once a library (learn2learn) imports them.
    for package in ("lightning.pytorch", "lightning.fabric", "pytorch_lightning", "lightning_fabric"):
        _filter(f"{package}.utilities.rank_zero", "litlogger", "GPU available: False", "TPU available: False")
    for package in ("lightning.fabric", "lightning_fabric"):
        _filter(f"{package}.utilities.seed", "Seed set to")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated.*")
    # `metasgd fit` says itself, in one line, what a fresh run does to an earlier run's checkpoints (cli.py).
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
