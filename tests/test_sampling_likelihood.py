"""Sampling and likelihood against analytic flows (Gaussian data, linear fields)."""

import math

import chex
import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fmjax
from fmjax import marginals, paths

pytestmark = pytest.mark.usefixtures("x64")

M = jnp.array([1.0, -2.0])
S = 0.5
SIGMA_MIN = 1e-3


def _marginal_velocity(q, path, t, x):
    return q.velocity(path, x, t)


def _gaussian_field(dtype=jnp.float64):
    """Exact CondOT marginal field for data N(M, S^2 I): linear in x."""
    q = marginals.GaussianMixture.create(M[None], S)
    q = jax.tree_util.tree_map(lambda a: a.astype(dtype), q)
    return jax.tree_util.Partial(_marginal_velocity, q, paths.CondOT(sigma_min=SIGMA_MIN))


def _x0(n=64, d=2, seed=0):
    return jax.random.normal(jax.random.key(seed), (n, d), jnp.float64)


STD1 = math.sqrt(S**2 + SIGMA_MIN**2)


def test_sample_is_the_exact_gaussian_transport_map():
    # For isotropic Gaussian data the marginal flow is x0 -> t M + sqrt(sigma_t^2 + t^2 S^2) x0,
    # so at t = 1 every sample must be M + STD1 * x0.
    v = _gaussian_field()
    x0 = _x0()
    x1, stats = fmjax.sample(v, x0, solver="dopri5", rtol=1e-8, atol=1e-8)
    np.testing.assert_allclose(x1, M + STD1 * x0, rtol=1e-6, atol=1e-6)
    assert bool(stats.success) and int(stats.nfe) > 0
    for solver, kw, tol in [
        ("rk4", dict(steps=20), 1e-5),
        ("midpoint", dict(step_size=0.01), 1e-3),
        ("heun", dict(steps=100), 1e-3),
        ("euler", dict(steps=2000), 5e-3),
        ("tsit5", {}, 3e-4),
    ]:
        x1, stats = fmjax.sample(v, x0, solver=solver, **kw)
        np.testing.assert_allclose(x1, M + STD1 * x0, atol=tol, err_msg=solver)


def test_sample_distribution_mean_and_covariance():
    v = _gaussian_field()
    x0 = jax.random.normal(jax.random.key(1), (20_000, 2), jnp.float64)
    x1, _ = fmjax.sample(v, x0, solver="dopri5", rtol=1e-5, atol=1e-5)
    n = x1.shape[0]
    np.testing.assert_allclose(jnp.mean(x1, 0), M, atol=4 * STD1 / math.sqrt(n))
    np.testing.assert_allclose(jnp.cov(x1.T), STD1**2 * jnp.eye(2), atol=0.02)


def test_trajectory_matches_analytic_path_and_backward_solve_inverts():
    v = _gaussian_field()
    x0 = _x0(8)
    ts = jnp.array([0.25, 0.5, 0.75])
    x1, stats = fmjax.sample(v, x0, solver="dopri5", rtol=1e-9, atol=1e-9, save_times=ts)
    sig = 1 - (1 - SIGMA_MIN) * ts
    expected = ts[:, None, None] * M + jnp.sqrt(sig**2 + ts**2 * S**2)[:, None, None] * x0
    assert stats.trajectory.shape == (3, 8, 2)
    np.testing.assert_allclose(stats.trajectory, expected, atol=1e-6)
    back, _ = fmjax.sample(v, x1, solver="rk4", steps=50, t0=1.0, t1=0.0)
    np.testing.assert_allclose(back, x0, atol=1e-6)


def test_save_times_are_not_rounded_to_low_precision_points():
    # bfloat16 points solve in float32 (times too): the save time 0.3 must stay 0.3, not
    # bfloat16's 0.30078 (exp(-0.3) and exp(-0.30078) differ by 5.8e-4).
    x0 = jnp.ones((4, 2), jnp.bfloat16)
    _, stats = fmjax.sample(lambda t, x: -x, x0, rtol=1e-8, atol=1e-8, save_times=[0.3, 0.7])
    np.testing.assert_allclose(stats.trajectory[:, 0, 0], np.exp([-0.3, -0.7]), atol=1e-5)
    # times given as a bfloat16 array are what they are (0.5 is exact in bfloat16)
    _, stats = fmjax.sample(
        lambda t, x: -x, x0, rtol=1e-8, atol=1e-8, save_times=jnp.array([0.5], jnp.bfloat16)
    )
    np.testing.assert_allclose(stats.trajectory[0, 0, 0], np.exp(-0.5), atol=1e-5)


@pytest.mark.parametrize(
    "save_times, t0, t1, match",
    [
        ([1.5], 0.0, 1.0, r"lie in \[0.0, 1.0\]"),
        ([-0.1, 0.5], 0.0, 1.0, r"lie in \[0.0, 1.0\]"),
        ([0.5, float("nan")], 0.0, 1.0, r"lie in"),
        ([0.7, 0.3], 0.0, 1.0, "must be increasing"),
        ([0.3, 0.7], 1.0, 0.0, "must be decreasing"),
        ([[0.5]], 0.0, 1.0, "1-D"),
        (0.5, 0.0, 1.0, "1-D"),
    ],
)
def test_bad_save_times_are_refused(save_times, t0, t1, match):
    v = _gaussian_field()
    with pytest.raises(ValueError, match=match):
        fmjax.sample(v, _x0(4), t0=t0, t1=t1, save_times=save_times)


def test_save_times_inside_jit_and_backwards():
    v = _gaussian_field()
    x0 = _x0(4)
    with pytest.raises(ValueError, match="1-D"):  # shape checked while tracing
        jax.jit(lambda ts: fmjax.sample(v, x0, save_times=ts)[1].trajectory)(jnp.ones((1, 2)))
    # a backward solve (t1 < t0) saves at decreasing times, endpoints included
    x1, _ = fmjax.sample(v, x0, rtol=1e-9, atol=1e-9)
    _, st = fmjax.sample(v, x1, t0=1.0, t1=0.0, rtol=1e-9, atol=1e-9, save_times=[1.0, 0.0])
    np.testing.assert_allclose(st.trajectory[0], x1, atol=1e-7)
    np.testing.assert_allclose(st.trajectory[1], x0, atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_solves_keep_the_input_precision_under_x64(dtype):
    # This module runs with jax_enable_x64, where Python-float times are float64: a float32
    # solve must stay float32 (outputs and every call of the field), a float64 one float64.
    seen = set()

    def v(t, x):
        seen.add((jnp.result_type(t), x.dtype))
        return -x

    x = _x0(4).astype(dtype)
    outs = [
        fmjax.sample(v, x, solver="dopri5")[0],
        fmjax.sample(v, x, solver="midpoint", steps=3, save_times=jnp.array([0.5]))[1].trajectory,
        fmjax.sample(v, x, solver="dopri5", per_example=True)[0],
        fmjax.log_likelihood(v, x, solver="dopri5")[0],
        fmjax.log_likelihood(
            v, x, solver="euler", steps=4, divergence="hutchinson", key=jax.random.key(0)
        )[0],
    ]
    for out in outs:
        chex.assert_type(out, dtype)
    assert seen == {(jnp.dtype(dtype), jnp.dtype(dtype))}
    # the value is the closed form either way: x1 = e^{-1} x0
    np.testing.assert_allclose(outs[0], np.exp(-1.0) * np.asarray(x, np.float64), rtol=1e-4)


def test_max_error_norm_holds_every_example_to_the_tolerance():
    # v = -k_i x per example: x(1) = e^{-k_i} x0, log p_1(x(1)) = log N(x0) + D k_i. One fast
    # example among 255 slow ones: the batch RMS norm dilutes its error (by ~sqrt(256)); the
    # max-over-examples norm takes smaller steps for it, and the batch keeps one sequence.
    k = jnp.concatenate([jnp.full((255,), 0.1), jnp.array([8.0])])
    x0 = jax.random.normal(jax.random.key(0), (256, 2)).at[-1].set(jnp.array([1.5, -1.0]))

    def v(t, x):
        return -k[:, None] * x

    x1 = jnp.exp(-k)[:, None] * x0
    ref_logp = -0.5 * jnp.sum(x0**2, axis=1) - jnp.log(2 * jnp.pi) + 2 * k
    tol = {"rtol": 1e-4, "atol": 1e-4}
    got = {}
    for norm in ("rms", "max"):
        xs, s_stats = fmjax.sample(v, x0, error_norm=norm, **tol)
        lp, l_stats = fmjax.log_likelihood(v, x1, error_norm=norm, **tol)
        x_err = jnp.max(jnp.abs(xs - x1), axis=1)
        lp_err = jnp.abs(lp - ref_logp)
        got[norm] = (float(x_err[-1]), float(lp_err[-1]), int(s_stats.nfe), int(l_stats.nfe))
        assert float(jnp.max(x_err[:-1])) < 1e-9 and float(jnp.max(lp_err[:-1])) < 1e-8
    (xr, lr, nsr, nlr), (xm, lm, nsm, nlm) = got["rms"], got["max"]
    assert xr > 1e-4 and xm < 0.3 * xr, got  # the RMS norm let the fast example miss atol
    assert lm < 0.3 * lr, got
    assert nsm > nsr and nlm > nlr, got
    # one example: the two norms are the same
    one = [
        fmjax.sample(lambda t, x: -8.0 * x, x0[-1:], error_norm=n, **tol) for n in ("rms", "max")
    ]
    np.testing.assert_array_equal(one[0][0], one[1][0])
    assert int(one[0][1].nfe) == int(one[1][1].nfe)
    with pytest.raises(ValueError, match="unknown error_norm 'l2'"):
        fmjax.sample(v, x0, error_norm="l2")
    with pytest.raises(ValueError, match="fixed-step solver 'euler' has none"):
        fmjax.log_likelihood(v, x1, solver="euler", steps=4, error_norm="max")


def test_a_leaf_is_held_to_the_tolerance_however_large_the_others():
    # State (x, l): x constant at 0 (zero error estimate), l' = 5 cos(20 t). Per leaf, the norm
    # is l's own RMS, so the solve (its starting step included) takes exactly the steps of l
    # alone and l meets the tolerance; one RMS over all 260 entries (diffrax's default) would
    # divide l's error estimate by ~8 and take longer steps, missing the tolerance.
    def dl(t, l, args):
        return 5.0 * jnp.cos(20.0 * t) * jnp.ones_like(l)

    def field(t, y, args):
        return jnp.zeros_like(y[0]), dl(t, y[1], args)

    y0 = (jnp.zeros((4, 64)), jnp.zeros((4,)))
    (x1, l1), _, pair = fmjax.ode.solve(field, y0, t0=0.0, t1=1.0, rtol=1e-4, atol=1e-4)
    l_alone, _, alone = fmjax.ode.solve(dl, y0[1], t0=0.0, t1=1.0, rtol=1e-4, atol=1e-4)
    assert int(pair.nfe) == int(alone.nfe)
    np.testing.assert_array_equal(l1, l_alone)
    np.testing.assert_allclose(l1, 5.0 * np.sin(20.0) / 20.0, atol=1e-4)
    np.testing.assert_array_equal(x1, y0[0])


def test_error_norms_are_per_leaf_and_differentiable_at_zero_error():
    for norm in (fmjax.solvers.leaf_rms_norm, fmjax.solvers.max_example_rms_norm):
        g = jax.grad(norm)((jnp.zeros((3, 2)), jnp.zeros((3,))))
        assert all(bool(jnp.all(jnp.isfinite(x))) for x in g)
    x, logp = jnp.array([[3.0, 4.0], [0.0, 0.0]]), jnp.array([0.0, 2.0])
    # per leaf (torchdiffeq's tuple norm), not one RMS over the 6 entries (sqrt(29 / 6))
    np.testing.assert_allclose(fmjax.solvers.leaf_rms_norm((x, logp)), np.sqrt(25.0 / 4.0))
    np.testing.assert_allclose(fmjax.solvers.leaf_rms_norm((x, 3.0 * logp)), np.sqrt(18.0))
    # per example and leaf: example 0's points sqrt(12.5), example 1's log-density 2
    np.testing.assert_allclose(fmjax.solvers.max_example_rms_norm((x, logp)), np.sqrt(12.5))
    np.testing.assert_allclose(fmjax.solvers.max_example_rms_norm((x, 4.0 * logp)), 8.0)


def test_per_example_stepping_and_nfe_accounting():
    v = _gaussian_field()
    x0 = _x0(4)
    x1, stats = fmjax.sample(v, x0, solver="dopri5", per_example=True)
    np.testing.assert_allclose(x1, M + STD1 * x0, atol=5e-4)
    assert stats.nfe.shape == (4,)
    np.testing.assert_array_equal(stats.nfe, 2 + 6 * stats.num_steps)  # (the start: 2)
    _, st = fmjax.sample(v, x0, solver="midpoint", step_size=0.05)
    assert int(st.nfe) == 40 and int(st.num_steps) == 20
    _, st = fmjax.sample(v, x0, solver="euler", steps=7)
    assert int(st.nfe) == 7


@pytest.mark.parametrize(
    "solver,kw",
    [
        ("euler", dict(steps=5)),
        ("midpoint", dict(steps=4)),
        ("heun", dict(steps=3)),
        ("rk4", dict(steps=3)),
        ("dopri5", dict(rtol=1e-6, atol=1e-6)),
        ("tsit5", dict(rtol=1e-3, atol=1e-3)),
        ("bosh3", dict(rtol=1e-3, atol=1e-3)),
        ("dopri8", dict(rtol=1e-6, atol=1e-6)),
    ],
)
def test_reported_nfe_equals_counted_calls(solver, kw):
    """stats.nfe must equal the number of times the vector field really ran."""
    calls = []

    def counting_field(t, x):
        jax.debug.callback(lambda: calls.append(1))
        return -x * (1.0 + jnp.sin(5 * t[:, None]))

    x0 = _x0(3)
    _, stats = fmjax.sample(counting_field, x0, solver=solver, **kw)
    jax.effects_barrier()
    assert len(calls) == int(stats.nfe), (solver, len(calls), stats)


def test_nfe_counts_the_first_evaluation_again_when_diffrax_cannot_take_it(monkeypatch):
    # fsal_state falls back to None when diffrax's FSAL state has another form (another
    # diffrax version): the solver then evaluates field(t0, y0) itself, one more call.
    calls = []

    def counting_field(t, x):
        jax.debug.callback(lambda: calls.append(1))
        return -x * (1.0 + jnp.sin(5 * t[:, None]))

    monkeypatch.setattr(fmjax.solvers, "fsal_state", lambda *args: None)
    _, stats = fmjax.sample(counting_field, _x0(3), solver="dopri5", rtol=1e-6, atol=1e-6)
    jax.effects_barrier()
    assert len(calls) == int(stats.nfe) == 3 + 6 * int(stats.num_steps)


def test_ode_solve_takes_traced_end_times():
    # y' = -y: y(t1) = exp(-(t1 - t0)) y0 with t0, t1 traced under jit (one compile for all)
    def solve(t0, t1, **kw):
        return fmjax.ode.solve(lambda t, y, args: -y, jnp.ones((2, 1)), t0=t0, t1=t1, **kw)[0]

    adaptive = jax.jit(lambda t0, t1: solve(t0, t1, rtol=1e-8, atol=1e-8))
    fixed = jax.jit(lambda t0, t1: solve(t0, t1, solver="rk4", steps=50))
    for t0, t1 in ((0.0, 1.0), (0.25, 0.75), (1.0, 0.0)):
        np.testing.assert_allclose(adaptive(t0, t1), np.exp(t0 - t1) * np.ones((2, 1)), rtol=1e-7)
        np.testing.assert_allclose(fixed(t0, t1), np.exp(t0 - t1) * np.ones((2, 1)), rtol=1e-7)
    with pytest.raises(ValueError, match="step_size= needs concrete t0 and t1"):
        jax.jit(lambda t1: solve(0.0, t1, solver="rk4", step_size=0.1))(1.0)
    # concrete save times with a traced end time: values checked by diffrax at run time
    saved = jax.jit(
        lambda t1: fmjax.ode.solve(
            lambda t, y, args: -y,
            jnp.ones((2, 1)),
            t0=0.0,
            t1=t1,
            save_times=[0.25, 0.5],
            rtol=1e-8,
            atol=1e-8,
        )[1]
    )(1.0)
    np.testing.assert_allclose(saved[:, :, 0], np.exp([[-0.25] * 2, [-0.5] * 2]), rtol=1e-7)
    with pytest.raises(ValueError, match="1-D sequence of real times"):
        jax.jit(lambda t1: solve(0.0, t1, save_times=[[0.5]], rtol=1e-6, atol=1e-6))(1.0)


@pytest.mark.parametrize("adjoint", [None, "backsolve", "forward"])
def test_gradients_through_an_adaptive_solve_with_either_adjoint(adjoint):
    # y' = -a y: y(1) = y0 exp(-a), d y(1) / da = -y0 exp(-a) (reverse mode, or forward
    # mode with ForwardMode). BacksolveAdjoint refuses to
    # differentiate through a solver state passed in, so with it the solver evaluates
    # field(t0, y0) itself (one more evaluation, counted). (Backsolve differentiates with
    # respect to args, not closed-over values.)
    y0 = jnp.array([1.5, -0.5])
    adj = {None: None, "backsolve": diffrax.BacksolveAdjoint(), "forward": diffrax.ForwardMode()}[
        adjoint
    ]
    grad_fn = jax.jacfwd if adjoint == "forward" else jax.grad

    def y1(a):
        y, _, stats = fmjax.ode.solve(
            lambda t, y, args: -args * y,
            y0,
            t0=0.0,
            t1=1.0,
            rtol=1e-8,
            atol=1e-8,
            args=a,
            adjoint=adj,
        )
        return jnp.sum(y), stats

    value, stats = y1(0.7)
    grad = grad_fn(lambda a: y1(a)[0])(0.7)
    np.testing.assert_allclose(value, jnp.sum(y0) * np.exp(-0.7), rtol=1e-7)
    np.testing.assert_allclose(grad, -jnp.sum(y0) * np.exp(-0.7), rtol=1e-6)
    assert int(stats.nfe) == (3 if adjoint == "backsolve" else 2) + 6 * int(stats.num_steps)


@pytest.mark.parametrize("t0,t1", [(0.0, 1.0), (1.0, 0.0)])
def test_adaptive_solves_start_with_hairers_step(t0, t1):
    # y' = lam * y: Hairer, Norsett & Wanner's starting step in closed form. d0 = |y0| / s,
    # d1 = |lam| d0, so h0 = 0.01 / |lam|; the Euler probe gives |f1 - f0| = lam^2 h0 |y0|, so
    # d2 = lam^2 d0; h = min(100 h0, (0.01 / max(d1, d2))^(1/5)) for dopri5 (error order 5).
    lam, y0, tol = 3.0, 2.0, 1e-5
    d0 = y0 / (tol + tol * y0)
    h0 = 0.01 / lam
    want = min(100 * h0, (0.01 / max(lam * d0, lam**2 * d0)) ** 0.2)
    h, f0 = fmjax.solvers.initial_step_size(
        lambda t, y: lam * y,
        jnp.full((1,), y0),
        t0=jnp.asarray(t0),
        t1=jnp.asarray(t1),
        error_order=5,
        rtol=tol,
        atol=tol,
        norm=fmjax.solvers.leaf_rms_norm,
    )
    np.testing.assert_allclose(h, want, rtol=1e-5)
    np.testing.assert_allclose(f0, [lam * y0])
    # the solve evaluates at t0, at the probe t0 + h0 and then at the first step's stages
    # t0 + c_i h (dopri5: c_1 = 1/5), in the direction of the solve
    times = []

    def field(t, y, args):
        jax.debug.callback(lambda s: times.append(float(s)), t)
        return lam * y

    _, _, stats = fmjax.ode.solve(field, jnp.full((1,), y0), t0=t0, t1=t1, rtol=tol, atol=tol)
    jax.effects_barrier()
    sign = 1.0 if t1 > t0 else -1.0
    np.testing.assert_allclose(
        times[:3], [t0, t0 + sign * h0, t0 + sign * want / 5], rtol=1e-6, atol=1e-9
    )
    assert len(times) == int(stats.nfe) == 2 + 6 * int(stats.num_steps)
    # a probe longer than the interval is capped and evaluates at t1 itself, not one ulp
    # past it (t0 + |t1 - t0| rounds past t1 for these float32 times)
    a, b = np.float32(0.00033813505), np.float32(0.0046515143)
    lo, hi = (a, b) if t1 > t0 else (b, a)
    probes = []

    def slow(t, y):
        probes.append(t)
        return 1e-3 * y

    fmjax.solvers.initial_step_size(
        slow,
        jnp.ones((1,), jnp.float32),
        t0=jnp.asarray(lo),
        t1=jnp.asarray(hi),
        error_order=5,
        rtol=tol,
        atol=tol,
        norm=fmjax.solvers.leaf_rms_norm,
    )
    assert float(probes[1]) == float(hi)
    # y0 = 0 and a field vanishing there: probe h0 = 1e-6, then max(1e-6, 1e-3 h0)
    h, _ = fmjax.solvers.initial_step_size(
        lambda t, y: 0.0 * y,
        jnp.zeros((2,)),
        t0=jnp.asarray(t0),
        t1=jnp.asarray(t1),
        error_order=5,
        rtol=tol,
        atol=tol,
        norm=fmjax.solvers.leaf_rms_norm,
    )
    np.testing.assert_allclose(h, 1e-6, rtol=1e-5)


def test_log_likelihood_exact_matches_gaussian_density():
    v = _gaussian_field()
    x = M + STD1 * _x0(32, seed=3) * 1.3
    logp, stats = fmjax.log_likelihood(v, x, divergence="exact", rtol=1e-8, atol=1e-8)
    expected = jnp.sum(jax.scipy.stats.norm.logpdf(x, M, STD1), axis=1)
    np.testing.assert_allclose(logp, expected, rtol=1e-6, atol=1e-6)
    # the latent is the inverse transport map
    np.testing.assert_allclose(stats.latent, (x - M) / STD1, atol=1e-5)
    # default tolerance 1e-5 in float32 still agrees to ~1e-3 nats
    lp32, _ = fmjax.log_likelihood(_gaussian_field(jnp.float32), x.astype(jnp.float32))
    np.testing.assert_allclose(lp32, expected, atol=2e-3)


def _linear_field(a_mat, event_shape):
    d = math.prod(event_shape)

    def v(a_mat, t, x):
        flat = x.reshape(x.shape[0], d)
        return (flat @ a_mat.T * (1 + t[:, None])).reshape(x.shape)

    return jax.tree_util.Partial(v, a_mat)


@pytest.mark.parametrize("chunk_size", [None, 4])
def test_exact_divergence_any_event_shape(chunk_size):
    """Field v = (1 + t) A x on images (2, 3, 1): x1 = exp(1.5 A) x0, log-det = 1.5 tr A."""
    shape = (2, 3, 1)
    d = 6
    a_mat = 0.3 * jax.random.normal(jax.random.key(4), (d, d), jnp.float64)
    v = _linear_field(a_mat, shape)
    x = jax.random.normal(jax.random.key(5), (5, *shape), jnp.float64)
    logp, stats = fmjax.log_likelihood(v, x, rtol=1e-9, atol=1e-9, chunk_size=chunk_size)
    x0 = x.reshape(5, d) @ jax.scipy.linalg.expm(-1.5 * a_mat).T
    expected = jnp.sum(jax.scipy.stats.norm.logpdf(x0), 1) - 1.5 * jnp.trace(a_mat)
    np.testing.assert_allclose(logp, expected, rtol=1e-7, atol=1e-7)
    np.testing.assert_allclose(stats.latent.reshape(5, d), x0, atol=1e-7)


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
@pytest.mark.parametrize("mode", ["jvp", "vjp"])
def test_hutchinson_is_unbiased(probe, mode):
    d = 4
    a_mat = 0.4 * jax.random.normal(jax.random.key(6), (d, d), jnp.float64)
    v = _linear_field(a_mat, (d,))
    x = jax.random.normal(jax.random.key(7), (1, d), jnp.float64)
    exact, _ = fmjax.log_likelihood(v, x, solver="rk4", steps=10)

    est = jnp.stack(
        [
            fmjax.log_likelihood(
                v,
                x,
                divergence="hutchinson",
                key=jax.random.key(i),
                probe=probe,
                hutchinson_mode=mode,
                solver="rk4",
                steps=10,
            )[0][0]
            for i in range(64)
        ]
    )
    err = est - exact[0]
    se = jnp.std(err) / math.sqrt(err.size)
    assert float(se) > 1e-4  # one probe is noisy: the estimator is not the exact trace
    assert abs(float(jnp.mean(err))) < 4 * float(se)
    # averaging over many probes per solve shrinks the error
    many, _ = fmjax.log_likelihood(
        v,
        x,
        divergence="hutchinson",
        key=jax.random.key(0),
        num_probes=4096,
        probe=probe,
        hutchinson_mode=mode,
        solver="rk4",
        steps=10,
    )
    assert abs(float(many[0] - exact[0])) < 0.1 * float(jnp.std(err))


def test_probe_is_drawn_once_per_solve():
    """With one fixed probe, the estimate equals integrating eps^T A(t) eps exactly."""
    d = 3
    a_mat = 0.5 * jax.random.normal(jax.random.key(8), (d, d), jnp.float64)
    v = _linear_field(a_mat, (d,))
    x = jnp.zeros((1, d))
    key = jax.random.key(9)
    est, _ = fmjax.log_likelihood(
        v, x, divergence="hutchinson", key=key, probe="gaussian", rtol=1e-9, atol=1e-9
    )
    eps = jax.random.normal(key, (1, 1, d), jnp.float64)[0, 0]
    # latent of x = 0 is 0; integral of (1 + t) eps^T A eps over [0, 1] is 1.5 eps^T A eps
    expected = -0.5 * d * math.log(2 * math.pi) - 1.5 * eps @ a_mat @ eps
    np.testing.assert_allclose(est[0], expected, rtol=1e-8)


def test_custom_base_log_prob_and_interval():
    v = jax.tree_util.Partial(lambda t, x: jnp.zeros_like(x))
    x = jnp.array([[0.1, 0.2], [2.0, -1.0]])

    def base(z):
        return jnp.sum(jax.scipy.stats.norm.logpdf(z, 0.0, 2.0), 1)

    logp, stats = fmjax.log_likelihood(v, x, base_log_prob=base, solver="euler", steps=1)
    np.testing.assert_allclose(logp, base(x))
    assert int(stats.nfe) == 1
    with pytest.raises(
        ValueError,
        match=r"one log-density per example, shape \(2,\); got "
        r"shape \(2, 2\)",
    ):  # forgot the sum over dims
        fmjax.log_likelihood(
            v, x, base_log_prob=lambda z: jax.scipy.stats.norm.logpdf(z), solver="euler", steps=1
        )


def test_bits_per_dim_known_densities():
    d = 3 * 4 * 4
    # uniform density on [0, 1]^D of dequantized 8-bit data: 8 bits per dim exactly
    np.testing.assert_allclose(fmjax.bits_per_dim(jnp.zeros(2), d), 8.0)
    # uniform on [-1, 1]^D: log p = -D log 2 -> still 8 bits
    np.testing.assert_allclose(
        fmjax.bits_per_dim(jnp.array(-d * math.log(2.0)), (3, 4, 4), value_range=(-1, 1)), 8.0
    )
    # the paper's formula: bpd = -log p / (D ln 2) + 7 for [-1, 1]
    lp = jnp.array([-1234.5])
    np.testing.assert_allclose(
        fmjax.bits_per_dim(lp, d, value_range=(-1.0, 1.0)), -lp / (d * math.log(2)) + 7
    )
    # binary data (2 levels) with a uniform density on [0, 1]: 1 bit per dim
    np.testing.assert_allclose(fmjax.bits_per_dim(jnp.zeros(()), 5, num_levels=2), 1.0)


def test_bad_inputs():
    v = _gaussian_field()
    x0 = _x0(4)
    with pytest.raises(ValueError, match="unknown solver 'rk45'"):
        fmjax.sample(v, x0, solver="rk45")
    with pytest.raises(ValueError, match="exactly one of steps= or step_size="):
        fmjax.sample(v, x0, solver="euler")
    with pytest.raises(ValueError, match="adaptive solver"):
        fmjax.sample(v, x0, solver="dopri5", steps=10)
    with pytest.raises(ValueError, match=r"\(batch, \*event_shape\)"):
        fmjax.sample(v, x0[0])
    for fn in (fmjax.sample, fmjax.log_likelihood):  # was a ZeroDivisionError
        with pytest.raises(ValueError, match=r"empty batch \(shape \(0, 2\)\)"):
            fn(v, x0[:0])
    with pytest.raises(ValueError, match="divergence must be one of"):
        fmjax.log_likelihood(v, x0, divergence="trace")
    with pytest.raises(ValueError, match="needs a PRNG key"):
        fmjax.log_likelihood(v, x0, divergence="hutchinson")
    with pytest.raises(ValueError, match="probe must be one of"):
        fmjax.log_likelihood(v, x0, divergence="hutchinson", key=jax.random.key(0), probe="sphere")
    with pytest.raises(ValueError, match="callable"):
        fmjax.sample(3.0, x0)
    with pytest.raises(ValueError, match="num_dims"):
        fmjax.bits_per_dim(jnp.zeros(2), 0)
    with pytest.raises(RuntimeError, match="max_steps"):
        fmjax.sample(v, x0, solver="dopri5", rtol=1e-12, atol=1e-12, max_steps=3)
    _, st = fmjax.sample(v, x0, solver="dopri5", rtol=1e-12, atol=1e-12, max_steps=3, throw=False)
    assert not bool(st.success)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"rtol": -1.0}, "rtol must be a finite number >= 0"),
        ({"atol": float("nan")}, "atol must be a finite number >= 0"),
        ({"rtol": 0.0, "atol": 0.0}, "cannot both be 0"),
        ({"max_steps": 0}, "max_steps must be a positive integer"),
        ({"max_steps": 2.5}, "max_steps must be a positive integer"),
        # non-finite times: returned x0 unchanged with success=True (t0 == t1 never held)
        ({"t0": float("nan")}, "t0 must be a finite time; got nan"),
        ({"t1": float("inf"), "solver": "euler", "steps": 2}, "t1 must be a finite time; got inf"),
        ({"solver": "euler", "step_size": float("inf")}, "step_size must be a finite number > 0"),
    ],
)
def test_bad_tolerances_and_step_budgets(kw, match):
    v = _gaussian_field()
    x = _x0(4)
    with pytest.raises(ValueError, match=match):
        fmjax.sample(v, x, **kw)
    with pytest.raises(ValueError, match=match):
        fmjax.log_likelihood(v, x, **kw)
    # tolerances do not concern fixed-step solvers; a zero rtol with atol > 0 is fine
    fmjax.sample(v, x, solver="euler", steps=2, rtol=-1.0)
    fmjax.sample(v, x, rtol=0.0, atol=1e-6)


@pytest.mark.parametrize(
    "bad_v, match",
    [
        (lambda t, x: x[:, :1], r"x's shape \(4, 2\); got shape \(4, 1\)"),
        (lambda t, x: jnp.sum(x, axis=1), r"got shape \(4,\)"),
        (lambda t, x: (x, x), "got tuple"),
        (lambda t, x: x.astype(jnp.int32), "floating-point"),
    ],
)
def test_field_output_must_have_the_state_shape(bad_v, match):
    # A (B, 1) or (B,) output would broadcast against the state inside the solver and give
    # a wrong flow without an error.
    x = _x0(4)
    with pytest.raises(ValueError, match=match):
        fmjax.sample(bad_v, x)
    with pytest.raises(ValueError, match=match):
        fmjax.sample(bad_v, x, solver="euler", steps=2)
    with pytest.raises(ValueError, match=match):
        fmjax.log_likelihood(bad_v, x)
    with pytest.raises(ValueError, match=match):
        fmjax.log_likelihood(bad_v, x, divergence="hutchinson", key=jax.random.key(0))
    with pytest.raises(
        ValueError,
        match=r"x's shape \(1, 2\); got shape \(1, 1\) "
        r"\(per_example=True: x is one example",
    ):
        fmjax.sample(lambda t, x: x[:, :1], x, per_example=True)


def _tree_field(t, y, args):  # d/dt (a, b) = (-a, 2 b): a(1) = a0 / e, b(1) = b0 e^2
    return {"a": -y["a"], "b": 2.0 * y["b"]}


def test_ode_solve_of_a_pytree_state():
    y0 = {"a": jnp.ones((4, 2)), "b": jnp.full((4,), 0.5)}
    y1, _, stats = jax.jit(lambda y: fmjax.ode.solve(_tree_field, y, t0=0.0, t1=1.0))(y0)
    np.testing.assert_allclose(y1["a"], np.exp(-1.0), rtol=1e-4)
    np.testing.assert_allclose(y1["b"], 0.5 * np.exp(2.0), rtol=1e-4)
    assert bool(stats.success)


@pytest.mark.parametrize(
    "bad_field, match",
    [
        (
            lambda t, y, args: {"a": -y["a"], "b": 2.0 * y["b"][:, None]},
            r"dy/dt\['b'\] with the state's shape \(4,\); got shape \(4, 1\)",
        ),
        (
            lambda t, y, args: {"a": -y["a"][:, :1], "b": y["b"]},
            r"dy/dt\['a'\] with the state's shape \(4, 2\); got shape \(4, 1\)",
        ),
        (lambda t, y, args: (-y["a"], y["b"]), "with the state's structure"),
        (lambda t, y, args: {"a": -y["a"], "b": None}, "with the state's structure"),
        (
            lambda t, y, args: {"a": y["a"].astype(jnp.int32), "b": y["b"]},
            r"floating-point dy/dt\['a'\]; got dtype int32",
        ),
    ],
)
def test_ode_solve_checks_the_fields_output_against_the_state(bad_field, match):
    # (the check runs while tracing, so these raise before anything is compiled)
    y0 = {"a": jnp.ones((4, 2)), "b": jnp.full((4,), 0.5)}
    for kw in ({}, {"solver": "rk4", "steps": 3}):
        with pytest.raises(ValueError, match=match):
            jax.jit(lambda y, kw=kw: fmjax.ode.solve(bad_field, y, t0=0.0, t1=1.0, **kw))(y0)


def test_recompiles_once_per_shape_with_partial():
    v = _gaussian_field()
    fmjax.sample(v, _x0(16), solver="euler", steps=3)
    before = fmjax.sampling._sample._cache_size()
    v2 = _gaussian_field()  # new Partial of the same function, new arrays
    fmjax.sample(v2, _x0(16, seed=2), solver="euler", steps=3)
    assert fmjax.sampling._sample._cache_size() == before


def test_check_derivative_accepts_python_scalars_and_names_what_came_back():
    # a scalar state may get a Python float back (shape (), floating); a string may not
    fmjax.ode.check_derivative(1.0, jnp.zeros(()))
    with pytest.raises(ValueError, match=r"dy/dt with the state's shape \(\); got str"):
        fmjax.ode.check_derivative("a", jnp.zeros(()))
    with pytest.raises(ValueError, match=r"v\(t, x\) must return dx/dt\['a'\] with x's shape"):
        fmjax.ode.check_derivative(
            {"a": jnp.zeros(3)}, {"a": jnp.zeros(2)}, fn="v(t, x)", out="dx/dt", state="x"
        )
