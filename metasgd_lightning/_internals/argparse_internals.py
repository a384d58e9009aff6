"""argparse's private names that metasgd_lightning relies on, each behind one function (see the package docstring)."""

from __future__ import annotations

import argparse

__all__ = ["long_option_strings"]


def long_option_strings(parser: argparse.ArgumentParser) -> list[str]:
    """Every ``--option`` a parser accepts (to name the nearest one to a misspelt option).

    argparse keeps its actions in the private ``parser._actions``; it has no public list of them.
    """
    return [option for action in parser._actions for option in action.option_strings if option.startswith("--")]
