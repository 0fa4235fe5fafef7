"""ODE solves through diffrax, shared by :func:`fmjax.sample` and
:func:`fmjax.log_likelihood`: :func:`solve` with one :class:`SolverOptions` value.

:class:`SolverOptions` holds every solver setting (the solver, its steps or tolerances, the
step budget and the adaptive error norm), checked once when it is made; it is frozen and
hashable, so equal options are one jit cache entry. :func:`solve`, :func:`fmjax.sample` and
:func:`fmjax.log_likelihood` take it as ``options=`` or build it from the same settings
given as keywords (``solver="rk4", steps=20``); :class:`SolverOptions`,
:func:`fmjax.solvers.solver_options` and :func:`fmjax.solvers.check_times` are defined in
:mod:`fmjax.solvers`.

Fixed-step solvers (``euler``, ``midpoint``, ``heun``, ``rk4``) take ``steps`` or
``step_size``; ``step_size=h`` makes ``ceil(|t1 - t0| / h)`` equal steps that end exactly at
``t1`` (h = 0.3 on [0, 1]: four steps of 0.25; torchdiffeq would step 0.3, 0.3, 0.3, 0.1;
the two agree whenever h divides the interval, as 0.05 does); adaptive solvers (``bosh3``,
``dopri5``, ``tsit5``, ``dopri8``) take ``rtol``/``atol``. The solvers, the error norms and
the starting step of an adaptive solve are in :mod:`fmjax.solvers`.

NFE (number of function evaluations of the vector field) is computed from diffrax's step
counts and each solver's Butcher tableau, and the test suite checks the formula against a
vector field that counts its own calls.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import diffrax
import jax
import jax.numpy as jnp
import numpy as np

from fmjax import solvers
from fmjax.checks import traced
from fmjax.solvers import (
    ADAPTIVE_SOLVERS,
    FIXED_SOLVERS,
    SOLVERS,
    SolverOptions,
    check_times,
    initial_step_size,
    leaf_rms_norm,
    max_example_rms_norm,
    solver_options,
)

__all__ = [
    "ADAPTIVE_SOLVERS",
    "ADJOINTS",
    "FIXED_SOLVERS",
    "SOLVERS",
    "SolveStats",
    "SolverOptions",
    "check_derivative",
    "make_adjoint",
    "check_save_times",
    "raise_if_failed",
    "solve",
]


#: Reverse-mode derivatives of a solve by name (``adjoint=`` of :func:`solve` and
#: :func:`fmjax.log_likelihood`): ``"checkpoint"`` backpropagates through the solver's steps
#: (:class:`diffrax.RecursiveCheckpointAdjoint`: exact gradients of the discrete solve,
#: memory bounded by recomputation); ``"backsolve"`` solves the continuous adjoint equations
#: backwards in time (:class:`diffrax.BacksolveAdjoint`, Chen et al. 2018: the solver and
#: step control of the forward solve, constant memory, gradients exact only up to the
#: solver's error).
ADJOINTS = ("checkpoint", "backsolve")


def make_adjoint(adjoint):
    """The diffrax adjoint for a name of :data:`ADJOINTS`; a diffrax adjoint or None is
    returned as given."""
    if adjoint is None or isinstance(adjoint, diffrax.AbstractAdjoint):
        return adjoint
    if adjoint == "checkpoint":
        return diffrax.RecursiveCheckpointAdjoint()
    if adjoint == "backsolve":
        return diffrax.BacksolveAdjoint()
    raise ValueError(f"adjoint must be one of {ADJOINTS} or a diffrax adjoint; got {adjoint!r}.")


class SolveStats(NamedTuple):
    """Statistics of one ODE solve (all jax arrays, so it passes through jit).

    - ``nfe``: evaluations of the vector field, including rejected steps and the adaptive
      controller's initial step-size selection.
    - ``num_steps``: steps attempted; ``num_accepted`` / ``num_rejected`` split them.
    - ``success``: False when the solver failed (e.g. ``max_steps`` reached).
    """

    nfe: Any
    num_steps: Any
    num_accepted: Any
    num_rejected: Any
    success: Any


def check_derivative(
    dy,
    y,
    *,
    fn: str = "field(t, y, args)",
    out: str = "dy/dt",
    state: str = "the state",
    where: str = "",
) -> None:
    """At trace time: ``field(t, y, args)`` must return ``dy/dt`` with ``y``'s tree structure
    and leaf shapes, in floating point (a ``(B, 1)`` leaf for a ``(B, 2)`` state would
    otherwise broadcast inside the solver and give a silently wrong solution). ``fn``,
    ``out`` and ``state`` name the function, its output and ``y`` in the messages; ``where``
    is appended to them (e.g. what ``y`` is in this solve)."""
    y_def, dy_def = jax.tree_util.tree_structure(y), jax.tree_util.tree_structure(dy)
    if y_def != dy_def:
        if jax.tree_util.treedef_is_leaf(y_def):  # one array: say what came back instead
            raise ValueError(
                f"{fn} must return {out}, one array of {state}'s shape "
                f"{jnp.shape(y)}; got {type(dy).__name__}{where}."
            )
        raise ValueError(
            f"{fn} must return {out} with {state}'s structure {y_def}; got {dy_def}{where}."
        )
    for (path, leaf), d in zip(
        jax.tree_util.tree_leaves_with_path(y), jax.tree_util.tree_leaves(dy), strict=False
    ):
        name = out + jax.tree_util.keystr(path)
        try:
            shape, dtype = jnp.shape(d), jnp.result_type(d)
        except (TypeError, ValueError):
            shape = dtype = None
        if shape is None or shape != jnp.shape(leaf):
            got = type(d).__name__ if shape is None else f"shape {shape}"
            raise ValueError(
                f"{fn} must return {name} with {state}'s shape {jnp.shape(leaf)}; got {got}{where}."
            )
        if not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(f"{fn} must return floating-point {name}; got dtype {dtype}{where}.")


def check_save_times(save_times, t0, t1) -> None:
    """Validate ``save_times``: a 1-D sequence of times in [t0, t1], ordered in the direction
    of integration (increasing for t1 > t0, decreasing for t1 < t0). Values are checked when
    they and t0, t1 are concrete; under tracing only the shape and dtype (diffrax checks the
    values at run time)."""
    if save_times is None:
        return
    ts = save_times if traced(save_times) else np.asarray(save_times)
    shape, dtype = ts.shape, ts.dtype
    if len(shape) != 1 or not (
        jnp.issubdtype(dtype, jnp.floating)  # (bfloat16 too)
        or jnp.issubdtype(dtype, jnp.integer)
    ):
        raise ValueError(
            f"save_times must be a 1-D sequence of real times; got shape {shape} and dtype {dtype}."
        )
    if traced(save_times, t0, t1):
        return
    t0, t1 = float(t0), float(t1)
    lo, hi = min(t0, t1), max(t0, t1)
    if ts.size and not (np.all(np.isfinite(ts)) and ts.min() >= lo and ts.max() <= hi):
        raise ValueError(
            f"save_times must lie in [{lo}, {hi}] (between t0={t0} and t1={t1}); got {ts.tolist()}."
        )
    gaps = np.diff(ts.astype(np.float64)) * (1.0 if t1 > t0 else -1.0)  # along the solve
    if np.any(gaps < 0):
        order = "increasing" if t1 > t0 else "decreasing (the solve runs from t0 down to t1)"
        raise ValueError(f"save_times must be {order}; got {ts.tolist()}.")


def solve(
    field,
    y0,
    *,
    t0: float,
    t1: float,
    options: SolverOptions | None = None,
    save_times=None,
    args=None,
    adjoint=None,
    **settings,
):
    """Solve ``dy/dt = field(t, y, args)`` from t0 to t1 (either direction) with diffrax.

    ``y0`` is any pytree of float arrays; ``field`` must return ``dy/dt`` with the same tree
    structure and leaf shapes (checked when the solve is traced, see
    :func:`check_derivative`). Returns ``(y1, ys, stats)`` where ``ys`` holds the states at
    ``save_times`` (or None). Pure and traceable: call it under jit; ``t0`` and ``t1`` may be
    traced (not with ``step_size=``, whose number of steps is static). The solve does not
    raise when it fails: check ``stats.success`` (:func:`raise_if_failed`).

    The solver settings are ``options``, a :class:`SolverOptions`, or its fields given as
    keywords (``solver="rk4", steps=50``), not both. ``adjoint`` is diffrax's (default
    :class:`diffrax.RecursiveCheckpointAdjoint`) or a name of :data:`ADJOINTS`; with
    ``"backsolve"`` gradients reach only ``y0``, ``args`` and the field's own pytree leaves,
    so pass parameters through ``args``, not a closure.
    """
    options = solver_options(options, **settings)
    adjoint = make_adjoint(adjoint)
    check_times(t0, t1, options)
    check_save_times(save_times, t0, t1)
    solver = options.solver

    def checked_field(t, y, args):  # the check runs while tracing: no cost per step
        dy = field(t, y, args)
        check_derivative(dy, y)
        return dy

    # Time in the state's float precision (at least float32): diffrax promotes the state to
    # the time dtype, and Python-float times are float64 under jax_enable_x64, which would
    # silently turn a float32 solve (and every call of the field) into float64.
    state_dtypes = [jnp.result_type(y) for y in jax.tree_util.tree_leaves(y0)]
    time_dtype = jnp.result_type(
        jnp.float32, *[d for d in state_dtypes if jnp.issubdtype(d, jnp.floating)]
    )
    t0_, t1_ = jnp.asarray(t0, time_dtype), jnp.asarray(t1, time_dtype)
    # the state promoted as diffeqsolve promotes it (a bfloat16 state solves in float32), so
    # the starting step's evaluations see what the solver's do
    y0 = jax.tree_util.tree_map(
        lambda y: jnp.asarray(y, jnp.promote_types(jnp.result_type(y), time_dtype)), y0
    )
    term = diffrax.ODETerm(checked_field)
    solver_state = None
    if solver in FIXED_SOLVERS:
        n = options.num_fixed_steps(t0, t1)
        dt0 = (t1 - t0) / n
        controller = diffrax.ConstantStepSize()
        max_steps = n
        solver_obj = FIXED_SOLVERS[solver]()
    else:
        norm = leaf_rms_norm if options.error_norm == "rms" else max_example_rms_norm
        rtol, atol, max_steps = options.rtol, options.atol, options.max_steps
        controller = diffrax.PIDController(rtol=rtol, atol=atol, norm=norm)
        solver_obj = ADAPTIVE_SOLVERS[solver]()
        h, f0 = initial_step_size(
            lambda t, y: checked_field(t, y, args),
            y0,
            t0=t0_,
            t1=t1_,
            error_order=solver_obj.error_order(term),
            rtol=rtol,
            atol=atol,
            norm=norm,
        )
        dt0 = jnp.sign(t1_ - t0_) * jax.lax.stop_gradient(h).astype(time_dtype)
        if adjoint is None or isinstance(
            adjoint,
            (diffrax.RecursiveCheckpointAdjoint, diffrax.DirectAdjoint, diffrax.ForwardMode),
        ):
            # (the other adjoints refuse to differentiate through a passed solver state)
            solver_state = solvers.fsal_state(solver_obj, term, t0_, t1_, y0, args, f0)
    if save_times is not None:
        saveat = diffrax.SaveAt(t1=True, ts=jnp.asarray(save_times, time_dtype))
    else:
        saveat = diffrax.SaveAt(t1=True)
    sol = diffrax.diffeqsolve(
        term,
        solver_obj,
        t0=t0_,
        t1=t1_,
        dt0=jnp.asarray(dt0, time_dtype),
        y0=y0,
        args=args,
        saveat=saveat,
        stepsize_controller=controller,
        max_steps=max_steps,
        throw=False,
        adjoint=adjoint if adjoint is not None else diffrax.RecursiveCheckpointAdjoint(),
        solver_state=solver_state,
    )
    per_step, init = solvers.evaluations_per_step(solver_obj)
    if solver in ADAPTIVE_SOLVERS:  # the starting step's two; f0 replaces the FSAL solver's
        init = 2 + (init if solver_state is None else 0)
    num_steps = sol.stats["num_steps"]
    stats = SolveStats(
        nfe=init + per_step * num_steps,
        num_steps=num_steps,
        num_accepted=sol.stats["num_accepted_steps"],
        num_rejected=sol.stats["num_rejected_steps"],
        success=sol.result == diffrax.RESULTS.successful,
    )
    y1 = jax.tree_util.tree_map(lambda y: y[-1], sol.ys)
    ys = None
    if save_times is not None:
        ys = jax.tree_util.tree_map(lambda y: y[:-1], sol.ys)
    return y1, ys, stats


def raise_if_failed(stats: SolveStats, what: str) -> None:
    """Eager-mode check of ``stats.success`` (no-op under tracing)."""
    if traced(stats.success):
        return
    if not bool(np.all(np.asarray(stats.success))):
        raise RuntimeError(
            f"{what}: the ODE solve failed (steps taken: {np.asarray(stats.num_steps)}); "
            "the adaptive solver most likely hit max_steps. Raise max_steps, loosen rtol/atol, "
            "or pass throw=False and inspect stats.success."
        )
