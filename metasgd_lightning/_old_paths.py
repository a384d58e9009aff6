"""The module paths of before the split into ``methods``, ``training`` and ``commands``, kept importable.

Saved configs and checkpoints name classes by those paths (``metasgd_lightning.models.ConvNet4``), and
user code imports from them (``from metasgd_lightning.module import MetaSGDLightningModule``). Each old
path is the new module itself, not a copy, so classes and functions are the same objects.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

OLD_PATHS = {
    "metasgd_lightning.metasgd": "metasgd_lightning.methods.metasgd",
    "metasgd_lightning.reptile": "metasgd_lightning.methods.reptile",
    "metasgd_lightning.models": "metasgd_lightning.methods.models",
    "metasgd_lightning.module": "metasgd_lightning.training",
    "metasgd_lightning.metrics": "metasgd_lightning.training.metrics",
    "metasgd_lightning.callbacks": "metasgd_lightning.training.callbacks",
    "metasgd_lightning.checkpointing": "metasgd_lightning.training.checkpointing",
    "metasgd_lightning.progress": "metasgd_lightning.training.progress",
    "metasgd_lightning.tensorboard_views": "metasgd_lightning.training.tensorboard_views",
    "metasgd_lightning.cuda_graph": "metasgd_lightning.training.cuda_graph",
    "metasgd_lightning.cli": "metasgd_lightning.commands.cli",
    "metasgd_lightning.inference": "metasgd_lightning.commands.inference",
    "metasgd_lightning.plotting": "metasgd_lightning.commands.plotting",
    "metasgd_lightning.task_plots": "metasgd_lightning.commands.task_plots",
    "metasgd_lightning.adapt_command": "metasgd_lightning.commands.adapt_command",
    "metasgd_lightning._quiet": "metasgd_lightning.commands._quiet",
    "metasgd_lightning._parser": "metasgd_lightning.commands._parser",
    "metasgd_lightning._module_class": "metasgd_lightning.commands._module_class",
}

__all__ = ["OLD_PATHS", "install"]


class _OldPathFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds an old path and gives the module at its new one."""

    def find_spec(self, name, path=None, target=None):
        if name not in OLD_PATHS:
            return None
        return importlib.util.spec_from_loader(name, self)

    def create_module(self, spec):
        return importlib.import_module(OLD_PATHS[spec.name])

    def exec_module(self, module):
        pass  # already imported at its new path


def install() -> None:
    """Make the old paths importable (idempotent)."""
    if not any(isinstance(finder, _OldPathFinder) for finder in sys.meta_path):
        sys.meta_path.append(_OldPathFinder())
