"""The ``metasgd`` command's argument parser: whole option names only, and an unknown one named in one line.

argparse accepts any unambiguous prefix of an option (``--model.inner_step 5`` is taken as
``--model.inner_steps``), so a misspelt option can silently set another one: :class:`MetaSGDArgumentParser`
turns prefixes off. An unknown option, on the command line or in a config file, is answered with one line
that names it and the nearest valid option, instead of the usage block of every option.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import re
import sys
from typing import Any

from lightning.pytorch.cli import LightningArgumentParser

__all__ = ["MetaSGDArgumentParser", "unknown_option_lines"]


class MetaSGDArgumentParser(LightningArgumentParser):
    """``LightningArgumentParser`` without prefix matching (``allow_abbrev=False``) and with short unknown-option errors."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str, ex: Exception | None = None):
        lines = unknown_option_lines(self, str(message), ex) if self.exit_on_error else []
        if not lines:
            return super().error(message, ex)
        self._logger.error(message)
        sys.stderr.write("\n".join(lines) + "\n")
        raise SystemExit(2)


def unknown_option_lines(parser, message: str, ex: Exception | None = None) -> list[str]:
    """One line per unknown option named in a parser's error ``message``, with the nearest valid option; [] if none."""
    parser = getattr(ex, "subcommand_parser", None) or parser
    prog = parser.prog.replace(" [options]", "")
    valid = _option_strings(parser)
    unknown: list[tuple[str, list[str]]] = []
    found = re.search(r"unrecognized arguments: (.*)", message)
    if found:
        unknown += [(token.split("=")[0], valid) for token in found.group(1).split() if token.startswith("--")]
    found = re.search(r"does not accept option '([^']+)'", message)  # a key of a config file
    if found:
        unknown.append(("--" + found.group(1), valid))
    found = re.search(r"Parser key \"([^\"]+)\".*?class_path '([^']+)':\s*Option '([^']+)' is not accepted", message, re.S)
    if found:  # an argument of a class chosen by class_path (e.g. the data module)
        key, class_path, option = found.groups()
        arguments = [f"--{key}.{name}" for name in _init_arguments(class_path)]
        unknown.append((f"--{key}.{option}", arguments or valid))
    lines = []
    for option, candidates in unknown:
        nearest = difflib.get_close_matches(option, candidates, n=1, cutoff=0.6)
        hint = f"; did you mean {nearest[0]}?" if nearest else "."
        lines.append(f"{prog}: unknown option {option}{hint} (all options: {prog} --help)")
    return lines


def _option_strings(parser) -> list[str]:
    return [option for action in parser._actions for option in action.option_strings if option.startswith("--")]


def _init_arguments(class_path: str) -> list[str]:
    """The constructor arguments of the class at ``class_path`` (already imported by the parser), or []."""
    module_name, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
        parameters = inspect.signature(cls).parameters.values()
    except (ImportError, AttributeError, TypeError, ValueError):
        return []
    return [p.name for p in parameters if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
