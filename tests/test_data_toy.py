"""Tests for fmjax.data.toy (2-D toy densities)."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from fmjax.data import toy

NAMES = ["checkerboard", "eight_gaussians", "two_moons", "circles", "swiss_roll", "pinwheel"]
N = 4096  # one sample size everywhere, so that eager and jit compilations are reused
N_BIG = 200_000

# Jitted samplers / log-densities shared by the tests (jax.jit caches per function, so the
# chex `with_jit` variants below and these wrappers share compilations).
JIT = {name: jax.jit(fn, static_argnums=1) for name, fn in toy.DENSITIES.items()}
LP_JIT = {name: jax.jit(fn) for name, fn in toy.LOG_PROBS.items()}


@pytest.fixture(scope="module")
def cb_big():
    key = jax.random.key(123)
    raw = jax.jit(toy._checkerboard_unscaled, static_argnums=1)(key, N_BIG)
    return np.asarray(raw), np.asarray(JIT["checkerboard"](key, N_BIG))


def test_registry_and_public_functions():
    assert sorted(toy.DENSITIES) == sorted(NAMES)
    for name in NAMES:
        assert toy.DENSITIES[name] is getattr(toy, name)
    assert sorted(toy.LOG_PROBS) == ["checkerboard", "eight_gaussians"]


class SamplerVariantsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(*NAMES)
    def test_shape_dtype_finite(self, name):
        fn = self.variant(toy.DENSITIES[name], static_argnums=1)
        x = fn(jax.random.key(0), N)
        chex.assert_shape(x, (N, 2))
        chex.assert_type(x, jnp.float32)
        chex.assert_tree_all_finite(x)

    @chex.variants(with_jit=True, without_jit=True)
    def test_sample_dispatch(self):
        fn = self.variant(toy.sample, static_argnums=(0, 2))
        x = fn("pinwheel", jax.random.key(1), N)
        chex.assert_shape(x, (N, 2))
        np.testing.assert_allclose(x, JIT["pinwheel"](jax.random.key(1), N), rtol=1e-5, atol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_log_probs_variants(self):
        x = JIT["eight_gaussians"](jax.random.key(2), N)
        for name in ("checkerboard", "eight_gaussians"):
            lp = self.variant(toy.LOG_PROBS[name])(x)
            chex.assert_shape(lp, (N,))
            chex.assert_type(lp, jnp.float32)


@pytest.mark.parametrize("name", NAMES)
def test_deterministic_key_dependent_and_scaled(name):
    a = np.asarray(JIT[name](jax.random.key(7), N))
    b = np.asarray(JIT[name](jax.random.key(7), N))
    c = np.asarray(JIT[name](jax.random.key(8), N))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    assert np.all(np.isfinite(a)) and a.dtype == np.float32
    # roughly standardised (the checkerboard's support is [-2, 2)^2 / 0.45, i.e. up to 4.44)
    assert np.abs(a).max() < 5.5
    assert np.mean(np.all(np.abs(a) <= 4.5, axis=1)) > 0.99
    assert np.all(a.std(axis=0) > 0.3)


def test_jit_matches_eager_vmap_and_legacy_keys():
    key = jax.random.key(5)
    # checkerboard is bit-identical with and without jit
    np.testing.assert_array_equal(JIT["checkerboard"](key, N), toy.checkerboard(key, N))
    keys = jax.random.split(key, 3)
    xs = jax.jit(jax.vmap(lambda k: toy.sample("two_moons", k, N)))(keys)
    chex.assert_shape(xs, (3, N, 2))
    np.testing.assert_allclose(xs[2], JIT["two_moons"](keys[2], N), rtol=1e-5, atol=1e-5)
    # legacy uint32 keys work too
    chex.assert_shape(JIT["checkerboard"](jax.random.PRNGKey(0), N), (N, 2))


def test_unknown_name_and_bad_n():
    with pytest.raises(ValueError, match="checkerboard"):
        toy.sample("nope", jax.random.key(0), 10)
    with pytest.raises(ValueError, match="known"):
        toy.log_prob("nope", jnp.zeros((3, 2)))
    with pytest.raises(ValueError, match="closed-form"):
        toy.log_prob("two_moons", jnp.zeros((3, 2)))
    for bad in (0, -3, 2.5, True, "10", None):
        with pytest.raises(ValueError, match="positive int"):
            toy.sample("checkerboard", jax.random.key(0), bad)
    chex.assert_shape(toy.sample("circles", jax.random.key(0), np.int64(N)), (N, 2))
    with pytest.raises(ValueError, match=r"\(\.\.\., 2\)"):
        toy.checkerboard_log_prob(jnp.zeros((3, 3)))


# ----------------------------------------------------------------------------- checkerboard


def test_checkerboard_is_scaled_unscaled(cb_big):
    raw, x = cb_big
    np.testing.assert_array_equal(x, raw * np.float32(1 / 0.45))
    np.testing.assert_allclose(x * 0.45, raw, atol=1e-6)


def test_checkerboard_marginal_stats(cb_big):
    raw, _ = cb_big
    for j in range(2):  # both coordinates are U[-2, 2): mean 0, variance 4/3
        assert abs(raw[:, j].mean()) < 0.015
        assert abs(raw[:, j].var() - 4.0 / 3.0) < 0.02
        assert raw[:, j].min() >= -2.0 and raw[:, j].max() < 2.0


def test_checkerboard_support_exact(cb_big):
    raw, _ = cb_big
    x1, x2 = raw[:, 0], raw[:, 1]
    # definition: x2 - (floor(x1) mod 2) in [0, 1) U [-2, -1)
    r = x2 - np.mod(np.floor(x1), 2.0)
    assert np.all(((r >= 0) & (r < 1)) | ((r >= -2) & (r < -1)))
    # equivalently: cell (floor x1, floor x2) in [-2, 1]^2 with even index sum
    cells = np.floor(raw).astype(int)
    assert np.all((cells >= -2) & (cells <= 1))
    assert np.all((cells.sum(axis=1) % 2) == 0)


def test_checkerboard_cell_fractions(cb_big):
    raw, _ = cb_big
    cells = np.floor(raw).astype(int)
    uniq, counts = np.unique(cells, axis=0, return_counts=True)
    assert len(uniq) == 8
    np.testing.assert_allclose(counts / len(raw), 1 / 8, atol=0.004)


def test_checkerboard_log_prob_on_samples_and_entropy(cb_big):
    _, x = cb_big
    lp = np.asarray(LP_JIT["checkerboard"](x))
    assert np.all(np.isfinite(lp))
    np.testing.assert_allclose(lp, math.log(0.45**2 / 8), rtol=1e-6)
    assert toy.ENTROPY["checkerboard"] == pytest.approx(math.log(8 / 0.45**2))
    assert toy.ENTROPY["checkerboard"] == pytest.approx(3.6765, abs=1e-4)
    np.testing.assert_allclose(-lp.mean(), toy.ENTROPY["checkerboard"], rtol=1e-5)
    # eager agrees with jit (and the dispatcher with the direct function)
    np.testing.assert_array_equal(toy.log_prob("checkerboard", x[:N]), lp[:N])


def test_checkerboard_log_prob_boundaries():
    s = np.float32(1 / 0.45)
    # integer pre-images (cell corners) are in the support iff the cell they start is occupied
    g = np.arange(-3, 3, dtype=np.float32)
    yy = np.stack(np.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
    lp = np.asarray(toy.checkerboard_log_prob(yy * s))
    expect = np.all((yy >= -2) & (yy < 2), axis=1) & (yy.sum(axis=1) % 2 == 0)
    np.testing.assert_array_equal(np.isfinite(lp), expect)
    # just below the upper edge is inside, the edge itself and far points are outside
    lp2 = toy.checkerboard_log_prob(jnp.array([[1.999, 1.999], [2.0, 1.5], [100.0, 0.0]]) * s)
    assert np.isfinite(lp2[0]) and np.isneginf(lp2[1]) and np.isneginf(lp2[2])


def test_checkerboard_log_prob_integrates_to_one():
    # midpoint rule on a grid whose cell edges contain the board edges (exact up to rounding)
    h = 0.01
    g = -2.5 + h * (np.arange(500) + 0.5)
    yy = np.stack(np.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
    p = np.exp(np.asarray(LP_JIT["checkerboard"](jnp.asarray(yy / 0.45, jnp.float32))))
    np.testing.assert_allclose(p.sum() * (h / 0.45) ** 2, 1.0, atol=1e-4)
    # a grid not aligned with the board (error O(h))
    h2 = 0.02
    g2 = np.arange(500) * h2 - 5.0 + 0.0037
    xx = np.stack(np.meshgrid(g2, g2, indexing="ij"), -1).reshape(-1, 2)
    p2 = np.exp(np.asarray(LP_JIT["checkerboard"](jnp.asarray(xx, jnp.float32))))
    np.testing.assert_allclose(p2.sum() * h2**2, 1.0, atol=2e-2)


# -------------------------------------------------------------------------- eight Gaussians


def test_eight_gaussians_log_prob_integrates_to_one():
    h = 0.02
    g = np.arange(-6.0, 6.0, h) + h / 2
    xx = np.stack(np.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
    lp = np.asarray(LP_JIT["eight_gaussians"](jnp.asarray(xx, jnp.float32)))
    np.testing.assert_allclose(toy.log_prob("eight_gaussians", xx[:N]), lp[:N], rtol=1e-5)
    p = np.exp(lp)
    np.testing.assert_allclose(p.sum() * h**2, 1.0, atol=1e-4)


def test_eight_gaussians_log_prob_value():
    # at a centre only its own component contributes (the next centre is 2.16 = 6.1 sigma away)
    c = np.asarray(toy.eight_gaussians_centers())
    np.testing.assert_allclose(np.linalg.norm(c, axis=1), 2 * math.sqrt(2), rtol=1e-6)
    s2 = toy.EIGHT_GAUSSIANS_SIGMA**2
    lp = np.asarray(toy.eight_gaussians_log_prob(c))
    np.testing.assert_allclose(lp, -math.log(8 * 2 * math.pi * s2), atol=1e-4)


def test_eight_gaussians_moments():
    x = np.asarray(JIT["eight_gaussians"](jax.random.key(11), N_BIG), np.float64)
    # analytic: mean 0, cov = (sigma^2 + R^2 / 2) I = 4.125 I
    var = toy.EIGHT_GAUSSIANS_SIGMA**2 + toy.EIGHT_GAUSSIANS_RADIUS**2 / 2
    assert var == pytest.approx(4.125)
    np.testing.assert_allclose(x.mean(axis=0), 0.0, atol=0.02)
    np.testing.assert_allclose(np.cov(x.T), var * np.eye(2), atol=0.04)
    # every sample is within a few sigma of its nearest centre
    c = np.asarray(toy.eight_gaussians_centers())
    d = np.min(np.linalg.norm(x[:, None, :] - c[None], axis=-1), axis=1)
    assert d.max() < 6 * toy.EIGHT_GAUSSIANS_SIGMA
