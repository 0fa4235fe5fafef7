"""Reflow (Liu et al. 2023, "Flow straight and fast"): a trained flow as a new coupling.

The flow of a field ``v`` maps each source sample ``x0`` to ``x̂1 = psi(x0)``. Retraining
flow matching on the pairs ``(x0, x̂1)`` with the linear path (rectified flow) gives a field
whose trajectories cross less, so it is straighter and needs fewer solver steps; a flow
whose trajectories are already straight lines is a fixed point (reflowing it returns the
same pairs, and its straightness is 0). Each round costs one solve per pair.

- :func:`pairs` draws the pairs once, to store and train on (Liu et al. generate a fixed
  set of pairs per round);
- :func:`coupling` solves on the fly: ``coupling(key, x0, x1) -> (x0, psi(x0))`` replaces
  the data batch by the flow's endpoints, for ``cfm_loss(coupling=...)`` or
  ``couplings.pairing`` (one solve per training step);
- :func:`distillation_loss` fits one Euler step to the pairs (Liu et al.'s one-step
  distillation of a reflowed field): ``x0 + (t1 - t0) v(t0, x0)`` should land on ``x̂1``.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from fmjax.batching import check_batch
from fmjax.checks import real, same_shape
from fmjax.sampling import sample
from fmjax.solvers import SolverOptions, solver_options

__all__ = ["coupling", "distillation_loss", "pairs"]


def pairs(
    v,
    x0,
    *,
    options: SolverOptions | None = None,
    t0: float = 0.0,
    t1: float = 1.0,
    **solver_settings,
):
    """The reflow pairs ``(x0, x̂1)`` of the flow of ``v``: ``x̂1`` solves ``dx/dt = v(t, x)``
    from ``x0`` at ``t0`` to ``t1`` (:func:`fmjax.sample`; default dopri5 at 1e-5).

    Args:
      v: the trained field ``v(t, x)`` (a ``jax.tree_util.Partial`` of the model).
      x0: ``(B, *event_shape)`` source samples (e.g. ``path.sample_source(key, shape)``).
      options: the solve's :class:`fmjax.SolverOptions`.
      t0, t1: the span solved (``path.velocity_range(prediction)`` for a converted model).
      **solver_settings: the fields of :class:`fmjax.SolverOptions` as keywords, instead
        of ``options``.

    Returns:
      ``(x0, x1_hat)``, both of x0's shape; ``x1_hat`` is held out of differentiation
      (``stop_gradient``): the pairs are data for the next round.
    """
    check_batch(x0, "x0")
    options = solver_options(options, **solver_settings)
    x1, _ = sample(v, x0, options=options, t0=t0, t1=t1, throw=False)
    x0 = jnp.asarray(x0, x1.dtype)
    return x0, jax.lax.stop_gradient(x1)


def coupling(
    v,
    *,
    options: SolverOptions | None = None,
    t0: float = 0.0,
    t1: float = 1.0,
    **solver_settings,
) -> Callable:
    """A coupling ``coupling(key, x0, x1) -> (x0, psi(x0))`` that pairs each source sample
    with the endpoint of its trajectory under ``v``, ignoring the data batch ``x1`` but for
    its shape: the on-the-fly form of :func:`pairs` for ``cfm_loss(coupling=...)`` and
    :func:`fmjax.couplings.pairing` (which then replace the batch's data by the endpoints).
    Unconditional fields only (``cfm_loss`` refuses a coupling that returns a new x1 with
    conditions)."""
    options = solver_options(options, **solver_settings)

    def reflow_coupling(key, x0, x1):
        del key
        if jnp.shape(x0) != jnp.shape(x1):
            raise ValueError(
                f"x0 and x1 must have the same shape; got {jnp.shape(x0)} and {jnp.shape(x1)}."
            )
        return pairs(v, x0, options=options, t0=t0, t1=t1)

    return reflow_coupling


def distillation_loss(v, x0, x1, *, t0: float = 0.0, t1: float = 1.0):
    """One-step distillation (Liu et al. 2023, section 2.3): the mean over the batch of the
    squared norm ``||x0 + (t1 - t0) v(t0, x0) - x1||^2``, summed over the event dimensions.

    Trained on the pairs ``(x0, x̂1)`` of a (reflowed) flow (:func:`pairs`), its minimiser is
    the field whose single Euler step from ``t0`` to ``t1`` is the flow's map: the one-step
    generator ``x0 -> x0 + (t1 - t0) v(t0, x0)``, evaluated at ``t0`` only (the field is not
    trained at other times, so the distilled model is for one-step sampling; fine-tune it from
    the reflowed weights so that it starts at the straight field's step).

    Args:
      v: the field ``v(t, x)`` being distilled (e.g. a ``jax.tree_util.Partial`` of the model
        with the parameters differentiated).
      x0: ``(B, *event_shape)`` source samples.
      x1: the targets ``x̂1 = psi(x0)``, of x0's shape.
      t0, t1: the step's start and end times (``t1 > t0``).

    Returns:
      The scalar loss.
    """
    check_batch(x0, "x0")
    same_shape(x0, x1, "x0", "x1")
    t0, t1 = real(t0, "t0"), real(t1, "t1")
    if not t1 > t0:
        raise ValueError(f"distillation_loss needs t1 > t0; got t0={t0}, t1={t1}.")
    t = jnp.full((jnp.shape(x0)[0],), t0, jnp.asarray(x0).dtype)
    step = x0 + (t1 - t0) * v(t, x0)
    err = jnp.square(step - x1).reshape(jnp.shape(x0)[0], -1)
    return jnp.mean(jnp.sum(err, axis=1))
