"""Two-dimensional toy densities as pure JAX samplers.

Every sampler has the signature ``sampler(key, n) -> (n, 2) float32`` and is built only from
``jax.random`` / ``jax.numpy`` operations (no NumPy randomness, no Python loops over samples),
so it can be wrapped in ``jax.jit`` (with ``n`` static, e.g. ``jax.jit(checkerboard,
static_argnums=1)``) and ``jax.vmap``-ed over keys.  ``key`` may be a typed key
(``jax.random.key``) or a legacy ``uint32[2]`` key (``jax.random.PRNGKey``).

The data are scaled to lie roughly within ``[-4, 4]^2``.

Public API
----------
* samplers: :func:`checkerboard`, :func:`eight_gaussians`, :func:`two_moons`, :func:`circles`,
  :func:`swiss_roll`, :func:`pinwheel`;
* :data:`DENSITIES` -- registry ``name -> sampler`` and :func:`sample` dispatching through it;
* exact log-densities :func:`checkerboard_log_prob`, :func:`eight_gaussians_log_prob`, the
  registry :data:`LOG_PROBS` and :func:`log_prob` dispatching through it;
* :data:`ENTROPY` -- exact differential entropies (nats) where known.

Checkerboard
------------
Identical to the generator of the 2-D example of Meta's ``flow_matching`` library::

    x1 ~ U[-2, 2),  x2 = u - 2 b + (floor(x1) mod 2),  u ~ U[0, 1),  b ~ Bernoulli(1/2),
    data = (x1, x2) / 0.45

Before scaling the support is the 8 unit cells ``[i, i+1) x [j, j+1)`` of ``[-2, 2)^2`` with
``i + j`` even, on which the density is uniform (``1/8``).  After scaling the density is
``0.45**2 / 8`` on the support, so the differential entropy is ``log(8 / 0.45**2)``.
The division by 0.45 is implemented as a multiplication by the float32 constant
``1 / 0.45`` (this is what XLA compiles ``/ 0.45`` into under ``jit`` anyway), so the sampler
returns bit-identical values with and without ``jit``.

Eight Gaussians
---------------
The FFJORD ``8gaussians`` density with its ``1.414`` replaced by ``sqrt(2)``: an equal-weight
mixture of 8 isotropic Gaussians with centres ``R (cos(k pi/4), sin(k pi/4))``, ``k = 0..7``,
radius ``R = 2 sqrt(2)`` (= 4/sqrt(2)) and standard deviation ``SIGMA = sqrt(2)/4``
(= 0.5/sqrt(2)).  Its mean is 0 and its covariance is ``(SIGMA**2 + R**2/2) I = 4.125 I``.

The other densities follow the FFJORD / scikit-learn toy data sets (see each docstring); they
have no closed-form density, so :func:`log_prob` raises ``ValueError`` for them.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from fmjax.checks import integer

__all__ = [
    "CHECKERBOARD_SCALE",
    "DENSITIES",
    "EIGHT_GAUSSIANS_RADIUS",
    "EIGHT_GAUSSIANS_SIGMA",
    "ENTROPY",
    "LOG_PROBS",
    "checkerboard",
    "check_name",
    "checkerboard_log_prob",
    "circles",
    "eight_gaussians",
    "eight_gaussians_centers",
    "eight_gaussians_log_prob",
    "log_prob",
    "pinwheel",
    "sample",
    "swiss_roll",
    "two_moons",
]

_F32 = jnp.float32

# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _check_n(n) -> int:
    """The sample count as an int (a positive integer; bools refused)."""
    return integer(n, "n (the number of samples)")


# --------------------------------------------------------------------------------------------
# checkerboard
# --------------------------------------------------------------------------------------------

CHECKERBOARD_SCALE = 0.45
"""Meta's flow_matching example divides the unit-cell checkerboard by this number."""

# float32 constants shared by the sampler and the log-density so that they are consistent.
_CB_INV_SCALE = np.float32(1.0 / CHECKERBOARD_SCALE)  # numpy: importing must not start JAX
_CB_SCALE = np.float32(CHECKERBOARD_SCALE)
_CB_LOG_DENSITY = math.log(CHECKERBOARD_SCALE**2 / 8.0)


def _checkerboard_unscaled(key: jax.Array, n: int) -> jax.Array:
    """Checkerboard samples before the ``/ 0.45`` scaling (all arithmetic is exact in f32)."""
    n = _check_n(n)
    k1, k2, k3 = jax.random.split(key, 3)
    x1 = jax.random.uniform(k1, (n,), dtype=_F32) * 4.0 - 2.0
    u = jax.random.uniform(k2, (n,), dtype=_F32)
    b = jax.random.bernoulli(k3, 0.5, (n,)).astype(_F32)
    x2 = u - 2.0 * b + jnp.mod(jnp.floor(x1), 2.0)
    return jnp.stack([x1, x2], axis=-1)


def checkerboard(key: jax.Array, n: int) -> jax.Array:
    """Meta ``flow_matching`` 2-D example checkerboard (4x4 board, 8 occupied cells), / 0.45.

    Values lie in ``[-2, 2)^2 / 0.45`` (about ``[-4.44, 4.44)``).
    """
    return _checkerboard_unscaled(key, n) * _CB_INV_SCALE


def _checkerboard_unscale(x: jax.Array) -> jax.Array:
    """Invert ``y -> y * (1/0.45)`` in float32.

    ``x * 0.45`` is correct to ~1 ulp, which matters only when the pre-image is exactly a cell
    boundary (an integer, which the sampler does produce with small probability, e.g.
    ``x1 = -1``).  Such points are snapped back to the integer when it maps exactly onto ``x``,
    so every sample of :func:`checkerboard` gets a finite log-density.
    """
    y = x * _CB_SCALE
    k = jnp.round(y)
    return jnp.where(k * _CB_INV_SCALE == x, k, y)


def checkerboard_log_prob(x: jax.Array) -> jax.Array:
    """Exact log-density of :func:`checkerboard` at ``x`` of shape ``(..., 2)``.

    ``log(0.45**2 / 8)`` on the support (cells ``[i, i+1) x [j, j+1)`` of ``[-2, 2)^2`` with
    ``i + j`` even, in units of ``0.45``), ``-inf`` elsewhere.  Returns shape ``x.shape[:-1]``.
    """
    x = jnp.asarray(x, _F32)
    if x.ndim < 1 or x.shape[-1] != 2:
        raise ValueError(f"x must have shape (..., 2), got {x.shape}")
    y = _checkerboard_unscale(x)
    inside = jnp.all((y >= -2.0) & (y < 2.0), axis=-1)
    cells = jnp.floor(y)
    even = jnp.mod(cells[..., 0] + cells[..., 1], 2.0) == 0.0
    return jnp.where(inside & even, _F32(_CB_LOG_DENSITY), _F32(-jnp.inf))


# --------------------------------------------------------------------------------------------
# eight Gaussians
# --------------------------------------------------------------------------------------------

EIGHT_GAUSSIANS_RADIUS = 2.0 * math.sqrt(2.0)
"""Radius of the circle carrying the 8 mixture centres (FFJORD: 4 / 1.414)."""
EIGHT_GAUSSIANS_SIGMA = math.sqrt(2.0) / 4.0
"""Standard deviation of each isotropic component (FFJORD: 0.5 / 1.414)."""


def eight_gaussians_centers() -> jax.Array:
    """The ``(8, 2)`` float32 mixture centres ``R (cos(k pi/4), sin(k pi/4))``."""
    angles = jnp.arange(8, dtype=_F32) * _F32(math.pi / 4.0)
    return EIGHT_GAUSSIANS_RADIUS * jnp.stack([jnp.cos(angles), jnp.sin(angles)], axis=-1)


def eight_gaussians(key: jax.Array, n: int) -> jax.Array:
    """Equal mixture of 8 Gaussians (std ``sqrt(2)/4``) on the circle of radius ``2 sqrt(2)``."""
    n = _check_n(n)
    kc, kz = jax.random.split(key)
    idx = jax.random.randint(kc, (n,), 0, 8)
    z = jax.random.normal(kz, (n, 2), dtype=_F32)
    return (eight_gaussians_centers()[idx] + _F32(EIGHT_GAUSSIANS_SIGMA) * z).astype(_F32)


def eight_gaussians_log_prob(x: jax.Array) -> jax.Array:
    """Exact log-density of :func:`eight_gaussians` at ``x`` of shape ``(..., 2)``."""
    x = jnp.asarray(x, _F32)
    if x.ndim < 1 or x.shape[-1] != 2:
        raise ValueError(f"x must have shape (..., 2), got {x.shape}")
    s2 = EIGHT_GAUSSIANS_SIGMA**2
    d2 = jnp.sum((x[..., None, :] - eight_gaussians_centers()) ** 2, axis=-1)  # (..., 8)
    log_comp = -0.5 * d2 / s2 - math.log(2.0 * math.pi * s2)
    return (jax.nn.logsumexp(log_comp, axis=-1) - math.log(8.0)).astype(_F32)


# --------------------------------------------------------------------------------------------
# densities without a closed-form log-density
# --------------------------------------------------------------------------------------------


def two_moons(key: jax.Array, n: int) -> jax.Array:
    """FFJORD ``moons``: scikit-learn ``make_moons(noise=0.1)``, then ``* 2 + (-1, -0.2)``.

    Each point picks one of the two half circles with probability 1/2.
    """
    n = _check_n(n)
    kb, kt, kz = jax.random.split(key, 3)
    lower = jax.random.bernoulli(kb, 0.5, (n,))
    theta = jax.random.uniform(kt, (n,), dtype=_F32, maxval=math.pi)
    upper_pts = jnp.stack([jnp.cos(theta), jnp.sin(theta)], axis=-1)
    lower_pts = jnp.stack([1.0 - jnp.cos(theta), 0.5 - jnp.sin(theta)], axis=-1)
    pts = jnp.where(lower[:, None], lower_pts, upper_pts)
    pts = pts + 0.1 * jax.random.normal(kz, (n, 2), dtype=_F32)
    return (pts * 2.0 + jnp.array([-1.0, -0.2], _F32)).astype(_F32)


def circles(key: jax.Array, n: int) -> jax.Array:
    """FFJORD ``circles``: ``make_circles(factor=0.5, noise=0.08) * 3``.

    Two concentric circles of radii 3 and 1.5 (each with probability 1/2) plus Gaussian noise of
    std ``0.24``.
    """
    n = _check_n(n)
    kb, kt, kz = jax.random.split(key, 3)
    radius = jnp.where(jax.random.bernoulli(kb, 0.5, (n,)), _F32(0.5), _F32(1.0))
    theta = jax.random.uniform(kt, (n,), dtype=_F32, maxval=2.0 * math.pi)
    pts = radius[:, None] * jnp.stack([jnp.cos(theta), jnp.sin(theta)], axis=-1)
    pts = pts + 0.08 * jax.random.normal(kz, (n, 2), dtype=_F32)
    return (pts * 3.0).astype(_F32)


def swiss_roll(key: jax.Array, n: int) -> jax.Array:
    """FFJORD ``swissroll``: 2-D slice of ``make_swiss_roll(noise=1.0)`` divided by 5.

    ``t = 1.5 pi (1 + 2 u)``, ``u ~ U[0, 1)``; point ``(t cos t, t sin t) + N(0, I)``, then ``/5``.
    """
    n = _check_n(n)
    kt, kz = jax.random.split(key)
    t = 1.5 * math.pi * (1.0 + 2.0 * jax.random.uniform(kt, (n,), dtype=_F32))
    pts = jnp.stack([t * jnp.cos(t), t * jnp.sin(t)], axis=-1)
    pts = pts + jax.random.normal(kz, (n, 2), dtype=_F32)
    return (pts / 5.0).astype(_F32)


def pinwheel(key: jax.Array, n: int) -> jax.Array:
    """FFJORD ``pinwheel``: 5 spiralling arms (radial std 0.3, tangential std 0.1, rate 0.25).

    Each point picks an arm uniformly at random (FFJORD uses ``n // 5`` per arm).
    """
    n = _check_n(n)
    num_classes, radial_std, tangential_std, rate = 5, 0.3, 0.1, 0.25
    kl, kf = jax.random.split(key)
    labels = jax.random.randint(kl, (n,), 0, num_classes)
    feats = jax.random.normal(kf, (n, 2), dtype=_F32) * jnp.array(
        [radial_std, tangential_std], _F32
    )
    feats = feats.at[:, 0].add(1.0)
    rads = labels.astype(_F32) * _F32(2.0 * math.pi / num_classes)
    angles = rads + rate * jnp.exp(feats[:, 0])
    c, s = jnp.cos(angles), jnp.sin(angles)
    # FFJORD: einsum("ti,tij->tj", features, [[c, -s], [s, c]])
    out = jnp.stack([feats[:, 0] * c + feats[:, 1] * s, -feats[:, 0] * s + feats[:, 1] * c], -1)
    return (2.0 * out).astype(_F32)


# --------------------------------------------------------------------------------------------
# registries
# --------------------------------------------------------------------------------------------

#: Toy 2-D samplers by name: ``sampler(key, n) -> (n, 2)``.
DENSITIES: dict[str, Callable[[jax.Array, int], jax.Array]] = {
    "checkerboard": checkerboard,
    "eight_gaussians": eight_gaussians,
    "two_moons": two_moons,
    "circles": circles,
    "swiss_roll": swiss_roll,
    "pinwheel": pinwheel,
}

#: Exact log-densities of the toy densities that have one: ``log_prob(x) -> (n,)``.
LOG_PROBS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "checkerboard": checkerboard_log_prob,
    "eight_gaussians": eight_gaussians_log_prob,
}

ENTROPY: dict[str, float] = {
    # uniform on area 8 * (1/0.45)**2
    "checkerboard": math.log(8.0 / CHECKERBOARD_SCALE**2),
}
"""Exact differential entropies in nats (only where a closed form exists)."""


def check_name(name: str) -> None:
    """Raise a ``ValueError`` naming the known densities unless ``name`` is one of them."""
    if name not in DENSITIES:
        raise ValueError(f"unknown density {name!r}; known densities: {sorted(DENSITIES)}")


def sample(name: str, key: jax.Array, n: int) -> jax.Array:
    """Draw ``n`` samples ``(n, 2)`` float32 from the density registered as ``name``."""
    check_name(name)
    return DENSITIES[name](key, n)


def log_prob(name: str, x: jax.Array) -> jax.Array:
    """Exact log-density of density ``name`` at ``x`` (``(..., 2)`` -> ``(...)``).

    Raises ``ValueError`` for unknown names and for densities without a closed form.
    """
    check_name(name)
    if name not in LOG_PROBS:
        raise ValueError(
            f"density {name!r} has no closed-form log-density; available for: {sorted(LOG_PROBS)}"
        )
    return LOG_PROBS[name](x)
