"""Vector fields as pytree callables: a jitted solve keys on the function and its structure
and takes the field's arrays as runtime arguments.

``jax.tree_util.Partial(model.apply, params)`` already is one. A callable that is itself a
pytree holding its weights (an Equinox module, a Flax NNX module) is split into its arrays
(the leaves of a ``Partial``) and the rest (its tree structure and non-array leaves, such as
activation functions, compared by value): a module with new weights reuses the compiled
solve instead of being compiled in as constants. A plain function is wrapped as is.
NumPy arrays among the leaves count as arrays (traced, as under ``equinox.filter_jit``): a
field that branches in Python on an array's values must keep it out of its leaves (e.g. in
a static field).
"""

from __future__ import annotations

import jax
import numpy as np

_ARRAY = object()  # marks the places of the arrays among a field's static leaves


def _is_array(leaf) -> bool:
    return isinstance(leaf, (jax.Array, np.ndarray, np.generic))


class _Rebuild:
    """``_Rebuild(treedef, statics)(arrays, *args)``: the field rebuilt from its arrays and
    its static leaves, called on ``args``. Equal and hashed by structure and static leaves,
    so equal fields share one compiled solve."""

    __slots__ = ("statics", "treedef")

    def __init__(self, treedef, statics):
        self.treedef, self.statics = treedef, statics

    def __call__(self, arrays, *args, **kwargs):
        leaves = [a if s is _ARRAY else s for a, s in zip(arrays, self.statics, strict=True)]
        return jax.tree_util.tree_unflatten(self.treedef, leaves)(*args, **kwargs)

    def __eq__(self, other):
        return (
            type(other) is _Rebuild
            and self.treedef == other.treedef
            and len(self.statics) == len(other.statics)
            and all(
                a is b or (a is not _ARRAY and b is not _ARRAY and a == b)
                for a, b in zip(self.statics, other.statics, strict=True)
            )
        )

    def __hash__(self):
        return hash((self.treedef, tuple(None if s is _ARRAY else s for s in self.statics)))

    def __repr__(self):
        return f"_Rebuild({self.treedef})"


def as_field(v):
    """Return ``v`` as a pytree callable so jit keys on the function, not on its arrays.

    A ``jax.tree_util.Partial`` is returned as is; a callable pytree with arrays among its
    leaves (an Equinox or Flax NNX module) as a ``Partial`` whose arguments are those arrays
    (see the module docstring); any other callable as ``Partial(v)``."""
    if isinstance(v, jax.tree_util.Partial):
        return v
    if not callable(v):
        raise ValueError(f"v must be a callable v(t, x) -> dx/dt; got {type(v).__name__}.")
    leaves, treedef = jax.tree_util.tree_flatten(v)
    if not any(_is_array(leaf) for leaf in leaves):
        return jax.tree_util.Partial(v)  # a function (or a pytree without weights)
    statics = tuple(_ARRAY if _is_array(leaf) else leaf for leaf in leaves)
    rebuild = _Rebuild(treedef, statics)
    try:
        hash(rebuild)
    except TypeError:  # an unhashable static leaf: key on the object, as before
        return jax.tree_util.Partial(v)
    arrays = [leaf if _is_array(leaf) else None for leaf in leaves]
    return jax.tree_util.Partial(rebuild, arrays)
