"""Which module class the ``metasgd`` command parses for: a fixed one, or the one a config names.

The Meta-SGD configs give ``model:`` as the module's arguments (``model: {model: ..., init_lr: ...}``),
and their runs and checkpoints store it so. A config of another method names its class instead:
``model: {class_path: metasgd_lightning.ReptileLightningModule, init_args: {...}}`` (or
``metasgd_lightning.MAMLLightningModule``: ``configs/maml_sine.yaml``). LightningCLI
reads the second form only in its subclass mode, whose help lists no module arguments and whose
checkpoints store the class beside them; so the command takes subclass mode only when the arguments
name a class, and every Meta-SGD config, run and checkpoint works exactly as before.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import yaml

__all__ = ["module_forms_conflict", "names_module_class"]


def names_module_class(args: Sequence[str]) -> bool:
    """Whether the command-line ``args`` name the module's class.

    True when a ``--config`` (a file or a YAML string) has ``model: {class_path: ...}``, when
    ``--model`` is given a class (a name, or a file or YAML string with ``class_path``), and for
    ``--model.class_path`` and ``--model.help``.
    """
    for i, arg in enumerate(args):
        option, equals, value = arg.partition("=")
        if not equals:
            value = args[i + 1] if i + 1 < len(args) else ""
        if option in ("--model.class_path", "--model.help"):
            return True
        if option in ("--config", "-c"):
            model = _load(value).get("model")
            if isinstance(model, dict) and "class_path" in model:
                return True
        elif option == "--model" and value:
            if "class_path" in _load(value) or (_CLASS_NAME.fullmatch(value) and not _is_file(value)):
                return True  # e.g. --model ReptileLightningModule
    return False


def module_forms_conflict(args: Sequence[str]) -> str | None:
    """What is wrong when the command line names the module's class but a ``--config`` gives the Meta-SGD form
    (``model:`` as the module's arguments, no ``class_path``), which subclass mode cannot read; None otherwise.

    Example::

        module_forms_conflict(["--config", "configs/sine_5shot.yaml", "--model", "ReptileLightningModule"])
    """
    plain, named = None, None
    for i, arg in enumerate(args):
        option, equals, value = arg.partition("=")
        if not equals:
            value = args[i + 1] if i + 1 < len(args) else ""
        if option in ("--config", "-c"):
            model = _load(value).get("model")
            if isinstance(model, dict) and model and "class_path" not in model:
                plain = value
        elif option == "--model.class_path" or (option == "--model" and value and (
                "class_path" in _load(value) or (_CLASS_NAME.fullmatch(value) and not _is_file(value)))):
            named = f"{option} {value}"
    if plain is None or named is None:
        return None
    return (f"{named} names the module's class, but {plain} gives Meta-SGD's settings (`model:` without "
            "class_path), which another class cannot take. Use a config of that method (e.g. configs/reptile_sine.yaml, "
            "configs/maml_sine.yaml), or write the config's model as {class_path: ..., init_args: {...}}.")


_CLASS_NAME = re.compile(r"[A-Za-z_][\w.]*")


def _is_file(value: str) -> bool:
    try:
        return Path(value).is_file()
    except (OSError, ValueError):  # e.g. a YAML string too long for a file name
        return False


def _load(value: str) -> dict:
    """A config file or YAML string as a dict (``{}`` for anything else)."""
    try:
        loaded = yaml.safe_load(Path(value).read_text() if _is_file(value) else value)
    except (OSError, ValueError, yaml.YAMLError):
        return {}
    return loaded if isinstance(loaded, dict) else {}
