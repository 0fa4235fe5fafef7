"""Tests for fmjax.models.mlp (time-conditioned MLP velocity field)."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from fmjax.models.mlp import ACTIVATIONS, MLP


def _n_params(params):
    return sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(params))


def _init(model, x, t=None):
    t = jnp.zeros((x.shape[0],)) if t is None else t
    return jax.jit(model.init)(jax.random.key(0), t, x)


def _shapes(model, x):
    """Parameter shapes without running the initialisers (fast)."""
    return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((x.shape[0],)), x)


def _random_params(model, x, seed=0):
    """Random float32 parameters of the right structure, drawn with NumPy (no XLA compile)."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda s: jnp.asarray(rng.normal(size=s.shape) / np.sqrt(s.shape[0]), jnp.float32),
        _shapes(model, x),
    )


def test_param_count_meta_example():
    # Meta flow_matching 2-D example: Linear(3,512), 3x Linear(512,512), Linear(512,2)
    model = MLP(hidden=512, depth=4, activation="silu", time_embedding="raw")
    params = _shapes(model, jnp.zeros((1, 2)))
    assert _n_params(params) == 3 * 512 + 512 + 3 * (512 * 512 + 512) + 512 * 2 + 2 == 791_042


def test_param_count_small_selu():
    model = MLP(hidden=64, depth=3, activation="selu", time_embedding="raw")
    params = _shapes(model, jnp.zeros((1, 2)))
    assert _n_params(params) == 3 * 64 + 64 + 2 * (64 * 64 + 64) + 64 * 2 + 2 == 8_706


def test_param_count_sinusoidal_and_out_dim():
    model = MLP(hidden=32, depth=2, time_embedding="sinusoidal", time_dim=8, out_dim=3)
    params = _init(model, jnp.zeros((1, 5)))
    assert _n_params(params) == (5 + 16) * 32 + 32 + (32 * 32 + 32) + 32 * 3 + 3
    out = jax.jit(model.apply)(params, 0.5, jnp.ones((4, 5)))
    chex.assert_shape(out, (4, 3))
    # depth 0 is a linear map
    assert _n_params(_shapes(MLP(depth=0, time_embedding="raw"), jnp.zeros((1, 2)))) == 3 * 2 + 2


class MLPVariantsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters("raw", "sinusoidal")
    def test_shape_dtype_and_t_dependence(self, time_embedding):
        model = MLP(hidden=32, depth=2, time_embedding=time_embedding, time_dim=8)
        x = jax.random.normal(jax.random.key(1), (5, 2))
        params = _random_params(model, x)
        apply = self.variant(model.apply)
        v0 = apply(params, jnp.full((5,), 0.1), x)
        v1 = apply(params, jnp.linspace(0.5, 0.9, 5), x)
        for v in (v0, v1):
            chex.assert_shape(v, (5, 2))
            chex.assert_type(v, jnp.float32)
            chex.assert_tree_all_finite(v)
        # the output depends on t
        assert np.abs(np.asarray(v0) - np.asarray(v1)).min() > 1e-4
        # scalar t is broadcast over the batch
        np.testing.assert_allclose(apply(params, jnp.float32(0.1), x), v0, rtol=1e-6, atol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_event_shape(self):
        model = MLP(hidden=16, depth=2, time_embedding="sinusoidal", time_dim=4)
        x = jax.random.normal(jax.random.key(3), (3, 4, 4, 1))
        params = _random_params(model, x)
        # first layer sees the 16 flattened features + 2 * time_dim
        assert params["params"]["hidden_0"]["kernel"].shape == (16 + 8, 16)
        out = self.variant(model.apply)(params, 0.3, x)
        chex.assert_shape(out, (3, 4, 4, 1))
        chex.assert_type(out, jnp.float32)
        flat = self.variant(model.apply)(params, 0.3, x.reshape(3, 16))
        np.testing.assert_allclose(out.reshape(3, 16), flat, rtol=1e-5, atol=1e-6)


def test_bfloat16_compute():
    model = MLP(hidden=32, depth=2, time_dim=8, dtype=jnp.bfloat16)
    x = jax.random.normal(jax.random.key(1), (5, 2))
    # params stay float32
    chex.assert_type(jax.tree_util.tree_leaves(_shapes(model, x)), jnp.float32)
    params = _random_params(model, x)
    v = jax.jit(model.apply)(params, 0.5, x)
    chex.assert_shape(v, (5, 2))
    chex.assert_type(v, jnp.float32)
    chex.assert_tree_all_finite(v)
    v32 = jax.jit(MLP(hidden=32, depth=2, time_dim=8).apply)(params, 0.5, x)
    np.testing.assert_allclose(v, v32, rtol=0.1, atol=0.05)


def test_activations_all_work():
    assert set(ACTIVATIONS) == {"silu", "relu", "gelu", "selu", "tanh", "softplus"}
    x = jnp.linspace(-1.0, 1.0, 4).reshape(2, 2)
    params = _random_params(MLP(hidden=8, depth=1, time_embedding="raw"), x)  # same structure

    @jax.jit
    def all_outputs(params):
        return [
            MLP(hidden=8, depth=1, activation=name, time_embedding="raw").apply(params, 0.5, x)
            for name in ACTIVATIONS
        ]

    outs = [np.asarray(o) for o in all_outputs(params)]
    assert all(np.all(np.isfinite(o)) for o in outs)
    for i in range(len(outs)):
        for j in range(i + 1, len(outs)):
            assert not np.allclose(outs[i], outs[j])


def test_bad_config_raises():
    with pytest.raises(ValueError, match="silu"):
        MLP(activation="swish")
    with pytest.raises(ValueError, match="raw"):
        MLP(time_embedding="fourier")
    with pytest.raises(ValueError):
        MLP(depth=-1)


def test_bad_input_raises():
    model = MLP(hidden=8, depth=1, time_embedding="raw")
    x = jnp.zeros((4, 2))
    params = _shapes(model, x)
    # shape checks are static: they raise while tracing (eval_shape / jit) as well as eagerly
    apply = functools.partial(jax.eval_shape, model.apply)
    chex.assert_shape(apply(params, 0.0, x), (4, 2))
    with pytest.raises(ValueError, match=r"rank >= 2.*\(2,\)"):
        apply(params, 0.0, jnp.zeros((2,)))
    with pytest.raises(ValueError, match=r"\(4,\).*\(5,\)"):
        apply(params, jnp.zeros((5,)), x)
    with pytest.raises(ValueError, match=r"\(4, 1\)"):
        apply(params, jnp.zeros((4, 1)), x)
    with pytest.raises(ValueError, match="expected t"):
        jax.jit(model.apply).lower(params, jnp.zeros((3,)), x)
    with pytest.raises(ValueError, match="expected t"):  # eager: raised before params are used
        model.apply(params, jnp.zeros((3,)), x)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_fast_selu_matches_jax_selu(dtype):
    from fmjax.models.mlp import fast_selu

    x = jnp.concatenate([jnp.linspace(-30.0, 30.0, 10001), jnp.array([-1e-8, 0.0, 1e-8])])
    x = x.astype(dtype)
    tol = {"rtol": 1e-6, "atol": 2e-7} if dtype == jnp.float32 else {"rtol": 1e-2, "atol": 1e-2}
    y = fast_selu(x)
    chex.assert_type(y, dtype)
    np.testing.assert_allclose(
        np.asarray(y, np.float32), np.asarray(jax.nn.selu(x), np.float32), **tol
    )
    # first and second derivatives, including x = 0 (jax.nn.selu's slope there is the
    # negative branch's, scale * alpha)
    for order in (1, 2):
        ours, ref = fast_selu, jax.nn.selu
        for _ in range(order):
            ours, ref = jax.grad(ours), jax.grad(ref)
        got, want = jax.vmap(ours)(x), jax.vmap(ref)(x)
        chex.assert_type(got, dtype)
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), **tol)
    np.testing.assert_allclose(
        jax.grad(fast_selu)(0.0), 1.0507009873554805 * 1.6732632423543772, rtol=1e-6
    )


def test_fast_selu_derivative_by_finite_differences_and_jvp_equals_vjp():
    from fmjax.models.mlp import fast_selu

    x = jnp.array(
        [-5.0, -1.3, -0.2, 0.3, 2.0, 7.5], jnp.float64 if jax.config.jax_enable_x64 else jnp.float32
    )
    h = 1e-3
    fd = (fast_selu(x + h) - fast_selu(x - h)) / (2 * h)
    _, jvp = jax.jvp(fast_selu, (x,), (jnp.ones_like(x),))
    _, vjp_fn = jax.vjp(fast_selu, x)
    np.testing.assert_allclose(jvp, fd, rtol=1e-3, atol=5e-5)  # float32 differences
    np.testing.assert_allclose(vjp_fn(jnp.ones_like(x))[0], jvp, rtol=1e-6)


def test_class_and_context_conditioning():
    x, t = jnp.ones((3, 2)), jnp.full((3,), 0.5)
    base = _n_params(_shapes(MLP(hidden=8, depth=1, time_embedding="raw"), x))
    m = MLP(hidden=8, depth=1, time_embedding="raw", num_classes=4, class_dim=5)
    y = jnp.array([0, 3, 4])
    params = jax.jit(m.init)(jax.random.key(0), t, x, y)
    # a (K + 1) x class_dim table and class_dim more inputs to the first layer
    assert _n_params(params) == base + 5 * 5 + 5 * 8
    params = _random_params_like(params)
    out = m.apply(params, t, x, y)
    chex.assert_shape(out, (3, 2))
    assert not np.allclose(out[0], out[1])  # same x and t, different classes
    # no label is the null class K
    np.testing.assert_allclose(m.apply(params, t, x), m.apply(params, t, x, jnp.full(3, 4)))
    c = MLP(hidden=8, depth=1, time_embedding="raw", context_dim=3)
    ctx = jnp.arange(9.0).reshape(3, 3)
    cparams = _random_params_like(jax.jit(c.init)(jax.random.key(0), t, x, ctx))
    assert _n_params(cparams) == base + 3 * 8
    out = c.apply(cparams, t, x, ctx)
    assert not np.allclose(out, c.apply(cparams, t, x, ctx + 1.0))


def _random_params_like(params, seed=1):
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params
    )


def test_bad_conditions_raise():
    x, t = jnp.ones((3, 2)), jnp.zeros(3)
    plain = MLP(hidden=8, depth=1, time_embedding="raw")
    with pytest.raises(ValueError, match="this MLP takes no condition"):
        jax.eval_shape(plain.init, jax.random.key(0), t, x, jnp.zeros(3, jnp.int32))
    cls = MLP(hidden=8, depth=1, time_embedding="raw", num_classes=4)
    with pytest.raises(ValueError, match=r"class labels cond of shape \(3,\) and an integer"):
        jax.eval_shape(cls.init, jax.random.key(0), t, x, jnp.zeros(3))
    with pytest.raises(ValueError, match=r"class labels must lie in \[0, 4\] \(null class 4\)"):
        cls.init(jax.random.key(0), t, x, jnp.array([0, 5, 1]))
    ctx = MLP(hidden=8, depth=1, time_embedding="raw", context_dim=2)
    with pytest.raises(ValueError, match=r"float context cond of shape \(3, 2\)"):
        jax.eval_shape(ctx.init, jax.random.key(0), t, x, None)
    with pytest.raises(ValueError, match="not both"):
        MLP(num_classes=3, context_dim=2)
    for bad in (
        {"num_classes": 0},
        {"num_classes": 2.5},
        {"context_dim": -1},
        {"num_classes": 3, "class_dim": 0},
    ):
        with pytest.raises(ValueError):
            MLP(**bad)
