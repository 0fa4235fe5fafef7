"""The ODE solvers by name, their settings (:class:`SolverOptions`) and the adaptive
step-size control of :func:`fmjax.ode.solve`.

Fixed-step solvers (``euler``, ``midpoint``, ``heun``, ``rk4``) take ``steps`` or
``step_size``; adaptive solvers (``bosh3``, ``dopri5``, ``tsit5``, ``dopri8``) take
``rtol``/``atol`` and always get an explicit :class:`diffrax.PIDController` (diffrax's
default controller is a constant step, which would silently make dopri5 fixed-step).

The adaptive step-size control measures the error estimate with an error norm: ``"rms"``
(default) is the root mean square over the whole batch, taken per leaf of the state and the
largest over the leaves (:func:`leaf_rms_norm`), as torchdiffeq and ``flow_matching`` do: a
likelihood solve's log-density is held to the tolerance on its own, not diluted among the D
entries of the points (diffrax's default RMS over all entries at once lets it drift). One
example's error can still exceed the tolerance while the batch's mean square stays within
it; ``"max"`` (:func:`max_example_rms_norm`) takes each example's RMS (per leaf) and the
largest over the batch, so every example meets ``rtol``/``atol`` while the batch still
shares one step sequence.

An adaptive solve starts with Hairer, Norsett & Wanner's step (:func:`initial_step_size`,
two evaluations, the first reused by the FSAL solvers' first step, :func:`fsal_state`), as
torchdiffeq does: with the same controller (I-control, safety 0.9, factors 0.2-10, error
exponent 1/5 for dopri5) the solves then take torchdiffeq's step sequence. diffrax's own
selection never runs in ``diffeqsolve`` (it wraps every term, and its selection only accepts
a bare ``ODETerm``), which started every solve at 0.01.

NFE (number of function evaluations of the vector field) is computed from diffrax's step
counts and each solver's Butcher tableau (:func:`evaluations_per_step`); rejected steps and
the starting step's two evaluations count.
"""

from __future__ import annotations

import dataclasses
import math

import diffrax
import jax
import jax.numpy as jnp
import numpy as np

from fmjax.checks import integer, traced

__all__ = [
    "ADAPTIVE_SOLVERS",
    "ERROR_NORMS",
    "FIXED_SOLVERS",
    "RK4",
    "SOLVERS",
    "SolverOptions",
    "check_times",
    "evaluations_per_step",
    "fsal_state",
    "initial_step_size",
    "leaf_rms_norm",
    "max_example_rms_norm",
    "solver_options",
]

#: Adaptive error norms (``error_norm=`` of :class:`fmjax.ode.SolverOptions`).
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


def _finite(value) -> bool:
    """``value`` is a finite real number (a traced value passes: it is checked nowhere)."""
    if traced(value):
        return True
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


@dataclasses.dataclass(frozen=True)
class SolverOptions:
    """Every setting of an ODE solve, checked when made; frozen and hashable.

    Args:
      solver: 'euler', 'midpoint', 'heun', 'rk4' (fixed step: give ``steps`` or
        ``step_size``, which makes ``ceil(|t1 - t0| / step_size)`` equal steps) or 'bosh3',
        'dopri5', 'tsit5', 'dopri8' (adaptive: ``rtol``/``atol``).
      steps: the number of equal steps of a fixed-step solver.
      step_size: the step of a fixed-step solver, instead of ``steps``.
      rtol, atol: the adaptive solver's relative and absolute tolerances (finite, >= 0, not
        both 0; a fixed-step solver ignores them).
      max_steps: the adaptive solver's step budget.
      error_norm: how an adaptive solver measures its error estimate: 'rms' over the whole
        batch, per leaf of the state (default; what torchdiffeq and ``flow_matching`` do) or
        'max', the largest of the examples' own RMS errors, so that every example meets
        rtol/atol while the batch keeps one step sequence (see :mod:`fmjax.solvers`).

    The values are stored normalised (``steps=4.0`` as ``4``, tolerances as floats), so
    equal settings compare and hash equal and can be a static argument of ``jax.jit``.
    ``dataclasses.replace(options, rtol=1e-6)`` makes a changed, checked copy.

    Raises:
      ValueError: an unknown solver or error norm, steps and step_size both or neither given
        to a fixed-step solver (or either to an adaptive one), a count that is not a
        positive integer, a step size or tolerance out of range.
    """

    solver: str = "dopri5"
    steps: int | None = None
    step_size: float | None = None
    rtol: float = 1e-5
    atol: float = 1e-5
    max_steps: int = 4096
    error_norm: str = "rms"

    def __post_init__(self):
        solver, steps, step_size = self.solver, self.steps, self.step_size
        if not isinstance(solver, str) or solver not in SOLVERS:
            raise ValueError(f"unknown solver {solver!r}; choose one of {list(SOLVERS)}.")
        if not isinstance(self.error_norm, str) or self.error_norm not in ERROR_NORMS:
            raise ValueError(
                f"unknown error_norm {self.error_norm!r}; choose one of {list(ERROR_NORMS)}."
            )
        fixed = solver in FIXED_SOLVERS
        if self.error_norm != "rms" and fixed:
            raise ValueError(
                f"error_norm={self.error_norm!r} controls adaptive step sizes; the "
                f"fixed-step solver {solver!r} has none."
            )
        if fixed:
            if (steps is None) == (step_size is None):
                raise ValueError(
                    f"fixed-step solver {solver!r} needs exactly one of steps= or step_size=; "
                    f"got steps={steps!r}, step_size={step_size!r}."
                )
            steps = integer(steps, "steps", allow_none=True)
            if step_size is not None:
                if not (_finite(step_size) and float(step_size) > 0):
                    raise ValueError(f"step_size must be a finite number > 0; got {step_size!r}.")
                step_size = float(step_size)
        elif steps is not None or step_size is not None:
            raise ValueError(
                f"adaptive solver {solver!r} chooses its own steps from rtol/atol; do not pass "
                f"steps= or step_size= (got steps={steps!r}, step_size={step_size!r})."
            )
        max_steps = integer(self.max_steps, "max_steps")
        rtol, atol = self.rtol, self.atol
        if not fixed:
            for name, tol in (("rtol", rtol), ("atol", atol)):
                if not (_finite(tol) and float(tol) >= 0):
                    raise ValueError(f"{name} must be a finite number >= 0; got {tol!r}.")
            if float(rtol) == float(atol) == 0:
                raise ValueError(
                    "rtol and atol cannot both be 0: the adaptive solver could never accept a step."
                )
        for name, value in (
            ("steps", steps),
            ("step_size", step_size),
            ("rtol", float(rtol)),
            ("atol", float(atol)),
            ("max_steps", max_steps),
        ):
            object.__setattr__(self, name, value)

    @property
    def adaptive(self) -> bool:
        """True for an adaptive solver (``rtol``/``atol``), False for a fixed-step one."""
        return self.solver in ADAPTIVE_SOLVERS

    def num_fixed_steps(self, t0: float, t1: float) -> int:
        """The number of steps a fixed-step solver takes from t0 to t1."""
        if self.steps is not None:
            return self.steps
        # A step size that divides the interval up to rounding gives exactly that many steps.
        return max(1, math.ceil(abs(t1 - t0) / self.step_size - 1e-6))


_FIELDS = tuple(f.name for f in dataclasses.fields(SolverOptions))


def solver_options(options: SolverOptions | None = None, **settings) -> SolverOptions:
    """``options``, or a :class:`SolverOptions` made from ``settings`` (its fields given as
    keywords; a setting given as None takes its default).

    Raises:
      TypeError: ``options`` is not a :class:`SolverOptions`, or a setting is not one of its
        fields.
      ValueError: both ``options`` and settings are given, or the settings are refused by
        :class:`SolverOptions`.
    """
    given = {k: v for k, v in settings.items() if v is not None}
    unknown = sorted(set(settings) - set(_FIELDS))
    if unknown:
        raise TypeError(f"unknown solver setting(s) {unknown}; the settings are {list(_FIELDS)}.")
    if options is None:
        return SolverOptions(**given)
    if not isinstance(options, SolverOptions):
        raise TypeError(f"options must be a fmjax.ode.SolverOptions; got {type(options).__name__}.")
    if given:
        raise ValueError(
            f"give the solver settings either as options= or as keywords, not both; got "
            f"options={options!r} and {', '.join(f'{k}={v!r}' for k, v in given.items())}. "
            "Use dataclasses.replace(options, ...) to change some of them."
        )
    return options


def check_times(t0, t1, options: SolverOptions) -> None:
    """Raise a ValueError unless ``t0`` and ``t1`` are finite, distinct times a solve with
    ``options`` can run between (traced times: values are not checked, and a fixed-step
    solve needs ``steps=``, its number of steps being static)."""
    for name, t in (("t0", t0), ("t1", t1)):
        if not _finite(t):
            raise ValueError(f"{name} must be a finite time; got {t!r}.")
    if traced(t0, t1):
        if not options.adaptive and options.steps is None:
            raise ValueError(
                f"step_size= needs concrete t0 and t1 (the number of steps is "
                f"static); with traced times give steps= or use an adaptive solver "
                f"(got step_size={options.step_size!r})."
            )
    elif t0 == t1:
        raise ValueError(f"t0 and t1 must differ; got t0=t1={t0}.")


def evaluations_per_step(solver) -> tuple[int, int]:
    """``(evaluations per attempted step, evaluations at initialisation)`` of a diffrax
    Runge-Kutta solver, from its Butcher tableau (an FSAL solver reuses its last stage)."""
    if isinstance(solver, diffrax.Euler):
        return 1, 0
    tab = solver.tableau
    if tab.fsal:
        return tab.num_stages - 1, 1
    return tab.num_stages, 0


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
    ``diffeqsolve`` wraps its terms) and starts at 0.01 instead.
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


def fsal_state(solver, term, t0, t1, y0, args, f0):
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
