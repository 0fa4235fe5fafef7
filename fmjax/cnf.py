"""Maximum-likelihood training of a continuous normalizing flow (Chen et al. 2018; FFJORD,
Grathwohl et al. 2019): the baseline that flow matching replaces.

:func:`ml_loss` is the negative log-likelihood of a data batch under the flow of ``v``,

    L_ML = -E_{x1 ~ q} log p_1(x1),   log p_1(x1) = log p_0(x_0) - int_0^1 div v(t, x_t) dt,

computed by :func:`fmjax.log_likelihood` (an ODE solve of the augmented state from data to
noise, the divergence exact or Hutchinson's estimate) and differentiated through that solve
with a diffrax adjoint: ``"checkpoint"`` backpropagates through the solver's steps
(discretise-then-optimise, the exact gradient of the discrete solve) and ``"backsolve"``
solves the continuous adjoint equations backwards (optimise-then-discretise, constant memory,
gradient exact up to the solver's error). Every training step therefore simulates the flow,
where :func:`fmjax.losses.cfm_loss` evaluates ``v`` once per example: the cost flow matching
removes, reported here as NFE.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax.numpy as jnp

from fmjax import ode
from fmjax.likelihood import log_likelihood
from fmjax.solvers import FIXED_SOLVERS, SolverOptions, solver_options

__all__ = ["MLStats", "ml_loss"]


class MLStats(NamedTuple):
    """What one :func:`ml_loss` evaluation cost (jax arrays, so it passes through jit).

    - ``nfe``: evaluations of the augmented field (``v`` and its divergence) in the forward
      solve, as :class:`fmjax.likelihood.LikelihoodStats` counts them.
    - ``nfe_backward``: evaluations of the field's vector-Jacobian product in the backward
      pass: one per forward evaluation for ``"checkpoint"`` (plus the forward evaluations it
      recomputes between checkpoints, not counted) and for ``"backsolve"`` with a fixed-step
      solver (the backward solve takes the forward's steps); -1 for ``"backsolve"`` with an
      adaptive solver, whose backward step count diffrax does not report.
    - ``num_steps``: the forward solve's steps; ``success``: False where it failed.
    """

    nfe: Any
    nfe_backward: Any
    num_steps: Any
    success: Any


def ml_loss(
    v,
    x1,
    *,
    key=None,
    divergence: str = "exact",
    num_probes: int = 1,
    probe: str = "rademacher",
    adjoint: str = "checkpoint",
    base_log_prob=None,
    options: SolverOptions | None = None,
    t0: float = 0.0,
    t1: float = 1.0,
    cond=None,
    **solver_settings,
):
    """Negative log-likelihood (nats per example, batch mean) of ``x1`` under the flow of ``v``.

    Call it like :func:`fmjax.losses.cfm_loss` inside a training step:
    ``jax.grad(lambda p: ml_loss(Partial(model.apply, p), x1, key=k)[0])``.

    Args:
      v: the vector field ``v(t, x)`` on a batch (a ``jax.tree_util.Partial`` of the model
        and its parameters, so that the parameters reach the solve as arrays), or with
        ``cond`` a conditional ``v(t, x, cond)``.
      x1: the data batch ``(B, *event_shape)``.
      key: PRNG key of the Hutchinson probes (needed for ``divergence='hutchinson'``).
      divergence, num_probes, probe: as in :func:`fmjax.log_likelihood`: 'exact' (the
        Jacobian's trace, one JVP per dimension: small dimensions) or 'hutchinson' (an
        unbiased estimate from ``num_probes`` probes held fixed over the solve: large ones).
      adjoint: 'checkpoint' (backpropagate through the solver) or 'backsolve' (the
        continuous adjoint); see :data:`fmjax.ode.ADJOINTS`.
      base_log_prob: the source log-density (default standard normal).
      options: the solve's :class:`fmjax.SolverOptions` (default dopri5 at rtol = atol =
        1e-5; training usually affords looser tolerances or a fixed-step solver such as
        ``solver="rk4", steps=8``).
      t0, t1: the noise and data ends.
      cond: each example's condition for a conditional ``v``.
      **solver_settings: the fields of :class:`fmjax.SolverOptions` as keywords, instead
        of ``options``.

    Returns:
      ``(loss, stats)``: the mean negative log-likelihood in nats and an :class:`MLStats`.
      The solve does not raise inside jit: a failed solve (``stats.success`` False) gives a
      loss from where the solver stopped.
    """
    options = solver_options(options, **solver_settings)
    if adjoint not in ode.ADJOINTS:
        raise ValueError(f"adjoint must be one of {ode.ADJOINTS}; got {adjoint!r}.")
    logp, stats = log_likelihood(
        v,
        x1,
        divergence=divergence,
        key=key,
        num_probes=num_probes,
        probe=probe,
        base_log_prob=base_log_prob,
        options=options,
        t0=t0,
        t1=t1,
        cond=cond,
        throw=False,
        adjoint=adjoint,
    )
    if adjoint == "backsolve" and options.solver not in FIXED_SOLVERS:
        nfe_backward = jnp.full_like(stats.nfe, -1)
    else:
        nfe_backward = stats.nfe
    loss = -jnp.mean(logp)
    return loss, MLStats(stats.nfe, nfe_backward, stats.num_steps, stats.success)
