"""Schedule functions ``t -> alpha_t`` / ``t -> sigma_t`` for :class:`fmjax.paths.AffinePath`.

Each schedule is a frozen, hashable dataclass (equal parameters compare equal), so a path built
twice from the same schedules hits the same jit cache entry. Any elementwise jnp function of t
works as a schedule too; these are the common ones.

A schedule is only the function: :class:`fmjax.paths.AffinePath` takes its time derivative
with ``jax.jvp`` (exact, automatic differentiation) unless it is given ``d_alpha`` /
``d_sigma`` (``fmjax.paths.rectified_flow`` passes :class:`Constant` slopes).
:attr:`Linear.derivative` is the one schedule-valued derivative here.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp

__all__ = ["Constant", "Cosine", "Linear", "OneMinusPower", "Power"]


@dataclasses.dataclass(frozen=True)
class Constant:
    """``t -> value``."""

    value: float

    def __call__(self, t):
        return jnp.full_like(t, self.value)


@dataclasses.dataclass(frozen=True)
class Linear:
    """``t -> intercept + slope * t``."""

    intercept: float
    slope: float

    def __call__(self, t):
        return self.intercept + self.slope * t

    @property
    def derivative(self) -> Constant:
        """``t -> slope``, the time derivative as a schedule."""
        return Constant(self.slope)


@dataclasses.dataclass(frozen=True)
class Cosine:
    """``sin(pi t / 2)`` (``sine=True``, an alpha) or ``cos(pi t / 2)`` (a sigma)."""

    sine: bool = True

    def __call__(self, t):
        return jnp.sin(0.5 * math.pi * t) if self.sine else jnp.cos(0.5 * math.pi * t)


@dataclasses.dataclass(frozen=True)
class Power:
    """``t -> t ** n``."""

    n: float

    def __call__(self, t):
        return t**self.n


@dataclasses.dataclass(frozen=True)
class OneMinusPower:
    """``t -> 1 - t ** n``."""

    n: float

    def __call__(self, t):
        return 1.0 - t**self.n
