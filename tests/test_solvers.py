"""fmjax.solvers: one checked, hashable SolverOptions value for every solve."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fmjax
from fmjax import ode, solvers
from fmjax.solvers import SolverOptions, solver_options


def _v(t, x):
    return -x * (1.0 + t[:, None])


X = jnp.linspace(-1.0, 1.0, 8).reshape(4, 2)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"solver": "rk45"}, "unknown solver 'rk45'"),
        ({"solver": 3}, "unknown solver 3"),
        ({"error_norm": "l2"}, "unknown error_norm 'l2'"),
        ({"solver": "euler", "steps": 4, "error_norm": "max"}, "controls adaptive step sizes"),
        ({"solver": "euler"}, "exactly one of steps= or step_size="),
        ({"solver": "euler", "steps": 4, "step_size": 0.1}, "exactly one of steps= or step_size="),
        ({"solver": "dopri5", "steps": 10}, "adaptive solver 'dopri5' chooses its own steps"),
        ({"step_size": 0.1}, "adaptive solver"),
        ({"solver": "rk4", "steps": 0}, "steps must be a positive integer"),
        ({"solver": "rk4", "steps": True}, "steps must be a positive integer"),
        ({"solver": "rk4", "step_size": -0.1}, "step_size must be a finite number > 0"),
        ({"solver": "rk4", "step_size": float("inf")}, "step_size must be a finite number > 0"),
        ({"rtol": -1.0}, "rtol must be a finite number >= 0"),
        ({"atol": float("nan")}, "atol must be a finite number >= 0"),
        ({"rtol": 0.0, "atol": 0.0}, "cannot both be 0"),
        ({"max_steps": 0}, "max_steps must be a positive integer"),
        ({"max_steps": 2.5}, "max_steps must be a positive integer"),
    ],
)
def test_construction_validates(kw, match):
    with pytest.raises(ValueError, match=match):
        SolverOptions(**kw)
    with pytest.raises(ValueError, match=match):  # and so does every keyword form
        fmjax.sample(_v, X, **kw)


def test_fixed_step_solvers_ignore_tolerances_and_values_are_normalised():
    o = SolverOptions("euler", steps=4.0, rtol=-1.0)
    assert o.steps == 4 and type(o.steps) is int and not o.adaptive
    o = SolverOptions("midpoint", step_size=np.float32(0.25), rtol=0, atol=0)
    assert o.step_size == 0.25 and type(o.step_size) is float
    assert o.num_fixed_steps(0.0, 1.0) == 4 and o.num_fixed_steps(1.0, 0.0) == 4
    assert SolverOptions("rk4", step_size=0.3).num_fixed_steps(0.0, 1.0) == 4  # ceil
    o = SolverOptions(rtol=np.float64(1e-4), atol=1, max_steps=1e3)
    assert (o.rtol, o.atol, o.max_steps) == (1e-4, 1.0, 1000) and o.adaptive
    assert type(o.atol) is float and type(o.max_steps) is int


def test_equal_options_are_equal_and_hash_equal():
    a = SolverOptions("rk4", steps=10)
    b = SolverOptions(solver="rk4", steps=np.int64(10))
    assert a == b and hash(a) == hash(b)
    assert SolverOptions() == SolverOptions("dopri5", rtol=1e-5, atol=1e-5, max_steps=4096)
    assert SolverOptions(rtol=1e-4) != SolverOptions(rtol=1e-5)
    assert len({a, b, SolverOptions()}) == 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.steps = 3
    c = dataclasses.replace(SolverOptions(), rtol=1e-3)
    assert c.rtol == 1e-3
    with pytest.raises(ValueError, match="rtol must be"):
        dataclasses.replace(SolverOptions(), rtol=-1.0)

    # a static argument of jax.jit: equal options share one compiled function
    @jax.jit
    def run(x):
        return ode.solve(lambda t, y, args: -y, x, t0=0.0, t1=1.0, options=a)[0]

    f = jax.jit(
        lambda x, options: ode.solve(lambda t, y, args: -y, x, t0=0.0, t1=1.0, options=options)[0],
        static_argnames="options",
    )
    f(X, options=a)
    f(X, options=b)
    assert f._cache_size() == 1
    np.testing.assert_allclose(run(X), f(X, options=b))


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"solver": "rk4", "steps": 7},
        {"solver": "midpoint", "step_size": 0.1},
        {"solver": "tsit5", "rtol": 1e-6, "atol": 1e-7, "error_norm": "max"},
    ],
)
def test_keyword_form_equals_options_form(settings):
    options = SolverOptions(**settings)
    kw_x, kw_stats = fmjax.sample(_v, X, **settings)
    op_x, op_stats = fmjax.sample(_v, X, options=options)
    np.testing.assert_array_equal(kw_x, op_x)
    assert int(kw_stats.nfe) == int(op_stats.nfe)
    kw_l, _ = fmjax.log_likelihood(_v, X, **settings)
    op_l, _ = fmjax.log_likelihood(_v, X, options=options)
    np.testing.assert_array_equal(kw_l, op_l)
    kw_y = ode.solve(lambda t, y, a: -y, X, t0=0.0, t1=1.0, **settings)[0]
    op_y = ode.solve(lambda t, y, a: -y, X, t0=0.0, t1=1.0, options=options)[0]
    np.testing.assert_array_equal(kw_y, op_y)
    # the exact solution of dx/dt = -x (1 + t): x0 exp(-(t + t^2 / 2)) at t = 1
    np.testing.assert_allclose(op_x, X * np.exp(-1.5), rtol=5e-3, atol=1e-6)


def test_options_and_keywords_together_are_refused():
    options = SolverOptions("rk4", steps=4)
    for fn in (fmjax.sample, fmjax.log_likelihood):
        with pytest.raises(ValueError, match="either as options= or as keywords, not both"):
            fn(_v, X, options=options, rtol=1e-3)
    with pytest.raises(ValueError, match="not both"):
        ode.solve(lambda t, y, a: -y, X, t0=0.0, t1=1.0, options=options, steps=3)
    with pytest.raises(TypeError, match="options must be a fmjax.ode.SolverOptions"):
        fmjax.sample(_v, X, options={"solver": "rk4"})
    with pytest.raises(TypeError, match=r"unknown solver setting\(s\) \['rtoll'\]"):
        fmjax.sample(_v, X, rtoll=1e-3)
    # a setting given as None takes its default, with or without options
    assert solver_options(options, steps=None) is options
    assert solver_options(rtol=None) == SolverOptions()


def test_options_are_checked_once_per_solve(monkeypatch):
    made = []
    post_init = SolverOptions.__post_init__

    def counting(self):
        made.append(1)
        post_init(self)

    monkeypatch.setattr(SolverOptions, "__post_init__", counting)
    x = X + 0.5  # new shapes' values: whatever is cached, the solve below is traced
    for fn in (fmjax.sample, fmjax.log_likelihood):
        made.clear()
        fn(jax.tree_util.Partial(_v), x[:3], solver="rk4", steps=3)
        assert made == [1], fn
        made.clear()
        fn(jax.tree_util.Partial(_v), x[:3], options=SolverOptions("rk4", steps=3))
        assert made == [1], fn  # the one made above; passing it checks nothing again


def test_check_times():
    fixed = SolverOptions("rk4", step_size=0.1)
    solvers.check_times(0.0, 1.0, fixed)
    with pytest.raises(ValueError, match="t0 and t1 must differ"):
        solvers.check_times(0.5, 0.5, SolverOptions())
    with pytest.raises(ValueError, match="t1 must be a finite time; got inf"):
        solvers.check_times(0.0, float("inf"), SolverOptions())
    with pytest.raises(ValueError, match="step_size= needs concrete t0 and t1"):
        jax.jit(lambda t1: solvers.check_times(0.0, t1, fixed))(1.0)
    jax.jit(lambda t1: solvers.check_times(0.0, t1, SolverOptions("rk4", steps=3)))(1.0)
