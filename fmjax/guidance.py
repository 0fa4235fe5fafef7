"""Conditional vector fields: fixing each example's condition, and classifier-free guidance.

:func:`conditional` turns ``v(t, x, cond)`` with a batch of conditions into the ``v(t, x)``
that :func:`fmjax.sample` and :func:`fmjax.log_likelihood` take. Both also take the
conditional field itself with ``cond=``, which sends each row's condition with it through a
mesh and through per-example step control (``sample(per_example=True)``).

A conditional field ``v(t, x, cond)`` trained with the condition sometimes replaced by a null
condition (class dropout: Ho & Salimans 2022; for flow matching, Zheng et al. 2023, "Guided
Flows") gives both ``v(t, x, cond)`` and ``v(t, x, null)``. The guided field with weight ``w``
is their affine combination

    v_w(t, x) = v(t, x, null) + w * (v(t, x, cond) - v(t, x, null))
              = (1 - w) * v_uncond + w * v_cond:

``w = 1`` is the conditional field, ``w = 0`` the unconditional one, ``w > 1`` guides
(sharper, less diverse samples). The weights sum to one and every conversion of an affine
path (:func:`fmjax.predictions.convert`) is affine in the prediction with an ``x`` term that does
not depend on it, so guiding the velocity, the x1-, eps- or score-prediction all give the same
field. The result is an ordinary ``v(t, x)`` for :func:`fmjax.sample`; it is not the flow of
a normalised density, so :func:`fmjax.log_likelihood` of it is not a likelihood.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fmjax import checks
from fmjax._field import as_field
from fmjax.batching import check_cond

__all__ = ["classifier_free", "conditional"]


_ONE_ROW_HINT = (
    " fmjax.sample(per_example=True) calls the field on one row at a time: give the "
    "conditions to the solve instead, fmjax.sample(v, x0, cond=cond, per_example=True) with "
    "the conditional v itself or classifier_free(v, None, null_cond, scale), so that they go "
    "row by row with x."
)


def _leading(cond, batch: int, where: str):
    check_cond(cond, batch, where, _ONE_ROW_HINT if batch == 1 else "")


def _broadcast_null(c, n):
    dtype = jnp.result_type(c)
    if isinstance(n, (jax.Array, jax.core.Tracer)):
        return jnp.broadcast_to(n.astype(dtype), jnp.shape(c))
    # a host value stays a NumPy array: a replicated input on any mesh, in any process
    return np.broadcast_to(np.asarray(n, dtype), jnp.shape(c))


def _null_like(null, cond):
    """``null`` broadcast to cond's structure and shapes (one example's null or a batch)."""
    try:
        return jax.tree_util.tree_map(_broadcast_null, cond, null)
    except (ValueError, OverflowError) as e:
        raise ValueError(
            "null_cond must have cond's tree structure, with arrays that broadcast to cond's "
            "(one example's null condition, e.g. the null class id, or one per example); got "
            f"cond shapes {jax.tree_util.tree_map(jnp.shape, cond)} and null_cond "
            f"{jax.tree_util.tree_map(jnp.shape, null)}: {e}"
        ) from e


def _scale_like(scale, x):
    scale = jnp.asarray(scale, x.dtype)
    if scale.ndim == 0:
        return scale
    if scale.shape != (x.shape[0],):
        raise ValueError(
            f"classifier_free: scale must be a scalar or one weight per example, shape "
            f"({x.shape[0]},); got shape {scale.shape}."
            + (
                " fmjax.sample(per_example=True) calls the field on one row at a time: "
                "per-example weights need the batch-wide step control (the default)."
                if x.shape[0] == 1
                else ""
            )
        )
    return scale.reshape((-1,) + (1,) * (x.ndim - 1))


def _interleave(a, b):
    return jnp.stack([a, b], axis=1).reshape((2 * a.shape[0], *a.shape[1:]))


def _guided(v, cond, null, scale, t, x, *, batched=True):
    batch = x.shape[0]
    _leading(cond, batch, "classifier_free")  # null: already broadcast to cond's shapes
    w = _scale_like(scale, x)
    if batched:
        # one call of v on 2B rows, interleaved (x[0] | cond[0], x[0] | null, x[1] | cond[1],
        # ...): rows 2i and 2i + 1 stay on the device of row i of a batch sharded over a mesh
        both = jax.tree_util.tree_map(lambda c, n: _interleave(c, n), cond, null)
        out = v(jnp.repeat(t, 2, axis=0), jnp.repeat(x, 2, axis=0), both)
        if jnp.shape(out) != (2 * batch, *x.shape[1:]):
            raise ValueError(
                f"classifier_free: v(t, x, cond) on the doubled batch must return x's shape "
                f"with {2 * batch} rows, {(2 * batch, *x.shape[1:])}; got shape "
                f"{jnp.shape(out)}."
            )
        out = out.reshape((batch, 2, *x.shape[1:]))
        v_cond, v_uncond = out[:, 0], out[:, 1]
    else:  # two calls of B rows: half the peak memory
        v_cond, v_uncond = v(t, x, cond), v(t, x, null)
    return v_uncond + w * (v_cond - v_uncond)


def _guided_in_two_calls(v, cond, null, scale, t, x):
    return _guided(v, cond, null, scale, t, x, batched=False)


def _guided_given(v, null_cond, scale, t, x, cond):
    return _guided(v, cond, _null_like(null_cond, cond), scale, t, x)


def _guided_given_in_two_calls(v, null_cond, scale, t, x, cond):
    return _guided(v, cond, _null_like(null_cond, cond), scale, t, x, batched=False)


def _unconditional_given(v, null_cond, t, x, cond):
    return v(t, x, _null_like(null_cond, cond))


def _conditional(v, cond, t, x):
    _leading(cond, x.shape[0], "conditional field")
    return v(t, x, cond)


def conditional(v, cond):
    """``v(t, x, cond)`` with each example's condition fixed: the ``v(t, x)`` that
    :func:`fmjax.sample` and :func:`fmjax.log_likelihood` take (class labels, or context
    vectors such as the observations of simulation-based inference: the flow then samples and
    scores ``p(x | cond)``). A ``jax.tree_util.Partial``: ``cond`` and ``v``'s arrays stay
    runtime arguments. ``cond``: an array or pytree of arrays with leading size ``B``,
    checked against x's batch when the field is called."""
    if not callable(v):
        raise ValueError(f"v must be a callable v(t, x, cond); got {type(v).__name__}.")
    v = as_field(v)
    return jax.tree_util.Partial(_conditional, v, cond)


def classifier_free(v, cond, null_cond, scale, *, batched: bool = True):
    """The guided field ``v_w(t, x) = v(t, x, null) + w (v(t, x, cond) - v(t, x, null))``.

    Args:
      v: a conditional field ``v(t, x, cond)`` on a batch (``t`` of shape ``(B,)``, ``x`` of
        shape ``(B, *event_shape)``, returning x's shape), e.g.
        ``jax.tree_util.Partial(apply_fn, params)`` with ``apply_fn(params, t, x, y)``.
      cond: the condition of each example: an array (class ids of shape ``(B,)``, embeddings
        ``(B, d)``) or a pytree of arrays with leading size ``B``. ``None``: the result is
        the guided conditional field ``v_w(t, x, cond)``, for ``fmjax.sample(v_w, x0,
        cond=cond)``, which sends each row's condition with it, also with
        ``per_example=True``.
      null_cond: the null condition the model was trained with (e.g. the null class id
        ``num_classes``): one example's, broadcast to every row, or one per example; same
        tree structure as ``cond`` and cast to its dtypes (with ``cond=None``: one
        example's, broadcast to the conditions the field is given).
      scale: the guidance weight ``w``: a number or a scalar array (1: conditional, 0:
        unconditional, > 1: guided), or one weight per example, shape ``(B,)``, to sweep
        weights in one solve.
      batched: evaluate the conditional and unconditional fields in one call of ``v`` on
        ``2B`` rows (default; each row of ``x`` twice in a row, with its condition and with
        the null one, so a batch sharded over a mesh stays where it is), or in two calls of
        ``B`` rows (half the activation memory). Both give the same field; one call saves
        a model call's fixed overhead per evaluation, which matters for a small model
        (``docs/benchmarks.md``).

    Returns:
      ``v_w(t, x)`` (``v_w(t, x, cond)`` for ``cond=None``) as a ``jax.tree_util.Partial``;
      ``cond``, ``null_cond``, ``scale`` and ``v``'s own arrays are runtime arguments, so a
      solve compiles once per shape whatever their values. For a Python number
      ``scale == 1`` it is ``v(t, x, cond)`` itself, and for ``scale == 0``
      ``v(t, x, null_cond)``: one evaluation per step, not two. ``cond``'s leading size is
      checked against ``x``'s batch when the field is first called, so a ``cond`` fixed here
      is refused with a clear error by ``fmjax.sample(per_example=True)``, which calls the
      field on one row at a time (give it to the solve instead, as above).

    Raises:
      ValueError: ``v`` not callable, a bool, string or non-finite ``scale``, a ``null_cond``
        that does not broadcast to ``cond`` (with ``cond=None``: when called), or (when
        called) a ``cond`` or per-example ``scale`` whose leading size is not x's batch.
    """
    if not callable(v):
        raise ValueError(f"v must be a callable v(t, x, cond); got {type(v).__name__}.")
    if not isinstance(batched, bool):
        raise ValueError(f"batched must be True or False; got {batched!r}.")
    v = as_field(v)
    if cond is not None:
        null = _null_like(null_cond, cond)
    elif not jax.tree_util.tree_leaves(null_cond):
        raise ValueError(f"null_cond must be an array or a pytree of arrays; got {null_cond!r}.")
    if checks.traced(scale) or np.ndim(scale) > 0:  # (np: no warning for None or a str)
        dtype = jnp.result_type(scale)
        if not (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)):
            raise ValueError(f"scale must hold real numbers; got dtype {dtype}.")
        if not checks.traced(scale) and not bool(jnp.all(jnp.isfinite(scale))):
            raise ValueError(f"scale must be finite; got {scale!r}.")
    else:
        w = checks.real(scale, "scale (the guidance weight w)")
        if isinstance(scale, (int, float)):
            if w == 1.0:
                return v if cond is None else conditional(v, cond)
            if w == 0.0:
                if cond is None:
                    return jax.tree_util.Partial(_unconditional_given, v, null_cond)
                return conditional(v, null)
    if cond is None:
        return jax.tree_util.Partial(
            _guided_given if batched else _guided_given_in_two_calls, v, null_cond, scale
        )
    return jax.tree_util.Partial(_guided if batched else _guided_in_two_calls, v, cond, null, scale)
