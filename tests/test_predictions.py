"""Models that predict x1, eps or the score instead of the velocity: the CFM loss's targets and
the velocity field made from such a model, checked against identities and closed forms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fmjax
from fmjax import losses, marginals, paths

PATHS = {"cond_ot": paths.CondOT(sigma_min=0.01), "vp": paths.VP(), "cosine": paths.cosine()}


def _batch(n=16, d=3, seed=0):
    k0, k1, kt, kw = jax.random.split(jax.random.key(seed), 4)
    return (
        jax.random.normal(k0, (n, d)),
        2.0 + jax.random.normal(k1, (n, d)),
        jax.random.uniform(kt, (n,), minval=0.05, maxval=0.95),
        0.3 * jax.random.normal(kw, (d, d)),
    )


@pytest.mark.parametrize("name", sorted(PATHS))
@pytest.mark.parametrize("prediction", ["x1", "eps", "score"])
def test_velocity_loss_is_a_time_weighting_of_the_prediction_loss(name, prediction):
    # any model f predicting `prediction`, converted to a velocity, has per-example velocity
    # loss = weight(t) * prediction loss (x = sigma x0 + alpha x1 holds exactly)
    path = PATHS[name]
    x0, x1, t, w = _batch()

    def f(t, x):
        return jnp.tanh(x @ w) + t[:, None]

    common = {"x0": x0, "t": t, "reduction": "none"}
    own = losses.cfm_loss(f, path, None, x1, prediction=prediction, **common)
    vel = losses.cfm_loss(path.velocity_field(f, prediction), path, None, x1, **common)
    c = path.coefficients(t)
    a, s, da, ds = c.alpha, c.sigma, c.d_alpha, c.d_sigma
    weight = {
        "x1": (da - ds * a / s) ** 2,
        "eps": (ds - da * s / a) ** 2,
        "score": (s * (ds - da * s / a)) ** 2,
    }[prediction]
    np.testing.assert_allclose(vel, weight * own, rtol=2e-4)
    assert np.all(own > 1e-3)  # not a trivial 0 = 0


def test_prediction_targets_are_what_the_names_say():
    path = PATHS["cond_ot"]
    x0, x1, t, _ = _batch()
    s = path.coefficients(t).sigma[:, None]
    np.testing.assert_array_equal(path.prediction_target(x0, x1, t, "x1"), x1)
    np.testing.assert_array_equal(path.prediction_target(x0, x1, t, "eps"), x0)
    np.testing.assert_allclose(path.prediction_target(x0, x1, t, "score"), -x0 / s, rtol=1e-6)
    np.testing.assert_allclose(
        path.prediction_target(x0, x1, t, "velocity"), x1 - (1 - 0.01) * x0, rtol=1e-6
    )
    # the perfect predictor of a one-point data set has zero loss in every parameterisation
    m = jnp.array([1.5, -0.5, 0.25])
    data = jnp.broadcast_to(m, x0.shape)
    exact = {
        "x1": lambda t, x: jnp.broadcast_to(m, x.shape),
        "eps": lambda t, x: (x - t[:, None] * m) / (1 - 0.99 * t[:, None]),
    }
    for prediction, f in exact.items():
        assert losses.cfm_loss(f, path, None, data, x0=x0, t=t, prediction=prediction) < 1e-10


@pytest.mark.parametrize("prediction", ["velocity", "x1", "eps", "score"])
def test_sampling_a_model_of_any_prediction_lands_on_the_closed_form(prediction):
    # Gaussian data N(m, s^2 I) under CondOT(sigma_min): the exact models of each
    # parameterisation (posterior mean, noise, score from fmjax.marginals) all give the flow
    # x_t = alpha_t m + sqrt(sigma_t^2 + alpha_t^2 s^2) z, so x_1 = m + sqrt(sigma_min^2 + s^2) z
    sigma_min, std = 0.05, 0.4
    path = paths.CondOT(sigma_min=sigma_min)
    m = jnp.array([1.0, -2.0])
    data = marginals.GaussianMixture(m[None], jnp.array([std]), jnp.ones(1))

    def alpha_sigma(t):
        c = path.coefficients(t)
        a, s = c.alpha, c.sigma
        return a[:, None], s[:, None]

    models = {
        "velocity": lambda t, x: data.velocity(path, x, t),
        "x1": lambda t, x: data.posterior_mean(path, x, t),
        "eps": lambda t, x: (
            (x - alpha_sigma(t)[0] * data.posterior_mean(path, x, t)) / alpha_sigma(t)[1]
        ),
        "score": lambda t, x: data.score(path, x, t),
    }
    # eps and score divide by alpha_t, which is 0 at t = 0: start just after it, from the
    # exact marginal there
    t0 = 0.0 if prediction in ("velocity", "x1") else 1e-3
    z = jax.random.normal(jax.random.key(0), (8, 2))
    c0 = path.coefficients(jnp.float32(t0))
    a0, s0 = c0.alpha, c0.sigma
    x_start = a0 * m + jnp.sqrt(s0**2 + a0**2 * std**2) * z
    v = path.velocity_field(models[prediction], prediction)
    x1, _ = fmjax.sample(v, x_start, t0=t0, solver="dopri5", rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(x1, m + np.sqrt(sigma_min**2 + std**2) * z, atol=2e-4)


def test_bad_predictions_are_refused():
    path = PATHS["cond_ot"]
    x0, x1, t, _ = _batch()
    for bad in ("v", "noise", None, 1):
        with pytest.raises(ValueError, match=r"prediction must be one of \('velocity', 'x1'"):
            losses.cfm_loss(lambda t, x: x, path, None, x1, x0=x0, t=t, prediction=bad)
        with pytest.raises(ValueError, match="prediction must be one of"):
            path.velocity_field(lambda t, x: x, bad)
    with pytest.raises(ValueError, match="f must be a callable"):
        path.velocity_field("model", "x1")
    with pytest.raises(ValueError, match=r"f\(t, x\) must return x's shape \(16, 3\)"):
        path.velocity_field(lambda t, x: x[:, :1], "x1")(t, x1)
    with pytest.raises(ValueError, match="t must lie in"):
        path.prediction_target(x0, x1, t + 2.0, "x1")


def test_a_conditional_prediction_model_samples_through_the_solve():
    # point-mass classes at m_y: the exact x1-predictor is m_y, whose CondOT flow ends at
    # m_y + sigma_min x0; the conditional velocity field takes the labels from the solve
    sigma_min, means = 0.05, jnp.array([[1.0, -1.0], [-2.0, 0.5]])
    path = paths.CondOT(sigma_min=sigma_min)
    y = jnp.array([0, 1, 1, 0, 1], jnp.int32)
    z = jax.random.normal(jax.random.key(1), (5, 2))
    v = path.velocity_field(lambda t, x, c: jnp.broadcast_to(means[c], x.shape), "x1")
    for per_example in (False, True):
        x1, _ = fmjax.sample(v, z, cond=y, per_example=per_example, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(x1, means[y] + sigma_min * z, atol=1e-4)
    with pytest.raises(ValueError, match=r"f\(t, x, cond\) must return x's shape"):
        fmjax.sample(path.velocity_field(lambda t, x, c: x[:, :1], "eps"), z, cond=y)


def test_velocity_range_avoids_only_the_singular_ends():
    cond_ot0, cond_ot = paths.CondOT(sigma_min=0.0), paths.CondOT(sigma_min=1e-4)
    assert cond_ot.velocity_range("velocity") == (0.0, 1.0)
    assert cond_ot.velocity_range("x1") == (0.0, 1.0)  # sigma_1 = 1e-4 > 0
    assert cond_ot0.velocity_range("x1", 0.01) == (0.0, 0.99)  # sigma_1 = 0
    for p in (cond_ot, paths.cosine(), paths.rectified_flow()):
        assert p.velocity_range("eps") == p.velocity_range("score") == (1e-3, 1.0)  # alpha_0 = 0
    assert paths.cosine().velocity_range("x1") == (0.0, 0.999)  # cos(pi / 2) ~ 0 in float32
    assert paths.VP().velocity_range("eps") == paths.VP().t_range  # alpha_0 = e^-5 > 0
    assert paths.VE().velocity_range("x1") == (0.0, 1.0)  # sigma >= sigma_min > 0
    # where the range keeps an end, the converted field is finite there
    x, t = jnp.ones((2, 2)), jnp.ones(2)
    for p, pred in ((cond_ot, "x1"), (paths.VP(), "eps")):
        lo, hi = p.velocity_range(pred)
        for end in (lo, hi):
            out = p.velocity_field(lambda t, x: x, pred)(t * end, x)
            assert bool(jnp.all(jnp.isfinite(out))), (p, pred, end)
    with pytest.raises(ValueError, match=r"margin must be a finite number in \(0, 0.5\)"):
        cond_ot.velocity_range("eps", 0.0)
    with pytest.raises(ValueError, match="prediction must be one of"):
        cond_ot.velocity_range("noise")
