"""What a model predicts, and how a model of any prediction becomes a velocity field.

A network trained along a Gaussian path ``x_t = sigma_t x0 + alpha_t x1``
(:class:`fmjax.paths.GaussianPath`) can predict the velocity ``v``, the data ``x1``
(E[x1 | x_t]), the noise ``eps`` (E[x0 | x_t]) or the ``score`` of p_t (for the standard
normal source, ``score = -E[x0 | x_t] / sigma_t``). :func:`convert` maps any of these into
any other with the identities ``x = sigma x0 + alpha x1`` and ``v = sigma' x0 + alpha' x1``.
Train such a network with ``fmjax.losses.cfm_loss(..., prediction=...)`` (its regression
target is :func:`prediction_target`) and sample it through :func:`velocity_field`, over the
times of :func:`velocity_range`.

Every function takes the path as its first argument; the path's methods of the same names
(``path.convert(...)``, ``path.velocity_field(...)``, ...) call them.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

from fmjax._field import as_field
from fmjax.checks import real, same_shape
from fmjax.paths import Coefficients, check_time

if TYPE_CHECKING:
    from collections.abc import Callable

    from fmjax.paths import GaussianPath

__all__ = [
    "PREDICTIONS",
    "check_prediction",
    "convert",
    "prediction_of",
    "prediction_target",
    "velocity_field",
    "velocity_range",
]

#: What a model may predict: the velocity, the data ``x1``, the noise ``eps`` or the score.
PREDICTIONS = ("velocity", "x1", "eps", "score")


def check_prediction(value, name: str) -> None:
    """Raise unless ``value`` is one of :data:`PREDICTIONS`."""
    if not isinstance(value, str) or value not in PREDICTIONS:
        raise ValueError(f"{name} must be one of {PREDICTIONS}; got {value!r}.")


def convert(path: GaussianPath, pred, x, t, *, src: str, dst: str):
    """Convert a prediction at ``(t, x)`` between 'velocity', 'x1', 'eps' and 'score'.

    Uses ``x = sigma x0 + alpha x1`` and ``v = sigma' x0 + alpha' x1`` with ``x0, x1``
    replaced by their posterior means, and ``score = -E[x0 | x] / sigma`` (standard normal
    source). Each conversion divides by a coefficient that may vanish at the ends of the
    path (e.g. alpha_0 = 0 for CondOT when converting from eps); evaluate inside t_range.
    """
    for name, value in (("src", src), ("dst", dst)):
        check_prediction(value, name)
    same_shape(pred, x, "pred", "x")
    c = path.coefficients_like(t, x)
    a, s, da, ds = c.alpha, c.sigma, c.d_alpha, c.d_sigma
    if src == dst:
        return pred
    # Recover the posterior means (x0_hat, x1_hat) from the source prediction.
    if src == "velocity":
        det = da * s - ds * a
        x0_hat = (da * x - a * pred) / det
        x1_hat = (s * pred - ds * x) / det
    elif src == "x1":
        x1_hat = pred
        x0_hat = (x - a * pred) / s
    else:
        x0_hat = pred if src == "eps" else -s * pred
        x1_hat = (x - s * x0_hat) / a
    if dst == "velocity":
        return ds * x0_hat + da * x1_hat
    if dst == "x1":
        return x1_hat
    if dst == "eps":
        return x0_hat
    return -x0_hat / s


def prediction_target(path: GaussianPath, x0, x1, t, prediction: str = "velocity"):
    """The regression target of a model that predicts ``prediction`` at ``x_t``:
    'velocity' ``sigma'_t x0 + alpha'_t x1`` (``path.target``), 'x1' the data ``x1``,
    'eps' the noise ``x0``, 'score' ``-x0 / sigma_t`` (denoising score matching; singular
    where sigma_t = 0). Each is the conditional quantity whose regression gives the
    posterior mean that :func:`convert` turns into the marginal velocity."""
    check_prediction(prediction, "prediction")
    same_shape(x0, x1, "x0", "x1")
    if prediction == "velocity":
        return path.target(x0, x1, t)
    if prediction == "x1":
        check_time(t, path.t_range)
        return x1
    if prediction == "eps":
        check_time(t, path.t_range)
        return x0
    return -x0 / path.coefficients_like(t, x1).sigma


def velocity_range(path: GaussianPath, prediction: str, margin: float = 1e-3):
    """``(t0, t1)``: the times over which :func:`velocity_field` of a ``prediction`` model
    is finite, to pass to :func:`fmjax.sample` and :func:`fmjax.log_likelihood`.

    ``t_range``, moved in by ``margin`` at an end where the conversion divides by zero
    (by a coefficient below 1e-6):
    the start for 'eps' and 'score' where alpha vanishes there, the end for 'x1' where
    sigma does (e.g. ``(1e-3, 1)`` for 'eps' on CondOT, ``(0, 0.999)`` for 'x1' on
    ``CondOT(sigma_min=0)``, and ``t_range`` itself for 'velocity'). Starting a sample
    at ``t0 > 0`` from the source noise, or scoring against it there, neglects the data's
    ``alpha_{t0} x1`` share of ``x_{t0}``: an approximation of order ``margin``.
    """
    check_prediction(prediction, "prediction")
    margin = real(margin, "margin", low=0.0, high=0.5, low_open=True, high_open=True)
    lo, hi = path.t_range

    def vanishes(c):  # zero up to float32 rounding (cos(pi / 2) is -4e-8 there)
        return abs(float(c)) < 1e-6

    if prediction in ("eps", "score") and vanishes(_at(path, lo).alpha):
        lo += margin
    if prediction == "x1" and vanishes(_at(path, hi).sigma):
        hi -= margin
    return lo, hi


def _at(path, t: float) -> Coefficients:
    return Coefficients(*path.coefficients(jnp.float32(t)))


def velocity_field(path: GaussianPath, f: Callable, prediction: str) -> Callable:
    """``v(t, x)`` for :func:`fmjax.sample` / :func:`fmjax.log_likelihood` from a model
    ``f(t, x)`` that predicts ``prediction`` ('velocity', 'x1', 'eps' or 'score'):
    ``convert(path, f(t, x), x, t, src=prediction, dst='velocity')``, as a
    ``jax.tree_util.Partial`` (``f``'s arrays stay runtime arguments).

    The conversion divides by a coefficient that vanishes at an end of most paths: 'x1'
    by sigma_t (t = 1 for CondOT with sigma_min = 0), 'eps' and 'score' by alpha_t
    (alpha_0 = 0 for CondOT): solve over :func:`velocity_range`, where it is positive.

    A conditional model ``f(t, x, cond)`` gives the conditional ``v(t, x, cond)``, for
    ``fmjax.sample(..., cond=...)`` and :mod:`fmjax.guidance`.
    """
    check_prediction(prediction, "prediction")
    if not callable(f):
        raise ValueError(f"f must be a callable f(t, x); got {type(f).__name__}.")
    f = as_field(f)
    if prediction == "velocity":
        return f
    return jax.tree_util.Partial(_TO_VELOCITY[prediction], path, f)


def prediction_of(f: Callable, t, x, name: str = "f", args: tuple = ()):
    """``f(t, x, *args)``, which must have x's shape (a model's prediction at a batch;
    ``args``: e.g. the conditions of a conditional model)."""
    pred = f(t, x, *args)
    if jnp.shape(pred) != jnp.shape(x):
        call = "(t, x" + ", cond" * len(args) + ")"
        raise ValueError(
            f"{name}{call} must return x's shape {jnp.shape(x)}; got {jnp.shape(pred)}."
        )
    return pred


def _velocity_from(prediction, path, f, t, x, *args):
    return convert(path, prediction_of(f, t, x, args=args), x, t, src=prediction, dst="velocity")


# one function object per prediction, made once: a Partial's function is part of its static
# tree structure (a string cannot be one of its leaves), so solves compile once per kind
_TO_VELOCITY = {p: functools.partial(_velocity_from, p) for p in ("x1", "eps", "score")}
