"""Argument checks shared by the library and the experiments.

``integer`` and ``real`` turn a value from code or a config file into a Python number, or
raise a ``ValueError`` that names the argument, says what was expected and what was given;
``traced`` tells whether a value is only known at run time (inside ``jit``), when a value
check has to be skipped.
"""

from __future__ import annotations

import math
import operator

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["broadcast_time", "integer", "real", "same_shape", "traced"]


def traced(*values) -> bool:
    """Any of ``values`` is a tracer: its value is unknown until run time, so a value check
    has to be skipped (or left to run time)."""
    return any(isinstance(v, jax.core.Tracer) for v in values)


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
        minimum, f"an integer >= {minimum}"
    )
    expected = kind + (" or None" if allow_none else "")
    n = None
    if not isinstance(value, (bool, np.bool_)):
        try:
            n = operator.index(value)
        except TypeError:
            if (
                isinstance(value, (float, np.floating))
                and math.isfinite(value)
                and float(value).is_integer()
            ):
                n = int(value)
    if n is None or n < minimum:
        raise ValueError(f"{name} must be {expected}; got {value!r}.")
    return n


def real(
    value,
    name: str,
    *,
    low: float = -math.inf,
    high: float = math.inf,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """``value`` as a finite Python float in the interval from ``low`` to ``high`` (each end
    closed unless ``*_open``); anything else (bools, strings, NaN, inf, out of range) is a
    ``ValueError`` that names ``name`` and the interval."""
    x = None
    if not isinstance(value, (bool, np.bool_, str, bytes)):
        try:
            x = float(value)
        except (TypeError, ValueError):
            x = None
    ok = (
        x is not None
        and math.isfinite(x)
        and (x > low if low_open else x >= low)
        and (x < high if high_open else x <= high)
    )
    if not ok:
        lo = "(" if low_open else "["
        hi = ")" if high_open or high == math.inf else "]"
        if low == -math.inf:
            lo = "("
        raise ValueError(
            f"{name} must be a finite number in {lo}{low:g}, {high:g}{hi}; got {value!r}."
        )
    return x


def same_shape(a, b, name_a: str, name_b: str) -> None:
    """Raise a ValueError unless ``a`` and ``b`` have the same shape."""
    if jnp.shape(a) != jnp.shape(b):
        raise ValueError(
            f"{name_a} and {name_b} must have the same shape; got {jnp.shape(a)} and "
            f"{jnp.shape(b)}."
        )


def broadcast_time(t, x) -> jax.Array:
    """``t`` (a scalar, or ``(B,)`` for a batch ``x`` of ``(B, *event)``) reshaped to broadcast
    against ``x``; any other shape raises a ``ValueError`` naming both shapes."""
    t = jnp.asarray(t)
    if t.ndim == 0:
        return t
    if t.ndim == 1 and jnp.ndim(x) >= 1 and t.shape[0] == jnp.shape(x)[0]:
        return t.reshape(t.shape + (1,) * (jnp.ndim(x) - 1))
    raise ValueError(
        "t must be a scalar (one example) or have shape (batch,) matching x's leading axis; "
        f"got t.shape={t.shape} and x.shape={jnp.shape(x)}."
    )
