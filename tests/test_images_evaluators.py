"""Sampling and the evaluators of the image experiments: closed forms of the bits/dim and
samples of exact predictors on each path and prediction type, and guided samples."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tensorflow_datasets as tfds
from conftest import use_compile_cache
from flax import linen as nn
from image_runs import (
    small_config,
)

import fmjax
import fmjax.metrics.nll
import fmjax.train
from experiments import images
from experiments.images.evaluation import evaluate as evaluate_setup
from experiments.images.evaluators import bpd as bpd_lib

use_compile_cache()
pytestmark = pytest.mark.usefixtures("float32")


def test_ve_path_samples_and_scores_from_its_wide_source(tmp_path):
    # VE starts from N(0, sigma_max^2 I). A fresh UNet's output layer is zero, so v = 0: the
    # samples are the source noise, and the bits/dim of data in [-1, 1] are the source's,
    # 7 + (log(2 pi) / 2 + log 50) / ln 2 = 13.9696 (the data's |y|^2 / (2 * 50^2) adds < 1e-4)
    config = small_config(**{"path.name": "ve", "mode": "eval"})
    setup = images.build(config)
    assert setup.source_std == pytest.approx(50.0)
    state = setup.init_state()
    mesh = fmjax.train.sharding.make_mesh()
    solver = fmjax.SolverOptions("dopri5", rtol=1e-5, atol=1e-5)
    imgs, _ = setup.sample(state.params, jax.random.key(0), 4, mesh, solver)
    assert imgs.shape == (4, 32, 32, 3) and np.std(imgs) == pytest.approx(50.0, rel=0.03)
    with tfds.testing.mock_data(num_examples=16):
        m = images.evaluate(config, str(tmp_path / "run"), state=state)
    expected = 7 + (0.5 * math.log(2 * math.pi) + math.log(50.0)) / math.log(2.0)
    assert m["results"]["bpd"]["value"] == pytest.approx(expected, abs=2e-4)
    assert m["results"]["nfe"]["value"] > 0


class _ExactGaussianModel(nn.Module):
    """The exact prediction of ``path`` for data ``N(0, s^2 I)``: with ``x_t = sigma_t x0 +
    alpha_t x1`` and ``v_t = sigma_t^2 + alpha_t^2 s^2``, ``E[x0 | x] = sigma_t x / v_t``,
    ``E[x1 | x] = alpha_t s^2 x / v_t``, score ``-x / v_t``, velocity
    ``(sigma_t sigma_t' + alpha_t alpha_t' s^2) x / v_t``. Takes the UNet's arguments."""

    gaussian_path: object
    prediction: str
    s: float

    @nn.compact
    def __call__(self, t, x, y=None, train=False):
        self.param("unused", nn.initializers.zeros, ())
        a, sig, da, dsig = (c.reshape(-1, 1, 1, 1) for c in self.gaussian_path.coefficients(t))
        var = sig**2 + a**2 * self.s**2
        scale = {
            "eps": sig,
            "x1": a * self.s**2,
            "score": -1.0,
            "velocity": sig * dsig + a * da * self.s**2,
        }[self.prediction]
        return scale / var * x


@pytest.mark.parametrize(
    "path_name,prediction,t_range",
    [
        ("vp", "eps", (0.0, 1.0 - 1e-5)),  # DDPM's parameterisation
        ("cond_ot", "eps", (1e-3, 1.0)),  # alpha_0 = 0: solved from t0 = t_margin
        ("cond_ot", "score", (1e-3, 1.0)),
        ("cosine", "x1", (0.0, 0.999)),  # sigma_1 = 0: solved up to 1 - t_margin
        ("cosine", "velocity", (0.0, 1.0)),
    ],
)
def test_x1_eps_score_models_sample_and_score_as_their_closed_form(
    tmp_path, path_name, prediction, t_range
):
    # The exact predictor of N(0, s^2 I) data on each path, evaluated by the experiment: the
    # flow over [t0, t1] scales x linearly, x_{t1} = x_{t0} sqrt(v_{t1} / v_{t0}), so the
    # samples are the source noise times that factor, and an image y gets log p =
    # log N(y; 0, v_{t1}) + log N(x_{t0}; 0, s0^2) - log N(x_{t0}; 0, v_{t0}) with s0 the
    # source std the solve starts from (Hutchinson is exact: the Jacobian is c(t) I).
    # Reading the prediction as a velocity, or solving over [0, 1], fails both checks.
    s, n = 0.5, 4
    config = small_config(
        **{
            "path.name": path_name,
            "train.prediction": prediction,
            "mode": "eval",
            "eval.rtol": 1e-6,
            "eval.atol": 1e-6,
        }
    )
    setup = images.build(config)
    path = setup.path
    model = _ExactGaussianModel(gaussian_path=path, prediction=prediction, s=s)
    setup = dataclasses.replace(setup, model=model)
    params = model.init(jax.random.key(0), jnp.zeros((1,)), jnp.zeros((1, 32, 32, 3)))
    state = fmjax.train.TrainState.create(params, optax.adam(1e-3), jax.random.key(1))
    t0, t1 = t_range
    var = {
        t: float(np.asarray(sig**2 + a**2 * s**2))
        for t in t_range
        for a, sig, _, _ in [path.coefficients(jnp.float32(t))]
    }
    s0 = setup.source_std
    mesh = fmjax.train.sharding.make_mesh()
    solver = fmjax.SolverOptions("dopri5", rtol=1e-6, atol=1e-6)
    imgs, stats = setup.sample(params, jax.random.key(0), n, mesh, solver)
    x0 = s0 * jax.random.normal(jax.random.key(0), (n, 32, 32, 3))
    np.testing.assert_allclose(imgs, x0 * math.sqrt(var[t1] / var[t0]), rtol=1e-4, atol=1e-5)
    assert bool(np.all(stats.success))

    with tfds.testing.mock_data(num_examples=16):
        m = evaluate_setup(setup, mesh, str(tmp_path / "run"), state=state)
        batch = next(iter(bpd_lib.eval_batches(setup, mesh)()))
    assert m["prediction"] == prediction and m["t_range"] == pytest.approx(list(t_range))
    x = np.asarray(batch["image"], np.float64)
    keys = fmjax.metrics.nll.example_keys(jax.random.key(config.seed + 1), np.arange(n))
    u = np.asarray(
        fmjax.metrics.nll.dequantization_noise(keys, x.shape[1:], 2, 2 / 256), np.float64
    )
    y = x[:, None] + u  # (n, K, 32, 32, 3)
    x_t0 = y * math.sqrt(var[t0] / var[t1])

    def log_normal(z, v):
        return -0.5 * np.sum(z**2, axis=(2, 3, 4)) / v - 0.5 * 3072 * math.log(2 * math.pi * v)

    logp = log_normal(y, var[t1]) + log_normal(x_t0, s0**2) - log_normal(x_t0, var[t0])
    logp = np.logaddexp(logp[:, 0], logp[:, 1]) - math.log(2)
    expected = np.mean(-logp / (3072 * math.log(2)) + 7)
    assert m["results"]["bpd"]["value"] == pytest.approx(expected, abs=1e-4)


def test_guided_image_samples_mix_the_labelled_and_the_null_class_fields():
    n, w, tol = 4, 2.0, {"solver": "dopri5", "rtol": 1e-3, "atol": 1e-3}
    setup = images.build(small_config(**{"model.num_classes": 3, "eval.guidance_scale": w}))
    model = setup.model
    params = jax.jit(setup.init_state)().params
    # a fresh UNet's output layer is zero (v = 0): perturb every weight so v depends on y
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.key(5), len(leaves))
    params = tree.unflatten(
        [
            p + 0.05 * jax.random.normal(k, p.shape, p.dtype)
            for p, k in zip(leaves, keys, strict=True)
        ]
    )
    mesh = fmjax.train.sharding.make_mesh()
    imgs, _ = setup.sample(
        params, jax.random.key(0), n, mesh, fmjax.SolverOptions("dopri5", rtol=1e-3, atol=1e-3)
    )
    y, null = jnp.arange(n) % 3, jnp.full((n,), 3)

    def guided(t, x):
        return (1 - w) * model.apply(params, t, x, null, train=False) + w * model.apply(
            params, t, x, y, train=False
        )

    x0 = jax.random.normal(jax.random.key(0), (n, 32, 32, 3))
    expected, _ = fmjax.sample(guided, x0, **tol)
    np.testing.assert_allclose(imgs, expected, atol=2e-3)
    # the labelled and null fields differ, so the test tells guided from conditional samples
    apply = jax.jit(lambda y: model.apply(params, jnp.zeros((n,)), x0, y, train=False))
    assert np.max(np.abs(apply(y) - apply(null))) > 0.1
