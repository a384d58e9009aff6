"""lightning's private names that metasgd_lightning relies on, each behind one function (see the package docstring)."""

from __future__ import annotations
