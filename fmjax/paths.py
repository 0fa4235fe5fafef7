"""Gaussian conditional probability paths (Lipman et al. 2023, section 4).

Every path in this module is *affine* in the pair (x0, x1):

    x_t = psi_t(x0 | x1) = sigma_t * x0 + alpha_t * x1,    x0 ~ N(0, I),

so that ``p_t(x | x1) = N(x | alpha_t x1, sigma_t^2 I)``. The paper's three paths are all of
this form:

==========  ===================  ============================  ==========================
path        alpha_t              sigma_t                       paper
==========  ===================  ============================  ==========================
CondOT      t                    1 - (1 - sigma_min) t         eq. 20-23
VE          1                    s_{1-t} (geometric s)         eq. 16-17 (reversed)
VP          a_{1-t}              sqrt(1 - a_{1-t}^2)           eq. 18-19 (reversed)
==========  ===================  ============================  ==========================

and :class:`AffinePath` accepts any pair of schedule functions (linear / rectified flow,
cosine, polynomial are in :mod:`fmjax.schedules`).

Conventions (DESIGN.md): time runs from t=0 (noise) to t=1 (data). Every method works on a
single example (``t`` a scalar, ``x`` of any event shape) or a batch (``t`` of shape
``(B,)``, ``x`` of shape ``(B, *event_shape)``). Paths are frozen dataclasses registered as
pytrees with all hyper-parameters static, so they pass through ``jax.jit``/``vmap``/``grad``
unchanged and their constants are folded at compile time.

A model may predict another quantity than the velocity (the data ``x1``, the noise ``eps`` or
the score): :mod:`fmjax.predictions` converts between them and turns such a model into a
velocity field; the path methods :meth:`GaussianPath.convert`,
:meth:`GaussianPath.prediction_target`, :meth:`GaussianPath.velocity_range` and
:meth:`GaussianPath.velocity_field` call it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fmjax import schedules
from fmjax.checks import broadcast_time, same_shape, traced
from fmjax.densities import normal_log_prob

__all__ = [
    "VE",
    "VP",
    "AffinePath",
    "Coefficients",
    "CondOT",
    "GaussianPath",
    "check_time",
]


class Coefficients(NamedTuple):
    """A path's schedules at t: ``x_t = sigma x0 + alpha x1`` and its time derivative
    ``d/dt x_t = d_sigma x0 + d_alpha x1``."""

    alpha: Any
    sigma: Any
    d_alpha: Any
    d_sigma: Any


def _static_dataclass(cls):
    """Frozen dataclass registered as a pytree with every field static (no leaves)."""
    cls = dataclasses.dataclass(frozen=True)(cls)
    fields = [f.name for f in dataclasses.fields(cls)]
    return jax.tree_util.register_dataclass(cls, data_fields=[], meta_fields=fields)


def check_time(t, t_range=(0.0, 1.0), name="t"):
    """Raise ValueError if a concrete ``t`` lies outside ``t_range`` (no-op under tracing)."""
    if traced(t):
        return
    t_np = np.asarray(t)
    if t_np.size == 0:
        return
    lo, hi = t_range
    if not np.all(np.isfinite(t_np)) or t_np.min() < lo or t_np.max() > hi:
        raise ValueError(
            f"{name} must lie in [{lo}, {hi}] for this path; got values in "
            f"[{t_np.min()}, {t_np.max()}]."
        )


class GaussianPath:
    """Base class: the path ``x_t = sigma_t x0 + alpha_t x1``; subclasses give
    :meth:`coefficients` and ``t_range`` (the closed interval of t on which the path and its
    velocity are finite; used for validation and as the default training-time range)."""

    t_range = (0.0, 1.0)

    def coefficients(self, t) -> Coefficients:
        """``(alpha_t, sigma_t, d alpha_t/dt, d sigma_t/dt)`` evaluated at t (any shape)."""
        raise NotImplementedError

    def coefficients_like(self, t, x) -> Coefficients:
        """:meth:`coefficients` at a checked ``t`` (inside ``t_range``; an integer ``t`` is
        taken as float32), each shaped to broadcast against ``x``: ``t`` a scalar for one
        example, or of shape ``(B,)`` for a batch ``x`` of shape ``(B, *event_shape)``."""
        check_time(t, self.t_range)
        t = jnp.asarray(t)
        if not jnp.issubdtype(t.dtype, jnp.floating):
            t = t.astype(jnp.float32)
        return Coefficients(*(broadcast_time(c, x) for c in self.coefficients(t)))

    # -- the path ----------------------------------------------------------------------
    def mean_std(self, x1, t):
        """Mean ``mu_t(x1) = alpha_t x1`` and std ``sigma_t`` of ``p_t(x | x1)``."""
        c = self.coefficients_like(t, x1)
        return c.alpha * x1, c.sigma

    def interpolate(self, x0, x1, t):
        """``x_t = psi_t(x0 | x1) = sigma_t x0 + alpha_t x1``."""
        same_shape(x0, x1, "x0", "x1")
        c = self.coefficients_like(t, x1)
        return c.sigma * x0 + c.alpha * x1

    def target(self, x0, x1, t):
        """The regression target ``d/dt psi_t(x0 | x1) = sigma'_t x0 + alpha'_t x1``."""
        same_shape(x0, x1, "x0", "x1")
        c = self.coefficients_like(t, x1)
        return c.d_sigma * x0 + c.d_alpha * x1

    def interpolate_and_target(self, x0, x1, t):
        """``(x_t, d/dt x_t)`` sharing one evaluation of the schedules (the training hot path)."""
        same_shape(x0, x1, "x0", "x1")
        c = self.coefficients_like(t, x1)
        return c.sigma * x0 + c.alpha * x1, c.d_sigma * x0 + c.d_alpha * x1

    def conditional_velocity(self, x, x1, t):
        """Theorem 3: ``u_t(x | x1) = sigma'/sigma (x - alpha x1) + alpha' x1``.

        Singular where sigma_t = 0 (t = 1 for CondOT with sigma_min = 0, VP at t = 1).
        """
        same_shape(x, x1, "x", "x1")
        c = self.coefficients_like(t, x1)
        return c.d_sigma / c.sigma * (x - c.alpha * x1) + c.d_alpha * x1

    def sample_source(self, key, shape, dtype=jnp.float32):
        """Draw ``sigma_{t0} * N(0, I)``, the noise part of the path's start marginal.

        For CondOT and VP this is (close to) N(0, I); for VE it is N(0, sigma_max^2 I).
        """
        return self.source_std(dtype) * jax.random.normal(key, shape, dtype)

    def source_std(self, dtype=jnp.float32):
        """``sigma_{t0}``: the std of :meth:`sample_source` (1 for CondOT, ~1 for VP,
        sigma_max for VE)."""
        return Coefficients(*self.coefficients(jnp.asarray(self.t_range[0], dtype))).sigma

    def source_log_prob(self, x):
        """Log-density of :meth:`sample_source`, ``N(0, sigma_{t0}^2 I)``, per example of a
        batch ``(B, *event_shape)``: the ``base_log_prob`` of :func:`fmjax.log_likelihood`
        that matches the samples' starting noise."""
        x = jnp.asarray(x)
        return normal_log_prob(x, self.source_std(x.dtype))

    # -- models of other predictions (fmjax.predictions) ----------------------------------
    def convert(self, pred, x, t, *, src: str, dst: str):
        """:func:`fmjax.predictions.convert` on this path."""
        return _predictions().convert(self, pred, x, t, src=src, dst=dst)

    def prediction_target(self, x0, x1, t, prediction: str = "velocity"):
        """:func:`fmjax.predictions.prediction_target` on this path."""
        return _predictions().prediction_target(self, x0, x1, t, prediction)

    def velocity_range(self, prediction: str, margin: float = 1e-3) -> tuple[float, float]:
        """:func:`fmjax.predictions.velocity_range` on this path."""
        return _predictions().velocity_range(self, prediction, margin)

    def velocity_field(self, f: Callable, prediction: str) -> Callable:
        """:func:`fmjax.predictions.velocity_field` on this path."""
        return _predictions().velocity_field(self, f, prediction)


def _predictions():
    """:mod:`fmjax.predictions`, which builds on this module (imported on first use)."""
    from fmjax import predictions

    return predictions


@_static_dataclass
class AffinePath(GaussianPath):
    """The affine Gaussian path ``x_t = sigma(t) x0 + alpha(t) x1`` from schedule functions.

    Args:
      alpha: ``t -> alpha_t`` (elementwise, jnp-traceable), the data coefficient.
      sigma: ``t -> sigma_t``, the noise coefficient.
      d_alpha, d_sigma: their time derivatives; derived with ``jax.jvp`` when not given.
      t_range: where the path and its velocity are finite.
      name: for ``repr`` and logs.

    Schedules should be hashable and compare equal when equal (module-level functions or the
    dataclasses of :mod:`fmjax.schedules`) so that jit caches hit across constructions.

    Example (rectified flow / I-CFM)::

        path = AffinePath(alpha=lambda t: t, sigma=lambda t: 1 - t)
    """

    alpha: Callable
    sigma: Callable
    d_alpha: Callable | None = None
    d_sigma: Callable | None = None
    t_range: tuple = (0.0, 1.0)
    name: str = "affine"

    def __post_init__(self):
        if not (callable(self.alpha) and callable(self.sigma)):
            raise ValueError(
                f"alpha and sigma must be callables t -> value; got {type(self.alpha)} and "
                f"{type(self.sigma)}."
            )
        lo, hi = self.t_range
        if not 0.0 <= lo < hi <= 1.0:
            raise ValueError(f"t_range must satisfy 0 <= lo < hi <= 1; got {self.t_range}.")
        object.__setattr__(self, "t_range", (float(lo), float(hi)))

    def coefficients(self, t) -> Coefficients:
        ones = jnp.ones_like(t)
        a, s = self.alpha(t), self.sigma(t)
        da = self.d_alpha(t) if self.d_alpha else jax.jvp(self.alpha, (t,), (ones,))[1]
        ds = self.d_sigma(t) if self.d_sigma else jax.jvp(self.sigma, (t,), (ones,))[1]
        return Coefficients(*(jnp.broadcast_to(c, jnp.shape(t)) for c in (a, s, da, ds)))


@_static_dataclass
class CondOT(GaussianPath):
    """The paper's optimal-transport conditional path (eq. 20-23).

    ``mu_t = t x1``, ``sigma_t = 1 - (1 - sigma_min) t``; the target is
    ``x1 - (1 - sigma_min) x0``. ``sigma_min = 0`` is rectified flow / I-CFM (the path the
    PyTorch libraries use); then ``conditional_velocity`` is singular at t = 1.
    """

    sigma_min: float = 0.0

    def __post_init__(self):
        if not 0.0 <= float(self.sigma_min) < 1.0:
            raise ValueError(f"sigma_min must lie in [0, 1); got {self.sigma_min!r}.")
        object.__setattr__(self, "sigma_min", float(self.sigma_min))

    def coefficients(self, t) -> Coefficients:
        c = 1.0 - self.sigma_min
        ones = jnp.ones_like(t)
        return Coefficients(t, 1.0 - c * t, ones, -c * ones)


@_static_dataclass
class VE(GaussianPath):
    """The paper's reversed variance-exploding path (eq. 16-17).

    ``mu_t = x1``, ``sigma_t = s(1 - t)`` with ``s(r) = sigma_min (sigma_max / sigma_min)^r``.
    Finite on all of [0, 1], but its t=0 marginal is N(x1, sigma_max^2 I), approximately
    N(0, sigma_max^2 I): start samples from :meth:`sample_source`.
    """

    sigma_min: float = 0.01
    sigma_max: float = 50.0

    def __post_init__(self):
        lo, hi = float(self.sigma_min), float(self.sigma_max)
        if not (0.0 < lo < hi and math.isfinite(hi)):
            raise ValueError(
                f"VE needs 0 < sigma_min < sigma_max < inf; got sigma_min={self.sigma_min!r}, "
                f"sigma_max={self.sigma_max!r}."
            )
        object.__setattr__(self, "sigma_min", lo)
        object.__setattr__(self, "sigma_max", hi)

    def coefficients(self, t) -> Coefficients:
        log_ratio = math.log(self.sigma_max / self.sigma_min)
        s = self.sigma_min * jnp.exp((1.0 - t) * log_ratio)
        return Coefficients(jnp.ones_like(t), s, jnp.zeros_like(t), -log_ratio * s)


@_static_dataclass
class VP(GaussianPath):
    """The paper's reversed variance-preserving path (eq. 18-19).

    ``mu_t = a(1 - t) x1``, ``sigma_t = sqrt(1 - a(1 - t)^2)`` with ``a(s) = exp(-T(s) / 2)``,
    ``T(s) = beta_min s + (beta_max - beta_min) s^2 / 2``. sigma_t -> 0 at t = 1, where the
    velocity is singular, so the safe range is ``t_range = (0, 1 - eps)`` (eps = 1e-5 as in
    score-based diffusion); a(1) = exp(-T(1) / 2) ~ 6.6e-3 so p_0 ~ N(0, I).
    """

    beta_min: float = 0.1
    beta_max: float = 20.0
    eps: float = 1e-5

    def __post_init__(self):
        bmin, bmax, eps = float(self.beta_min), float(self.beta_max), float(self.eps)
        if not (0.0 < bmin <= bmax and math.isfinite(bmax)):
            raise ValueError(
                f"VP needs 0 < beta_min <= beta_max < inf; got beta_min={self.beta_min!r}, "
                f"beta_max={self.beta_max!r}."
            )
        if not 0.0 < eps < 1.0:
            raise ValueError(f"VP eps must lie in (0, 1); got {self.eps!r}.")
        for k, v in dict(beta_min=bmin, beta_max=bmax, eps=eps).items():
            object.__setattr__(self, k, v)

    @property
    def t_range(self):
        return (0.0, 1.0 - self.eps)

    def coefficients(self, t) -> Coefficients:
        s = 1.0 - t
        big_t = self.beta_min * s + 0.5 * (self.beta_max - self.beta_min) * s**2
        beta = self.beta_min + (self.beta_max - self.beta_min) * s
        a = jnp.exp(-0.5 * big_t)
        # d/dt a(1 - t) = -a'(s) = beta(s) a(s) / 2
        da = 0.5 * beta * a
        one_minus_a2 = -jnp.expm1(-big_t)
        sig = jnp.sqrt(one_minus_a2)
        dsig = -a * da / sig
        return Coefficients(a, sig, da, dsig)


def rectified_flow() -> AffinePath:
    """``x_t = (1 - t) x0 + t x1`` (rectified flow, I-CFM; same as ``CondOT(0)``)."""
    return AffinePath(
        alpha=schedules.Linear(0.0, 1.0),
        sigma=schedules.Linear(1.0, -1.0),
        d_alpha=schedules.Constant(1.0),
        d_sigma=schedules.Constant(-1.0),
        name="rectified_flow",
    )


def cosine() -> AffinePath:
    """``alpha_t = sin(pi t / 2)``, ``sigma_t = cos(pi t / 2)`` (variance preserving)."""
    return AffinePath(
        alpha=schedules.Cosine(sine=True), sigma=schedules.Cosine(sine=False), name="cosine"
    )


def polynomial(n: float, eps: float = 1e-5) -> AffinePath:
    """``alpha_t = t^n``, ``sigma_t = 1 - t^n`` (n > 0).

    For ``n < 1`` the velocity ``n t^(n-1) (x1 - x0)`` is infinite at t = 0, so the path's
    ``t_range`` (where losses draw t) is ``(eps, 1)``; for ``n >= 1`` it is ``(0, 1)``."""
    if not float(n) > 0:
        raise ValueError(f"polynomial exponent n must be > 0; got {n!r}.")
    if not 0.0 < float(eps) < 1.0:
        raise ValueError(f"polynomial eps must lie in (0, 1); got {eps!r}.")
    lo = float(eps) if float(n) < 1.0 else 0.0
    return AffinePath(
        alpha=schedules.Power(float(n)),
        sigma=schedules.OneMinusPower(float(n)),
        t_range=(lo, 1.0),
        name=f"polynomial({float(n)})",
    )


def _sb_cfm(**kwargs):
    from fmjax.bridges import SchrodingerBridge  # builds on this module

    return SchrodingerBridge(**kwargs)


_NAMED = {
    "cond_ot": CondOT,
    "ve": VE,
    "vp": VP,
    "rectified_flow": rectified_flow,
    "cosine": cosine,
    "polynomial": polynomial,
    "sb_cfm": _sb_cfm,
}


def get(name: str, **kwargs) -> GaussianPath:
    """Build a path by name (``cond_ot``, ``ve``, ``vp``, ``rectified_flow``, ``cosine``,
    ``polynomial``, or ``sb_cfm``: the noisy interpolant
    :class:`fmjax.bridges.SchrodingerBridge`) with keyword hyper-parameters — the hook for
    config files."""
    if name not in _NAMED:
        raise ValueError(f"unknown path {name!r}; known paths: {sorted(NAMES)}.")
    return _NAMED[name](**kwargs)


NAMES = tuple(_NAMED)
"""The names :func:`get` knows."""

__all__ += ["NAMES", "cosine", "get", "polynomial", "rectified_flow"]
