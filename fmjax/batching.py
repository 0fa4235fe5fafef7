"""Batches, meshes and conditions: the helpers that :func:`fmjax.sample`,
:func:`fmjax.log_likelihood`, the losses, guidance and the trainers share.

A batch is an array ``(B, *event_shape)``; a vector field is called on one as ``v(t, x)``
with ``t`` of shape ``(B,)`` (:func:`batch_time`), or ``v(t, x, cond)`` with a condition per
row (:func:`call_field`, :func:`check_cond`). A mesh with a ``"data"`` axis
(:data:`DATA_AXIS`) splits the rows of a batch over devices (:func:`place_batch`,
``mesh=`` of :func:`fmjax.sample`); build one with ``fmjax.train.sharding.make_mesh()`` or
``jax.make_mesh``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from fmjax import ode
from fmjax.checks import traced

__all__ = [
    "DATA_AXIS",
    "auto_axes",
    "auto_mesh",
    "batch_time",
    "call_field",
    "check_batch",
    "check_cond",
    "check_field_output",
    "check_rows_divisible",
    "place_batch",
    "place_cond",
]

#: The mesh axis over which batches are split (rows of ``x``, ``cond``, a training batch).
DATA_AXIS = "data"


def batch_time(t, x) -> jax.Array:
    """The scalar solver time as the ``(B,)`` vector that ``v(t, x)`` expects."""
    return jnp.full((x.shape[0],), t, dtype=x.dtype)


def call_field(v, t, x, cond):
    """``v(t, x)``, or ``v(t, x, cond)`` for a conditional field (``cond`` not None)."""
    return v(t, x) if cond is None else v(t, x, cond)


def check_field_output(dx, x, where: str = "") -> None:
    """At trace time: ``v(t, x)`` must return one array of x's shape, in floating point (a
    (B, 1) or (B,) output would otherwise broadcast against the state inside the solver,
    silently wrong). ``where`` is appended to the message (e.g. what x is in this solve)."""
    ode.check_derivative(dx, x, fn="v(t, x)", out="dx/dt", state="x", where=where)


def check_batch(x, name: str) -> None:
    """Raise a ValueError unless ``x`` is a non-empty floating-point batch
    ``(batch, *event_shape)``; ``name`` is the argument's name in the message."""
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


def check_cond(cond, batch: int, where: str, hint: str = "") -> None:
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


def place_cond(cond, mesh: Mesh | None):
    """``cond``'s leaves as arrays, each split over the ``"data"`` axis of ``mesh`` as the
    batch it conditions is (one row per example; ``mesh=None``: not moved)."""
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


def check_rows_divisible(x, mesh: Mesh, name: str) -> None:
    """Raise a ValueError unless ``x`` has a leading axis that splits evenly over the
    ``"data"`` axis of ``mesh``."""
    n = int(mesh.shape[DATA_AXIS])
    if jnp.ndim(x) < 1 or jnp.shape(x)[0] % n:
        raise ValueError(
            f"{name} (shape {jnp.shape(x)}) must have a leading batch axis divisible by the "
            f"{n} devices of the mesh's {DATA_AXIS!r} axis."
        )
