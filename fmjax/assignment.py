"""Optimal assignment on the host: the exact solvers behind :mod:`fmjax.couplings`.

The exact minibatch OT coupling is a linear assignment problem on the squared-distance cost
of a batch. Two solvers give the same optimum at different speeds: POT's network simplex
(``ot.emd``, run to optimality; for uniform marginals its plan is a permutation) and scipy's
``linear_sum_assignment`` (shortest augmenting path). :func:`assignment` solves one cost
matrix (one per class with integer labels); :func:`exact_ot_permutation` pairs two NumPy
batches with no JAX call, for host input pipelines (:mod:`fmjax.data.pairing`).
Conditions are class labels ``(B,)`` (pairs only within a class) or float context vectors
``(B, ...)`` (added to the cost): :func:`is_labels` and :func:`check_cond` tell them apart.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

__all__ = [
    "EXACT_SOLVERS",
    "SIMPLEX_MAX_DIM",
    "assignment",
    "check_cond",
    "check_finite_cost",
    "exact_ot_permutation",
    "is_labels",
    "resolve_solver",
]

#: The host solvers of the exact method: POT's network simplex, scipy's Hungarian
#: (shortest augmenting path), or ``"auto"``: network simplex for events of at most
#: :data:`SIMPLEX_MAX_DIM` numbers (it is several times faster on low-dimensional costs),
#: Hungarian above (faster on image-sized events). Both return an optimal permutation.
EXACT_SOLVERS = ("auto", "network_simplex", "hungarian")

#: ``solver="auto"`` uses the network simplex up to this many numbers per event.
SIMPLEX_MAX_DIM = 64


def is_labels(cond) -> bool:
    """Whether ``cond`` is integer class labels of shape ``(B,)`` (else float contexts)."""
    return jnp.ndim(cond) == 1 and jnp.issubdtype(jnp.result_type(cond), jnp.integer)


def check_cond(cond, batch: int, cond_weight) -> None:
    """Raise ValueError unless ``cond`` is labels ``(batch,)`` (with ``cond_weight`` None) or
    float contexts ``(batch, ...)``."""
    shape = jnp.shape(cond)
    dtype = jnp.result_type(cond)
    if not shape or shape[0] != batch:
        raise ValueError(
            f"cond must have the batch's leading size {batch} (labels (B,) or context vectors "
            f"(B, ...)); got shape {shape}."
        )
    if is_labels(cond):
        if cond_weight is not None:
            raise ValueError(
                "cond_weight applies to float context vectors; integer class labels pair "
                f"only within each class. Got labels of dtype {dtype} and "
                f"cond_weight={cond_weight!r}."
            )
    elif not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(
            "cond must be integer class labels of shape (B,) or float context vectors of shape "
            f"(B, ...); got dtype {dtype} and shape {shape}."
        )


def check_finite_cost(cost, method: str) -> None:
    """Raise ValueError if a concrete (host or eager) cost matrix holds NaN or inf."""
    cost = np.asarray(cost)
    if not np.all(np.isfinite(cost)):
        raise ValueError(
            f"{method} OT coupling: the squared-distance cost has non-finite entries, so x0 "
            f"or x1 holds NaN or inf ({np.sum(~np.isfinite(cost))} of {cost.size} costs); no "
            "pairing is optimal."
        )


def _hungarian(cost):
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(cost)
    perm = np.empty(cost.shape[1], dtype=np.int32)
    perm[cols] = rows
    return perm


def _network_simplex(cost):
    import ot  # POT, imported on first use

    # uniform marginals: the simplex ends at a vertex of the Birkhoff polytope, a permutation
    plan, log = ot.emd([], [], cost, numItermax=2**31 - 1, log=True)
    if log["result_code"] != 1:  # not optimal (iteration limit or numerical trouble)
        return _hungarian(cost)
    return np.argmax(plan, axis=0).astype(np.int32)


def _assign(cost, solver):
    """``perm`` with ``perm[j]`` the row paired with column ``j`` (optimal assignment)."""
    if len(cost) == 1:
        return np.zeros(1, np.int32)
    return _network_simplex(cost) if solver == "network_simplex" else _hungarian(cost)


def resolve_solver(solver: str, event_size: int) -> str:
    """The solver ``solver`` names for events of ``event_size`` numbers (``"auto"``: by
    :data:`SIMPLEX_MAX_DIM`); raises ValueError for a name not in :data:`EXACT_SOLVERS`."""
    if solver not in EXACT_SOLVERS:
        raise ValueError(f"solver must be one of {EXACT_SOLVERS}; got {solver!r}.")
    if solver == "auto":
        return "network_simplex" if event_size <= SIMPLEX_MAX_DIM else "hungarian"
    return solver


def assignment(cost, labels=None, *, solver: str = "hungarian") -> np.ndarray:
    """``perm`` with ``perm[j]`` the row of ``cost`` paired with column ``j`` in an optimal
    assignment; with integer ``labels``, one assignment per class (``labels[perm[j]] ==
    labels[j]``). ``solver``: ``"network_simplex"`` or ``"hungarian"`` (see
    :func:`resolve_solver`). Non-finite costs raise ValueError."""
    cost = np.asarray(cost, dtype=np.float64)
    check_finite_cost(cost, "exact")
    if labels is None:
        return _assign(cost, solver)
    labels = np.asarray(labels)
    perm = np.empty(cost.shape[1], dtype=np.int32)
    for label in np.unique(labels):  # one assignment per class: smaller and exact
        idx = np.flatnonzero(labels == label)
        perm[idx] = idx[_assign(cost[np.ix_(idx, idx)], solver)]
    return perm


def exact_ot_permutation(
    x0: np.ndarray,
    x1: np.ndarray,
    cond: np.ndarray | None = None,
    cond_weight: float = 1.0,
    *,
    solver: str = "auto",
) -> np.ndarray:
    """:func:`fmjax.couplings.exact_ot_assignment` on NumPy arrays, on the host, with no
    JAX call.

    For input pipelines (e.g. grain transforms in reader threads) that pair each batch while
    the device computes the previous step. Same permutation as the jitted coupling
    (``perm[j]``: the source row given to data row ``j``; integer labels ``cond`` pair only
    within a class; float contexts add ``cond_weight * ||c_i - c_j||^2``)."""
    x0, x1 = np.asarray(x0), np.asarray(x1)
    if x0.shape != x1.shape or x0.ndim < 2:
        raise ValueError(
            "x0 and x1 must be batches of the same shape (batch, *event_shape); got "
            f"{x0.shape} and {x1.shape}."
        )
    solver = resolve_solver(solver, int(np.prod(x0.shape[1:])))
    a = x0.reshape(len(x0), -1).astype(np.float64)
    b = x1.reshape(len(x1), -1).astype(np.float64)
    cost = np.sum(a * a, 1)[:, None] + np.sum(b * b, 1)[None, :] - 2.0 * a @ b.T
    labels = None
    if cond is not None:
        cond = np.asarray(cond)
        check_cond(cond, len(x1), None if is_labels(cond) else cond_weight)
        if is_labels(cond):
            labels = cond
        else:
            c = cond.reshape(len(cond), -1).astype(np.float64)
            cost += cond_weight * (
                np.sum(c * c, 1)[:, None] + np.sum(c * c, 1)[None, :] - 2.0 * c @ c.T
            )
    return assignment(cost, labels, solver=solver)
