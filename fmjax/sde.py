"""Stochastic sampling: an SDE with the marginals of a flow's probability-flow ODE.

For a velocity field ``v(t, x)`` whose flow carries ``p_0`` to ``p_t`` and the score
``grad_x log p_t(x)``, the Itô SDE

    dx = [v(t, x) + g(t)^2 / 2 * score(t, x)] dt + g(t) dW

has the same marginals ``p_t`` for every diffusion ``g(t) >= 0``: the extra drift and the
noise cancel in the Fokker–Planck equation (Song et al. 2021; Albergo & Vanden-Eijnden's
stochastic interpolants; Ma et al. 2024, SiT). ``g = 0`` is :func:`fmjax.sample`'s ODE;
``g > 0`` lets the noise correct errors of the drift, at a cost in discretisation error.

:func:`sample_sde` solves it with diffrax: ``MultiTerm(ODETerm(drift), ControlTerm(g,
W))`` with a Brownian motion ``W`` of x's shape (:class:`diffrax.UnsafeBrownianPath`, one
fresh normal increment per step: the solve has fixed steps and is not differentiated), and
one of the fixed-step SDE solvers of :data:`SDE_SOLVERS`. The noise is additive (``g``
depends on t only), so the Stratonovich solvers (Heun, ShARK, SRA1) solve the Itô SDE too.

The score is either given, ``score(t, x)``, or derived from the velocity on a Gaussian path
(``path=``) with :func:`fmjax.predictions.convert`: ``score = -E[x0 | x] / sigma_t``, which
divides by ``sigma_t`` and is singular where it vanishes (t = 1 on ``CondOT(sigma_min=0)``).
There the noise must vanish (``g(t1) = 0``, e.g. :func:`sigma_diffusion`, whose
``g^2 / 2 * score = -scale^2 / 2 * E[x0 | x]`` stays finite) or the span must end before it
(``t1 = 1 - 1e-3``); anything else is refused, not integrated into NaNs.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import diffrax
import jax
import jax.numpy as jnp
import lineax
import numpy as np

from fmjax._field import as_field
from fmjax.batching import batch_time, call_field, check_batch, check_cond, check_field_output
from fmjax.checks import integer, real
from fmjax.paths import Coefficients, check_time
from fmjax.sampling import SampleStats

__all__ = ["SDE_SOLVERS", "sample_sde", "sigma_diffusion"]

#: The fixed-step SDE solvers by name, with the evaluations of the drift per step:
#: ``"euler"`` Euler–Maruyama (1; strong order 0.5, for additive noise 1),
#: ``"heun"`` (2), ``"shark"`` and ``"sra1"`` (2; additive-noise stochastic Runge–Kutta
#: methods of strong order 1.5 that also draw the space-time Lévy area).
SDE_SOLVERS = {
    "euler": (diffrax.Euler, diffrax.BrownianIncrement, 1),
    "heun": (diffrax.Heun, diffrax.BrownianIncrement, 2),
    "shark": (diffrax.ShARK, diffrax.SpaceTimeLevyArea, 2),
    "sra1": (diffrax.SRA1, diffrax.SpaceTimeLevyArea, 2),
}

# |sigma_t| or the velocity-to-score determinant below this: the derived score is singular
_SINGULAR = 1e-6


@dataclasses.dataclass(frozen=True)
class _SigmaDiffusion:
    path: object
    scale: object  # an array: a runtime argument of the solve, so new scales do not recompile

    def __call__(self, t):
        t = jnp.asarray(t)
        sigma = self.path.coefficients(t.astype(jnp.result_type(t, jnp.float32)))[1]
        return self.scale * jnp.sqrt(jnp.clip(sigma, 0.0))


jax.tree_util.register_dataclass(_SigmaDiffusion, data_fields=["scale"], meta_fields=["path"])


def sigma_diffusion(path, scale: float = 1.0) -> Callable:
    """The diffusion ``g(t) = scale * sqrt(sigma_t)`` of a Gaussian path (SiT's choice
    ``w_t = sigma_t``): ``g^2 / 2 * score = -scale^2 / 2 * E[x0 | x_t]`` is finite where the
    score is not, so the SDE can run to ``t = 1`` on ``CondOT(sigma_min=0)``; the noise
    vanishes as the samples reach the data. The scale is a runtime argument of the solve: a
    new scale does not recompile it.
    """
    if not hasattr(path, "coefficients"):
        raise ValueError(
            f"sigma_diffusion needs a Gaussian path (fmjax.paths); got {type(path).__name__}."
        )
    return _SigmaDiffusion(path, np.float32(real(scale, "scale", low=0.0)))


def _coefficients(path, t: float) -> Coefficients:
    return Coefficients(*(float(c) for c in path.coefficients(jnp.float32(t))))


def _score_singular_at(path, t: float) -> bool:
    """Whether ``convert(path, v, x, t, src='velocity', dst='score')`` divides by zero."""
    c = _coefficients(path, t)
    det = c.d_alpha * c.sigma - c.d_sigma * c.alpha
    return abs(c.sigma) < _SINGULAR or abs(det) < _SINGULAR


def _diffusion_at(diffusion, t: float) -> float:
    """``g(t)`` as a checked float (finite, >= 0, a scalar)."""
    if not callable(diffusion):
        return diffusion
    try:
        g = np.asarray(diffusion(jnp.float32(t)))
    except Exception as err:  # noqa: BLE001  (say which call failed, keep the cause)
        raise ValueError(f"diffusion(t) failed at t={t}: {err}") from err
    if g.shape != () or not np.issubdtype(g.dtype, np.floating):
        raise ValueError(
            f"diffusion(t) must return a floating-point scalar g(t); got shape {g.shape} "
            f"and dtype {g.dtype} at t={t}."
        )
    if not (np.isfinite(g) and g >= 0):
        raise ValueError(f"diffusion(t) must be finite and >= 0; got g({t}) = {float(g)}.")
    return float(g)


def _check_key(key) -> None:
    key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
    typed = jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
    raw = key.dtype == jnp.uint32 and key.shape == (2,)
    if not ((typed and key.shape == ()) or raw):
        raise ValueError(
            "key must be one PRNG key (jax.random.key(seed) or jax.random.PRNGKey(seed)); "
            f"got shape {key.shape} and dtype {key.dtype}."
        )


def _g(diffusion, t, callable_, dtype):
    """``g(t)``: the diffusion function at t, or the constant; a checked scalar."""
    g = jnp.asarray(diffusion(t) if callable_ else diffusion, dtype)
    if jnp.shape(g) != ():
        raise ValueError(f"diffusion(t) must return a scalar g(t); got shape {jnp.shape(g)}.")
    return g


def _drift_fn(v, score, path, g_callable):
    """The SDE's drift ``v + g^2 / 2 * score`` at the scalar solver time ``t``."""

    def drift(t, x, args):
        cond, diffusion = args
        tb = batch_time(t, x)
        vx = call_field(v, tb, x, cond)
        check_field_output(vx, x)
        g = _g(diffusion, t, g_callable, x.dtype)
        if score is None:
            s = path.convert(vx, x, tb, src="velocity", dst="score")
        else:
            s = call_field(score, tb, x, cond)
            check_field_output(s, x, " (score(t, x): the score has x's shape)")
        g2 = g**2
        # where g vanishes the score term is 0, even at an end where the score is singular
        return vx + jnp.where(g2 > 0, 0.5 * g2 * s, jnp.zeros_like(s))

    return drift


@functools.partial(jax.jit, static_argnames=("solver", "steps", "t0", "t1", "path", "g_callable"))
def _sample_sde(v, score, x0, key, cond, diffusion, *, solver, steps, t0, t1, path, g_callable):
    solver_cls, levy_area, per_step = SDE_SOLVERS[solver]
    dtype = jnp.result_type(x0, jnp.float32)
    x0 = x0.astype(dtype)

    def noise(t, x, args):
        return lineax.DiagonalLinearOperator(
            jnp.broadcast_to(_g(args[1], t, g_callable, dtype), x.shape)
        )

    brownian = diffrax.UnsafeBrownianPath(
        shape=jax.ShapeDtypeStruct(x0.shape, dtype), key=key, levy_area=levy_area
    )
    terms = diffrax.MultiTerm(
        diffrax.ODETerm(_drift_fn(v, score, path, g_callable)), diffrax.ControlTerm(noise, brownian)
    )
    t0_, t1_ = jnp.asarray(t0, dtype), jnp.asarray(t1, dtype)
    sol = diffrax.diffeqsolve(
        terms,
        solver_cls(),
        t0=t0_,
        t1=t1_,
        dt0=(t1_ - t0_) / steps,
        y0=x0,
        args=(cond, diffusion),
        saveat=diffrax.SaveAt(t1=True),
        stepsize_controller=diffrax.ConstantStepSize(),
        max_steps=steps,
        throw=False,
        # the increments are drawn per step, so reverse-mode derivatives are not defined
        adjoint=diffrax.ForwardMode(),
    )
    num_steps = sol.stats["num_steps"]
    stats = SampleStats(
        nfe=per_step * num_steps,
        num_steps=num_steps,
        num_accepted=sol.stats["num_accepted_steps"],
        num_rejected=sol.stats["num_rejected_steps"],
        success=sol.result == diffrax.RESULTS.successful,
    )
    return sol.ys[-1], stats


def sample_sde(
    v,
    x0,
    key,
    *,
    diffusion: float | Callable = 1.0,
    score: Callable | None = None,
    path=None,
    steps: int = 100,
    solver: str = "euler",
    t0: float = 0.0,
    t1: float = 1.0,
    cond=None,
):
    """Push ``x0`` from t0 to t1 along ``dx = [v + g^2/2 score] dt + g dW`` (module docstring).

    Args:
      v: the vector field ``v(t, x)`` on a batch (``t`` of shape ``(B,)``), as for
        :func:`fmjax.sample`; with ``cond`` a conditional ``v(t, x, cond)``.
      x0: ``(B, *event_shape)`` floating-point starting points (``x_{t0} ~ p_{t0}``, e.g.
        ``path.sample_source``); image batches ``(B, H, W, C)`` work as they are.
      key: one PRNG key for the Brownian motion; every entry of every example gets its own
        independent noise. The same key, batch shape and settings give the same samples.
      diffusion: ``g``: a number >= 0 (constant) or a function ``g(t)`` of the scalar time
        returning a scalar >= 0 (e.g. :func:`sigma_diffusion`). Default 1.
      score: ``score(t, x)`` (or ``score(t, x, cond)``), ``grad_x log p_t(x)`` at a batch;
        or None to derive it from ``v`` on ``path``.
      path: a Gaussian path (:mod:`fmjax.paths`) along which ``v`` was learned; with
        ``score=None`` the score is ``path.convert(v(t, x), x, t, src='velocity',
        dst='score')``. The times must then lie in ``path.t_range``, and the noise must vanish
        where the score is singular (see the module docstring).
      steps: the number of equal steps (>= 1).
      solver: a name of :data:`SDE_SOLVERS` (``"euler"``: Euler–Maruyama).
      t0, t1: the span, ``t0 < t1`` (noise towards data).
      cond: the condition of each example for a conditional field (and score), as for
        :func:`fmjax.sample`.

    Returns:
      ``(x1, stats)``: the endpoints with x0's shape (in x0's float precision, at least
      float32) and a :class:`fmjax.sampling.SampleStats` whose ``nfe`` counts evaluations
      of the drift (each one call of ``v`` and, if given, one of ``score``). Traceable
      (``jit``, ``vmap`` over keys) with concrete settings; not reverse-differentiable (the
      Brownian increments are drawn per step).

    Raises:
      ValueError: a bad batch, key, condition, solver name, step count, span, diffusion, a
        missing score and path, or a positive diffusion where the derived score is singular.
    """
    check_batch(x0, "x0")
    _check_key(key)
    if not isinstance(solver, str) or solver not in SDE_SOLVERS:
        raise ValueError(f"unknown SDE solver {solver!r}; choose one of {list(SDE_SOLVERS)}.")
    steps = integer(steps, "steps")
    t0, t1 = real(t0, "t0"), real(t1, "t1")
    if not t0 < t1:
        raise ValueError(f"sample_sde integrates from noise to data: need t0 < t1; got {t0}, {t1}.")
    if not callable(v):
        raise ValueError(f"v must be a callable v(t, x); got {type(v).__name__}.")
    g_callable = callable(diffusion)
    if not g_callable:
        diffusion = real(diffusion, "diffusion", low=0.0)
    g_ends = {t: _diffusion_at(diffusion, t) for t in (t0, t1)}
    if score is not None and path is not None:
        raise ValueError(
            "give the score either as score= or derived from the velocity on path=, not both."
        )
    if score is None:
        if path is None:
            raise ValueError(
                "sample_sde needs the score: pass score=score(t, x), or path= (the Gaussian "
                "path v was learned on) to derive it from v."
            )
        if not hasattr(path, "convert"):
            raise ValueError(
                f"the score can be derived from the velocity on a Gaussian path only; "
                f"{type(path).__name__} has none: pass score=score(t, x)."
            )
        check_time(np.array([t0, t1]), path.t_range, name="t0 and t1")
        for t, g in g_ends.items():
            if g > 0 and _score_singular_at(path, t):
                move = f"t1 = {t} - 1e-3" if t == t1 else f"t0 = {t} + 1e-3"
                raise ValueError(
                    f"the score derived from the velocity is singular at t={t} on {path!r} "
                    f"(the conversion divides by zero there) but the diffusion is g({t}) = "
                    f"{g} > 0: move the span in ({move}) or use a diffusion that vanishes "
                    "there, such as fmjax.sde.sigma_diffusion(path, scale)."
                )
    elif not callable(score):
        raise ValueError(f"score must be a callable score(t, x) or None; got {score!r}.")
    if cond is not None:
        check_cond(cond, jnp.shape(x0)[0], "fmjax.sample_sde")
        cond = jax.tree_util.tree_map(jnp.asarray, cond)
    return _sample_sde(
        as_field(v),
        None if score is None else as_field(score),
        jnp.asarray(x0),
        key,
        cond,
        as_field(diffusion) if g_callable else jnp.float32(diffusion),
        solver=solver,
        steps=steps,
        t0=t0,
        t1=t1,
        path=None if score is not None else path,
        g_callable=g_callable,
    )
