"""Flow-matching losses.

:func:`cfm_loss` is the paper's Conditional Flow Matching objective (eq. 9 with the Gaussian
paths of section 4):

    L_CFM = E_{t, x1 ~ q, x0 ~ N(0, I)} || v(t, psi_t(x0 | x1)) - d/dt psi_t(x0 | x1) ||^2

and :func:`fm_loss` the Flow Matching objective (eq. 5) against the exact marginal field of a
tractable data distribution (:mod:`fmjax.marginals`). Theorem 2: the two differ by a constant
independent of v, so their gradients agree.

``v(t, x)`` takes ``t`` of shape ``(B,)`` and ``x`` of shape ``(B, *event_shape)``.
"""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp

from fmjax import couplings as couplings_lib
from fmjax import predictions
from fmjax.batching import check_cond

__all__ = ["REDUCTIONS", "cfm_loss", "fm_loss", "score_loss", "sf2m_loss", "uniform_time"]

#: ``cfm_loss`` reductions (see its ``reduction`` argument).
REDUCTIONS = ("mean", "sum", "none")


def uniform_time(key, n, t_range=(0.0, 1.0), dtype=jnp.float32):
    """``t ~ U[lo, hi]``, shape (n,)."""
    lo, hi = t_range
    return jax.random.uniform(key, (n,), dtype, minval=lo, maxval=hi)


def _reduce(sq_err, reduction):
    per_example = jnp.mean(sq_err.reshape(sq_err.shape[0], -1), axis=1)
    if reduction == "mean":
        return jnp.mean(per_example)
    if reduction == "sum":  # the paper's squared norm: sum over dimensions
        return jnp.mean(jnp.sum(sq_err.reshape(sq_err.shape[0], -1), axis=1))
    return per_example


def _check(x1, reduction):
    if jnp.ndim(x1) < 2:
        raise ValueError(
            f"x1 must be a batch of shape (batch, *event_shape); got shape {jnp.shape(x1)}."
        )
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}; got {reduction!r}.")
    if not jnp.issubdtype(jnp.result_type(x1), jnp.floating):
        raise ValueError(
            f"x1 must be floating point (e.g. images scaled to [-1, 1]); got "
            f"dtype {jnp.result_type(x1)}."
        )


def _prediction(v, t, xt, cond=None):
    return predictions.prediction_of(v, t, xt, "v", args=() if cond is None else (cond,))


def _draw(path, key, x1, x0, t, time_sampler, need_key=False):
    if key is None and (x0 is None or t is None or need_key):
        raise ValueError("a PRNG key is needed to draw x0, t or a coupling; got key=None.")
    k0, kt, kc = jax.random.split(key, 3) if key is not None else (None, None, None)
    if x0 is None:
        x0 = jax.random.normal(k0, x1.shape, x1.dtype)
    elif jnp.shape(x0) != jnp.shape(x1):
        raise ValueError(f"x0 must have x1's shape {jnp.shape(x1)}; got {jnp.shape(x0)}.")
    if t is None:
        sampler = time_sampler or (lambda k, n: uniform_time(k, n, path.t_range, x1.dtype))
        t = sampler(kt, x1.shape[0])
    if jnp.shape(t) != (x1.shape[0],):
        raise ValueError(f"t must have shape ({x1.shape[0]},); got {jnp.shape(t)}.")
    return x0, t, kc


def _takes_cond(coupling) -> bool:
    try:
        return "cond" in inspect.signature(coupling).parameters
    except (TypeError, ValueError):  # no signature to read: a plain coupling(key, x0, x1)
        return False


def _couple(coupling, kc, x0, x1, cond, caller):
    if coupling is None:
        return x0, x1
    coupling = couplings_lib.get(coupling) if isinstance(coupling, str) else coupling
    data = x1
    if cond is not None and _takes_cond(coupling):
        x0, x1 = coupling(kc, x0, x1, cond=cond)
    else:
        x0, x1 = coupling(kc, x0, x1)
    if cond is not None and x1 is not data:
        raise ValueError(
            f"{caller}(cond=...): the coupling {coupling!r} returned a new x1; with "
            "conditions it must re-pair x0 and return x1 as given (cond[i] belongs to "
            "x1[i]), as fmjax.couplings do."
        )
    return x0, x1


def _bridge_noise(path, key, x1, caller):
    """The interpolant's ``z``, drawn from ``fold_in(key, 3)`` (apart from x0, t, coupling)."""
    if key is None:
        raise ValueError(f"{caller}: the path {path!r} draws noise: it needs a PRNG key.")
    return jax.random.normal(jax.random.fold_in(key, 3), x1.shape, x1.dtype)


def cfm_loss(
    v,
    path,
    key,
    x1,
    *,
    x0=None,
    t=None,
    time_sampler=None,
    coupling=None,
    reduction="mean",
    prediction="velocity",
    cond=None,
):
    """Conditional Flow Matching loss on a batch of data ``x1``.

    Args:
      v: the vector field ``v(t, x)`` being trained (e.g. ``lambda t, x: model.apply(p, t, x)``),
        or with ``cond`` a conditional ``v(t, x, cond)``.
      path: a :mod:`fmjax.paths` path, or the noisy interpolant
        :class:`fmjax.bridges.SchrodingerBridge` (its noise ``z`` is drawn from ``key``;
        pass ``coupling=path.coupling`` for SB-CFM's entropic coupling).
      key: PRNG key for x0 ~ N(0, I), t and the coupling (whichever are not given).
      x1: data batch ``(B, *event_shape)``.
      x0: optional source samples (default standard normal).
      t: optional times ``(B,)``; otherwise ``time_sampler(key, B)`` or U[path.t_range].
      coupling: ``coupling(key, x0, x1) -> (x0, x1)`` or a name from
        :mod:`fmjax.couplings` ('independent', 'ot', 'ot_sinkhorn'); default independent.
        The named couplings draw nothing; a callable gets a key split from ``key``. With
        ``cond``, a coupling whose signature has a ``cond`` parameter (the named ones) is
        given the conditions, so the OT couplings pair within each class (integer labels) or
        at a cost for distant contexts (float vectors).
        Gradients flow through the re-paired x0 and x1 with the pairing held fixed.
      reduction: 'mean' (MSE over all elements, as the PyTorch references), 'sum' (the
        paper's squared norm, summed over dimensions, averaged over the batch) or 'none'
        (per-example MSE, shape (B,)).
      prediction: what ``v`` predicts and is regressed on: 'velocity' (the paper's CFM),
        'x1' (the data: ``E[x1 | x_t]`` at the optimum), 'eps' (the noise ``x0``) or 'score'
        (``-x0 / sigma_t``). Sample from such a model through
        ``path.velocity_field(model, prediction)``. The losses differ by a time weighting:
        with ``v`` converted to a velocity, the velocity loss is
        ``(alpha' - sigma' alpha / sigma)^2`` times the 'x1' loss and
        ``(sigma' - alpha' sigma / alpha)^2`` times the 'eps' loss at each t.
      cond: the condition of each data point for a conditional model ``v(t, x, cond)``
        (class ids ``(B,)``, context vectors ``(B, C)``, or a pytree of arrays with leading
        size B; ``cond[i]`` belongs to ``x1[i]``): the loss of ``p(x1 | cond)``. For
        classifier-free guidance replace some conditions by the null one before the call.
        The couplings re-pair x0 and keep x1 in its order, so each condition stays with its
        data point; a custom coupling that returns a new x1 is refused.
    """
    _check(x1, reduction)
    predictions.check_prediction(prediction, "prediction")
    if cond is not None:
        check_cond(cond, jnp.shape(x1)[0], "cfm_loss")
    x0, t, kc = _draw(path, key, x1, x0, t, time_sampler, need_key=callable(coupling))
    x0, x1 = _couple(coupling, kc, x0, x1, cond, "cfm_loss")
    if getattr(path, "needs_noise", False):  # the noisy interpolant (fmjax.bridges)
        if prediction != "velocity":
            raise ValueError(
                f"cfm_loss: the path {path!r} trains velocity models only; got "
                f"prediction={prediction!r}."
            )
        noise = _bridge_noise(path, key, x1, "cfm_loss")
        xt, target = path.interpolate_and_target(x0, x1, t, noise)
    elif prediction == "velocity":
        xt, target = path.interpolate_and_target(x0, x1, t)
    else:
        xt = path.interpolate(x0, x1, t)
        target = predictions.prediction_target(path, x0, x1, t, prediction)
    return _reduce(jnp.square(_prediction(v, t, xt, cond) - target), reduction)


def fm_loss(v, path, key, x1, marginal, *, x0=None, t=None, time_sampler=None, reduction="mean"):
    """Flow Matching loss against the exact marginal field of ``marginal``.

    ``x_t`` is drawn exactly as in :func:`cfm_loss` (so ``x1`` must be samples of
    ``marginal``); the target is ``marginal.velocity(path, x_t, t)`` instead of the
    conditional one. Supports ``(B, D)`` data (the marginals are written for vectors).
    """
    _check(x1, reduction)
    x0, t, _ = _draw(path, key, x1, x0, t, time_sampler)
    xt = path.interpolate(x0, x1, t)
    target = jax.lax.stop_gradient(marginal.velocity(path, xt, t))
    return _reduce(jnp.square(_prediction(v, t, xt) - target), reduction)


def _bridge_terms(v, s, path, key, x1, x0, t, time_sampler, coupling, reduction, cond, caller):
    """One draw of ``(x0, t, coupling, z)`` as :func:`cfm_loss` makes it; the per-element
    squared errors of the flow (``v``) and of the weighted score (``s``), None if not given."""
    _check(x1, reduction)
    if not (getattr(path, "needs_noise", False) and hasattr(path, "score_target")):
        raise ValueError(
            f"{caller} trains the score of the noisy interpolant (fmjax.bridges, "
            f"fmjax.paths.get('sb_cfm', sigma=...)); got the path {path!r}."
        )
    if path.sigma <= 0:
        raise ValueError(f"{caller}: the bridge has no score with sigma = 0; got {path!r}.")
    if cond is not None:
        check_cond(cond, jnp.shape(x1)[0], caller)
    x0, t, kc = _draw(path, key, x1, x0, t, time_sampler, need_key=True)
    x0, x1 = _couple(coupling, kc, x0, x1, cond, caller)
    noise = _bridge_noise(path, key, x1, caller)
    xt, u = path.interpolate_and_target(x0, x1, t, noise)
    flow = None if v is None else jnp.square(_prediction(v, t, xt, cond) - u)
    # lambda_t (s - score_target) = sigma_t s + z: no division by sigma_t
    lam = path.noise_std(jnp.reshape(t, (-1,) + (1,) * (x1.ndim - 1)))
    score = None if s is None else jnp.square(lam * _prediction(s, t, xt, cond) + noise)
    return flow, score


def score_loss(
    s,
    path,
    key,
    x1,
    *,
    x0=None,
    t=None,
    time_sampler=None,
    coupling=None,
    reduction="mean",
    cond=None,
):
    """Score matching on the noisy interpolant (the score half of [SF]2M, Tong et al. 2024):

        E || lambda_t (s(t, x_t) - grad log p_t(x_t | x0, x1)) ||^2 = E || sigma_t s + z ||^2

    with ``lambda_t = sigma_t = sigma sqrt(t (1 - t))``, the bridge's std: the weighted
    target ``-z`` is a standard normal at every t, and the minimiser is the marginal score
    ``grad log p_t`` (the loss is denoising score matching). [SF]2M writes the weight as
    ``2 sigma_t / sigma^2`` and folds ``sigma^2 / 2`` into its network (which then outputs
    ``sigma^2 / 2 * score``, the SDE's extra drift for ``g = sigma``); here ``s`` is the score
    itself, as :func:`fmjax.sample_sde` takes it, with the same time weighting up to the
    constant ``(2 / sigma^2)^2``.

    Args:
      s: the score model ``s(t, x)`` (or ``s(t, x, cond)``) being trained.
      path: the noisy interpolant :class:`fmjax.bridges.SchrodingerBridge` with ``sigma > 0``.
      key, x1, x0, t, time_sampler, coupling, reduction, cond: as :func:`cfm_loss`, with
        the same draws from ``key``: with the same arguments, :func:`cfm_loss` and this loss
        see the same ``x_t`` (t lies in the bridge's ``t_range``, away from the singular ends).
    """
    _, score = _bridge_terms(
        None, s, path, key, x1, x0, t, time_sampler, coupling, reduction, cond, "score_loss"
    )
    return _reduce(score, reduction)


def sf2m_loss(
    v,
    s,
    path,
    key,
    x1,
    *,
    x0=None,
    t=None,
    time_sampler=None,
    coupling=None,
    reduction="mean",
    cond=None,
    score_weight: float = 1.0,
):
    """[SF]2M's joint loss: :func:`cfm_loss` of the velocity ``v`` plus ``score_weight`` times
    :func:`score_loss` of the score ``s``, both on one draw of ``(x0, t, coupling, z)`` (one
    coupling solve). Returns ``(loss, {"flow_loss": ..., "score_loss": ...})``; with
    ``reduction='none'`` all three are per example. Arguments as :func:`score_loss`.
    """
    flow, score = _bridge_terms(
        v, s, path, key, x1, x0, t, time_sampler, coupling, reduction, cond, "sf2m_loss"
    )
    flow, score = _reduce(flow, reduction), _reduce(score, reduction)
    return flow + score_weight * score, {"flow_loss": flow, "score_loss": score}
