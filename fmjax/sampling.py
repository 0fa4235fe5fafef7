"""Sampling: solve ``dx/dt = v(t, x)`` from noise (t=0) to data (t=1) with diffrax.

The vector field is any function ``v(t, x)`` of a batch: ``t`` has shape ``(B,)`` and ``x``
shape ``(B, *event_shape)``; it returns dx/dt with x's shape (checked when the solve is
traced: a ``(B, 1)`` output would otherwise broadcast against the state). Wrap a model as
``jax.tree_util.Partial(model.apply, params)`` (or call :func:`sample` inside your own
``jax.jit``): the solve is compiled once per (function, shapes, options) and the parameters
stay runtime arguments. A fresh ``lambda`` on every call is a new function and recompiles.
A module that holds its weights (Equinox, Flax NNX) can be passed as it is: its arrays are
runtime arguments too (:func:`as_field`).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from fmjax import ode
from fmjax._checks import traced
from fmjax._field import as_field

__all__ = ["DATA_AXIS", "SampleStats", "as_field", "check_cond", "place_batch", "sample"]

#: The mesh axis over which batches are split (rows of ``x``, ``cond``, a training batch).
DATA_AXIS = "data"


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


def batch_time(t, x):
    """The scalar solver time as the ``(B,)`` vector that ``v(t, x)`` expects."""
    return jnp.full((x.shape[0],), t, dtype=x.dtype)


def call_field(v, t, x, cond):
    """``v(t, x)``, or ``v(t, x, cond)`` for a conditional field (``cond`` not None)."""
    return v(t, x) if cond is None else v(t, x, cond)


def check_field_output(dx, x, where=""):
    """At trace time: ``v(t, x)`` must return one array of x's shape, in floating point (a
    (B, 1) or (B,) output would otherwise broadcast against the state inside the solver,
    silently wrong). ``where`` is appended to the message (e.g. what x is in this solve)."""
    ode.check_derivative(dx, x, fn="v(t, x)", out="dx/dt", state="x", where=where)


def _check_batch(x, name):
    if jnp.ndim(x) < 2:
        raise ValueError(
            f"{name} must be a batch of shape (batch, *event_shape) with at least 2 dims; got "
            f"shape {jnp.shape(x)}. For one example use {name}[None]."
        )
    if jnp.shape(x)[0] == 0:
        raise ValueError(
            f"{name} is an empty batch (shape {jnp.shape(x)}); pass at least one example."
        )
    if not jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating):
        raise ValueError(f"{name} must be floating point; got dtype {jnp.asarray(x).dtype}.")


def check_cond(cond, batch: int, where: str, hint: str = ""):
    """Raise a ValueError unless ``cond`` is an array or a pytree of arrays whose every leaf
    has leading size ``batch`` (``cond[i]`` conditions ``x[i]``); ``hint`` ends the message."""
    leaves = jax.tree_util.tree_leaves(cond)
    if not leaves:
        raise ValueError(f"{where}: cond has no arrays; got {cond!r}.")
    for leaf in leaves:
        if not hasattr(leaf, "shape"):  # a list or tuple is a pytree of its items
            raise ValueError(
                f"{where}: cond must be an array or a pytree of arrays; got a "
                f"leaf of type {type(leaf).__name__} ({leaf!r}) in {cond!r} (pass "
                "np.asarray(...) for a list of labels)."
            )
        if jnp.ndim(leaf) < 1 or jnp.shape(leaf)[0] != batch:
            raise ValueError(
                f"{where}: every array of cond must have the batch's leading size {batch} "
                f"(cond[i] conditions x[i]); got shape {jnp.shape(leaf)}." + hint
            )


def _place_cond(cond, mesh: Mesh | None, x):
    """``cond``'s leaves as arrays, split over the mesh as ``x`` is (one row per example)."""
    if mesh is None:
        return jax.tree_util.tree_map(jnp.asarray, cond)
    return jax.tree_util.tree_map(lambda c: place_batch(jnp.asarray(c), mesh, "cond"), cond)


def auto_axes(mesh: Mesh) -> Mesh:
    """The same devices and axis names with Auto axis types (global-view jit + GSPMD)."""
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh; got {type(mesh).__name__}.")
    if all(t == AxisType.Auto for t in mesh.axis_types):
        return mesh
    return Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * mesh.devices.ndim)


def auto_mesh(mesh: Mesh) -> Mesh:
    """:func:`auto_axes` of a mesh that has the ``"data"`` axis (else a ValueError)."""
    mesh = auto_axes(mesh)
    if DATA_AXIS not in mesh.axis_names:
        raise ValueError(
            f"mesh must have a {DATA_AXIS!r} axis to shard the batch over; got "
            f"axes {mesh.axis_names}."
        )
    return mesh


def place_batch(x, mesh: Mesh | None, name: str = "x"):
    """``x`` with its leading (batch) axis split over the ``"data"`` axis of ``mesh``.

    ``mesh=None`` returns ``x`` unchanged. A solve on a batch placed this way runs data
    parallel: each device integrates its rows, and an adaptive solver's batch-wide error norm
    costs one scalar all-reduce per step, so the steps, NFE and results are those of the
    unsharded solve. With several processes pass global arrays (already sharded).

    ``mesh=None`` keeps an already sharded ``x`` where it is, on Auto mesh axes (an array on
    ``jax.make_mesh``'s default Explicit axes is moved onto the same devices with Auto axes,
    where the solver's global-view reductions are defined).
    """
    if mesh is None:
        sharding = getattr(x, "sharding", None) if isinstance(x, jax.Array) else None
        if (
            isinstance(sharding, NamedSharding)
            and not traced(x)
            and any(t != AxisType.Auto for t in sharding.mesh.axis_types)
        ):
            x = jax.device_put(x, NamedSharding(auto_axes(sharding.mesh), sharding.spec))
        return x
    mesh = auto_mesh(mesh)
    check_rows_divisible(x, mesh, name)
    return jax.device_put(x, NamedSharding(mesh, PartitionSpec(DATA_AXIS)))


def check_rows_divisible(x, mesh: Mesh, name: str):
    """Raise a ValueError unless ``x`` has a leading axis that splits evenly over the
    ``"data"`` axis of ``mesh``."""
    n = int(mesh.shape[DATA_AXIS])
    if jnp.ndim(x) < 1 or jnp.shape(x)[0] % n:
        raise ValueError(
            f"{name} (shape {jnp.shape(x)}) must have a leading batch axis divisible by the "
            f"{n} devices of the mesh's {DATA_AXIS!r} axis."
        )


@functools.partial(
    jax.jit,
    static_argnames=(
        "solver",
        "t0",
        "t1",
        "steps",
        "step_size",
        "rtol",
        "atol",
        "max_steps",
        "per_example",
        "error_norm",
    ),
)
def _sample(
    v,
    x0,
    save_times,
    cond,
    *,
    solver,
    t0,
    t1,
    steps,
    step_size,
    rtol,
    atol,
    max_steps,
    per_example,
    error_norm,
):
    def field(t, x, cond):
        dx = call_field(v, batch_time(t, x), x, cond)
        check_field_output(
            dx,
            x,
            " (per_example=True: x is one example, a batch of one row)" if per_example else "",
        )
        return dx

    def run(x, cond):
        return ode.solve(
            field,
            x,
            t0=t0,
            t1=t1,
            solver=solver,
            steps=steps,
            step_size=step_size,
            rtol=rtol,
            atol=atol,
            save_times=save_times,
            max_steps=max_steps,
            error_norm=error_norm,
            args=cond,
        )

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
    solver: str = "dopri5",
    t0: float = 0.0,
    t1: float = 1.0,
    steps: int | None = None,
    step_size: float | None = None,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    save_times=None,
    max_steps: int = 4096,
    per_example: bool = False,
    error_norm: str = "rms",
    mesh: Mesh | None = None,
    cond=None,
    throw: bool = True,
):
    """Push ``x0`` (a batch of source samples) through the flow of ``v`` from t0 to t1.

    Args:
      v: the vector field ``v(t, x)`` on a batch (see the module docstring), or with
        ``cond`` a conditional field ``v(t, x, cond)``.
      x0: ``(B, *event_shape)`` floating-point starting points, e.g. ``N(0, I)`` draws.
      solver: 'euler', 'midpoint', 'heun', 'rk4' (fixed step: give ``steps`` or
        ``step_size``, which makes ``ceil(|t1 - t0| / step_size)`` equal steps) or 'bosh3',
        'dopri5', 'tsit5', 'dopri8' (adaptive: ``rtol``/``atol``).
      t0, t1: integration interval; ``t1 < t0`` integrates backwards (data -> noise).
      save_times: optional 1-D times in [t0, t1], ordered from t0 towards t1, at which to
        also return the states (``stats.trajectory``, shape ``(len(save_times), *x0.shape)``).
      max_steps: adaptive-solver step budget.
      per_example: adaptive step-size control per example (vmapped solve) instead of one
        step sequence for the whole batch with a batch-wide RMS error norm. Per-example
        stats are then arrays of shape (B,).
      error_norm: how an adaptive solver measures its error estimate: 'rms' over the whole
        batch, per leaf of the state (default; what torchdiffeq and ``flow_matching`` do) or
        'max', the largest of the examples' own RMS errors, so that every example meets
        rtol/atol while the batch keeps one step sequence (see :mod:`fmjax.ode`).
      mesh: a mesh with a ``"data"`` axis (``fmjax.train.sharding.make_mesh()``): ``x0`` is
        split over it (see :func:`place_batch`; B must be divisible by its size) and the
        result stays sharded. On a CPU host see :func:`fmjax.use_cpu_devices`. An ``x0``
        that is already a sharded array is solved data parallel without ``mesh``.
      cond: the condition of each example for a conditional ``v(t, x, cond)`` (class ids
        ``(B,)``, context vectors ``(B, C)``, or a pytree of arrays with leading size B;
        ``cond[i]`` conditions ``x0[i]``). It goes with the rows of ``x0``: split over
        ``mesh`` as ``x0`` is, and row by row with ``per_example=True``. A runtime argument:
        new conditions do not recompile. ``None`` (default): ``v(t, x)``.
      throw: outside jit, raise if the solve failed; inside jit check ``stats.success``.

    Returns:
      ``(x1, stats)``: the endpoints with x0's shape and a :class:`SampleStats`. The solve
      (times included) runs in x0's float precision, at least float32: float32 stays float32
      under ``jax_enable_x64``; pass float64 points for a float64 solve.
    """
    _check_batch(x0, "x0")
    ode.check_solver_args(
        solver, steps, step_size, t0, t1, error_norm, rtol=rtol, atol=atol, max_steps=max_steps
    )
    ode.check_save_times(save_times, t0, t1)
    if cond is not None:
        check_cond(cond, jnp.shape(x0)[0], "fmjax.sample")
        cond = _place_cond(cond, mesh, x0)
    x1, stats = _sample(
        as_field(v),
        place_batch(jnp.asarray(x0), mesh, "x0"),
        # Times keep their own precision here; ode.solve gives them the solve's time dtype
        # (x0's float dtype, at least float32), so bfloat16 points do not round them.
        None if save_times is None else jnp.asarray(save_times),
        cond,
        solver=solver,
        t0=float(t0),
        t1=float(t1),
        steps=steps,
        step_size=None if step_size is None else float(step_size),
        rtol=float(rtol),
        atol=float(atol),
        max_steps=int(max_steps),
        per_example=bool(per_example),
        error_norm=error_norm,
    )
    if throw:
        ode.raise_if_failed(stats, "fmjax.sample")
    return x1, stats
