"""Straightness, transport cost and the NFE sweep against closed forms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.integrate import quad

from fmjax.metrics import efficiency

MU = jnp.array([1.5, -0.5, 2.0])
S = 0.4  # data N(MU, S^2 I), source N(0, I)


def _x0(n=512, seed=0):
    return jax.random.normal(jax.random.key(seed), (n, 3))


def straight_field(t, x):
    """The flow x_t = t MU + (1 - t + t S) x0 of the OT coupling x1 = MU + S x0: straight."""
    g = 1.0 + t[:, None] * (S - 1.0)
    return MU + (S - 1.0) * (x - t[:, None] * MU) / g


def _sigma(t):
    return np.sqrt((1 - t) ** 2 + (t * S) ** 2)


def _dsigma(t):
    return (t * (1 + S * S) - 1) / _sigma(t)


def curved_field(t, x):
    """The marginal CondOT(0) flow of independent pairs: x_t = t MU + sigma_t x0."""
    sig = jnp.sqrt((1 - t) ** 2 + (t * S) ** 2)[:, None]
    dsig = (t * (1 + S * S) - 1)[:, None] / sig
    return MU + dsig * (x - t[:, None] * MU) / sig


def test_a_straight_flow_has_zero_straightness_and_its_transport_cost():
    x0 = _x0()
    out = efficiency.straightness(straight_field, x0, rtol=1e-7, atol=1e-7)
    np.testing.assert_allclose(out.x1, MU + S * x0, atol=1e-4)  # the flow's endpoint
    assert float(out.straightness) < 1e-8
    expected = np.mean(np.sum(np.asarray(MU + (S - 1.0) * x0) ** 2, axis=1))
    np.testing.assert_allclose(out.transport_cost, expected, rtol=1e-4)
    assert int(out.nfe) > 0


def test_a_curved_flow_scores_its_closed_form():
    # x1 - x0 - v(t, x_t) = (S - 1 - sigma'_t) x0, so S = mean_t (S - 1 - sigma'_t)^2 E|x0|^2
    x0 = _x0(seed=1)
    n = 32
    out = efficiency.straightness(curved_field, x0, num_times=n, rtol=1e-7, atol=1e-7)
    m2 = float(np.mean(np.sum(np.asarray(x0) ** 2, axis=1)))
    ts = (np.arange(n) + 0.5) / n
    midpoint = np.mean((S - 1 - _dsigma(ts)) ** 2) * m2
    np.testing.assert_allclose(out.straightness, midpoint, rtol=1e-4)
    integral = quad(lambda t: (S - 1 - _dsigma(t)) ** 2, 0, 1)[0] * m2
    np.testing.assert_allclose(out.straightness, integral, rtol=2e-3)
    assert float(out.straightness) > 0.05
    # the endpoints are those of the straight flow: the same transport cost
    straight = efficiency.straightness(straight_field, x0, rtol=1e-7, atol=1e-7)
    np.testing.assert_allclose(out.transport_cost, straight.transport_cost, rtol=1e-4)


def test_sweep_of_a_constant_field_has_no_ode_error_at_any_step_count():
    c = jnp.array([0.3, -1.0, 2.0])
    x0 = _x0(64)
    records = efficiency.sweep(
        lambda t, x: jnp.broadcast_to(c, x.shape),
        x0,
        steps=(1, 2, 4),
        tolerances=(1e-2,),
        quality=lambda x: {"mean_shift": jnp.mean(x - x0)},
    )
    per_step = {"euler": 1, "midpoint": 2, "heun": 2, "rk4": 4}
    fixed = [r for r in records if "steps" in r]
    assert [(r["solver"], r["steps"]) for r in fixed] == [
        (s, k) for s in ("euler", "midpoint", "heun", "rk4") for k in (1, 2, 4)
    ]
    for r in records:
        assert r["ode_error"] < 1e-5, r
        np.testing.assert_allclose(r["mean_shift"], float(jnp.mean(c)), rtol=1e-5)
    for r in fixed:
        assert r["nfe"] == r["steps"] * per_step[r["solver"]], r
    assert [r.get("tol") for r in records[-2:]] == [1e-2, 1e-5]


def test_sweep_ode_error_of_euler_on_a_linear_field():
    # v = a x: the exact flow is x0 e^a; k Euler steps give x0 (1 + a / k)^k
    a = -1.3
    x0 = _x0(128, seed=2)
    records = efficiency.sweep(
        lambda t, x: a * x, x0, solvers=("euler",), steps=(1, 4, 16), tolerances=()
    )
    norm = float(np.mean(np.linalg.norm(np.asarray(x0), axis=1)))
    for r in records[:-1]:
        expected = norm * abs(np.exp(a) - (1 + a / r["steps"]) ** r["steps"])
        np.testing.assert_allclose(r["ode_error"], expected, rtol=1e-3, atol=1e-5)
    errors = [r["ode_error"] for r in records[:-1]]
    assert errors == sorted(errors, reverse=True)


def test_bad_arguments():
    x0 = _x0(8)
    with pytest.raises(ValueError, match="solvers must be among"):
        efficiency.sweep(straight_field, x0, solvers=("dopri5",))
    with pytest.raises(ValueError, match="adaptive must be one of"):
        efficiency.sweep(straight_field, x0, adaptive="euler")
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        efficiency.sweep(straight_field, x0, steps=(0,))
    with pytest.raises(ValueError, match="num_times must be a positive integer"):
        efficiency.straightness(straight_field, x0, num_times=0)
    with pytest.raises(ValueError, match="same shape"):
        efficiency.ode_error(x0, x0[:4])
