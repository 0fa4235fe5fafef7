"""fmjax.sde: the SDE sampler against closed forms.

The CondOT (sigma_min = 0) flow from N(0, 1) to data N(M, S^2) has Gaussian marginals
N(t M, V(t)), V(t) = (1 - t)^2 + t^2 S^2, velocity ``v = c(t) (x - t M) + M`` with
``c = (t S^2 - (1 - t)) / V`` and score ``-(x - t M) / V``. Its SDE ``dx = [v + g^2/2 score]
dt + g dW`` is linear, so Euler–Maruyama's endpoint is exactly Gaussian with the mean and
variance of a scalar recursion (:func:`em_moments`); the samples must match those within
their standard errors, and the recursion must be close to the data's N(M, S^2).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fmjax
from fmjax import sde

M, S = 1.5, 0.5
PATH = fmjax.paths.CondOT(sigma_min=0.0)
DATA = fmjax.marginals.GaussianMixture.create(jnp.array([[M]]), S)
N = 8000


def var_t(t):
    return (1 - t) ** 2 + t**2 * S**2


def field(t, x):
    return DATA.velocity(PATH, x, t)


def score(t, x):
    return DATA.score(PATH, x, t)


def em_moments(steps, g2, t0=0.0, t1=1.0, mean=0.0, var=1.0):
    """Mean and variance of Euler–Maruyama's endpoint for the drift ``v + g2(t)/2 score``
    (affine in x: ``(c - g2 / (2V)) (x - t M) + M``) from N(mean, var) at t0."""
    h = (t1 - t0) / steps
    for k in range(steps):
        t = t0 + k * h
        a = (t * S**2 - (1 - t)) / var_t(t) - g2(t) / (2 * var_t(t))
        mean, var = (1 + h * a) * mean + h * (M - a * t * M), (1 + h * a) ** 2 * var + g2(t) * h
    return mean, var


def check_moments(x, mean, var, z=5.0):
    """Sample mean and variance within z standard errors of a Gaussian's."""
    x = np.asarray(x, np.float64).ravel()
    n = x.size
    assert abs(x.mean() - mean) < z * math.sqrt(var / n), (x.mean(), mean)
    assert abs(x.var() - var) < z * var * math.sqrt(2 / (n - 1)), (x.var(), var)


@pytest.fixture(scope="module")
def x0():
    return jax.random.normal(jax.random.key(0), (N, 1))


@pytest.mark.parametrize("g", [0.5, 1.5])
def test_euler_maruyama_with_the_given_score_samples_the_data(x0, g):
    steps = 200
    x1, stats = sde.sample_sde(
        field, x0, jax.random.key(1), diffusion=g, score=score, steps=steps, t1=1.0
    )
    mean, var = em_moments(steps, lambda t: g**2)
    check_moments(x1, mean, var)
    # the scheme's own bias is small: the endpoint is the data N(M, S^2) to O(1/steps)
    assert abs(mean - M) < 0.01 and abs(var - S**2) < 0.02 * S**2 + 0.01 * g**2
    assert int(stats.nfe) == steps and bool(stats.success)


def test_score_derived_by_convert_with_a_vanishing_diffusion(x0):
    # g(t)^2 = 2 sigma_t = 2 (1 - t): the derived score -E[x0|x]/sigma_t is singular at
    # t = 1, g^2/2 * score is not, and the span runs to the data
    g = sde.sigma_diffusion(PATH, math.sqrt(2.0))
    assert float(g(jnp.float32(1.0))) == 0.0
    x1, _ = sde.sample_sde(field, x0, jax.random.key(2), diffusion=g, path=PATH, steps=200)
    mean, var = em_moments(200, lambda t: 2 * (1 - t))
    check_moments(x1, mean, var)
    assert abs(mean - M) < 0.01 and abs(var - S**2) < 0.01


def test_score_derived_by_convert_with_a_constant_diffusion_before_the_end(x0):
    t1 = 0.98  # the marginal there is N(t1 M, V(t1)), not yet the data
    x1, _ = sde.sample_sde(field, x0, jax.random.key(3), diffusion=1.0, path=PATH, t1=t1)
    mean, var = em_moments(100, lambda t: 1.0, t1=t1)
    check_moments(x1, mean, var)
    assert abs(mean - t1 * M) < 0.01 and abs(var - var_t(t1)) < 0.02


@pytest.mark.parametrize("solver", ["heun", "shark"])
def test_higher_order_solvers_sample_the_data(x0, solver):
    x1, stats = sde.sample_sde(
        field, x0, jax.random.key(4), diffusion=1.0, score=score, steps=50, solver=solver
    )
    check_moments(x1, M, S**2, z=6.0)
    assert int(stats.nfe) == 100


@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_zero_diffusion_is_the_ode_sample(solver):
    # the derived score is singular at t = 1, where heun evaluates: g = 0 drops it there
    x0 = jax.random.normal(jax.random.key(5), (64, 1))
    x1, stats = sde.sample_sde(
        field, x0, jax.random.key(6), diffusion=0.0, path=PATH, steps=10, solver=solver
    )
    ode, ode_stats = fmjax.sample(field, x0, solver=solver, steps=10)
    np.testing.assert_allclose(x1, ode, rtol=1e-6, atol=1e-6)
    assert int(stats.nfe) == int(ode_stats.nfe)


def test_ornstein_uhlenbeck_variance_on_an_image_batch():
    # dx = -theta x dt + g dW from 0 (v = -theta x, no score term): Euler–Maruyama's variance
    # is sum_k (1 - theta h)^(2k) g^2 h, the exact process's g^2 (1 - e^{-2 theta T}) / (2 theta)
    theta, g, steps = 2.0, 0.7, 100
    x0 = jnp.zeros((1000, 2, 2, 3))
    x1, stats = sde.sample_sde(
        lambda t, x: -theta * x,
        x0,
        jax.random.key(7),
        diffusion=g,
        score=lambda t, x: jnp.zeros_like(x),
        steps=steps,
    )
    assert x1.shape == x0.shape
    h = 1.0 / steps
    var = sum((1 - theta * h) ** (2 * k) * g**2 * h for k in range(steps))
    exact = g**2 * (1 - math.exp(-2 * theta)) / (2 * theta)
    assert abs(var - exact) < 0.02 * exact
    check_moments(x1, 0.0, var)
    # every entry of every example has its own noise: no correlation between entries
    flat = np.asarray(x1).reshape(1000, -1)
    corr = np.corrcoef(flat.T)[np.triu_indices(12, 1)]
    assert np.max(np.abs(corr)) < 5 / math.sqrt(1000)


def test_same_key_same_samples_and_vmap_over_keys():
    x0 = jnp.zeros((16, 2))
    kw = dict(diffusion=1.0, score=lambda t, x: jnp.zeros_like(x), steps=5)
    a, _ = sde.sample_sde(field_2d, x0, jax.random.key(8), **kw)
    b, _ = sde.sample_sde(field_2d, x0, jax.random.key(8), **kw)
    c, _ = sde.sample_sde(field_2d, x0, jax.random.key(9), **kw)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    keys = jnp.stack([jax.random.key(8), jax.random.key(9)])
    both = jax.jit(jax.vmap(lambda k: sde.sample_sde(field_2d, x0, k, **kw)[0]))(keys)
    np.testing.assert_allclose(both[0], a, atol=1e-6)
    np.testing.assert_allclose(both[1], c, atol=1e-6)


def field_2d(t, x):
    return -x


def test_conditional_field():
    cond = jnp.array([0.0, 1.0, 2.0, 3.0])

    def v(t, x, c):
        return jnp.broadcast_to(c[:, None], x.shape)

    def s(t, x, c):
        return jnp.zeros_like(x)

    x1, _ = sde.sample_sde(
        v, jnp.zeros((4, 1)), jax.random.key(0), diffusion=0.0, score=s, cond=cond
    )
    np.testing.assert_allclose(x1[:, 0], cond, rtol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(x0=jnp.zeros((3,))), "batch of shape"),
        (dict(x0=jnp.zeros((3, 1), jnp.int32)), "floating point"),
        (dict(key=jnp.zeros((3,))), "one PRNG key"),
        (dict(solver="rk4"), "unknown SDE solver 'rk4'"),
        (dict(steps=0), "steps must be a positive integer"),
        (dict(diffusion=-1.0), "diffusion must be a finite number"),
        (dict(diffusion=lambda t: -t - 1.0), "finite and >= 0"),
        (dict(diffusion=lambda t: jnp.ones(2)), "scalar g"),
        (dict(t0=0.5, t1=0.2), "need t0 < t1"),
        (dict(t1=1.5), r"t0 and t1 must lie in \[0.0, 1.0\]"),
        (dict(diffusion=1.0, t1=1.0), r"singular at t=1.0 .* \(t1 = 1.0 - 1e-3\)"),
        (dict(diffusion=lambda t: 1.0 - t, t1=1.0), None),  # vanishes where it is singular
        (dict(path=None), "needs the score"),
        (dict(path=fmjax.paths.get("sb_cfm", sigma=0.5)), "pass score="),
        (dict(score="no", path=None), "score must be a callable"),
        (dict(score=score), "not both"),
        (dict(cond=jnp.zeros(2)), "leading size 3"),
    ],
)
def test_bad_input(kwargs, message):
    args = dict(x0=jnp.zeros((3, 1)), key=jax.random.key(0), path=PATH, diffusion=0.5, t1=0.9)
    args.update(kwargs)
    x0, key = args.pop("x0"), args.pop("key")
    if message is None:
        assert np.all(np.isfinite(sde.sample_sde(field, x0, key, **args)[0]))
        return
    with pytest.raises(ValueError, match=message):
        sde.sample_sde(field, x0, key, **args)


def test_field_output_shape_is_checked():
    with pytest.raises(ValueError, match="shape"):
        sde.sample_sde(
            lambda t, x: x[:, :1], jnp.zeros((3, 2)), jax.random.key(0), diffusion=0.0, path=PATH
        )
