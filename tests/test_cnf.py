"""fmjax.cnf.ml_loss against the closed form of a linear flow on Gaussian data."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.scipy.linalg import expm

from fmjax import cnf

D = 2


def linear_field(params, t, x):
    a, b = params
    del t
    return x @ a.T + b


def closed_form_nll(params, x1):
    """-mean log p_1(x1) for dx/dt = A x + b from N(0, I): x1 = e^A x0 + c with
    [[e^A, c], [0, 1]] = expm([[A, b], [0, 0]]), and log p_1 = log N(x0) - tr A."""
    a, b = params
    m = jnp.zeros((D + 1, D + 1), a.dtype).at[:D, :D].set(a).at[:D, D].set(b)
    e = expm(m)
    x0 = jnp.linalg.solve(e[:D, :D], (x1 - e[:D, D]).T).T
    log_n = -0.5 * jnp.sum(x0**2, 1) - 0.5 * D * jnp.log(2 * jnp.pi)
    return -jnp.mean(log_n - jnp.trace(a))


@pytest.fixture(scope="module")
def problem(x64):
    key = jax.random.key(0)
    a = jnp.array([[0.3, -0.5], [0.2, -0.4]], jnp.float64)
    b = jnp.array([0.7, -0.2], jnp.float64)
    # Gaussian data N(m, S) unlike the flow's: the gradient is far from zero
    x1 = jax.random.normal(key, (32, D), jnp.float64) @ jnp.array([[1.5, 0.0], [0.4, 0.6]])
    return (a, b), x1 + jnp.array([1.0, -2.0])


# fixed-step rk4, 32 steps: the solve's error ~ (|A| h)^5 is below the tolerances, and the
# continuous adjoint's backward solve takes the forward's steps (adaptive solves compile
# several times slower; the toy2d test trains through dopri5)
SOLVE = dict(solver="rk4", steps=32)


@pytest.mark.parametrize("adjoint", ["checkpoint", "backsolve"])
def test_ml_gradient_of_linear_field_is_closed_form(problem, adjoint):
    params, x1 = problem

    def loss(p):
        field = jax.tree_util.Partial(linear_field, p)
        return cnf.ml_loss(field, x1, adjoint=adjoint, **SOLVE)

    (value, stats), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    want_value, want_grads = jax.value_and_grad(closed_form_nll)(params, x1)
    np.testing.assert_allclose(value, want_value, rtol=1e-7)
    for g, w in zip(grads, want_grads, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6)
    assert np.abs(want_grads[0]).max() > 0.1  # a real gradient, not ~0
    assert bool(stats.success) and int(stats.nfe) > 10
    assert int(stats.nfe_backward) == int(stats.nfe) == 4 * 32


def test_bad_arguments_are_refused(problem):
    params, x1 = problem
    field = jax.tree_util.Partial(linear_field, params)
    with pytest.raises(ValueError, match="needs a PRNG key"):
        cnf.ml_loss(field, x1, divergence="hutchinson", solver="rk4", steps=4)
    with pytest.raises(ValueError, match="adjoint must be one of"):
        cnf.ml_loss(field, x1, adjoint="reverse", solver="rk4", steps=4)
