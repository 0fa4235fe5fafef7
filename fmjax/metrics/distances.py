"""Two-sample distances between point clouds ``x (N, D)`` and ``y (M, D)``."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

__all__ = ["mmd", "sliced_wasserstein"]


def _check(x, y):
    if jnp.ndim(x) != 2 or jnp.ndim(y) != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(
            f"x and y must be (N, D) and (M, D) with the same D; got "
            f"{jnp.shape(x)} and {jnp.shape(y)}."
        )
    if x.shape[0] < 2 or y.shape[0] < 2:
        raise ValueError("mmd needs at least two points in each sample.")


def _pairwise_sum(v, axis=-1):
    """Sum along ``axis`` by halving (rounding error O(log n) ulps, not O(n) as in a running
    float32 sum: the MMD is a small difference of three kernel means)."""
    v = jnp.moveaxis(v, axis, -1)
    while v.shape[-1] > 1:
        if v.shape[-1] % 2:
            v = jnp.concatenate([v, jnp.zeros_like(v[..., :1])], axis=-1)
        v = v[..., 0::2] + v[..., 1::2]
    return v[..., 0]


def _kernel_sums(x, y, bandwidths, block):
    """Sum over all pairs (x_i, y_j) of a sum of RBF kernels, in blocks of ``block`` rows of
    ``x`` (memory O(block * M)); padded rows are masked out."""
    bw = jnp.asarray(bandwidths, x.dtype)
    n, d = x.shape
    block = min(block, n)
    pad = (-n) % block
    xs = jnp.concatenate([x, jnp.zeros((pad, d), x.dtype)]).reshape(-1, block, d)
    valid = (jnp.arange(n + pad) < n).reshape(-1, block)

    def row_block(args):
        xb, keep = args
        d2 = jnp.sum(xb * xb, 1)[:, None] + jnp.sum(y * y, 1)[None] - 2 * xb @ y.T
        d2 = jnp.maximum(d2, 0.0)
        k = sum(jnp.exp(-d2 / (2 * bw[i] ** 2)) for i in range(len(bandwidths)))
        return jnp.where(keep, _pairwise_sum(k), 0.0)

    return _pairwise_sum(jax.lax.map(row_block, (xs, valid)).reshape(-1))


@functools.partial(jax.jit, static_argnums=2)
def _mmd(x, y, bandwidths):
    n, m = x.shape[0], y.shape[0]
    k = len(bandwidths)
    block = 256
    kxx = (_kernel_sums(x, x, bandwidths, block) - n * k) / (n * (n - 1))
    kyy = (_kernel_sums(y, y, bandwidths, block) - m * k) / (m * (m - 1))
    kxy = _kernel_sums(x, y, bandwidths, block) / (n * m)
    return kxx + kyy - 2 * kxy


def mmd(x, y, bandwidths=(0.1, 0.2, 0.5, 1.0, 2.0)):
    """Unbiased squared MMD with a sum of RBF kernels ``exp(-|a-b|^2 / (2 h^2))``.

    Zero in expectation when x and y come from the same distribution (may be slightly
    negative); the bandwidths suit data of unit scale (the 2-D toys).
    """
    _check(x, y)
    return _mmd(jnp.asarray(x), jnp.asarray(y), tuple(float(b) for b in bandwidths))


@functools.partial(jax.jit, static_argnums=3)
def _sliced_w(key, x, y, num_projections):
    dirs = jax.random.normal(key, (num_projections, x.shape[1]), x.dtype)
    dirs = dirs / jnp.linalg.norm(dirs, axis=1, keepdims=True)
    px = jnp.sort(x @ dirs.T, axis=0)
    py = jnp.sort(y @ dirs.T, axis=0)
    return jnp.sqrt(jnp.mean(jnp.square(px - py)))


def sliced_wasserstein(key, x, y, num_projections: int = 256):
    """Sliced 2-Wasserstein distance over random directions (equal sample sizes)."""
    _check(x, y)
    if x.shape[0] != y.shape[0]:
        raise ValueError(
            f"sliced_wasserstein needs equal sample sizes; got {x.shape[0]} and {y.shape[0]}."
        )
    return _sliced_w(key, jnp.asarray(x), jnp.asarray(y), num_projections)
