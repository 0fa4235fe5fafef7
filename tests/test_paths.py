"""Paths against the paper's closed forms, autodiff derivatives and exact identities."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fmjax
from fmjax import paths, predictions, schedules

pytestmark = pytest.mark.usefixtures("x64")

ALL_PATHS = {
    "cond_ot": paths.CondOT(sigma_min=1e-2),
    "cond_ot0": paths.CondOT(),
    "ve": paths.VE(sigma_min=0.01, sigma_max=5.0),
    "vp": paths.VP(),
    "rectified": paths.rectified_flow(),
    "cosine": paths.cosine(),
    "poly": paths.polynomial(2.0),
    "affine_jvp": paths.AffinePath(alpha=lambda t: t**3, sigma=lambda t: 1 - 0.9 * t),
}
EVENT_SHAPES = [(3,), (4, 4, 2)]


def _draw(shape, batch=5, seed=0):
    k0, k1, kt = jax.random.split(jax.random.key(seed), 3)
    x0 = jax.random.normal(k0, (batch, *shape), jnp.float64)
    x1 = jax.random.normal(k1, (batch, *shape), jnp.float64)
    t = jax.random.uniform(kt, (batch,), jnp.float64, 0.02, 0.97)
    return x0, x1, t


@pytest.mark.parametrize("name", ALL_PATHS)
@pytest.mark.parametrize("shape", EVENT_SHAPES)
def test_target_is_time_derivative_of_interpolate(name, shape):
    path = ALL_PATHS[name]
    x0, x1, t = _draw(shape)
    target = path.target(x0, x1, t)
    # jvp in t of the interpolant, per example.
    jvp = jax.jvp(lambda tt: path.interpolate(x0, x1, tt), (t,), (jnp.ones_like(t),))[1]
    np.testing.assert_allclose(target, jvp, rtol=1e-9, atol=1e-9)
    # central finite differences as an independent check.
    h = 1e-6
    fd = (path.interpolate(x0, x1, t + h) - path.interpolate(x0, x1, t - h)) / (2 * h)
    np.testing.assert_allclose(target, fd, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ALL_PATHS)
def test_conditional_velocity_at_interpolant_equals_target(name):
    path = ALL_PATHS[name]
    x0, x1, t = _draw((3,))
    xt = path.interpolate(x0, x1, t)
    np.testing.assert_allclose(
        path.conditional_velocity(xt, x1, t), path.target(x0, x1, t), rtol=1e-8, atol=1e-8
    )


def test_cond_ot_closed_forms():
    s = 1e-2
    path = paths.CondOT(sigma_min=s)
    x0, x1, t = _draw((3,))
    tb = t[:, None]
    np.testing.assert_allclose(path.interpolate(x0, x1, t), (1 - (1 - s) * tb) * x0 + tb * x1)
    np.testing.assert_allclose(path.target(x0, x1, t), x1 - (1 - s) * x0)  # eq. 23
    x = x0 * 0.3 + 1.0
    np.testing.assert_allclose(
        path.conditional_velocity(x, x1, t), (x1 - (1 - s) * x) / (1 - (1 - s) * tb), rtol=1e-12
    )  # eq. 21
    mean, std = path.mean_std(x1, t)
    np.testing.assert_allclose(mean, tb * x1)
    np.testing.assert_allclose(std, 1 - (1 - s) * tb)


def test_boundary_conditions():
    x0, x1, _ = _draw((3,))
    ones, zeros = jnp.ones(5), jnp.zeros(5)
    s = 1e-2
    cot = paths.CondOT(sigma_min=s)
    np.testing.assert_allclose(cot.interpolate(x0, x1, zeros), x0)  # p_0 = N(0, I)
    np.testing.assert_allclose(cot.interpolate(x0, x1, ones), s * x0 + x1)  # N(x1, s^2 I)
    ve = paths.VE(sigma_min=0.01, sigma_max=5.0)
    np.testing.assert_allclose(ve.interpolate(x0, x1, zeros), 5.0 * x0 + x1)
    np.testing.assert_allclose(ve.interpolate(x0, x1, ones), 0.01 * x0 + x1)
    vp = paths.VP()
    t_hi = jnp.full(5, vp.t_range[1])
    np.testing.assert_allclose(vp.interpolate(x0, x1, t_hi), x1, atol=1e-2)
    a1 = math.exp(-0.5 * (0.1 + 0.5 * 19.9))
    np.testing.assert_allclose(
        vp.interpolate(x0, x1, zeros), math.sqrt(1 - a1**2) * x0 + a1 * x1, rtol=1e-10
    )


def test_ve_closed_form_velocity():
    smin, smax = 0.01, 5.0
    path = paths.VE(sigma_min=smin, sigma_max=smax)
    x0, x1, t = _draw((3,))
    x = x0 + 0.5
    sig = lambda r: smin * (smax / smin) ** r
    dsig = lambda r: sig(r) * math.log(smax / smin)
    r = (1 - t)[:, None]
    expected = -dsig(r) / sig(r) * (x - x1)  # eq. 17 with sigma'_{1-t} = d/ds sigma_s
    np.testing.assert_allclose(path.conditional_velocity(x, x1, t), expected, rtol=1e-10)


def test_vp_closed_form_velocity():
    bmin, bmax = 0.1, 20.0
    path = paths.VP(beta_min=bmin, beta_max=bmax)
    x0, x1, t = _draw((3,))
    x = x0 - 0.25
    big_t = lambda s: bmin * s + 0.5 * (bmax - bmin) * s**2
    alpha = lambda s: jnp.exp(-0.5 * big_t(s))
    # T'(s) = beta(s); alpha'_{s} as d/ds; eq. 19 uses alpha'_{1-t} = d/ds alpha at s = 1-t
    # with the sign of the reversed time: u = alpha'/(1 - alpha^2) (alpha x - x1), alpha' =
    # d/dt alpha_{1-t}.
    s = (1 - t)[:, None]
    a = alpha(s)
    da_dt = 0.5 * (bmin + (bmax - bmin) * s) * a
    expected = -da_dt / (1 - a**2) * (a * x - x1)
    np.testing.assert_allclose(path.conditional_velocity(x, x1, t), expected, rtol=1e-9)
    mean, std = path.mean_std(x1, t)
    np.testing.assert_allclose(mean, a * x1, rtol=1e-12)
    np.testing.assert_allclose(std, jnp.sqrt(1 - a**2), rtol=1e-12)


@pytest.mark.parametrize("name", ["cond_ot", "vp", "cosine", "poly", "ve"])
@pytest.mark.parametrize("src", predictions.PREDICTIONS)
@pytest.mark.parametrize("dst", predictions.PREDICTIONS)
def test_conversions_round_trip_and_consistency(name, src, dst):
    path = ALL_PATHS[name]
    x0, x1, t = _draw((4, 4, 2))
    xt = path.interpolate(x0, x1, t)
    s = path.coefficients(t).sigma.reshape(-1, 1, 1, 1)
    # For a single (x0, x1) pair the "posterior means" are x0 and x1 themselves, so every
    # parameterisation has a known value at x_t.
    truth = {"velocity": path.target(x0, x1, t), "x1": x1, "eps": x0, "score": -x0 / s}
    got = path.convert(truth[src], xt, t, src=src, dst=dst)
    np.testing.assert_allclose(got, truth[dst], rtol=1e-7, atol=1e-7)
    back = path.convert(got, xt, t, src=dst, dst=src)
    np.testing.assert_allclose(back, truth[src], rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("use_jit", [True, False])
def test_jit_vmap_grad_and_single_example(use_jit):
    path = paths.CondOT(sigma_min=1e-3)
    x0, x1, t = _draw((4, 4, 2))

    def interp(x0, x1, t):
        return path.interpolate(x0, x1, t)

    interp = jax.jit(interp) if use_jit else interp

    batched = interp(x0, x1, t)
    single = jax.vmap(lambda a, b, c: path.interpolate(a, b, c))(x0, x1, t)
    chex.assert_trees_all_close(batched, single)
    np.testing.assert_allclose(path.interpolate(x0[0], x1[0], t[0]), batched[0])
    chex.assert_shape(batched, x0.shape)
    chex.assert_type(batched, jnp.float64)
    g = jax.grad(lambda tt: jnp.sum(path.interpolate(x0, x1, tt)))(t)
    np.testing.assert_allclose(g, jnp.sum(x1 - (1 - 1e-3) * x0, axis=(1, 2, 3)), rtol=1e-10)


def test_paths_are_pytrees_through_jit():
    path = paths.VP(beta_min=0.2, beta_max=10.0)
    leaves, treedef = jax.tree_util.tree_flatten(path)
    assert leaves == []
    assert jax.tree_util.tree_unflatten(treedef, leaves) == path
    x0, x1, t = _draw((3,))
    out = jax.jit(lambda p, a, b, c: p.target(a, b, c))(path, x0, x1, t)
    np.testing.assert_allclose(out, path.target(x0, x1, t))
    assert paths.polynomial(2.0) == paths.polynomial(2.0)  # same jit cache entry


def test_schedules_derivatives_match_jvp():
    t = jnp.linspace(0.05, 0.95, 7)
    for sched, deriv in [
        (schedules.Linear(1.0, -0.7), lambda t: -0.7 + 0 * t),
        (schedules.Cosine(True), lambda t: 0.5 * math.pi * jnp.cos(0.5 * math.pi * t)),
        (schedules.Power(3.0), lambda t: 3 * t**2),
    ]:
        np.testing.assert_allclose(
            jax.jvp(sched, (t,), (jnp.ones_like(t),))[1], deriv(t), rtol=1e-10
        )


def test_bad_inputs():
    path = paths.CondOT(sigma_min=1e-2)
    x0, x1, t = _draw((3,))
    with pytest.raises(ValueError, match="sigma_min must lie in"):
        paths.CondOT(sigma_min=1.0)
    with pytest.raises(ValueError, match="sigma_min must lie in"):
        paths.CondOT(sigma_min=-0.1)
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        paths.VE(sigma_min=2.0, sigma_max=1.0)
    with pytest.raises(ValueError, match="beta_min"):
        paths.VP(beta_min=-1.0)
    # infinite parameters (0 < lo < inf held): interpolate gave inf, VP's coefficients NaN
    with pytest.raises(ValueError, match="sigma_max < inf"):
        paths.VE(sigma_min=0.01, sigma_max=float("inf"))
    with pytest.raises(ValueError, match="beta_max < inf"):
        paths.VP(beta_min=0.1, beta_max=float("inf"))
    with pytest.raises(ValueError, match=r"t must lie in \[0.0, 1.0\]"):
        path.interpolate(x0, x1, t + 1.0)
    with pytest.raises(ValueError, match=r"t must lie in \[0.0, 0.99999\]"):
        paths.VP().conditional_velocity(x0, x1, jnp.ones(5))
    with pytest.raises(ValueError, match="same shape"):
        path.interpolate(x0, x1[:, :2], t)
    with pytest.raises(ValueError, match=r"shape \(batch,\)"):
        path.interpolate(x0, x1, t[:3])
    with pytest.raises(ValueError, match="src must be one of"):
        path.convert(x0, x1, t, src="noise", dst="x1")
    with pytest.raises(ValueError, match="unknown path"):
        paths.get("ot")
    with pytest.raises(ValueError, match="exponent"):
        paths.polynomial(0)
    with pytest.raises(ValueError, match="eps must lie in"):
        paths.polynomial(0.5, eps=0.0)


def test_equal_parameters_make_equal_paths():
    # equal paths share a jit cache entry; polynomial(2) and polynomial(2.0) once differed in
    # their names
    assert paths.polynomial(2) == paths.polynomial(2.0)
    assert hash(paths.polynomial(2)) == hash(paths.polynomial(np.float32(2.0)))
    assert paths.polynomial(2) != paths.polynomial(3)


def test_polynomial_below_one_excludes_its_singular_start():
    # d/dt t^n = n t^(n-1) is infinite at t = 0 for n < 1: t_range starts at eps there
    x0, x1 = jnp.zeros((3, 2)), jnp.ones((3, 2))
    sqrt_path = paths.polynomial(0.5)
    assert sqrt_path.t_range == (1e-5, 1.0) and paths.polynomial(2.0).t_range == (0.0, 1.0)
    t = jnp.full((3,), 1e-5)
    np.testing.assert_allclose(sqrt_path.target(x0, x1, t), 0.5 / np.sqrt(1e-5), rtol=1e-4)
    with pytest.raises(ValueError, match=r"t must lie in \[1e-05, 1.0\]"):
        sqrt_path.target(x0, x1, jnp.zeros(3))
    loss = fmjax.losses.cfm_loss(lambda t, x: x, sqrt_path, jax.random.key(0), jnp.ones((64, 2)))
    assert np.isfinite(loss)
    assert paths.get("cond_ot", sigma_min=0.1) == paths.CondOT(sigma_min=0.1)


def test_source_noise_and_its_log_density():
    # the t0 marginal's noise: sigma_{t0} N(0, I): 1 for CondOT, sigma_max for VE,
    # sqrt(1 - exp(-T(1))) for VP (T(1) = (beta_min + beta_max) / 2)
    x = jax.random.normal(jax.random.key(0), (5, 3, 2, 2)) * 7.0
    for path, std in (
        (paths.CondOT(sigma_min=1e-4), 1.0),
        (paths.VE(sigma_max=50.0), 50.0),
        (paths.VP(), math.sqrt(1 - math.exp(-10.05))),
    ):
        np.testing.assert_allclose(path.source_std(), std, rtol=1e-6)
        expected = jnp.sum(jax.scipy.stats.norm.logpdf(x, 0.0, std), axis=(1, 2, 3))
        np.testing.assert_allclose(path.source_log_prob(x), expected, rtol=1e-5)
        z = path.sample_source(jax.random.key(1), (20000, 2))
        np.testing.assert_allclose(jnp.std(z), std, rtol=0.02)
