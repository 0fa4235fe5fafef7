"""Exact marginal probability paths and vector fields for tractable data distributions.

For a Gaussian conditional path ``p_t(x | x1) = N(alpha_t x1, sigma_t^2 I)`` and data ``q``
that is a finite set of points (:class:`EmpiricalData`) or an isotropic Gaussian mixture
(:class:`GaussianMixture`), the marginal

    p_t(x) = int p_t(x | x1) q(x1) dx1,
    u_t(x) = E[u_t(x | x1) | x_t = x] = sigma'/sigma (x - alpha E[x1|x]) + alpha' E[x1|x]

is closed-form (posterior weights in log space, so it is stable far from the data). These are
the oracles of Theorems 1 and 2 and a way to train toy models on the true marginal field
(:func:`fmjax.losses.fm_loss`).

All methods take a batch: ``x`` of shape ``(B, D)`` and ``t`` scalar or ``(B,)``; the
source is ``N(0, I)``. Both classes are pytrees (their arrays are leaves).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import logsumexp

from fmjax.checks import traced

__all__ = ["EmpiricalData", "GaussianMixture"]

# what the constructors check; other leaves are pytree internals (placeholders in unflatten)
_ARRAYS = (jax.Array, np.ndarray)


def _pytree_dataclass(cls):
    cls = dataclasses.dataclass(frozen=True)(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    return jax.tree_util.register_dataclass(cls, data_fields=names, meta_fields=[])


class _Marginal:
    """Shared logic: subclasses give per-component log-weights, variances and posterior means."""

    def _components(self, path, x, t):  # -> (log_resp_unnormalised (B,K), post_mean (B,K,D))
        raise NotImplementedError

    def _check(self, x):
        if jnp.ndim(x) != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x must have shape (batch, {self.dim}); got {jnp.shape(x)}.")

    def log_prob(self, path, x, t):
        """``log p_t(x)`` of the marginal path, shape (B,)."""
        self._check(x)
        log_joint, _ = self._components(path, x, t)
        return logsumexp(log_joint, axis=1)

    def posterior_mean(self, path, x, t):
        """``E[x1 | x_t = x]``, shape (B, D)."""
        self._check(x)
        log_joint, means = self._components(path, x, t)
        resp = jax.nn.softmax(log_joint, axis=1)
        return jnp.einsum("bk,bkd->bd", resp, means)

    def velocity(self, path, x, t):
        """The marginal vector field ``u_t(x)`` (eq. 8 of the paper), shape (B, D)."""
        x1_hat = self.posterior_mean(path, x, t)
        return path.convert(x1_hat, x, t, src="x1", dst="velocity")

    def score(self, path, x, t):
        """``grad_x log p_t(x)`` from the posterior mean (Tweedie), shape (B, D)."""
        x1_hat = self.posterior_mean(path, x, t)
        return path.convert(x1_hat, x, t, src="x1", dst="score")


def _gauss_logpdf(sq_dist, var, dim):
    return -0.5 * sq_dist / var - 0.5 * dim * jnp.log(2 * math.pi * var)


@_pytree_dataclass
class EmpiricalData(_Marginal):
    """Data uniform (or ``log_weights``-weighted) over ``points`` of shape (N, D)."""

    points: jax.Array
    log_weights: jax.Array | None = None

    def __post_init__(self):
        pts = self.points
        if isinstance(pts, _ARRAYS) and jnp.ndim(pts) != 2:
            raise ValueError(f"points must have shape (N, D); got {jnp.shape(pts)}.")

    @property
    def dim(self):
        return self.points.shape[1]

    def sample(self, key, n):
        logits = jnp.zeros(self.points.shape[0]) if self.log_weights is None else self.log_weights
        return self.points[jax.random.categorical(key, logits, shape=(n,))]

    def _components(self, path, x, t):
        c = path.coefficients_like(t, x)  # (B, 1) or scalar
        a, s = c.alpha, c.sigma
        mu = a[..., None] * self.points if jnp.ndim(a) else a * self.points  # (B|1, N, D)
        mu = jnp.broadcast_to(mu, (x.shape[0],) + self.points.shape)
        sq = jnp.sum(jnp.square(x[:, None, :] - mu), axis=-1)
        var = jnp.square(s).reshape(-1, 1)
        log_w = (
            jax.nn.log_softmax(self.log_weights)
            if self.log_weights is not None
            else -jnp.log(self.points.shape[0])
        )
        log_joint = log_w + _gauss_logpdf(sq, var, self.dim)
        means = jnp.broadcast_to(self.points, (x.shape[0],) + self.points.shape)
        return log_joint, means


def _check_mixture_values(means, stds, weights):
    m, s, w = (np.asarray(a) for a in (means, stds, weights))
    if not np.all(np.isfinite(m)):
        raise ValueError("GaussianMixture means must be finite; got non-finite entries.")
    if not (np.all(np.isfinite(s)) and np.all(s >= 0)):
        raise ValueError(f"GaussianMixture stds must be finite and >= 0; got {s.tolist()}.")
    if not (np.all(np.isfinite(w)) and np.all(w >= 0) and np.sum(w) > 0):
        raise ValueError(
            f"GaussianMixture weights must be finite, >= 0 and not all 0; got {w.tolist()}."
        )


@_pytree_dataclass
class GaussianMixture(_Marginal):
    """``q = sum_k w_k N(means_k, stds_k^2 I)``: means (K, D), stds (K,), weights (K,)."""

    means: jax.Array
    stds: jax.Array
    weights: jax.Array

    def __post_init__(self):
        m, s, w = self.means, self.stds, self.weights
        if not all(isinstance(a, _ARRAYS) for a in (m, s, w)):
            return  # pytree internals (tracers, placeholders)
        if jnp.ndim(m) != 2 or jnp.shape(s) != (m.shape[0],) or jnp.shape(w) != (m.shape[0],):
            raise ValueError(
                "GaussianMixture needs means (K, D), stds (K,), weights (K,); got "
                f"{jnp.shape(m)}, {jnp.shape(s)}, {jnp.shape(w)}."
            )

    @classmethod
    def create(cls, means, stds, weights=None):
        dtype = jnp.result_type(float)  # float64 under jax_enable_x64, else float32
        means = jnp.atleast_2d(jnp.asarray(means, dtype))
        k = means.shape[0]
        stds = jnp.broadcast_to(jnp.asarray(stds, dtype), (k,))
        weights = jnp.full((k,), 1.0 / k, dtype) if weights is None else jnp.asarray(weights, dtype)
        if not traced(means, stds, weights):
            _check_mixture_values(means, stds, weights)
        return cls(means, stds, weights / jnp.sum(weights))

    @property
    def dim(self):
        return self.means.shape[1]

    def sample(self, key, n):
        kc, kn = jax.random.split(key)
        comp = jax.random.categorical(kc, jnp.log(self.weights), shape=(n,))
        noise = jax.random.normal(kn, (n, self.dim))
        return self.means[comp] + self.stds[comp, None] * noise

    def _terms(self, path, x, t):
        """Per component k: log(w_k N(x; a m_k, var_k I)) (B, K), x - a m_k (B, K, D),
        var_k = a^2 s_k^2 + sigma^2 (B|1, K), and the coefficients a, sigma, a', sigma'
        (B|1, 1)."""
        c = path.coefficients_like(t, x)
        a, s, da, ds = (jnp.reshape(v, (-1, 1)) for v in (c.alpha, c.sigma, c.d_alpha, c.d_sigma))
        var_k = jnp.square(a * self.stds) + jnp.square(s)
        diff = x[:, None, :] - a[..., None] * self.means  # (B, K, D)
        log_joint = jnp.log(self.weights) + _gauss_logpdf(
            jnp.sum(jnp.square(diff), axis=-1), var_k, self.dim
        )
        return log_joint, diff, var_k, (a, s, da, ds)

    def _components(self, path, x, t):
        log_joint, diff, var_k, (a, _, _, _) = self._terms(path, x, t)
        gain = (a * jnp.square(self.stds) / var_k)[..., None]  # (B|1, K, 1)
        return log_joint, self.means + gain * diff

    def velocity(self, path, x, t):
        """The marginal vector field ``u_t(x)``: each component's Gaussian path
        ``N(a m_k, var_k I)`` has the field ``a' m_k + (sigma sigma' + a a' s_k^2) / var_k
        (x - a m_k)``, averaged with the posterior weights. Unlike the generic
        ``sigma'/sigma (x - a E[x1|x]) + a' E[x1|x]`` it is finite where sigma_t = 0 (t = 1
        for CondOT with sigma_min = 0) as long as the components have spread."""
        self._check(x)
        log_joint, diff, var_k, (a, s, da, ds) = self._terms(path, x, t)
        rate = ((s * ds + a * da * jnp.square(self.stds)) / var_k)[..., None]
        u_k = da[..., None] * self.means + rate * diff  # (B, K, D)
        return jnp.einsum("bk,bkd->bd", jax.nn.softmax(log_joint, axis=1), u_k)

    def score(self, path, x, t):
        """``grad_x log p_t(x) = sum_k r_k(x) (a m_k - x) / var_k``, finite where
        sigma_t = 0 as long as the components have spread."""
        self._check(x)
        log_joint, diff, var_k, _ = self._terms(path, x, t)
        return jnp.einsum("bk,bkd->bd", jax.nn.softmax(log_joint, axis=1), -diff / var_k[..., None])
