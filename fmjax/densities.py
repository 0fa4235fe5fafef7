"""Log-densities of the Gaussian sources that flows start from, per example of a batch
``(B, *event_shape)``: the default ``base_log_prob`` of :func:`fmjax.log_likelihood`
(:func:`standard_normal_log_prob`) and the source of a path whose noise has another scale
(:func:`normal_log_prob`, ``path.source_log_prob``)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

__all__ = ["normal_log_prob", "standard_normal_log_prob"]


def standard_normal_log_prob(x) -> jax.Array:
    """log N(x; 0, I) per example for a batch ``(B, *event_shape)``."""
    d = math.prod(x.shape[1:])
    return -0.5 * jnp.sum(jnp.square(x).reshape(x.shape[0], -1), axis=1) - 0.5 * d * math.log(
        2 * math.pi
    )


def normal_log_prob(x, std) -> jax.Array:
    """log N(x; 0, std^2 I) per example for a batch ``(B, *event_shape)``."""
    x = jnp.asarray(x)
    return standard_normal_log_prob(x / std) - math.prod(x.shape[1:]) * jnp.log(std)
