"""Log-likelihood of a flow by the instantaneous change of variables, and bits/dim.

Integrates the augmented ODE from t1 (data, default 1) to t0 (noise, default 0):

    d/dt [x_t, L_t] = [v(t, x_t), div v(t, x_t)],   L_{t1} = 0,
    log p_{t1}(x) = log p_{t0}(x_{t0}) + L_{t0}      (L_{t0} = -int_{t0}^{t1} div v dt)

The divergence is exact (the trace of the Jacobian, from one Jacobian-vector product per
input dimension, vmapped, or with ``chunk_size`` one linearisation and chunks of them, for
any event shape) or Hutchinson's estimate
``eps^T (dv/dx) eps`` with Gaussian or Rademacher probes drawn once per solve and held fixed
over it: one Jacobian-vector product per probe per evaluation.

``v(t, x)`` follows :mod:`fmjax.sampling`'s convention (batched, ``t`` of shape ``(B,)``) and
must treat the examples of a batch independently (no batch norm across examples).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fmjax import ode
from fmjax._field import as_field
from fmjax.batching import (
    batch_time,
    call_field,
    check_batch,
    check_cond,
    check_field_output,
    place_batch,
    place_cond,
)
from fmjax.checks import integer
from fmjax.cpu import jit_with_cpu_options
from fmjax.densities import normal_log_prob, standard_normal_log_prob
from fmjax.solvers import SolverOptions, solver_options

__all__ = [
    "DIVERGENCES",
    "PROBES",
    "LikelihoodStats",
    "bits_per_dim",
    "check_span",
    "log_likelihood",
    "normal_log_prob",
    "standard_normal_log_prob",
]

#: Divergence estimators: the exact trace or Hutchinson's estimator.
DIVERGENCES = ("exact", "hutchinson")
#: Hutchinson probe distributions.
PROBES = ("rademacher", "gaussian")


class LikelihoodStats(NamedTuple):
    """Solve statistics (see :class:`fmjax.ode.SolveStats`) plus ``latent``: the points x_{t0}
    the data were mapped to, and ``delta_logp``: ``log p(x) - log p_0(latent)``."""

    nfe: Any
    num_steps: Any
    num_accepted: Any
    num_rejected: Any
    success: Any
    latent: Any
    delta_logp: Any


def check_span(t0, t1) -> None:
    """A likelihood solve runs from the data at ``t1`` down to the noise at ``t0 < t1``."""
    if not t0 < t1:
        raise ValueError(f"need t0 < t1 (noise end before data end); got t0={t0}, t1={t1}.")


def _exact_divergence(f, x, chunk_size):
    """Value and trace of the per-example Jacobian of a batched f at x, any event shape.

    One forward-mode JVP per event dimension, all vmapped against a single primal pass
    (``jax.vmap(jax.jvp)``), rather than ``jax.linearize`` followed by vmapped tangents,
    which stores and re-reads every residual. With ``chunk_size``, the directions are
    evaluated ``chunk_size`` at a time from a linearisation (bounded memory).
    """
    b = x.shape[0]
    d = math.prod(x.shape[1:])
    eye = jnp.eye(d, dtype=x.dtype)

    def tangent(e):  # one basis direction of the event space, shared by the batch
        return jnp.broadcast_to(e.reshape(x.shape[1:]), x.shape)

    if chunk_size is None or chunk_size >= d:

        def one(e):
            y, tan = jax.jvp(f, (x,), (tangent(e),))
            return y, jnp.sum(tan.reshape(b, d) * e, axis=1)

        y, diag = jax.vmap(one, out_axes=(None, 0))(eye)
        return y, jnp.sum(diag, axis=0)
    y, f_jvp = jax.linearize(f, x)
    diag = jax.lax.map(
        lambda e: jnp.sum(f_jvp(tangent(e)).reshape(b, d) * e, axis=1), eye, batch_size=chunk_size
    )
    return y, jnp.sum(diag, axis=0)


def _hutchinson_divergence(f, x, probes, mode):
    """Value and mean over probes of eps^T J eps; probes: (K, B, *event)."""
    b = x.shape[0]
    if mode == "jvp":
        y, products = jax.vmap(lambda p: jax.jvp(f, (x,), (p,)), out_axes=(None, 0))(probes)
    else:
        y, f_vjp = jax.vjp(f, x)
        products = jax.vmap(lambda p: f_vjp(p)[0])(probes)
    quad = jnp.sum((products * probes).reshape(probes.shape[0], b, -1), axis=2)
    return y, jnp.mean(quad, axis=0)


def _draw_probes(key, shape, kind, dtype):
    if kind == "rademacher":
        return jax.random.rademacher(key, shape, dtype=dtype)
    return jax.random.normal(key, shape, dtype=dtype)


def _log_likelihood_impl(
    v,
    x1,
    key,
    cond,
    *,
    base_log_prob,
    divergence,
    num_probes,
    probe,
    hutchinson_mode,
    options,
    t0,
    t1,
    chunk_size,
    adjoint,
):
    probes = None
    if divergence == "hutchinson":
        probes = _draw_probes(key, (num_probes,) + x1.shape, probe, x1.dtype)

    # the field, its conditions and the probes go to the solve as args, not in a closure:
    # the continuous adjoint differentiates only args, y0 and the term
    def field(t, state, args):
        v, cond, probes = args
        x, _ = state

        def f(y):
            dy = call_field(v, batch_time(t, y), y, cond)
            check_field_output(dy, y)
            return dy

        if divergence == "exact":
            dx, div = _exact_divergence(f, x, chunk_size)
        else:
            dx, div = _hutchinson_divergence(f, x, probes, hutchinson_mode)
        return dx, div

    y0 = (x1, jnp.zeros((x1.shape[0],), x1.dtype))
    (latent, delta), _, stats = ode.solve(
        field, y0, t0=t1, t1=t0, options=options, args=(v, cond, probes), adjoint=adjoint
    )
    base = base_log_prob(latent) if base_log_prob is not None else standard_normal_log_prob(latent)
    if jnp.shape(base) != jnp.shape(delta):
        raise ValueError(
            f"base_log_prob(x0) must return one log-density per example, shape "
            f"{jnp.shape(delta)}; got shape {jnp.shape(base)}."
        )
    return base + delta, LikelihoodStats(*stats, latent=latent, delta_logp=delta)


# Exact-divergence solves compile with fmjax.cpu's XLA:CPU options (see that module);
# Hutchinson solves use the plain jit.
_log_likelihood = jit_with_cpu_options(
    _log_likelihood_impl,
    static_argnames=(
        "base_log_prob",
        "divergence",
        "num_probes",
        "probe",
        "hutchinson_mode",
        "options",
        "t0",
        "t1",
        "chunk_size",
        "adjoint",
    ),
)


def log_likelihood(
    v,
    x1,
    *,
    divergence: str = "exact",
    key=None,
    num_probes: int = 1,
    probe: str = "rademacher",
    hutchinson_mode: str = "jvp",
    base_log_prob=None,
    options: SolverOptions | None = None,
    t0: float = 0.0,
    t1: float = 1.0,
    chunk_size: int | None = None,
    mesh=None,
    cond=None,
    throw: bool = True,
    adjoint: str = "checkpoint",
    **solver_settings,
):
    """Log-density ``log p_{t1}(x1)`` of the flow of ``v`` started from ``base_log_prob``.

    Args:
      v: the vector field ``v(t, x)`` on a batch, or with ``cond`` a conditional field
        ``v(t, x, cond)``; wrap models with ``jax.tree_util.Partial``.
      x1: ``(B, *event_shape)`` points to evaluate.
      divergence: 'exact' (Jacobian trace; cost grows with the event size, fine for low
        dimension; ``chunk_size`` bounds memory by evaluating that many directions at once)
        or 'hutchinson' (unbiased stochastic estimate; needs ``key``).
      num_probes, probe: Hutchinson probes per example ('rademacher' or 'gaussian'), drawn
        once per solve from ``key`` and held fixed for the whole solve.
      hutchinson_mode: 'jvp' (forward mode, ``eps^T (J eps)``, default: no stored
        activations) or 'vjp' (reverse mode, ``(eps^T J) eps``); the same estimate.
      base_log_prob: log-density of the source at t0 on a batch, ``(B, *event) -> (B,)``;
        default standard normal (hashable callables only: it is a static argument).
      options: the solver settings, a :class:`fmjax.ode.SolverOptions` (default dopri5 at
        rtol = atol = 1e-5), or its fields as keywords (``**solver_settings``), as in
        :func:`fmjax.sample`; both error norms hold the log-density change to rtol/atol on
        its own, apart from the points (as torchdiffeq does for its tuple state), and
        ``'max'`` every example's.
      t0, t1: the noise and data ends; the solve runs from t1 down to t0.
      mesh: a mesh with a ``"data"`` axis: ``x1`` is split over it and the solve runs data
        parallel with the unsharded solve's steps and NFE (see :func:`fmjax.sample`).
      cond: each example's condition for a conditional ``v(t, x, cond)`` (an array or
        pytree of arrays with leading size B, split over ``mesh`` with ``x1``): the result is
        ``log p(x1[i] | cond[i])``. ``None`` (default): ``v(t, x)``.
      throw: outside jit, raise if the solve failed; inside jit check ``stats.success``.
      adjoint: how ``jax.grad`` differentiates the solve, a name of
        :data:`fmjax.ode.ADJOINTS`: 'checkpoint' (backpropagation through the solver's
        steps, default) or 'backsolve' (the continuous adjoint); see
        :func:`fmjax.cnf.ml_loss`, the maximum-likelihood loss built on this.
      **solver_settings: the fields of :class:`fmjax.ode.SolverOptions` as keywords
        (``solver="rk4", steps=10``), instead of ``options``.

    Returns:
      ``(log_prob, stats)``: log-densities of shape (B,) in nats and a
      :class:`LikelihoodStats` (NFE counts evaluations of the augmented field). The solve
      runs in x1's float precision, at least float32 (as :func:`fmjax.sample`).
    """
    check_batch(x1, "x1")
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}; got {divergence!r}.")
    if divergence == "hutchinson":
        if key is None:
            raise ValueError("divergence='hutchinson' needs a PRNG key= for its probes.")
        if probe not in PROBES:
            raise ValueError(f"probe must be one of {PROBES}; got {probe!r}.")
        num_probes = integer(num_probes, "num_probes")
        if hutchinson_mode not in ("jvp", "vjp"):
            raise ValueError(f"hutchinson_mode must be 'jvp' or 'vjp'; got {hutchinson_mode!r}.")
    chunk_size = integer(chunk_size, "chunk_size", allow_none=True)
    if adjoint not in ode.ADJOINTS:
        raise ValueError(f"adjoint must be one of {ode.ADJOINTS}; got {adjoint!r}.")
    options = solver_options(options, **solver_settings)
    ode.check_times(t0, t1, options)
    check_span(t0, t1)
    if cond is not None:
        check_cond(cond, jnp.shape(x1)[0], "fmjax.log_likelihood")
        cond = place_cond(cond, mesh)
    logp, stats = _log_likelihood(tuned=divergence == "exact")(
        as_field(v),
        place_batch(jnp.asarray(x1), mesh, "x1"),
        key,
        cond,
        base_log_prob=base_log_prob,
        divergence=divergence,
        num_probes=int(num_probes),
        probe=probe,
        hutchinson_mode=hutchinson_mode,
        options=options,
        t0=float(t0),
        t1=float(t1),
        chunk_size=chunk_size,
        adjoint=adjoint,
    )
    if throw:
        ode.raise_if_failed(stats, "fmjax.log_likelihood")
    return logp, stats


def bits_per_dim(log_prob, num_dims, *, value_range=(0.0, 1.0), num_levels: int = 256):
    """Bits per dimension of discrete data from a density fitted to dequantized data.

    ``log_prob`` is the log-density in the model's space of data that was uniformly
    dequantized (``(k + u) / num_levels`` with ``u ~ U[0, 1)``) and then mapped affinely from
    [0, 1] to ``value_range``. The map's log-determinant ``D log(hi - lo)`` is added back so
    the result is in bits of the discrete data:

        bpd = -(log p + D log(hi - lo) - D log num_levels) / (D log 2)

    (for ``value_range=(-1, 1)``, 8-bit data: ``-log p / (D ln 2) + 7``, the paper's protocol.)
    ``num_dims`` is D, the number of dimensions per example (an int or an event shape).
    """
    if isinstance(num_dims, (tuple, list)):  # an event shape: its entries, then D
        for size in num_dims:
            integer(size, f"num_dims={tuple(num_dims)!r}: each size")
        num_dims = math.prod(num_dims)
    num_dims = integer(num_dims, "num_dims")
    lo, hi = value_range
    if not hi > lo:
        raise ValueError(f"value_range must be (lo, hi) with hi > lo; got {value_range!r}.")
    num_levels = integer(num_levels, "num_levels", minimum=2)
    d = float(num_dims)
    log_prob_unit = log_prob + d * math.log(hi - lo)
    return -(log_prob_unit - d * math.log(num_levels)) / (d * math.log(2.0))
