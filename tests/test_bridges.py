"""The noisy interpolant of SB-CFM (fmjax.bridges) and its entropic coupling, against math."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fmjax
from fmjax import couplings
from fmjax.bridges import SchrodingerBridge


def _batch(n=16, d=3, seed=0):
    k0, k1, kz, kt = jax.random.split(jax.random.key(seed), 4)
    x0 = jax.random.normal(k0, (n, d))
    x1 = 2.0 + jax.random.normal(k1, (n, d))
    z = jax.random.normal(kz, (n, d))
    t = jax.random.uniform(kt, (n,), minval=0.05, maxval=0.95)
    return x0, x1, z, t


def test_target_is_the_time_derivative_of_the_interpolant():
    path = fmjax.paths.get("sb_cfm", sigma=0.7)
    assert path == SchrodingerBridge(sigma=0.7) and path.epsilon == pytest.approx(0.98)
    x0, x1, z, t = _batch()
    xt, dxt = jax.jvp(lambda s: path.interpolate(x0, x1, s, z), (t,), (jnp.ones_like(t),))
    np.testing.assert_allclose(path.target(x0, x1, t, z), dxt, rtol=1e-5, atol=1e-5)
    # Tong et al.'s form at the point x_t equals it; by hand at t = 1/4:
    np.testing.assert_allclose(path.conditional_velocity(xt, x0, x1, t), dxt, rtol=1e-4, atol=1e-4)
    q = jnp.full_like(t, 0.25)  # d/dt sqrt(t(1 - t)) = (1 - 2t) / (2 sqrt(t(1 - t))) = 1/sqrt(3)
    want = x1 - x0 + 0.7 / np.sqrt(3.0) * z
    np.testing.assert_allclose(path.target(x0, x1, q, z), want, rtol=1e-5, atol=1e-5)
    both = path.interpolate_and_target(x0, x1, t, z)
    np.testing.assert_allclose(both[0], xt, rtol=1e-6)


def test_ends_are_the_source_and_the_data_exactly():
    path = SchrodingerBridge(sigma=2.0)
    x0, x1, z, _ = _batch()
    n = x0.shape[0]
    np.testing.assert_array_equal(path.interpolate(x0, x1, jnp.zeros(n), z), x0)
    np.testing.assert_array_equal(path.interpolate(x0, x1, jnp.ones(n), z), x1)
    # in between, x_t | x0, x1 has std sigma sqrt(t(1 - t)): at t = 1/2, sigma / 2
    zs = jax.random.normal(jax.random.key(3), (20000, 1))
    xs = path.interpolate(jnp.zeros((20000, 1)), jnp.ones((20000, 1)), 0.5, zs)
    assert float(jnp.std(xs)) == pytest.approx(1.0, rel=0.03)
    assert float(jnp.mean(xs)) == pytest.approx(0.5, abs=0.03)
    # the target is singular at the ends: t outside t_range is refused
    with pytest.raises(ValueError, match="t must lie in"):
        path.target(x0, x1, jnp.zeros(n), z)


def test_bad_parameters_are_refused():
    with pytest.raises(ValueError, match="sigma"):
        SchrodingerBridge(sigma=-1.0)
    with pytest.raises(ValueError, match="eps must lie in"):
        SchrodingerBridge(eps=0.7)
    with pytest.raises(ValueError, match="velocity models only"):
        SchrodingerBridge().velocity_range("eps")


def test_cfm_loss_draws_the_noise_and_sigma_zero_is_rectified_flow():
    x0, x1, _, t = _batch()
    key = jax.random.key(5)

    def v(t, x):
        return 0.3 * x + t[:, None]

    sb0 = fmjax.losses.cfm_loss(v, SchrodingerBridge(sigma=0.0), key, x1, x0=x0, t=t)
    rf = fmjax.losses.cfm_loss(v, fmjax.paths.rectified_flow(), key, x1, x0=x0, t=t)
    np.testing.assert_allclose(sb0, rf, rtol=1e-6)
    # sigma > 0: the noise adds E|sigma (1-2t)/(2 sqrt(t(1-t))) z|^2-sized terms to the loss
    sb = fmjax.losses.cfm_loss(v, SchrodingerBridge(sigma=1.0), key, x1, x0=x0, t=t)
    assert np.isfinite(float(sb)) and float(sb) != pytest.approx(float(rf))
    with pytest.raises(ValueError, match="velocity models only"):
        fmjax.losses.cfm_loss(v, SchrodingerBridge(), key, x1, prediction="x1")


def test_entropic_coupling_draws_pairs_from_the_plan():
    """Pair frequencies over many draws match B * P of the Sinkhorn plan (eps = 0.5 in the
    cost's units), and every draw is a permutation of x0."""
    b, eps = 4, 0.5
    x0 = jnp.array([[-1.5], [-0.5], [0.5], [1.5]])
    x1 = jnp.array([[-1.0], [0.2], [0.3], [2.0]])
    cost = couplings.ot_cost_matrix(x0, x1)
    plan = np.exp(
        couplings.sinkhorn_scores(cost, reg=eps, relative=False, threshold=1e-6, num_iters=5000)
    )
    ids = jnp.arange(b, dtype=jnp.float32)[:, None]  # x0's row ids travel with the pairs
    path = SchrodingerBridge(sigma=0.5)  # epsilon = 2 sigma^2 = 0.5

    def draw(k):
        # cost from x0, ids carried: re-pair (x0, ids) jointly through the permutation
        paired, _ = path.coupling(
            k, jnp.concatenate([x0, ids], 1), jnp.concatenate([x1, 0 * ids], 1)
        )
        return paired[:, 1]

    # (the id column adds (id_i - 0)^2 to every cost of row i: a row constant, which leaves the
    # plan unchanged)
    rows = np.asarray(jax.jit(jax.vmap(draw))(jax.random.split(jax.random.key(0), 1000)))
    assert all(sorted(r) == [0, 1, 2, 3] for r in rows[:50].astype(int).tolist())
    freq = np.stack([(rows == i).mean(0) for i in range(b)])  # freq[i, j]: x0[i] with x1[j]
    np.testing.assert_allclose(freq, b * plan, atol=0.06)  # ~4 standard errors
    assert freq[1, 2] > 0.3 and freq[2, 1] > 0.3  # not the OT assignment (the identity)
