"""Couplings of a batch of source samples x0 with a batch of data x1.

A coupling is a function ``coupling(key, x0, x1) -> (x0', x1')`` returning paired batches of
the same shapes. :func:`independent` keeps the pairing as drawn (the paper's CFM);
:func:`minibatch_ot` re-pairs within the batch by optimal transport for the squared Euclidean
cost (multisample flow matching, Pooladian et al. 2023; OT-CFM, Tong et al. 2023), either
exactly (Hungarian assignment through scipy, a host callback: jittable but synchronous) or
with entropic Sinkhorn in pure JAX (device-side, then one x0 drawn per x1 from the plan).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import logsumexp

from fmjax._checks import traced

__all__ = [
    "COUPLINGS",
    "exact_ot_assignment",
    "get",
    "independent",
    "minibatch_ot",
    "sinkhorn_plan",
]


def _check_pair(x0, x1):
    if jnp.shape(x0) != jnp.shape(x1) or jnp.ndim(x0) < 2:
        raise ValueError(
            "x0 and x1 must be batches of the same shape (batch, *event_shape); got "
            f"{jnp.shape(x0)} and {jnp.shape(x1)}."
        )


def independent(key, x0, x1):
    """The independent coupling q(x1) p(x0): returns the pair unchanged."""
    del key
    _check_pair(x0, x1)
    return x0, x1


def _sq_cost(x0, x1):
    a = x0.reshape(x0.shape[0], -1)
    b = x1.reshape(x1.shape[0], -1)
    return jnp.sum(a * a, 1)[:, None] + jnp.sum(b * b, 1)[None, :] - 2.0 * a @ b.T


def _check_finite_cost(cost, method: str) -> None:
    """Raise if a concrete (host or eager) cost matrix holds NaN or inf."""
    cost = np.asarray(cost)
    if not np.all(np.isfinite(cost)):
        raise ValueError(
            f"{method} OT coupling: the squared-distance cost has non-finite entries, so x0 "
            f"or x1 holds NaN or inf ({np.sum(~np.isfinite(cost))} of {cost.size} costs); no "
            "pairing is optimal."
        )


def _lsa_host(cost):
    from scipy.optimize import linear_sum_assignment

    cost = np.asarray(cost, dtype=np.float64)
    _check_finite_cost(cost, "exact")
    rows, cols = linear_sum_assignment(cost)
    perm = np.empty(cost.shape[1], dtype=np.int32)
    perm[cols] = rows
    return perm


def exact_ot_assignment(x0, x1):
    """Permutation ``perm`` minimising ``sum_j ||x0[perm[j]] - x1[j]||^2`` (Hungarian).

    The permutation is piecewise constant in x0 and x1, so it has no gradient: the cost is
    passed to the host under ``stop_gradient``, and ``grad`` through ``x0[perm]`` holds the
    pairing fixed. Called eagerly on concrete arrays, the assignment runs directly on the host
    (no callback) and non-finite data raise a plain ``ValueError``; under a transformation the
    same message arrives inside JAX's callback error."""
    cost = jax.lax.stop_gradient(_sq_cost(x0, x1))
    if not traced(cost):
        return jnp.asarray(_lsa_host(cost))
    out = jax.ShapeDtypeStruct((x1.shape[0],), jnp.int32)
    return jax.pure_callback(_lsa_host, out, cost, vmap_method="sequential")


def sinkhorn_plan(x0, x1, *, reg=0.05, num_iters=200):
    """Entropic OT plan (B, B) with uniform marginals, log-domain Sinkhorn (``lax.scan``).

    ``reg`` is relative to the mean squared cost, so it is scale-free.
    """
    cost = _sq_cost(x0, x1)
    eps = reg * jnp.maximum(jnp.mean(cost), 1e-12)
    n, m = cost.shape
    log_a = jnp.full((n,), -jnp.log(n))
    log_b = jnp.full((m,), -jnp.log(m))

    def body(carry, _):
        f, g = carry
        f = eps * (log_a - logsumexp((g[None, :] - cost) / eps, axis=1))
        g = eps * (log_b - logsumexp((f[:, None] - cost) / eps, axis=0))
        return (f, g), None

    (f, g), _ = jax.lax.scan(body, (jnp.zeros(n), jnp.zeros(m)), None, length=num_iters)
    return jnp.exp((f[:, None] + g[None, :] - cost) / eps)


def minibatch_ot(key, x0, x1, *, method="exact", reg=0.05, num_iters=200):
    """Re-pair x0 with x1 by minibatch optimal transport (squared Euclidean cost).

    method='exact' returns a permutation of x0 (each x0 used once); method='sinkhorn' draws,
    for every x1, one x0 from the row of the entropic plan (with replacement, as OT-CFM).
    NaN or inf in x0 or x1 raise a ``ValueError`` when called eagerly; under ``jit`` the exact
    method raises the same message from its host callback and Sinkhorn returns NaN pairs.
    """
    _check_pair(x0, x1)
    if method == "exact":
        return x0[exact_ot_assignment(x0, x1)], x1
    if method == "sinkhorn":
        # only integer indices come out of the plan: no gradient through the iterations
        x0_, x1_ = jax.lax.stop_gradient(x0), jax.lax.stop_gradient(x1)
        plan = sinkhorn_plan(x0_, x1_, reg=reg, num_iters=num_iters)
        finite = jnp.all(jnp.isfinite(plan))
        if not traced(finite) and not bool(finite):
            _check_finite_cost(_sq_cost(x0_, x1_), "Sinkhorn")  # eager: say why
        idx = jax.random.categorical(key, jnp.log(plan.T + 1e-30), axis=1)
        # a NaN plan (non-finite data under jit) would give one arbitrary x0 for every x1:
        # pass the NaN on to the pairs, and so to the loss, instead
        return jnp.where(finite, x0[idx], jnp.nan), x1
    raise ValueError(f"method must be 'exact' or 'sinkhorn'; got {method!r}.")


#: Couplings by name, as ``cfm_loss(coupling=...)`` accepts them.
COUPLINGS = {
    "independent": independent,
    "ot": functools.partial(minibatch_ot, method="exact"),
    "ot_sinkhorn": functools.partial(minibatch_ot, method="sinkhorn"),
}


def get(name: str):
    """Coupling by name: 'independent', 'ot' (exact) or 'ot_sinkhorn'."""
    if name not in COUPLINGS:
        raise ValueError(f"unknown coupling {name!r}; known couplings: {sorted(COUPLINGS)}.")
    return COUPLINGS[name]
