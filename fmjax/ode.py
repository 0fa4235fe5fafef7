"""ODE solving through diffrax: the solver registry and NFE accounting shared by
:func:`fmjax.sample` and :func:`fmjax.log_likelihood`.

Fixed-step solvers (``euler``, ``midpoint``, ``heun``, ``rk4``) take ``steps`` or
``step_size``; ``step_size=h`` makes ``ceil(|t1 - t0| / h)`` equal steps that end exactly at
``t1`` (h = 0.3 on [0, 1]: four steps of 0.25; torchdiffeq would step 0.3, 0.3, 0.3, 0.1;
the two agree whenever h divides the interval, as 0.05 does); adaptive solvers (``bosh3``,
``dopri5``, ``tsit5``, ``dopri8``) take ``rtol``/``atol`` and always get an explicit
:class:`diffrax.PIDController` (diffrax's default controller is a constant step, which would
silently make dopri5 fixed-step).

The adaptive step-size control measures the error estimate with ``error_norm``: ``"rms"``
(default) is the root mean square over the whole batch, taken per leaf of the state and the
largest over the leaves (:func:`leaf_rms_norm`), as torchdiffeq and ``flow_matching`` do: a
likelihood solve's log-density is held to the tolerance on its own, not diluted among the D
entries of the points (diffrax's default RMS over all entries at once lets it drift: on the
W2D-small model 355 instead of 505 evaluations, with 1.7x the peers' largest log-density
error). One example's error can still exceed the tolerance while the batch's mean square
stays within it; ``"max"`` takes each example's RMS (per leaf) and the largest over the
batch, so every example meets ``rtol``/``atol`` while the batch still shares one step
sequence.

An adaptive solve starts with Hairer, Norsett & Wanner's step (:func:`initial_step_size`,
two evaluations, the first reused by the FSAL solvers' first step), as torchdiffeq does: with
the same controller (I-control, safety 0.9, factors 0.2-10, error exponent 1/5 for dopri5) the
solves then take torchdiffeq's step sequence. diffrax's own selection never runs in
``diffeqsolve`` (it wraps every term, and its selection only accepts a bare ``ODETerm``), which
started every solve at 0.01.

NFE (number of function evaluations of the vector field) is computed from diffrax's step
counts and each solver's Butcher tableau — rejected steps and the starting step's two
evaluations count — and the test suite checks the formula against a vector field that counts
its own calls.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import diffrax
import jax
import jax.numpy as jnp
import numpy as np

from fmjax._checks import integer, traced

__all__ = [
    "ADAPTIVE_SOLVERS",
    "ERROR_NORMS",
    "FIXED_SOLVERS",
    "RK4",
    "SOLVERS",
    "SolveStats",
    "check_derivative",
    "check_save_times",
    "check_solver_args",
    "initial_step_size",
    "leaf_rms_norm",
    "max_example_rms_norm",
    "solve",
]

#: Adaptive error norms of :func:`solve` (``error_norm=``).
ERROR_NORMS = ("rms", "max")


def _sqrt_guarded(mean_sq):
    """``sqrt`` whose derivative at 0 is 0, not NaN (the controller is differentiated through
    when a solve is)."""
    positive = mean_sq > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, mean_sq, 1.0)), 0.0)


def leaf_rms_norm(tree) -> jax.Array:
    """The largest, over the leaves of the state, of each leaf's RMS over the whole batch:
    torchdiffeq's norm for a tuple state (``_mixed_norm``). For one leaf it is the plain RMS;
    for the likelihood's ``(x, delta log p)`` it holds the log-density to the tolerance on
    its own instead of diluting its error among the D entries of ``x``."""
    leaves = jax.tree_util.tree_leaves(tree)
    return _sqrt_guarded(jnp.max(jnp.stack([jnp.mean(jnp.square(jnp.abs(x))) for x in leaves])))


def max_example_rms_norm(tree) -> jax.Array:
    """The largest per-example, per-leaf RMS of a batch pytree (every leaf with the batch
    axis first): every example, and each part of its state, is held to the tolerance."""
    leaves = jax.tree_util.tree_leaves(tree)
    b = leaves[0].shape[0]
    per = [jnp.mean(jnp.square(jnp.abs(x)).reshape(b, -1), axis=1) for x in leaves]
    return _sqrt_guarded(jnp.max(jnp.stack(per)))


class RK4(diffrax.AbstractERK):
    """The classical 4th-order Runge-Kutta method (4 evaluations per step), as in torchdiffeq.

    The embedded error estimate (vs. the 2nd-order midpoint of the same stages) is only used
    if someone pairs it with an adaptive controller; fmjax uses RK4 fixed-step.
    """

    tableau = diffrax.ButcherTableau(
        c=np.array([0.5, 0.5, 1.0]),
        b_sol=np.array([1 / 6, 1 / 3, 1 / 3, 1 / 6]),
        b_error=np.array([1 / 6, 1 / 3 - 1.0, 1 / 3, 1 / 6]),
        a_lower=(np.array([0.5]), np.array([0.0, 0.5]), np.array([0.0, 0.0, 1.0])),
    )
    interpolation_cls = diffrax.ThirdOrderHermitePolynomialInterpolation.from_k

    def order(self, terms):
        del terms
        return 4


#: Fixed-step solvers by name (give ``steps`` or ``step_size``).
FIXED_SOLVERS = {
    "euler": diffrax.Euler,
    "midpoint": diffrax.Midpoint,
    "heun": diffrax.Heun,
    "rk4": RK4,
}
#: Adaptive solvers by name (``rtol``/``atol`` with a PID controller).
ADAPTIVE_SOLVERS = {
    "bosh3": diffrax.Bosh3,
    "dopri5": diffrax.Dopri5,
    "tsit5": diffrax.Tsit5,
    "dopri8": diffrax.Dopri8,
}
#: Every solver name.
SOLVERS = tuple(FIXED_SOLVERS) + tuple(ADAPTIVE_SOLVERS)


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


def _evals_per_step(solver) -> tuple[int, int]:
    """(evaluations per attempted step, evaluations at initialisation)."""
    if isinstance(solver, diffrax.Euler):
        return 1, 0
    tab = solver.tableau
    if tab.fsal:
        return tab.num_stages - 1, 1
    return tab.num_stages, 0


def _finite(value) -> bool:
    """``value`` is a finite real number (a traced value passes: it is checked nowhere)."""
    if traced(value):
        return True
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def check_solver_args(
    solver: str,
    steps,
    step_size,
    t0: float,
    t1: float,
    error_norm: str = "rms",
    *,
    rtol=None,
    atol=None,
    max_steps=None,
) -> None:
    """Validate solver options eagerly with errors that say what was expected (rtol, atol and
    max_steps are checked when given)."""
    if solver not in FIXED_SOLVERS and solver not in ADAPTIVE_SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose one of {list(SOLVERS)}.")
    if error_norm not in ERROR_NORMS:
        raise ValueError(f"unknown error_norm {error_norm!r}; choose one of {list(ERROR_NORMS)}.")
    if error_norm != "rms" and solver in FIXED_SOLVERS:
        raise ValueError(
            f"error_norm={error_norm!r} controls adaptive step sizes; the "
            f"fixed-step solver {solver!r} has none."
        )
    if solver in FIXED_SOLVERS:
        if (steps is None) == (step_size is None):
            raise ValueError(
                f"fixed-step solver {solver!r} needs exactly one of steps= or step_size=; got "
                f"steps={steps!r}, step_size={step_size!r}."
            )
        integer(steps, "steps", allow_none=True)
        if step_size is not None and not (_finite(step_size) and step_size > 0):
            raise ValueError(f"step_size must be a finite number > 0; got {step_size!r}.")
    elif steps is not None or step_size is not None:
        raise ValueError(
            f"adaptive solver {solver!r} chooses its own steps from rtol/atol; do not pass "
            f"steps= or step_size= (got steps={steps!r}, step_size={step_size!r})."
        )
    for name, t in (("t0", t0), ("t1", t1)):
        if not _finite(t):
            raise ValueError(f"{name} must be a finite time; got {t!r}.")
    times_traced = traced(t0, t1)
    if times_traced and solver in FIXED_SOLVERS and steps is None:
        raise ValueError(
            f"step_size= needs concrete t0 and t1 (the number of steps is "
            f"static); with traced times give steps= or use an adaptive solver "
            f"(got step_size={step_size!r})."
        )
    if not times_traced and t0 == t1:
        raise ValueError(f"t0 and t1 must differ; got t0=t1={t0}.")
    integer(max_steps, "max_steps", allow_none=True)
    if solver in ADAPTIVE_SOLVERS:
        for name, tol in (("rtol", rtol), ("atol", atol)):
            if tol is not None and not (math.isfinite(float(tol)) and float(tol) >= 0):
                raise ValueError(f"{name} must be a finite number >= 0; got {tol!r}.")
        if rtol is not None and atol is not None and float(rtol) == float(atol) == 0:
            raise ValueError(
                "rtol and atol cannot both be 0: the adaptive solver could never accept a step."
            )


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


def num_fixed_steps(steps, step_size, t0, t1) -> int:
    if steps is not None:
        return int(steps)
    # A step size that divides the interval up to rounding gives exactly that many steps.
    return max(1, math.ceil(abs(t1 - t0) / step_size - 1e-6))


def initial_step_size(field, y0, *, t0, t1, error_order, rtol, atol, norm):
    """The starting step of an adaptive solve: Hairer, Norsett & Wanner's algorithm (Solving
    Ordinary Differential Equations I, II.4), as torchdiffeq (and so ``flow_matching`` and
    ``torchcfm``) use it.

    Two evaluations of ``field(t, y)``: at ``(t0, y0)`` and one explicit Euler probe. Returns
    ``(h, f0)``, the step's magnitude (the solve runs from t0 towards t1) and
    ``field(t0, y0)`` for the solver to reuse. The probe step is capped at ``|t1 - t0|`` so
    the field is never evaluated outside the interval; with ``y0`` or ``f0`` near zero (``d0``
    or ``d1`` below 1e-5) it is 1e-6, and the step then grows by the controller's factors
    (a solve from y0 = 0 takes a few more steps than from a guess of 0.01, as in torchdiffeq).
    The norms are taken over the whole state, so with several leaves the start follows the
    most demanding one.
    diffrax 0.7 selects no starting step for a time-reversed or wrapped term (every
    ``diffeqsolve`` wraps its terms) and starts at 0.01 instead: on the W2D likelihood that
    cost 85 evaluations against torchdiffeq's 74 at the same tolerance, 74 with this step.
    """
    tree_map = jax.tree_util.tree_map
    f0 = field(t0, y0)
    scale = tree_map(lambda y: atol + rtol * jnp.abs(y), y0)
    d0 = norm(tree_map(jnp.divide, y0, scale))
    d1 = norm(tree_map(jnp.divide, f0, scale))
    tiny = (d0 < 1e-5) | (d1 < 1e-5)
    span = jnp.abs(t1 - t0)
    h0 = jnp.minimum(jnp.where(tiny, 1e-6, 0.01 * d0 / jnp.where(tiny, 1.0, d1)), span)
    sign = jnp.sign(t1 - t0)
    y1 = tree_map(lambda y, f: y + (sign * h0).astype(y.dtype) * f, y0, f0)
    # a capped probe evaluates at t1 itself (t0 + |t1 - t0| can round one ulp past it)
    t_probe = jnp.where(h0 >= span, t1, t0 + (sign * h0).astype(jnp.result_type(t0)))
    f1 = field(t_probe, y1)
    d2 = norm(tree_map(lambda a, b, c: (a - b) / c, f1, f0, scale)) / h0
    dmax = jnp.maximum(d1, d2)
    flat = dmax <= 1e-15
    h1 = jnp.where(
        flat,
        jnp.maximum(1e-6, 1e-3 * h0),
        (0.01 / jnp.where(flat, 1.0, dmax)) ** (1.0 / error_order),
    )
    return jnp.minimum(100.0 * h0, h1), f0


def _fsal_state(solver, term, t0, t1, y0, args, f0):
    """diffrax's state for an FSAL Runge-Kutta solver with ``field(t0, y0)`` already known,
    ``(first_step=False, f0)``, so that the first step does not evaluate it again; None (the
    solver evaluates it itself) for a solver without FSAL or if diffrax's state has another
    form than this (checked against ``solver.init``)."""
    tableau = getattr(solver, "tableau", None)
    if tableau is None or not tableau.fsal:
        return None
    state = (jnp.array(False), f0)
    want = jax.eval_shape(lambda: solver.init(term, t0, t1, y0, args))
    got = jax.eval_shape(lambda: state)
    if jax.tree_util.tree_structure(want) != jax.tree_util.tree_structure(got) or any(
        (w.shape, w.dtype) != (g.shape, g.dtype)
        for w, g in zip(
            jax.tree_util.tree_leaves(want), jax.tree_util.tree_leaves(got), strict=True
        )
    ):
        return None
    return state


def solve(
    field,
    y0,
    *,
    t0: float,
    t1: float,
    solver: str = "dopri5",
    steps: int | None = None,
    step_size: float | None = None,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    save_times=None,
    max_steps: int = 4096,
    args=None,
    adjoint=None,
    error_norm: str = "rms",
):
    """Solve ``dy/dt = field(t, y, args)`` from t0 to t1 (either direction) with diffrax.

    ``y0`` is any pytree of float arrays; ``field`` must return ``dy/dt`` with the same tree
    structure and leaf shapes (checked when the solve is traced, see
    :func:`check_derivative`). Returns ``(y1, ys, stats)`` where ``ys`` holds the states at
    ``save_times`` (or None). Pure and traceable: call it under jit; ``t0`` and ``t1`` may be
    traced (not with ``step_size=``, whose number of steps is static). ``throw=False``: check
    ``stats.success``.
    """
    check_solver_args(
        solver, steps, step_size, t0, t1, error_norm, rtol=rtol, atol=atol, max_steps=max_steps
    )
    check_save_times(save_times, t0, t1)

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
        n = num_fixed_steps(steps, step_size, t0, t1)
        dt0 = (t1 - t0) / n
        controller = diffrax.ConstantStepSize()
        max_steps = n
        solver_obj = FIXED_SOLVERS[solver]()
    else:
        norm = leaf_rms_norm if error_norm == "rms" else max_example_rms_norm
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
            solver_state = _fsal_state(solver_obj, term, t0_, t1_, y0, args, f0)
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
    per_step, init = _evals_per_step(solver_obj)
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
