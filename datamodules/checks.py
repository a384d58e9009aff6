"""Argument checks with errors that name the owner, the argument and the value given.

The data package's own: ``metasgd_lightning`` has its integer check beside the maths
(``metasgd_lightning.methods.contract.check_positive_int``), which must not depend on the data package.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["check_fractions", "check_int", "check_normalisation", "check_range"]


def check_int(owner: str, name: str, value: object, minimum: int = 1) -> int:
    """``value`` if it is an integer (not a bool) of at least ``minimum``, else a ``ValueError``.

    Example:
        >>> check_int("ConvNet4", "image_size", 0)
        Traceback (most recent call last):
        ...
        ValueError: ConvNet4 `image_size` must be an integer >= 1; got 0.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{owner} `{name}` must be an integer >= {minimum}; got {value!r}.")
    return value


def check_range(owner: str, name: str, value: Sequence[float]) -> tuple[float, float]:
    """A finite ``(low, high)`` pair with ``low <= high``, as floats."""
    low, high = (float(v) for v in value)
    if not (math.isfinite(low) and math.isfinite(high) and low <= high):
        raise ValueError(f"{owner} `{name}` must be a finite (low, high) pair with low <= high; got {value!r}.")
    return low, high


def check_fractions(owner: str, fractions: Sequence[float]) -> tuple[float, float, float]:
    """Three shares (train, val, test) in [0, 1] that sum to 1."""
    values = tuple(float(f) for f in fractions)
    if len(values) != 3 or any(not 0.0 <= f <= 1.0 for f in values) or abs(sum(values) - 1.0) > 1e-6:
        raise ValueError(f"{owner} `fractions` must be three numbers in [0, 1] (train, val, test) that sum to 1; "
                         f"got {tuple(fractions)!r}.")
    return values  # type: ignore[return-value]


def check_normalisation(owner: str, channels: int, mean: Sequence[float] | None,
                        std: Sequence[float] | None) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None]:
    """Both ``mean`` and ``std`` (one value per channel, std > 0) or neither."""
    if (mean is None) != (std is None):
        raise ValueError(f"{owner} needs both `mean` and `std` or neither; got mean={mean!r}, std={std!r}.")
    if mean is None:
        return None, None
    mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    if len(mean) != channels or len(std) != channels or any(s <= 0 for s in std):
        raise ValueError(f"{owner} `mean` and `std` must have one value per channel ({channels}) and std > 0; "
                         f"got mean={mean!r}, std={std!r}.")
    return mean, std
