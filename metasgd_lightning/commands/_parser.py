"""The ``metasgd`` command's argument parser: whole option names only, and an unknown one named in one line.

argparse accepts any unambiguous prefix of an option (``--model.inner_step 5`` is taken as
``--model.inner_steps``), so a misspelt option can silently set another one: :class:`MetaSGDArgumentParser`
turns prefixes off. An unknown option, on the command line or in a config file, is answered with one line
that names it and the nearest valid option, instead of the usage block of every option; any other parsing
error (a value of the wrong type, a config file that is missing or not YAML) is one line too.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import inspect
import re
import sys
from typing import Any

from lightning.pytorch.cli import LightningArgumentParser

from .._internals.argparse_internals import long_option_strings

__all__ = ["MetaSGDArgumentParser", "OneLineArgumentParser", "parse_error_line", "unknown_option_lines"]


class MetaSGDArgumentParser(LightningArgumentParser):
    """``LightningArgumentParser`` without prefix matching (``allow_abbrev=False``) and with short unknown-option errors."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str, ex: Exception | None = None):
        if not self.exit_on_error:  # jsonargparse parsing internally (e.g. a union's other types): its exception
            return super().error(message, ex)
        lines = unknown_option_lines(self, str(message), ex) or [parse_error_line(self, str(message), ex)]
        self.logger.error(message)
        sys.stderr.write("\n".join(lines) + "\n")
        raise SystemExit(2)


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse's parser for the checkpoint commands, whose errors are one line (not usage, then the error)."""

    def error(self, message: str):
        sys.stderr.write(f"{self.prog}: {' '.join(message.split())} (all options: {self.prog} --help)\n")
        raise SystemExit(2)


def parse_error_line(parser, message: str, ex: Exception | None = None) -> str:
    """jsonargparse's (multi-line) parsing error as one line: the option, what it expects, what was given."""
    parser = getattr(ex, "subcommand_parser", None) or parser
    prog = parser.prog.replace(" [options]", "")
    see = f"(all options: {prog} --help)"
    found = re.match(r'Parser key "([^"]+)":\s*(.*)', message, re.S)
    if not found:
        if message.startswith("Problems parsing config"):
            return f"{prog}: the config is not valid YAML: {' '.join(message.split(':', 1)[1].split())}"
        found = re.match(r"the following arguments are required: (.*)", message)
        if found:
            names = found.group(1).split(", ")
            subcommand = names[0].split(".", 1)[0]
            if prog == "metasgd" and subcommand in ("fit", "validate", "test", "predict"):
                prog, see = f"metasgd {subcommand}", f"(all options: metasgd {subcommand} --help)"
            missing = ", ".join("--" + name.split(".", 1)[-1] for name in names)
            return (f"{prog}: missing {missing}. Give a config that sets them (e.g. --config configs/sine_5shot.yaml) "
                    f"{see}")
        return f"{prog}: {' '.join(message.split())} {see}"
    key, detail = found.groups()
    nested = re.search(r"Problem with given class_path '[^']+':\s*Parser key \"([^\"]+)\":\s*(.*?)(?:\n\s*- |\Z)", detail, re.S)
    if nested:  # an argument of a class chosen by class_path (e.g. --data.shots)
        key, detail = f"{key}.{nested.group(1)}", nested.group(2)
    option = _option_name(parser, key)
    if key == "config":
        return f"{prog}: --config: {' '.join(detail.split())}. Give a YAML file (e.g. configs/sine_5shot.yaml)."
    given = re.search(r"Given value: (.*)", detail) or re.search(r"Got value: (.*)", detail)
    subtypes = re.search(r"Subtypes: \[(.*)\]", detail)
    expected = re.findall(r"Expected an? (.+?)(?:\. Got value|$)", detail, re.M)
    if subtypes:
        expected = [part.strip() for part in re.split(r",\s*(?![^\[]*\])", subtypes.group(1))]
    expected = [re.sub(r"<class '(?:[\w.]+\.)?(\w+)'>", r"\1", e).replace("NoneType", "null") for e in expected]
    if given and expected:
        value = given.group(1).strip()
        nested = re.fullmatch(r"""["']?NestedArg\(key='([^']+)', val='(.*)'\)["']?""", value)
        if nested:  # e.g. --model.class_path given a class that is not there
            option, value = f"{option}.{nested.group(1)}", nested.group(2)
        return f"{prog}: {option} expects {' or '.join(expected)}; got {value!r} {see}"
    return f"{prog}: {option}: {' '.join(detail.split())} {see}"


def _option_name(parser, key: str) -> str:
    """``--key``, or ``--group.key`` for a key jsonargparse names without its group (a class_path's arguments)."""
    options = long_option_strings(parser)
    if f"--{key}" in options:
        return f"--{key}"
    nested = [option for option in options if option.endswith(f".{key}")]
    return nested[0] if len(nested) == 1 else f"--{key}"


def unknown_option_lines(parser, message: str, ex: Exception | None = None) -> list[str]:
    """One line per unknown option named in a parser's error ``message``, with the nearest valid option; [] if none."""
    parser = getattr(ex, "subcommand_parser", None) or parser
    prog = parser.prog.replace(" [options]", "")
    valid = long_option_strings(parser)
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


def _init_arguments(class_path: str) -> list[str]:
    """The constructor arguments of the class at ``class_path`` (already imported by the parser), or []."""
    module_name, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
        parameters = inspect.signature(cls).parameters.values()
    except (ImportError, AttributeError, TypeError, ValueError):
        return []
    return [p.name for p in parameters if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
