"""Sampling efficiency of a trained flow: how straight it is and what few steps cost.

Flow matching's second promise is fast sampling: the straighter the learned flow, the fewer
evaluations an ODE solver needs. This module measures it for any vector field ``v(t, x)``:

- :func:`straightness`: Liu et al.'s ``S = mean_t E||(x̂1 - x0) / (t1 - t0) - v(t, x_t)||^2``
  along the model's own trajectories (``x̂1`` the endpoint of ``x0``; 0 for a flow whose
  trajectories are straight lines run at constant speed), with the **transport cost**
  ``E||x̂1 - x0||^2`` of the same solve.
- :func:`sweep`: the paper's sampling-efficiency study. Fixed-step solvers at 1, 2, 4, ...
  steps and an adaptive solver at several tolerances, each from the same noise; every record
  has the true NFE, the ODE error against a tight reference solve (mean Euclidean distance of
  the endpoints) and whatever ``quality(x1)`` returns (e.g. MMD against fresh data, or FID).

Norms are summed over the event dimensions and averaged over the batch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fmjax import ode
from fmjax._field import as_field
from fmjax.checks import integer
from fmjax.sampling import sample

__all__ = [
    "FIXED_STEP_COUNTS",
    "SWEEP_SOLVERS",
    "SWEEP_TOLERANCES",
    "Straightness",
    "ode_error",
    "straightness",
    "sweep",
]

#: Fixed-step solvers of the default sweep.
SWEEP_SOLVERS = ("euler", "midpoint", "heun", "rk4")
#: Step counts of the default sweep: 1, 2, 4, ..., 128.
FIXED_STEP_COUNTS = tuple(2**k for k in range(8))
#: dopri5 tolerances (rtol = atol) of the default sweep.
SWEEP_TOLERANCES = (1e-2, 1e-3, 1e-4)


class Straightness(NamedTuple):
    """What :func:`straightness` measures along one solve.

    - ``straightness``: ``mean_t E||(x̂1 - x0) / (t1 - t0) - v(t, x_t)||^2`` (midpoint rule
      over ``num_times`` times).
    - ``transport_cost``: ``E||x̂1 - x0||^2``.
    - ``x1``: the endpoints ``x̂1``; ``nfe``: the solve's evaluations.
    """

    straightness: jax.Array
    transport_cost: jax.Array
    x1: jax.Array
    nfe: jax.Array


def _sq_norm(x):
    return jnp.sum(jnp.reshape(x, (x.shape[0], -1)) ** 2, axis=1)


@jax.jit
def _deviation(field, ts, traj, x0, x1, t0, t1, cond):
    """Mean over times and examples of ||(x1 - x0) / (t1 - t0) - v(t, x_t)||^2."""
    chord = (x1 - x0) / (t1 - t0)

    def one(args):
        t, x = args
        tb = jnp.full((x.shape[0],), t, x.dtype)
        vel = field(tb, x) if cond is None else field(tb, x, cond)
        return jnp.mean(_sq_norm(chord - vel))

    return jnp.mean(jax.lax.map(one, (ts, traj)))


def straightness(
    v,
    x0,
    *,
    t0: float = 0.0,
    t1: float = 1.0,
    num_times: int = 32,
    solver: str = "dopri5",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    cond=None,
    mesh=None,
) -> Straightness:
    """Straightness and transport cost of the flow of ``v`` from the source samples ``x0``.

    One solve from ``x0`` saves the states at ``num_times`` midpoints of ``[t0, t1]``; ``v``
    is evaluated there (``num_times`` more batched calls) and compared with the chord
    ``(x̂1 - x0) / (t1 - t0)``. The value is exact for any flow up to the solver's tolerance
    and the midpoint rule's ``O(1 / num_times^2)``; a straight flow scores 0.

    Args:
      v: the vector field ``v(t, x)`` (or ``v(t, x, cond)`` with ``cond``).
      x0: ``(B, *event_shape)`` source samples.
      t0, t1: the span solved (e.g. ``path.velocity_range(prediction)``).
      num_times: times of the midpoint rule.
      solver, rtol, atol: the solve (:func:`fmjax.sample`'s meaning).
      cond, mesh: as in :func:`fmjax.sample`.
    """
    n = integer(num_times, "num_times")
    ts = t0 + (t1 - t0) * (np.arange(n) + 0.5) / n
    x1, stats = sample(
        v, x0, solver=solver, rtol=rtol, atol=atol, t0=t0, t1=t1, save_times=ts, cond=cond,
        mesh=mesh,
    )  # fmt: skip
    x0 = jnp.asarray(x0, x1.dtype)
    ts = jnp.asarray(ts, x1.dtype)
    dev = _deviation(as_field(v), ts, stats.trajectory, x0, x1, t0, t1, cond)
    return Straightness(dev, jnp.mean(_sq_norm(x1 - x0)), x1, stats.nfe)


def ode_error(x, reference) -> float:
    """Mean Euclidean distance between the rows of ``x`` and those of ``reference``."""
    if jnp.shape(x) != jnp.shape(reference):
        raise ValueError(
            f"x and reference must have the same shape; got {jnp.shape(x)} and "
            f"{jnp.shape(reference)}."
        )
    diff = jnp.asarray(x, jnp.float32) - jnp.asarray(reference, jnp.float32)
    return float(jnp.mean(jnp.sqrt(_sq_norm(diff))))


def sweep(
    v,
    x0,
    *,
    solvers: Sequence[str] = SWEEP_SOLVERS,
    steps: Sequence[int] = FIXED_STEP_COUNTS,
    adaptive: str = "dopri5",
    tolerances: Sequence[float] = SWEEP_TOLERANCES,
    reference_tol: float = 1e-5,
    quality: Callable[[jax.Array], Mapping[str, Any]] | None = None,
    t0: float = 0.0,
    t1: float = 1.0,
    cond=None,
    mesh=None,
) -> list[dict[str, Any]]:
    """Quality against NFE: every solver and budget from the same source samples ``x0``.

    Returns a list of records, fixed-step solvers first (``{"solver", "steps", "nfe",
    "ode_error", **quality(x1)}``), then ``adaptive`` at each tolerance (``"tol"`` instead of
    ``"steps"``), then the reference itself (``adaptive`` at ``reference_tol``, ODE error 0),
    which the ODE errors are measured against. ``quality`` maps a batch of samples to a dict
    of floats (e.g. ``lambda x: {"mmd": float(fmjax.metrics.mmd(x, data))}``).
    """
    if adaptive not in ode.ADAPTIVE_SOLVERS:
        raise ValueError(
            f"adaptive must be one of {sorted(ode.ADAPTIVE_SOLVERS)}; got {adaptive!r}."
        )
    for s in solvers:
        if s not in ode.FIXED_SOLVERS:
            raise ValueError(f"solvers must be among {sorted(ode.FIXED_SOLVERS)}; got {s!r}.")
    counts = [integer(k, "steps") for k in steps]
    span = {"t0": t0, "t1": t1, "cond": cond, "mesh": mesh}

    def record(x1, stats, **what):
        rec = {**what, "nfe": int(stats.nfe), "ode_error": ode_error(x1, ref)}
        if quality is not None:
            rec.update({k: float(val) for k, val in quality(x1).items()})
        return rec

    ref, ref_stats = sample(v, x0, solver=adaptive, rtol=reference_tol, atol=reference_tol, **span)
    records = []
    for s in solvers:
        for k in counts:
            x1, stats = sample(v, x0, solver=s, steps=k, **span)
            records.append(record(x1, stats, solver=s, steps=k))
    for tol in tolerances:
        x1, stats = sample(v, x0, solver=adaptive, rtol=tol, atol=tol, **span)
        records.append(record(x1, stats, solver=adaptive, tol=float(tol)))
    records.append(record(ref, ref_stats, solver=adaptive, tol=float(reference_tol)))
    return records
