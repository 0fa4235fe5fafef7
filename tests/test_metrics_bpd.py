"""Bits/dim of images under K-sample dequantization (fmjax.metrics.bpd) against closed forms.

With the zero vector field the flow is the identity, so p = the standard normal base exactly
and log p(x + u) is analytic; Hutchinson is exact too (the divergence is 0 for any probe). A
linear field v = a x has divergence a D (Rademacher probes: exact as well) and latent
x e^{-a}.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import logsumexp

import fmjax
from fmjax.metrics import bpd as metrics_bpd

BIN = 2.0 / 256.0


def _field(params, t, x):
    """a x + c tanh(2 x) (1 + t): one Python function for every test field, so the fields
    differ only in array leaves and share one compilation per shape and setting."""
    a, c = params
    return a * x + c * jnp.tanh(2.0 * x) * (1.0 + t)[:, None, None, None]


def field(a, c):
    return jax.tree_util.Partial(_field, (jnp.float32(a), jnp.float32(c)))


zero_field = field(0.0, 0.0)
A = -0.7
linear_field = field(A, 0.0)
tanh_field = field(0.0, 1.0)


def quantized(rng, shape):
    return (2.0 * rng.integers(0, 256, size=shape) / 256.0 - 1.0).astype(np.float32)


def closed_form_bpd(x, u, *, scale=1.0, div=0.0):
    """bpd of the K-sample bound for a flow whose latent is scale * y and log-det term div.

    x: (B, *event) levels, u: (B, K, *event) noise; log p(y) = log N(scale y) - div.
    """
    x = np.asarray(x, np.float64)
    u = np.asarray(u, np.float64)
    b, k = u.shape[:2]
    d = x[0].size
    y = (x[:, None] + u).reshape(b, k, d) * scale
    logp = -0.5 * np.sum(y * y, axis=2) - 0.5 * d * math.log(2 * math.pi) - div
    logp_iw = logsumexp(logp, axis=1) - math.log(k)
    return -logp_iw / (d * math.log(2.0)) + 7.0


def test_noise_derivation_and_range():
    key = jax.random.key(3)
    keys = metrics_bpd.example_keys(key, jnp.arange(2))
    u = np.asarray(metrics_bpd.dequantization_noise(keys, (4, 4, 3), 3, BIN))
    assert u.shape == (2, 3, 4, 4, 3)
    assert u.min() >= 0.0 and u.max() < BIN
    # The documented derivation, written out by hand.
    ek = jax.random.fold_in(key, 1)
    nk, _ = jax.random.split(jax.random.fold_in(ek, 2))
    np.testing.assert_array_equal(u[1, 2], BIN * np.asarray(jax.random.uniform(nk, (4, 4, 3))))
    # Raw uint32 keys give the same noise as typed ones.
    u_raw = metrics_bpd.dequantization_noise(jax.random.key_data(keys), (4, 4, 3), 3, BIN)
    np.testing.assert_array_equal(u, np.asarray(u_raw))


K = 3


@pytest.mark.parametrize("divergence", ["exact", "hutchinson"])
def test_zero_and_linear_fields_match_closed_form(divergence):
    rng = np.random.default_rng(0)
    x = quantized(rng, (3, 4, 4, 3))
    key = jax.random.key(7)
    u = metrics_bpd.dequantization_noise(
        metrics_bpd.example_keys(key, jnp.arange(3)), x.shape[1:], K, BIN
    )
    # v = 0: p is the standard normal base; the K-sample bound and the +7 of [-1, 1] data.
    bpd, nfe = metrics_bpd.image_bpd(zero_field, x, key, num_dequant=K, divergence=divergence)
    np.testing.assert_allclose(np.asarray(bpd), closed_form_bpd(x, u), rtol=1e-5, atol=1e-5)
    assert bpd.shape == (3,) and float(nfe) > 0
    # v = a x: back from t=1 to t=0 the latent is y e^{-a}, and log p(y) = log N(latent) - a D.
    bpd, _ = metrics_bpd.image_bpd(linear_field, x, key, num_dequant=K, divergence=divergence)
    expected = closed_form_bpd(x, u, scale=math.exp(-A), div=A * x[0].size)
    np.testing.assert_allclose(np.asarray(bpd), expected, rtol=1e-4)


@pytest.mark.parametrize("s0", [0.5, 3.0])
def test_source_std_scores_against_the_scaled_gaussian(s0):
    # A flow from N(0, s0^2 I): log p(y) = log N(y / s0) - D log s0 for v = 0, and with
    # v = a x the latent y e^{-a} gives log N(y e^{-a} / s0) - D (a + log s0).
    rng = np.random.default_rng(2)
    x = quantized(rng, (3, 4, 4, 3))
    key = jax.random.key(7)
    d = x[0].size
    u = metrics_bpd.dequantization_noise(
        metrics_bpd.example_keys(key, jnp.arange(3)), x.shape[1:], K, BIN
    )
    bpd, _ = metrics_bpd.image_bpd(zero_field, x, key, num_dequant=K, source_std=s0)
    np.testing.assert_allclose(
        np.asarray(bpd), closed_form_bpd(x, u, scale=1 / s0, div=d * math.log(s0)), rtol=1e-5
    )
    bpd, _ = metrics_bpd.image_bpd(
        linear_field, x, key, num_dequant=K, source_std=s0, divergence="exact"
    )
    np.testing.assert_allclose(
        np.asarray(bpd),
        closed_form_bpd(x, u, scale=math.exp(-A) / s0, div=d * (A + math.log(s0))),
        rtol=1e-4,
    )


def test_time_span_scores_the_flow_over_that_span():
    # v = a x solved over [t0, t1]: the latent is y e^{-a (t1 - t0)} and the log-det term
    # a D (t1 - t0) (a model that predicts eps is a velocity only over such a span)
    rng = np.random.default_rng(5)
    x = quantized(rng, (3, 4, 4, 3))
    key = jax.random.key(7)
    u = metrics_bpd.dequantization_noise(
        metrics_bpd.example_keys(key, jnp.arange(3)), x.shape[1:], K, BIN
    )
    t0, t1 = 0.25, 0.9
    bpd, _ = metrics_bpd.image_bpd(linear_field, x, key, num_dequant=K, t0=t0, t1=t1)
    span = t1 - t0
    np.testing.assert_allclose(
        np.asarray(bpd),
        closed_form_bpd(x, u, scale=math.exp(-A * span), div=A * x[0].size * span),
        rtol=1e-4,
    )


def test_bound_equals_direct_log_likelihood_per_sample():
    """Each of the K samples is fmjax.log_likelihood at x + u_k with probes from its key."""
    rng = np.random.default_rng(1)
    x = quantized(rng, (3, 4, 4, 3))
    key = jax.random.key(11)
    bpd, _ = metrics_bpd.image_bpd(tanh_field, x, key, num_dequant=K)
    d = x[0].size
    for i in range(3):
        ek = jax.random.fold_in(key, i)
        logps = []
        for k in range(K):
            nk, pk = jax.random.split(jax.random.fold_in(ek, k))
            y = x[i] + BIN * jax.random.uniform(nk, x.shape[1:])
            logp, _ = fmjax.log_likelihood(tanh_field, y[None], divergence="hutchinson", key=pk)
            logps.append(float(logp[0]))
        ref = -(logsumexp(logps) - math.log(K)) / (d * math.log(2.0)) + 7.0
        np.testing.assert_allclose(float(bpd[i]), ref, rtol=1e-6)


def test_per_example_results_do_not_depend_on_the_batch():
    rng = np.random.default_rng(4)
    x = quantized(rng, (3, 4, 4, 3))
    other = quantized(rng, (3, 4, 4, 3))
    keys = metrics_bpd.example_keys(jax.random.key(0), jnp.array([10, 11, 12]))
    full, _ = metrics_bpd.image_bpd(tanh_field, x, keys, num_dequant=K)
    # Row 1 among other examples (own adaptive steps per example): same value.
    mixed = other.copy()
    mixed[1] = x[1]
    again, _ = metrics_bpd.image_bpd(tanh_field, mixed, keys, num_dequant=K)
    np.testing.assert_allclose(float(again[1]), float(full[1]), rtol=1e-6)
    assert not np.allclose(np.asarray(again)[[0, 2]], np.asarray(full)[[0, 2]])
    # One key == the batch of keys fold_in(key, row).
    a, _ = metrics_bpd.image_bpd(tanh_field, x, jax.random.key(0), num_dequant=K)
    b, _ = metrics_bpd.image_bpd(
        tanh_field, x, metrics_bpd.example_keys(jax.random.key(0), jnp.arange(3)), num_dequant=K
    )
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_image_bpd_bad_input():
    x = np.zeros((2, 4, 4, 3), np.float32)
    with pytest.raises(ValueError, match="num_dequant"):
        metrics_bpd.image_bpd(zero_field, x, jax.random.key(0), num_dequant=0)
    with pytest.raises(ValueError, match="batch of 2 keys"):
        metrics_bpd.image_bpd(zero_field, x, jax.random.split(jax.random.key(0), 3))
    with pytest.raises(ValueError, match="divergence"):
        metrics_bpd.image_bpd(zero_field, x, jax.random.key(0), divergence="trace")
    with pytest.raises(ValueError, match="unknown solver"):
        metrics_bpd.image_bpd(zero_field, x, jax.random.key(0), solver="rk45")
    for bad in (0.0, -1.0, float("nan"), float("inf"), "abc", True):
        with pytest.raises(
            ValueError, match=r"source_std \(the std of .*\) must be a finite number in \(0, inf\)"
        ):
            metrics_bpd.image_bpd(zero_field, x, jax.random.key(0), source_std=bad)
    for kw, match in (
        ({"t0": 0.5, "t1": 0.5}, r"need t0 < t1 \(noise end before data end\); got t0=0.5, t1=0.5"),
        ({"t1": 1.5}, r"t1 must be a finite number in \[0, 1\]; got 1.5"),
        ({"t0": -0.1}, r"t0 must be a finite number in \[0, 1\]"),
    ):
        with pytest.raises(ValueError, match=match):
            metrics_bpd.image_bpd(zero_field, x, jax.random.key(0), **kw)


def test_solver_settings_as_one_options_value():
    rng = np.random.default_rng(5)
    x = quantized(rng, (2, 4, 4, 3))
    key = jax.random.key(1)
    options = fmjax.SolverOptions(solver="rk4", steps=6)
    by_value, nfe = metrics_bpd.image_bpd(tanh_field, x, key, options=options)
    by_keywords, _ = metrics_bpd.image_bpd(tanh_field, x, key, solver="rk4", steps=6)
    np.testing.assert_array_equal(by_value, by_keywords)
    assert float(nfe) == 4 * 6  # rk4's four evaluations per step, fixed steps
    made = metrics_bpd.BpdOptions.make(num_dequant=2, solver="rk4", steps=6)
    assert made.solve == options and made == metrics_bpd.BpdOptions(num_dequant=2, solve=options)
    assert hash(made) == hash(metrics_bpd.BpdOptions(num_dequant=2, solve=options))
    with pytest.raises(ValueError, match="either as options= or as keywords"):
        metrics_bpd.image_bpd(tanh_field, x, key, options=options, rtol=1e-3)
    with pytest.raises(TypeError, match=r"unknown solver setting\(s\) \['tolerance'\]"):
        metrics_bpd.image_bpd(tanh_field, x, key, tolerance=1e-3)
    with pytest.raises(TypeError, match="solve must be a fmjax.SolverOptions"):
        metrics_bpd.BpdOptions(solve="dopri5")
