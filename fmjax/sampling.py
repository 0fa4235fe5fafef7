"""Sampling: solve ``dx/dt = v(t, x)`` from noise (t=0) to data (t=1) with diffrax.

The vector field is any function ``v(t, x)`` of a batch: ``t`` has shape ``(B,)`` and ``x``
shape ``(B, *event_shape)``; it returns dx/dt with x's shape (checked when the solve is
traced: a ``(B, 1)`` output would otherwise broadcast against the state). Wrap a model as
``jax.tree_util.Partial(model.apply, params)`` (or call :func:`sample` inside your own
``jax.jit``): the solve is compiled once per (function, shapes, options) and the parameters
stay runtime arguments. A fresh ``lambda`` on every call is a new function and recompiles.
A module that holds its weights (Equinox, Flax NNX) can be passed as it is: its arrays are
runtime arguments too (:func:`as_field`). Batches, meshes and conditions are described in
:mod:`fmjax.batching`, the solver settings in :class:`fmjax.ode.SolverOptions`.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

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
from fmjax.solvers import SolverOptions, solver_options

__all__ = ["SampleStats", "as_field", "sample"]


class SampleStats(NamedTuple):
    """``nfe``, ``num_steps``, ``num_accepted``, ``num_rejected``, ``success`` (see
    :class:`fmjax.ode.SolveStats`; per example when ``per_example=True``) and ``trajectory``:
    the states at ``save_times`` with shape ``(len(save_times), B, *event_shape)``, or None."""

    nfe: Any
    num_steps: Any
    num_accepted: Any
    num_rejected: Any
    success: Any
    trajectory: Any = None


@functools.partial(jax.jit, static_argnames=("options", "t0", "t1", "per_example"))
def _sample(v, x0, save_times, cond, *, options, t0, t1, per_example):
    def field(t, x, cond):
        dx = call_field(v, batch_time(t, x), x, cond)
        check_field_output(
            dx,
            x,
            " (per_example=True: x is one example, a batch of one row)" if per_example else "",
        )
        return dx

    def run(x, cond):
        return ode.solve(field, x, t0=t0, t1=t1, options=options, save_times=save_times, args=cond)

    if per_example:
        # each example its own solve, with its own row of cond (a batch of one row each)
        x1, ys, stats = jax.vmap(
            lambda x, c: run(x[None], jax.tree_util.tree_map(lambda a: a[None], c))
        )(x0, cond)
        x1 = x1[:, 0]
        if ys is not None:
            ys = jnp.moveaxis(ys[:, :, 0], 0, 1)
    else:
        x1, ys, stats = run(x0, cond)
    return x1, SampleStats(*stats, trajectory=ys)


def sample(
    v,
    x0,
    *,
    options: SolverOptions | None = None,
    t0: float = 0.0,
    t1: float = 1.0,
    save_times=None,
    per_example: bool = False,
    mesh: Mesh | None = None,
    cond=None,
    throw: bool = True,
    **solver_settings,
):
    """Push ``x0`` (a batch of source samples) through the flow of ``v`` from t0 to t1.

    Args:
      v: the vector field ``v(t, x)`` on a batch (see the module docstring), or with
        ``cond`` a conditional field ``v(t, x, cond)``.
      x0: ``(B, *event_shape)`` floating-point starting points, e.g. ``N(0, I)`` draws.
      options: the solver settings, a :class:`fmjax.ode.SolverOptions` (default dopri5 at
        rtol = atol = 1e-5); or give them as keywords, ``**solver_settings``.
      t0, t1: integration interval; ``t1 < t0`` integrates backwards (data -> noise).
      save_times: optional 1-D times in [t0, t1], ordered from t0 towards t1, at which to
        also return the states (``stats.trajectory``, shape ``(len(save_times), *x0.shape)``).
      per_example: adaptive step-size control per example (vmapped solve) instead of one
        step sequence for the whole batch with a batch-wide error norm. Per-example
        stats are then arrays of shape (B,).
      mesh: a mesh with a ``"data"`` axis (``fmjax.train.sharding.make_mesh()``): ``x0`` is
        split over it (see :func:`fmjax.batching.place_batch`; B must be divisible by its
        size) and the result stays sharded. On a CPU host see :func:`fmjax.use_cpu_devices`.
        An ``x0`` that is already a sharded array is solved data parallel without ``mesh``.
      cond: the condition of each example for a conditional ``v(t, x, cond)`` (class ids
        ``(B,)``, context vectors ``(B, C)``, or a pytree of arrays with leading size B;
        ``cond[i]`` conditions ``x0[i]``). It goes with the rows of ``x0``: split over
        ``mesh`` as ``x0`` is, and row by row with ``per_example=True``. A runtime argument:
        new conditions do not recompile. ``None`` (default): ``v(t, x)``.
      throw: outside jit, raise if the solve failed; inside jit check ``stats.success``.
      **solver_settings: the fields of :class:`fmjax.ode.SolverOptions` as keywords
        (``solver``, ``steps``, ``step_size``, ``rtol``, ``atol``, ``max_steps``,
        ``error_norm``), instead of ``options``: ``sample(v, x0, solver="rk4", steps=20)``.

    Returns:
      ``(x1, stats)``: the endpoints with x0's shape and a :class:`SampleStats`. The solve
      (times included) runs in x0's float precision, at least float32: float32 stays float32
      under ``jax_enable_x64``; pass float64 points for a float64 solve.

    Raises:
      ValueError: bad inputs or solver settings, or both ``options`` and settings given.
      RuntimeError: with ``throw``, the solve failed (e.g. ``max_steps`` reached).
    """
    check_batch(x0, "x0")
    options = solver_options(options, **solver_settings)
    ode.check_times(t0, t1, options)
    ode.check_save_times(save_times, t0, t1)
    if cond is not None:
        check_cond(cond, jnp.shape(x0)[0], "fmjax.sample")
        cond = place_cond(cond, mesh)
    x1, stats = _sample(
        as_field(v),
        place_batch(jnp.asarray(x0), mesh, "x0"),
        # Times keep their own precision here; ode.solve gives them the solve's time dtype
        # (x0's float dtype, at least float32), so bfloat16 points do not round them.
        None if save_times is None else jnp.asarray(save_times),
        cond,
        options=options,
        t0=float(t0),
        t1=float(t1),
        per_example=bool(per_example),
    )
    if throw:
        ode.raise_if_failed(stats, "fmjax.sample")
    return x1, stats
