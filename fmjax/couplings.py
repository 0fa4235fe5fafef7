"""Couplings of a batch of source samples x0 with a batch of data x1.

A coupling is a function ``coupling(key, x0, x1) -> (x0', x1')`` returning paired batches of
the same shapes. :func:`independent` keeps the pairing as drawn (the paper's CFM);
:func:`minibatch_ot` re-pairs within the batch by optimal transport for the squared Euclidean
cost (multisample flow matching, Pooladian et al. 2023; OT-CFM, Tong et al. 2023). Both of its
methods return ``x0`` permuted, so every source sample is used exactly once:

- ``method="exact"``: the optimal assignment, solved on the host through a callback (jittable
  but synchronous): POT's network simplex (``ot.emd``, run to optimality) or scipy's
  ``linear_sum_assignment`` (``solver=``; ``"auto"`` takes the one measured faster for the
  data's dimension, see docs/benchmarks.md);
- ``method="sinkhorn"``: an entropic plan from ott-jax's Sinkhorn solver on the device,
  rounded to a permutation by :func:`round_to_permutation` (no duplicated or dropped points,
  unlike drawing one x0 per x1 from the plan).

With a condition per data point (``cond``), the pairing respects it: integer class labels of
shape ``(B,)`` pair only within a class (each ``x0[i]`` is drawn for ``x1[i]``, so it carries
``cond[i]``, and the permutation never moves a source sample to another class); float context
vectors ``(B, ...)`` add ``cond_weight * ||c_i - c_j||^2`` to the cost (condition-aware OT, as
C²OT), so pairs with distant contexts are avoided in proportion.

The pairing is over the whole batch the function is given: under ``jax.jit`` on a batch
sharded over a device mesh, that is the global batch (the same permutation as on one device).
:func:`exact_ot_permutation` is the same exact pairing on NumPy arrays, for host input
pipelines that pair while the device trains (``fmjax.data.images``); it and the exact solvers
live in :mod:`fmjax.assignment` and are re-exported here.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from fmjax.assignment import (
    EXACT_SOLVERS,
    assignment,
    check_cond,
    check_finite_cost,
    exact_ot_permutation,
    is_labels,
    resolve_solver,
)
from fmjax.checks import real, traced

__all__ = [
    "COUPLINGS",
    "METHODS",
    "EXACT_SOLVERS",
    "entropic_ot",
    "exact_ot_assignment",
    "exact_ot_permutation",
    "get",
    "independent",
    "minibatch_ot",
    "ot_cost_matrix",
    "pairing",
    "round_to_permutation",
    "sinkhorn_plan",
    "sinkhorn_scores",
]

#: The methods of :func:`minibatch_ot`.
METHODS = ("exact", "sinkhorn")


def _check_pair(x0, x1):
    if jnp.shape(x0) != jnp.shape(x1) or jnp.ndim(x0) < 2:
        raise ValueError(
            "x0 and x1 must be batches of the same shape (batch, *event_shape); got "
            f"{jnp.shape(x0)} and {jnp.shape(x1)}."
        )


def independent(key, x0, x1, *, cond=None):
    """The independent coupling q(x1) p(x0): returns the pair unchanged (``cond`` ignored)."""
    del key, cond
    _check_pair(x0, x1)
    return x0, x1


def _sq_dist(a, b):
    a = a.reshape(a.shape[0], -1)
    b = b.reshape(b.shape[0], -1)
    return jnp.sum(a * a, 1)[:, None] + jnp.sum(b * b, 1)[None, :] - 2.0 * a @ b.T


def ot_cost_matrix(x0, x1, cond=None, cond_weight: float = 1.0):
    """The pairing cost ``C[i, j]`` of source ``x0[i]`` with data ``x1[j]``.

    ``||x0_i - x1_j||^2``, plus ``cond_weight * ||c_i - c_j||^2`` for float context vectors
    ``cond`` (source sample ``i`` carries the context of the row it was drawn for). Integer
    labels do not enter the cost: they restrict the pairing instead (see :func:`minibatch_ot`).
    """
    cost = _sq_dist(x0, x1)
    if cond is not None and not is_labels(cond):
        c = jnp.asarray(cond, cost.dtype)
        cost = cost + cond_weight * _sq_dist(c, c)
    return cost


def exact_ot_assignment(x0, x1, cond=None, cond_weight: float = 1.0, *, solver: str = "auto"):
    """Permutation ``perm`` minimising ``sum_j C[perm[j], j]`` for the cost of
    :func:`ot_cost_matrix`; with integer labels ``cond``, ``cond[perm[j]] == cond[j]``.
    ``solver``: one of :data:`fmjax.assignment.EXACT_SOLVERS` (the optimum is the same; the
    time is not).

    The permutation is piecewise constant in x0 and x1, so it has no gradient: the cost is
    passed to the host under ``stop_gradient``, and ``grad`` through ``x0[perm]`` holds the
    pairing fixed. Called eagerly on concrete arrays, the assignment runs directly on the host
    (no callback) and non-finite data raise a plain ``ValueError``; under a transformation the
    same message arrives inside JAX's callback error."""
    host = functools.partial(assignment, solver=resolve_solver(solver, _event_size(x1)))
    cost = jax.lax.stop_gradient(ot_cost_matrix(x0, x1, cond, cond_weight))
    labels = cond if cond is not None and is_labels(cond) else None
    args = (cost,) if labels is None else (cost, labels)
    if not traced(*args):
        return jnp.asarray(host(*args))
    out = jax.ShapeDtypeStruct((x1.shape[0],), jnp.int32)
    return jax.pure_callback(host, out, *args, vmap_method="sequential")


def _event_size(x) -> int:
    return int(np.prod(jnp.shape(x)[1:]))


def sinkhorn_scores(
    cost,
    *,
    reg: float = 0.05,
    num_iters: int = 2000,
    threshold: float = 1e-3,
    relative: bool = True,
):
    """``log P`` of the entropic OT plan ``P`` (uniform marginals) for ``cost``, from ott-jax.

    ``reg`` is the entropic regularisation relative to the mean cost (scale-free), or with
    ``relative=False`` the regularisation epsilon itself, in the cost's units. Returned in
    the log domain, ``(f_i + g_j - C_ij) / eps``, so entries stay finite where ``P``
    underflows; the Sinkhorn iterations stop at ``threshold`` (marginal error) or
    ``num_iters``."""
    # ott-jax is imported on first use: it imports Flax, which the core does not
    from ott.geometry import geometry
    from ott.solvers import linear

    scale = "mean" if relative else 1.0
    geom = geometry.Geometry(cost_matrix=cost, epsilon=reg, scale_cost=scale)
    out = linear.solve(geom, threshold=threshold, max_iterations=num_iters)
    return (out.f[:, None] + out.g[None, :] - geom.cost_matrix) / geom.epsilon


def sinkhorn_plan(x0, x1, *, reg: float = 0.05, num_iters: int = 2000, threshold: float = 1e-3):
    """Entropic OT plan ``(B, B)`` of x0 and x1 with uniform marginals (ott-jax Sinkhorn).

    ``reg`` is relative to the mean squared cost, so it is scale-free."""
    cost = ot_cost_matrix(x0, x1)
    return jnp.exp(sinkhorn_scores(cost, reg=reg, num_iters=num_iters, threshold=threshold))


def round_to_permutation(scores, allowed=None):
    """A permutation ``perm`` (``perm[j]``: the row given to column ``j``) that follows
    ``scores`` greedily: in each round every open column proposes to its best free row, and
    each row takes its best proposal (ties to the lowest column). The globally best open pair
    always wins, so it ends within ``B`` rounds; on a near-permutation plan it takes a few.

    ``allowed[i, j]`` False forbids a pair; every column must keep an allowed row free until
    it is served (true for the class blocks of :func:`minibatch_ot`). Runs on the device.
    """
    n = scores.shape[0]
    floor = jnp.finfo(scores.dtype).min / 4  # NaN or -inf scores rank last but stay usable
    scores = jnp.where(jnp.isnan(scores), floor, jnp.maximum(scores, floor))
    if allowed is not None:
        scores = jnp.where(allowed, scores, -jnp.inf)
    cols = jnp.arange(n)

    def round_(state):
        row_of_col, taken, i = state
        open_ = row_of_col < 0
        s = jnp.where(taken[:, None] | ~open_[None, :], -jnp.inf, scores)
        prop = jnp.argmax(s, axis=0)
        score = s[prop, cols]
        ok = open_ & (score > -jnp.inf)
        best = jnp.full(n, -jnp.inf, scores.dtype).at[prop].max(jnp.where(ok, score, -jnp.inf))
        cand = ok & (score == best[prop])
        first = jnp.full(n, n).at[prop].min(jnp.where(cand, cols, n))
        win = cand & (first[prop] == cols)
        row_of_col = jnp.where(win, prop, row_of_col)
        taken = taken.at[jnp.where(win, prop, n)].set(True, mode="drop")
        return row_of_col, taken, i + 1

    def not_done(state):
        return jnp.any(state[0] < 0) & (state[2] < n)

    init = (jnp.full(n, -1), jnp.zeros(n, bool), 0)
    return jax.lax.while_loop(not_done, round_, init)[0]


def minibatch_ot(
    key,
    x0,
    x1,
    *,
    method: str = "exact",
    cond=None,
    cond_weight: float | None = None,
    solver: str = "auto",
    reg: float = 0.01,
    num_iters: int = 2000,
    threshold: float = 1e-3,
):
    """Re-pair x0 with x1 by minibatch optimal transport; returns ``(x0[perm], x1)``.

    Args:
      key: unused (both methods are deterministic); kept so every coupling has one signature.
      x0, x1: batches of the same shape ``(B, *event_shape)``.
      method: 'exact' (the optimal permutation, Hungarian on the host) or 'sinkhorn' (ott-jax's
        entropic plan on the device rounded to a permutation: approximate, for large batches).
      cond: the condition of each data point: integer labels ``(B,)`` pair only within a class;
        float context vectors ``(B, ...)`` add ``cond_weight * ||c_i - c_j||^2`` to the cost.
      cond_weight: the weight of the context cost (default 1; only for float contexts).
      solver: the exact method's host solver, one of :data:`fmjax.assignment.EXACT_SOLVERS`.
      reg, num_iters, threshold: Sinkhorn's regularisation relative to the mean cost, its most
        iterations and its stopping tolerance on the marginals.

    NaN or inf in x0 or x1 raise a ``ValueError`` when called eagerly; under ``jit`` the exact
    method raises the same message from its host callback and Sinkhorn returns NaN pairs.
    """
    _check_pair(x0, x1)
    if method not in METHODS:
        raise ValueError(f"method must be 'exact' or 'sinkhorn'; got {method!r}.")
    resolve_solver(solver, 1)
    if cond is not None:
        check_cond(cond, jnp.shape(x1)[0], cond_weight)
    weight = real(1.0 if cond_weight is None else cond_weight, "cond_weight", low=0.0)
    if method == "exact":
        return x0[exact_ot_assignment(x0, x1, cond, weight, solver=solver)], x1
    real(reg, "reg", low=0.0, low_open=True)
    x0_, x1_ = jax.lax.stop_gradient(x0), jax.lax.stop_gradient(x1)
    cost = ot_cost_matrix(x0_, x1_, cond, weight)
    finite = jnp.all(jnp.isfinite(cost))
    if not traced(finite) and not bool(finite):
        check_finite_cost(cost, "Sinkhorn")  # eager: say why
    scores = sinkhorn_scores(cost, reg=reg, num_iters=num_iters, threshold=threshold)
    allowed = None
    if cond is not None and is_labels(cond):
        allowed = cond[:, None] == cond[None, :]
    perm = round_to_permutation(scores, allowed)
    # non-finite data under jit: pass NaN on to the pairs (and so the loss), not a pairing
    return jnp.where(finite, x0[perm], jnp.nan), x1


def entropic_ot(
    key,
    x0,
    x1,
    *,
    epsilon: float,
    cond=None,
    num_iters: int = 2000,
    threshold: float = 1e-3,
):
    """Re-pair x0 with x1 by a draw from the entropic OT plan ``pi_epsilon`` of the batch;
    returns ``(x0[perm], x1)``: the coupling of Schrödinger-bridge CFM (Tong et al. 2024), whose
    plan with ``epsilon = 2 sigma^2`` is the static Schrödinger bridge of a Brownian motion of
    diffusion ``sigma`` (:class:`fmjax.bridges.SchrodingerBridge` builds it).

    ``epsilon`` is absolute (in the squared-distance cost's units, as in the paper), not
    relative to the mean cost as :func:`minibatch_ot`'s ``reg``. Each column ``j`` draws its
    row from ``P[:, j]`` by the Gumbel-max trick (``log P + Gumbel`` noise from ``key``), and
    the perturbed scores are rounded to a permutation by :func:`round_to_permutation`: where
    the draws of two columns collide, one takes its next-best row. So the pairs are random,
    as the plan says (rounding the plan itself would pick its mode: the deterministic OT
    assignment for small epsilon), and every source sample is used once (drawing rows
    independently duplicates and drops source points, torchcfm #142, so the batch's x0
    would no longer be N(0, I) draws). Integer labels ``cond`` restrict the pairs to a
    class, as in :func:`minibatch_ot`; float contexts are not supported here."""
    _check_pair(x0, x1)
    epsilon = real(epsilon, "epsilon", low=0.0, low_open=True)
    if key is None:
        raise ValueError("entropic_ot draws its pairs: it needs a PRNG key; got key=None.")
    allowed = None
    if cond is not None:
        check_cond(cond, jnp.shape(x1)[0], None)
        if not is_labels(cond):
            raise ValueError(
                "entropic_ot pairs within classes of integer labels (B,); got cond of "
                f"dtype {jnp.result_type(cond)} and shape {jnp.shape(cond)}."
            )
        allowed = cond[:, None] == cond[None, :]
    cost = ot_cost_matrix(jax.lax.stop_gradient(x0), jax.lax.stop_gradient(x1))
    scores = sinkhorn_scores(
        cost, reg=epsilon, num_iters=num_iters, threshold=threshold, relative=False
    )
    noise = jax.random.gumbel(key, scores.shape, scores.dtype)
    perm = round_to_permutation(scores + noise, allowed)
    return x0[perm], x1


def pairing(
    coupling: str | Callable = "ot",
    *,
    source: Callable | None = None,
    data: str = "x1",
    cond: str | None = None,
) -> Callable:
    """A batch transform ``prepare(key, batch) -> batch`` that draws source samples for
    ``batch[data]`` and pairs them with it by ``coupling``, adding them as ``batch["x0"]``
    (and storing the coupling's x1 as ``batch[data]``: the data as given for the couplings
    here, the flow's endpoints for :func:`fmjax.reflow.coupling`).

    For ``fmjax.train.make_train_step(prepare=...)``: it runs on the whole global batch before
    the batch is split over microbatches or devices, so the pairing is over the whole step's
    batch; the loss then uses ``cfm_loss(..., x0=batch["x0"])``.

    Args:
      coupling: a name from :data:`COUPLINGS` or a ``coupling(key, x0, x1[, cond=])``.
      source: ``source(key, shape, dtype)`` draws the source samples (e.g. a path's
        ``sample_source``); default N(0, I).
      data: the batch entry holding the data.
      cond: the batch entry holding each data point's condition (labels or context
        vectors), given to the coupling; None: unconditional pairing.
    """
    fn = get(coupling) if isinstance(coupling, str) else coupling
    draw = source or (lambda key, shape, dtype: jax.random.normal(key, shape, dtype))

    def prepare(key, batch):
        if data not in batch or (cond is not None and cond not in batch):
            want = [data] + ([cond] if cond is not None else [])
            raise ValueError(f"pairing: the batch must hold {want}; got keys {sorted(batch)}.")
        x1 = batch[data]
        k_draw, k_pair = jax.random.split(key)
        x0 = draw(k_draw, jnp.shape(x1), jnp.result_type(x1))
        kw = {} if cond is None else {"cond": batch[cond]}
        x0, x1 = fn(k_pair, x0, x1, **kw)  # x1 as given, but for fmjax.reflow's coupling
        return {**batch, data: x1, "x0": x0}

    return prepare


#: Couplings by name, as ``cfm_loss(coupling=...)`` accepts them.
COUPLINGS: dict[str, Callable] = {
    "independent": independent,
    "ot": functools.partial(minibatch_ot, method="exact"),
    "ot_sinkhorn": functools.partial(minibatch_ot, method="sinkhorn"),
}


def get(name: str) -> Callable:
    """Coupling by name: 'independent', 'ot' (exact) or 'ot_sinkhorn'."""
    if name not in COUPLINGS:
        raise ValueError(f"unknown coupling {name!r}; known couplings: {sorted(COUPLINGS)}.")
    return COUPLINGS[name]
