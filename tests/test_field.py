"""Vector fields given as modules that hold their weights (Equinox, Flax NNX, any callable
pytree): solved with their arrays as runtime arguments, so new weights reuse the compiled
solve, with the values of the same field passed as a function."""

import dataclasses
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import fmjax
from fmjax._field import as_field

X0 = jax.random.normal(jax.random.key(1), (16, 2))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Linear:
    """``v(t, x) = -rate * x``: the flow is ``x0 exp(-rate t)``, log-density change
    ``2 rate t`` in 2-D. ``rate`` is an array leaf; ``label`` a static (meta) field."""

    rate: jax.Array
    label: str = dataclasses.field(default="decay", metadata={"static": True})

    def __call__(self, t, x):
        Linear.traces += 1
        return -self.rate * x


Linear.traces = 0


class EqxField(eqx.Module):
    mlp: eqx.nn.MLP
    traces: ClassVar[list] = [0]  # (a class attribute, not a field)

    def __call__(self, t, x):
        EqxField.traces[0] += 1
        return jax.vmap(self.mlp)(jnp.concatenate([x, t[:, None]], axis=-1))


class NnxField(nnx.Module):
    traces: ClassVar[list] = [0]

    def __init__(self, seed):
        rngs = nnx.Rngs(seed)
        self.hidden, self.out = nnx.Linear(3, 16, rngs=rngs), nnx.Linear(16, 2, rngs=rngs)

    def __call__(self, t, x):
        NnxField.traces[0] += 1
        return self.out(jnp.tanh(self.hidden(jnp.concatenate([x, t[:, None]], axis=-1))))


def _traces_of(make, counter, solve):
    """Traces of the field by the first solve, and by two more with new weights."""
    before = counter()
    first = solve(make(0))
    after_one = counter()
    others = [solve(make(seed)) for seed in (1, 2)]
    return after_one - before, counter() - after_one, [first, *others]


def test_a_callable_pytree_is_solved_with_its_arrays_as_arguments():
    rates = {0: 0.5, 1: 1.5, 2: 2.5}
    n_first, n_more, outs = _traces_of(
        lambda s: Linear(jnp.asarray(rates[s])),
        lambda: Linear.traces,
        lambda v: fmjax.sample(v, X0, solver="dopri5", rtol=1e-7, atol=1e-7)[0],
    )
    assert n_first > 0 and n_more == 0  # new weights, no new compile
    for seed, out in enumerate(outs):  # the closed-form flow
        np.testing.assert_allclose(out, X0 * np.exp(-rates[seed]), rtol=1e-5, atol=1e-6)
    logp, _ = fmjax.log_likelihood(Linear(jnp.asarray(0.5)), X0, rtol=1e-7, atol=1e-7)
    # x0 = x1 e^{rate}: log N(x0) + d * rate
    expected = -0.5 * jnp.sum((X0 * np.exp(0.5)) ** 2, -1) - np.log(2 * np.pi) + 2 * 0.5
    np.testing.assert_allclose(logp, expected, rtol=1e-5, atol=1e-5)
    # a static field is part of the key: another value compiles anew
    before = Linear.traces
    fmjax.sample(Linear(jnp.asarray(0.5), "other"), X0, solver="dopri5")
    assert Linear.traces > before


def test_gradients_reach_the_arrays_of_a_module_field():
    def loss(v):
        return jnp.sum(fmjax.sample(v, X0, solver="dopri5", rtol=1e-8, atol=1e-8)[0])

    grad = jax.grad(loss)(Linear(jnp.asarray(0.7)))
    # d/d rate sum(x0 e^{-rate}) = -sum(x0) e^{-rate}
    np.testing.assert_allclose(grad.rate, -jnp.sum(X0) * np.exp(-0.7), rtol=1e-4)


@pytest.mark.parametrize("kind", ["equinox", "nnx"])
def test_equinox_and_nnx_modules_compile_once_and_match_a_plain_function(kind):
    if kind == "equinox":

        def make(seed):
            return EqxField(eqx.nn.MLP(3, 2, 16, 2, key=jax.random.key(seed)))

        counter = lambda: EqxField.traces[0]
    else:
        make, counter = NnxField, lambda: NnxField.traces[0]

    def solve(v):
        return fmjax.sample(v, X0, solver="dopri5")[0]

    n_first, n_more, outs = _traces_of(make, counter, solve)
    assert n_first > 0 and n_more == 0
    assert float(jnp.max(jnp.abs(outs[0] - outs[1]))) > 1e-3  # the new weights are used
    module = make(1)
    as_function = fmjax.sample(lambda t, x: module(t, x), X0, solver="dopri5")[0]
    np.testing.assert_array_equal(outs[1], as_function)
    # the other entry points take modules the same way
    lik = [fmjax.log_likelihood(make(seed), X0, solver="heun", steps=4)[0] for seed in (0, 1)]
    before = counter()
    fmjax.log_likelihood(make(2), X0, solver="heun", steps=4)
    assert counter() == before and float(jnp.max(jnp.abs(lik[0] - lik[1]))) > 1e-4
    x1_model = fmjax.paths.CondOT().velocity_field(make(0), "x1")
    fmjax.sample(x1_model, X0, solver="euler", steps=3, t1=0.9)
    before = counter()
    fmjax.sample(
        fmjax.paths.CondOT().velocity_field(make(1), "x1"), X0, solver="euler", steps=3, t1=0.9
    )
    assert counter() == before


def test_plain_functions_and_partials_are_kept():
    def f(t, x):
        return -x

    assert as_field(f).func is f
    p = jax.tree_util.Partial(f)
    assert as_field(p) is p
    with pytest.raises(ValueError, match="callable"):
        as_field(jnp.ones(3))
