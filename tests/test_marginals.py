"""Theorems 1 and 2 of the paper on tractable data, with the exact marginals as oracle."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmjax import losses, marginals, paths

pytestmark = pytest.mark.usefixtures("x64")


def _mixture():
    return marginals.GaussianMixture.create(
        jnp.array([[2.0, 0.0], [-1.0, 1.5], [0.0, -2.0]], jnp.float64),
        jnp.array([0.3, 0.5, 0.2], jnp.float64),
        jnp.array([0.5, 0.3, 0.2], jnp.float64),
    )


def _empirical():
    pts = jax.random.normal(jax.random.key(3), (7, 2), jnp.float64) * 1.5
    return marginals.EmpiricalData(pts)


@pytest.mark.parametrize(
    "path",
    [
        paths.CondOT(sigma_min=0.05),
        paths.VP(),
        paths.cosine(),
        paths.VE(sigma_min=0.1, sigma_max=3.0),
    ],
    ids=["cond_ot", "vp", "cosine", "ve"],
)
@pytest.mark.parametrize("data", ["mixture", "empirical"])
def test_theorem1_continuity_equation(path, data):
    """d/dt p_t + div(p_t u_t) = 0, i.e. d/dt log p + div u + u . grad log p = 0."""
    q = _mixture() if data == "mixture" else _empirical()
    key = jax.random.key(0)
    xs = jax.random.normal(key, (16, 2), jnp.float64) * 1.5
    ts = jax.random.uniform(jax.random.key(1), (16,), jnp.float64, 0.05, 0.95)

    def logp(t, x):
        return q.log_prob(path, x[None], t)[0]

    def u(t, x):
        return q.velocity(path, x[None], t)[0]

    def residual(t, x):
        dlogp_dt = jax.grad(logp, argnums=0)(t, x)
        grad_logp = jax.grad(logp, argnums=1)(t, x)
        div_u = jnp.trace(jax.jacfwd(u, argnums=1)(t, x))
        return dlogp_dt + div_u + u(t, x) @ grad_logp, jnp.abs(dlogp_dt)

    res, scale = jax.vmap(residual)(ts, xs)
    np.testing.assert_allclose(res, 0.0, atol=1e-8 * (1 + float(jnp.max(scale))))
    assert float(jnp.max(scale)) > 1e-3  # the check is not vacuous: p_t does change


def test_marginal_score_is_grad_log_prob():
    q = _mixture()
    path = paths.CondOT(sigma_min=0.05)
    x = jax.random.normal(jax.random.key(2), (9, 2), jnp.float64) * 2
    t = jnp.linspace(0.1, 0.9, 9)
    auto = jax.vmap(jax.grad(lambda x, t: q.log_prob(path, x[None], t)[0]))(x, t)
    np.testing.assert_allclose(q.score(path, x, t), auto, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    "path,u_at_1",
    [(paths.CondOT(sigma_min=0.0), "x"), (paths.rectified_flow(), "x"), (paths.cosine(), "0")],
    ids=["cond_ot_0", "rectified_flow", "cosine"],
)
def test_mixture_field_and_score_are_exact_where_sigma_vanishes(path, u_at_1):
    # sigma_1 = 0: the generic sigma'/sigma form is 0/0 there (NaN for CondOT, and off by
    # ~2 for the cosine path, whose sigma_1 is cos(pi/2) ~ 1e-16 rather than 0); the
    # mixture's components keep their spread, so p_1 = q and u_1 are finite. Closed forms:
    # x_t = t x1 + (1 - t) x0 moves at x1 - x0, and E[x0 | x_1 = x] = 0, so u_1(x) = x;
    # the cosine path has alpha'_1 = 0 and sigma_1 = 0, so u_1 = 0.
    q = _mixture()
    x = jax.random.normal(jax.random.key(4), (8, 2), jnp.float64) * 1.5
    one = jnp.ones(8, jnp.float64)
    u = q.velocity(path, x, one)
    np.testing.assert_allclose(u, x if u_at_1 == "x" else 0.0, atol=1e-10)
    # the score at t = 1 is that of the data's own density
    data_score = jax.vmap(
        jax.grad(
            lambda xi: jax.scipy.special.logsumexp(
                jnp.log(q.weights)
                + jax.vmap(
                    lambda m, s: jax.scipy.stats.multivariate_normal.logpdf(
                        xi, m, s**2 * jnp.eye(2)
                    )
                )(q.means, q.stds)
            )
        )
    )(x)
    np.testing.assert_allclose(q.score(path, x, one), data_score, rtol=1e-9, atol=1e-9)
    # and the continuity equation holds at t = 1 itself

    def logp(t, xi):
        return q.log_prob(path, xi[None], t)[0]

    def residual(xi):
        t = jnp.float64(1.0)
        v = q.velocity(path, xi[None], t)[0]
        div = jnp.trace(jax.jacfwd(lambda y: q.velocity(path, y[None], t)[0])(xi))
        return jax.grad(logp, 0)(t, xi) + div + v @ jax.grad(logp, 1)(t, xi)

    np.testing.assert_allclose(jax.vmap(residual)(x), 0.0, atol=1e-8)


def test_marginal_at_t0_is_standard_normal_and_far_points_are_stable():
    q = _empirical()
    path = paths.CondOT(sigma_min=0.01)
    x = jnp.array([[0.3, -0.2], [1e3, -1e3]], jnp.float64)
    lp0 = q.log_prob(path, x, 0.0)
    np.testing.assert_allclose(lp0, -0.5 * jnp.sum(x**2, 1) - jnp.log(2 * jnp.pi), rtol=1e-12)
    u = q.velocity(path, x, 0.7)
    assert bool(jnp.all(jnp.isfinite(u)))  # log-space posterior: no 0/0 far from the data


def test_empirical_matches_mixture_with_tiny_stds():
    pts = jnp.array([[1.0, 2.0], [-1.0, 0.5]], jnp.float64)
    emp = marginals.EmpiricalData(pts)
    gm = marginals.GaussianMixture.create(pts, 0.0)
    path = paths.CondOT(sigma_min=0.1)
    x = jax.random.normal(jax.random.key(5), (6, 2), jnp.float64)
    t = jnp.full(6, 0.6)
    np.testing.assert_allclose(emp.velocity(path, x, t), gm.velocity(path, x, t), rtol=1e-12)
    np.testing.assert_allclose(emp.log_prob(path, x, t), gm.log_prob(path, x, t), rtol=1e-12)


def _linear_model(theta, t, x):
    # v(t, x) = W x + b + t c : a model with enough parameters to feel any bias in the target.
    w, b, c = theta
    return x @ w.T + b + t[:, None] * c


@pytest.mark.parametrize("path", [paths.CondOT(sigma_min=0.05), paths.VP()], ids=["cond_ot", "vp"])
def test_theorem2_fm_and_cfm_gradients_agree(path):
    """grad L_FM = E grad L_CFM: per-sample gradient differences have mean zero."""
    q = _empirical()
    theta = (jnp.array([[0.3, -0.1], [0.2, 0.5]]), jnp.array([0.1, -0.2]), jnp.array([0.5, 0.4]))
    n = 40_000
    k1, k0, kt = jax.random.split(jax.random.key(7), 3)
    x1 = q.sample(k1, n)
    x0 = jax.random.normal(k0, x1.shape, jnp.float64)
    t = jax.random.uniform(kt, (n,), jnp.float64, 0.0, path.t_range[1])

    def per_sample_grads(loss_fn, marginal):
        def one(x0i, x1i, ti):
            def loss(theta):
                v = lambda tt, xx: _linear_model(theta, tt, xx)
                if marginal is None:
                    return loss_fn(v, path, None, x1i[None], x0=x0i[None], t=ti[None])
                return loss_fn(v, path, None, x1i[None], marginal, x0=x0i[None], t=ti[None])

            return jnp.concatenate([g.ravel() for g in jax.grad(loss)(theta)])

        return jax.vmap(one)(x0, x1, t)

    g_cfm = per_sample_grads(losses.cfm_loss, None)
    g_fm = per_sample_grads(losses.fm_loss, q)
    diff = g_cfm - g_fm
    mean, se = jnp.mean(diff, 0), jnp.std(diff, 0) / jnp.sqrt(n)
    assert float(jnp.min(se)) > 0  # targets really differ sample by sample
    assert float(jnp.max(jnp.abs(mean) / se)) < 4.5, (mean, se)
    # Power check: a wrong marginal (other data) gives a clearly non-zero difference.
    wrong = marginals.EmpiricalData(q.points + 0.5)
    diff_wrong = g_cfm - per_sample_grads(losses.fm_loss, wrong)
    z_wrong = jnp.abs(jnp.mean(diff_wrong, 0)) / (jnp.std(diff_wrong, 0) / jnp.sqrt(n))
    assert float(jnp.max(z_wrong)) > 10


def test_fm_and_cfm_losses_differ_by_a_constant():
    q = _empirical()
    path = paths.CondOT(sigma_min=0.05)
    n = 50_000
    k1, k = jax.random.split(jax.random.key(11))
    x1 = q.sample(k1, n)
    thetas = [(jnp.eye(2) * s, jnp.ones(2) * s, jnp.zeros(2)) for s in (0.0, 0.5, -1.0)]
    gaps = []
    for theta in thetas:
        v = lambda tt, xx, theta=theta: _linear_model(theta, tt, xx)
        gaps.append(float(losses.cfm_loss(v, path, k, x1) - losses.fm_loss(v, path, k, x1, q)))
    assert gaps[0] > 0.01  # CFM has the extra conditional variance
    np.testing.assert_allclose(gaps, gaps[0], rtol=0, atol=0.02 * gaps[0] + 1e-3)


def test_bad_inputs():
    with pytest.raises(ValueError, match="means"):
        marginals.GaussianMixture(jnp.zeros((3, 2)), jnp.ones(2), jnp.ones(3))
    with pytest.raises(ValueError, match="means"):  # NumPy arrays are checked too
        marginals.GaussianMixture(np.zeros((2, 2)), np.ones(3), np.ones(2))
    with pytest.raises(ValueError, match=r"points must have shape \(N, D\); got \(3,\)"):
        marginals.EmpiricalData(np.zeros(3))
    # silently NaN (negative or NaN weights) or a different model (negative std) before
    for kw, match in [
        ({"weights": [-1.0, 2.0]}, "weights must be finite, >= 0"),
        ({"weights": [float("nan"), 1.0]}, "weights must be finite"),
        ({"weights": [0.0, 0.0]}, "not all 0"),
        ({"stds": -0.5}, "stds must be finite and >= 0"),
        ({"means": [[0.0, float("inf")], [1.0, 1.0]]}, "means must be finite"),
    ]:
        args = {"means": [[0.0, 0.0], [1.0, 1.0]], "stds": 0.5, **kw}
        with pytest.raises(ValueError, match=match):
            marginals.GaussianMixture.create(**args)
    q = _mixture()
    with pytest.raises(ValueError, match=r"shape \(batch, 2\)"):
        q.velocity(paths.CondOT(), jnp.zeros((4, 3)), 0.5)
