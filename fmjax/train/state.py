"""Training state: parameters, optimizer state, EMA parameters, step and PRNG key."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

__all__ = ["TrainState"]


@flax.struct.dataclass
class TrainState:
    """Everything a training step reads and writes, as one pytree.

    ``ema_params`` is the exponential moving average of ``params`` (initialised from them); it
    equals ``params`` when training without EMA. ``rng`` is the base key; step ``i`` uses
    ``fold_in(rng, i)`` (and the fused steps draw its data with the other key of
    :func:`fmjax.train.step_keys`), so a resumed run draws the same randomness as an
    uninterrupted one.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    ema_params: Any
    rng: jax.Array

    @classmethod
    def create(cls, params, tx: optax.GradientTransformation, rng) -> TrainState:
        if not (hasattr(tx, "init") and hasattr(tx, "update")):
            raise ValueError(f"tx must be an optax GradientTransformation; got {type(tx)}.")
        # Own copies: donating the state must never delete the caller's arrays.
        params = jax.tree_util.tree_map(lambda x: jnp.array(x, copy=True), params)
        return cls(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=tx.init(params),
            ema_params=jax.tree_util.tree_map(jnp.copy, params),
            rng=rng,
        )

    def num_params(self) -> int:
        return sum(x.size for x in jax.tree_util.tree_leaves(self.params))
