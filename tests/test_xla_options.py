"""fmjax.cpu: per-computation XLA:CPU options for exact-divergence solves."""

import jax
import jax.numpy as jnp
import numpy as np

import fmjax
from fmjax import _jax_private, cpu


def test_options_on_cpu_and_switch_off(monkeypatch):
    assert jax.default_backend() == "cpu"
    opts = cpu.cpu_divergence_options()
    # This jaxlib (the one CI installs) knows the option; an unknown one is detected.
    assert opts == {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}
    assert not cpu._supported((("xla_cpu_experimental_ynn_fusion_type", "NOT_A_TYPE"),))
    monkeypatch.setenv("FMJAX_XLA_CPU_TUNING", "0")
    assert cpu.cpu_divergence_options() == {}


def test_tuned_and_plain_variants_agree(monkeypatch):
    w = jax.random.normal(jax.random.PRNGKey(0), (3, 16)) * 0.5
    u = jax.random.normal(jax.random.PRNGKey(1), (16, 2)) * 0.5

    def v(t, x):
        return jnp.tanh(jnp.concatenate([x, t[:, None]], 1) @ w) @ u

    x = jax.random.normal(jax.random.PRNGKey(2), (64, 2))
    kw = dict(divergence="exact", solver="midpoint", steps=8)
    tuned, _ = fmjax.log_likelihood(v, x, **kw)
    monkeypatch.setenv("FMJAX_XLA_CPU_TUNING", "0")
    plain, _ = fmjax.log_likelihood(v, x, **kw)
    np.testing.assert_allclose(np.asarray(tuned), np.asarray(plain), rtol=1e-5, atol=1e-5)

    # Both equal an explicit midpoint solve with the trace of a per-example jacfwd Jacobian.
    def div(t, x):
        jac = jax.vmap(jax.jacfwd(lambda xi, ti: v(ti[None], xi[None])[0]))(x, t)
        return jnp.trace(jac, axis1=1, axis2=2)

    y0 = (x, jnp.zeros(x.shape[0]))
    h = -1.0 / 8

    def f(t, s):
        xt = s[0]
        tt = jnp.full((xt.shape[0],), t)
        return v(tt, xt), div(tt, xt)

    t, s = 1.0, y0
    for _ in range(8):  # explicit midpoint from t=1 down to t=0
        k1 = f(t, s)
        mid = (s[0] + 0.5 * h * k1[0], s[1] + 0.5 * h * k1[1])
        k2 = f(t + 0.5 * h, mid)
        s = (s[0] + h * k2[0], s[1] + h * k2[1])
        t += h
    ref = fmjax.likelihood.standard_normal_log_prob(s[0]) + s[1]
    np.testing.assert_allclose(np.asarray(tuned), np.asarray(ref), rtol=1e-4, atol=1e-4)


def test_exact_likelihood_under_user_transformations():
    """compiler_options are top-level-only in JAX: calls inside jit/grad must still work
    (the regression CI caught) and give the top-level result."""
    w = jax.random.normal(jax.random.PRNGKey(3), (3, 8)) * 0.5

    def nll(scale, x):
        def v(t, x):
            return scale * jnp.tanh(jnp.concatenate([x, t[:, None]], 1) @ w)[:, :2]

        return -fmjax.log_likelihood(v, x, divergence="exact", solver="midpoint", steps=4)[0].mean()

    x = jax.random.normal(jax.random.PRNGKey(4), (16, 2))
    top = nll(0.7, x)
    assert _jax_private.at_top_level()
    np.testing.assert_allclose(float(jax.jit(nll)(0.7, x)), float(top), rtol=1e-5)
    g = jax.grad(nll)(0.7, x)
    fd = (nll(0.7 + 1e-2, x) - nll(0.7 - 1e-2, x)) / 2e-2
    np.testing.assert_allclose(float(g), float(fd), rtol=1e-2, atol=1e-3)
    inside = []
    jax.jit(lambda a: inside.append(_jax_private.at_top_level()) or a)(1.0)
    assert inside == [False]
