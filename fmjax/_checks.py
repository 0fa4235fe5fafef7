"""Argument checks shared by the library and the experiments."""

from __future__ import annotations

import math
import operator

import numpy as np

__all__ = ["integer"]


def integer(value, name: str, *, minimum: int = 1, allow_none: bool = False):
    """``value`` as a Python int ``>= minimum`` (or None where ``allow_none``).

    Accepted: Python and NumPy integers, concrete 0-d integer arrays, and integral finite
    floats (``1e4`` from a config file). Refused with a ``ValueError`` that names ``name``:
    bools (``True`` is almost always a misplaced flag), non-integral or non-finite numbers,
    strings, arrays with elements, traced values and anything below ``minimum``.
    """
    if value is None and allow_none:
        return None
    kind = {0: "a non-negative integer", 1: "a positive integer"}.get(
        minimum, f"an integer >= {minimum}")
    expected = kind + (" or None" if allow_none else "")
    n = None
    if not isinstance(value, (bool, np.bool_)):
        try:
            n = operator.index(value)
        except TypeError:
            if isinstance(value, (float, np.floating)) and math.isfinite(value) \
                    and float(value).is_integer():
                n = int(value)
    if n is None or n < minimum:
        raise ValueError(f"{name} must be {expected}; got {value!r}.")
    return n
