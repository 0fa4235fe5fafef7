"""The shared integer and real checks and every public argument that uses the first."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fmjax
from fmjax.checks import integer, real
from fmjax.data import toy
from fmjax.metrics import nll
from fmjax.train import checkpoint, step

BAD = [0, -2, 2.5, True, np.bool_(True), "3", float("nan"), float("inf"), np.ones(2, int)]


@pytest.mark.parametrize(
    "value,expected",
    [(3, 3), (np.int64(4), 4), (jnp.asarray(5), 5), (1e3, 1000), (np.float32(2.0), 2)],
)
def test_integer_accepts_integral_values(value, expected):
    out = integer(value, "n")
    assert out == expected and type(out) is int


@pytest.mark.parametrize("value", BAD + [None])
def test_integer_refuses_with_the_name_and_value(value):
    with pytest.raises(ValueError, match=r"^count must be a positive integer; got "):
        integer(value, "count")


def test_integer_minimum_none_and_traced_values():
    assert integer(0, "w", minimum=0) == 0 and integer(None, "w", allow_none=True) is None
    with pytest.raises(ValueError, match="w must be a non-negative integer; got -1"):
        integer(-1, "w", minimum=0)
    with pytest.raises(ValueError, match="k must be an integer >= 2 or None; got 1"):
        integer(1, "k", minimum=2, allow_none=True)
    with pytest.raises(ValueError, match="n must be a positive integer; got .*Tracer"):
        jax.jit(lambda n: integer(n, "n"))(3)


@pytest.mark.parametrize(
    "value,expected", [(0.5, 0.5), (1, 1.0), (np.float32(0.25), 0.25), (jnp.asarray(0.75), 0.75)]
)
def test_real_accepts_numbers(value, expected):
    out = real(value, "w", low=0.0, high=1.0)
    assert out == expected and type(out) is float


@pytest.mark.parametrize(
    "value",
    ["0.5", b"0.5", True, np.bool_(False), None, float("nan"), float("inf"), np.ones(2), 1.0, 0.0],
)
def test_real_refuses_with_the_name_and_interval(value):
    with pytest.raises(ValueError, match=r"^decay must be a finite number in \(0, 1\); got "):
        real(value, "decay", low=0.0, high=1.0, low_open=True, high_open=True)


def _v(t, x):
    return -x


X = jnp.ones((4, 2))
KEY = jax.random.key(0)
TX = optax.sgd(0.1)


def _fused(n):
    return step.make_fused_train_steps(lambda p, k, b: jnp.sum(p), TX, lambda k: X, n)


# every public argument that is a count: (name in the message, call with the value)
SITES = {
    "steps": lambda n: fmjax.sample(_v, X, solver="euler", steps=n),
    "max_steps": lambda n: fmjax.sample(_v, X, max_steps=n),
    "num_probes": lambda n: fmjax.log_likelihood(
        _v, X, divergence="hutchinson", key=KEY, num_probes=n
    ),
    "chunk_size": lambda n: fmjax.log_likelihood(_v, X, chunk_size=n),
    "num_dims": lambda n: fmjax.bits_per_dim(jnp.zeros(3), n),
    "num_steps": _fused,
    "n (the number of samples)": lambda n: toy.sample("checkerboard", KEY, n),
    "n (the number of CPU devices)": lambda n: fmjax.use_cpu_devices(n),
    "num_dequant": lambda n: nll.image_bpd(_v, jnp.zeros((2, 4)), KEY, num_dequant=n),
}


@pytest.mark.parametrize("value", [True, 0, 2.5, "3", float("nan")])
@pytest.mark.parametrize("name", sorted(SITES))
def test_count_arguments_refuse_non_integers(name, value):
    # before the shared check: True and nan passed or failed elsewhere, "3" failed with
    # int()'s own message
    with pytest.raises(ValueError, match=re.escape(name) + " must be a positive integer.*; got "):
        SITES[name](value)


def test_count_arguments_accept_integral_floats_and_numpy_ints():
    a, _ = fmjax.sample(_v, X, solver="euler", steps=4.0)
    b, _ = fmjax.sample(_v, X, solver="euler", steps=np.int32(4))
    np.testing.assert_allclose(a, (1 - 0.25) ** 4 * X, rtol=1e-6)  # 4 Euler steps of -x
    np.testing.assert_array_equal(a, b)
    assert toy.sample("checkerboard", KEY, 1e2).shape == (100, 2)
    bpd = fmjax.bits_per_dim(jnp.zeros(1), (2, 3.0))
    np.testing.assert_allclose(bpd, 8.0, rtol=1e-6)  # log p = 0 on [0, 1]^6: 8 bits/dim


def test_other_count_limits(tmp_path):
    with pytest.raises(
        ValueError,
        match=r"num_dims=\(32, 0, 3\): each size must be a "
        "positive integer; got 0",
    ):
        fmjax.bits_per_dim(jnp.zeros(1), (32, 0, 3))
    with pytest.raises(ValueError, match="num_levels must be an integer >= 2; got 1"):
        fmjax.bits_per_dim(jnp.zeros(1), 3, num_levels=1)
    with pytest.raises(ValueError, match="save_every must be a positive integer; got True"):
        checkpoint.CheckpointManager(tmp_path / "c", save_every=True)
    with pytest.raises(ValueError, match="keep must be a positive integer; got 0"):
        checkpoint.CheckpointManager(tmp_path / "c", keep=0)
