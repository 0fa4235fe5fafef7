"""The score of the noisy interpolant ([SF]2M): its conditional target, the score-matching
loss and the SDE with the bridge's score, against the closed forms of Gaussian ends.

With ``x0 ~ N(0, I)`` and ``x1 ~ N(m, s1^2 I)`` independent, ``x_t`` is ``N(t m, V_t I)`` with
``V_t = (1 - t)^2 + t^2 s1^2 + sigma^2 t (1 - t)``: its score is ``-(x - t m) / V_t`` and the
field that carries it (isotropic, so E[u_t | x_t]) is ``m + V_t' / (2 V_t) (x - t m)``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fmjax
from fmjax.bridges import SchrodingerBridge

SIGMA, S1 = 1.0, 0.5
M = jnp.array([2.0, -1.0])


def _var(t):
    return (1 - t) ** 2 + t**2 * S1**2 + SIGMA**2 * t * (1 - t)


def _dvar(t):
    return -2 * (1 - t) + 2 * t * S1**2 + SIGMA**2 * (1 - 2 * t)


def _tb(t, x):
    return jnp.reshape(t, (-1, 1)) * jnp.ones_like(x[:, :1])


def exact_score(t, x):
    tb = _tb(t, x)
    return -(x - tb * M) / _var(tb)


def exact_velocity(t, x):
    tb = _tb(t, x)
    return M + _dvar(tb) / (2 * _var(tb)) * (x - tb * M)


def _data(n, seed=0):
    return M + S1 * jax.random.normal(jax.random.key(seed), (n, 2))


def test_score_target_is_the_gradient_of_the_conditional_log_density():
    path = SchrodingerBridge(sigma=0.7)
    k = jax.random.split(jax.random.key(0), 4)
    x0, x1, z = (jax.random.normal(ki, (8, 3)) for ki in k[:3])
    t = jax.random.uniform(k[3], (8,), minval=0.05, maxval=0.95)
    xt = path.interpolate(x0, x1, t, z)

    def log_p(x):  # log N(x; (1 - t) x0 + t x1, sigma^2 t (1 - t) I), summed over the batch
        tb = t[:, None]
        var = 0.49 * tb * (1 - tb)
        return jnp.sum(-0.5 * (x - (1 - tb) * x0 - tb * x1) ** 2 / var - 0.5 * jnp.log(var))

    np.testing.assert_allclose(
        path.score_target(x0, x1, t, z), jax.grad(log_p)(xt), rtol=1e-4, atol=1e-4
    )
    with pytest.raises(ValueError, match="has no score"):
        SchrodingerBridge(sigma=0.0).score_target(x0, x1, t, z)
    with pytest.raises(ValueError, match="noise"):
        path.score_target(x0, x1, t, z[:, :2])


def test_score_loss_is_minimised_by_the_marginal_score():
    path = SchrodingerBridge(sigma=SIGMA)
    n = 100_000
    x1 = _data(n)
    t = jnp.linspace(0.02, 0.98, n)
    key = jax.random.key(1)

    def loss(ab):  # the family -a (x - t m) / V_t + b, exact at (a, b) = (1, 0)
        a, b = ab
        return fmjax.losses.score_loss(lambda t, x: a * exact_score(t, x) + b, path, key, x1, t=t)

    best = jnp.array([1.0, 0.0])
    # E||sigma_t s* + z||^2 per dimension = 1 - sigma_t^2 / V_t (the weighted conditional
    # score's variance left over by the marginal score)
    sig2 = SIGMA**2 * t * (1 - t)
    closed = float(jnp.mean(1 - sig2 / _var(t)))
    assert float(loss(best)) == pytest.approx(closed, abs=0.01)
    for other in ([1.2, 0.0], [0.8, 0.0], [1.0, 0.15]):
        assert float(loss(jnp.array(other))) > float(loss(best)) + 0.003
    grad = jax.grad(loss)(best)
    assert float(jnp.max(jnp.abs(grad))) < 0.01
    assert float(jnp.max(jnp.abs(jax.grad(loss)(jnp.array([1.2, 0.15]))))) > 0.05


def test_sf2m_loss_is_the_flow_and_the_score_loss_on_one_draw():
    path = SchrodingerBridge(sigma=0.5)
    x1, key = _data(64), jax.random.key(3)

    def v(t, x):
        return 0.3 * x + t[:, None]

    def s(t, x):
        return -x

    for coupling in (None, path.coupling):

        @jax.jit
        def losses(key, x1, coupling=coupling):
            return (
                fmjax.losses.sf2m_loss(v, s, path, key, x1, coupling=coupling, score_weight=0.5),
                fmjax.losses.cfm_loss(v, path, key, x1, coupling=coupling),
                fmjax.losses.score_loss(s, path, key, x1, coupling=coupling),
            )

        (total, parts), flow, score = losses(key, x1)
        np.testing.assert_allclose(parts["flow_loss"], flow, rtol=1e-5)
        np.testing.assert_allclose(parts["score_loss"], score, rtol=1e-5)
        np.testing.assert_allclose(total, flow + 0.5 * score, rtol=1e-5)
    per_example = fmjax.losses.score_loss(s, path, key, x1, reduction="none")
    assert per_example.shape == (64,)
    with pytest.raises(ValueError, match="noisy interpolant"):
        fmjax.losses.score_loss(s, fmjax.paths.get("cond_ot"), key, x1)
    with pytest.raises(ValueError, match="sigma = 0"):
        fmjax.losses.score_loss(s, SchrodingerBridge(sigma=0.0), key, x1)
    with pytest.raises(ValueError, match="PRNG key"):
        fmjax.losses.score_loss(s, path, None, x1)


def test_the_bridge_sde_with_the_exact_score_samples_the_target():
    # g = sigma: the Schrödinger bridge's own SDE; without the score term the noise
    # inflates the variance (the check can fail)
    path = SchrodingerBridge(sigma=SIGMA)
    x0 = path.sample_source(jax.random.key(4), (20_000, 2))
    kw = {"diffusion": SIGMA, "steps": 200, "t0": 0.0, "t1": 1.0}
    x, _ = fmjax.sample_sde(exact_velocity, x0, jax.random.key(5), score=exact_score, **kw)
    x = np.asarray(x, np.float64)
    np.testing.assert_allclose(x.mean(0), np.asarray(M), atol=0.02)
    np.testing.assert_allclose(x.var(0), S1**2, rtol=0.05)
    bad, _ = fmjax.sample_sde(
        exact_velocity, x0, jax.random.key(5), score=lambda t, x: jnp.zeros_like(x), **kw
    )
    assert float(np.asarray(bad).var(0).min()) > 1.5 * S1**2
