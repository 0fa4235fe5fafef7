"""The image training step's loss and the setup it is built from."""

import functools

import jax
import jax.numpy as jnp
import pytest
from conftest import use_compile_cache
from image_runs import (
    small_config,
)

import fmjax
import fmjax.metrics.nll
import fmjax.train
from experiments import images
from experiments.images import step as step_lib

use_compile_cache()
pytestmark = pytest.mark.usefixtures("float32")


def test_the_loss_regresses_the_configured_prediction():
    # A fresh UNet predicts 0 (its output layer is zero), so the loss is the mean square of
    # the target: the images themselves for x1, the source noise for eps (1 in expectation,
    # +-0.013 over these 12,288 values), x1 - (1 - sigma_min) x0 for the velocity
    images_ = jax.random.uniform(jax.random.key(3), (4, 32, 32, 3), minval=-1.0, maxval=1.0)
    mean_sq = float(jnp.mean(images_**2))
    losses = {}
    for prediction in ("x1", "eps", "velocity"):
        setup = images.build(small_config(**{"train.prediction": prediction}))
        params = jax.jit(setup.init_state)().params
        loss_fn = jax.jit(functools.partial(step_lib.loss_fn, setup))
        losses[prediction] = float(loss_fn(params, jax.random.key(0), {"image": images_}))
        # the library's CFM loss on the same key: the same draws, the same number
        k_cfm = jax.random.split(jax.random.key(0), 3)[0]
        expected = fmjax.losses.cfm_loss(
            lambda t, x, p=params, m=setup.model: m.apply(p, t, x, train=False),
            setup.path,
            k_cfm,
            images_,
            prediction=prediction,
        )
        assert losses[prediction] == pytest.approx(float(expected), rel=1e-6)
    # the noisy interpolant (SB-CFM): the step draws its noise z as cfm_loss does
    setup = images.build(small_config(**{"path.name": "sb_cfm"}))
    params = jax.jit(setup.init_state)().params
    loss = jax.jit(functools.partial(step_lib.loss_fn, setup))(
        params, jax.random.key(0), {"image": images_}
    )
    expected = fmjax.losses.cfm_loss(
        lambda t, x, p=params, m=setup.model: m.apply(p, t, x, train=False),
        setup.path,
        jax.random.split(jax.random.key(0), 3)[0],
        images_,
    )
    assert float(loss) == pytest.approx(float(expected), rel=1e-6)
    noiseless = fmjax.losses.cfm_loss(  # (so the noise matters: sigma = 0 differs)
        lambda t, x, p=params, m=setup.model: m.apply(p, t, x, train=False),
        fmjax.paths.get("sb_cfm", sigma=0.0),
        jax.random.split(jax.random.key(0), 3)[0],
        images_,
    )
    assert abs(float(loss) - float(noiseless)) > 1e-3 * float(loss)
    assert losses["x1"] == pytest.approx(mean_sq, rel=1e-5)
    assert losses["eps"] == pytest.approx(1.0, abs=0.05)
    assert losses["velocity"] == pytest.approx(1.0 + mean_sq, abs=0.05)


def test_class_conditional_bf16_loss_and_clipping():
    c = small_config(
        **{"model.num_classes": 10, "model.dtype": "bfloat16", "train.grad_clip_norm": 1.0}
    )
    setup = images.build(c)
    assert setup.model.dtype == jnp.bfloat16 and setup.model.num_classes == 10
    state = setup.state_shapes  # traced, not compiled: keeps the test fast
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(state.params))
    assert len(state.opt_state) == 2  # chain(clip_by_global_norm, adam)
    batch = {"image": jnp.zeros((4, 32, 32, 3)), "label": jnp.arange(4, dtype=jnp.int32)}
    loss_fn = functools.partial(step_lib.loss_fn, setup)
    loss = jax.eval_shape(loss_fn, state.params, jax.random.key(0), batch)
    assert loss.shape == () and loss.dtype == jnp.float32
    bad = small_config(**{"model.num_classes": 10, "data.source": "downsampled_imagenet/32x32"})
    with pytest.raises(ValueError, match="no labels"):
        images.train_and_evaluate(bad, "/nonexistent")


def test_ot_coupling_pairs_the_whole_batch_within_classes():
    # train.coupling=ot: the step pairs the source noise with the whole batch (within each
    # class) before the loss; a fresh UNet predicts 0, so the eps loss is the mean square of
    # the paired noise: the same number as the loss of the batch the pairing returns
    c = small_config(**{"train.coupling": "ot", "train.prediction": "eps", "model.num_classes": 3})
    assert images.build(c).pairing is None  # pairing=auto: ot pairs in the input pipeline
    c.train.pairing = "device"
    setup = images.build(c)
    assert setup.pairing is not None
    labels = jnp.array([0, 1, 2, 0, 1, 2, 0, 1], jnp.int32)
    x1 = jax.random.uniform(jax.random.key(5), (8, 32, 32, 3), minval=-1.0, maxval=1.0)
    batch = {"image": x1, "label": labels}
    key = jax.random.key(2)
    paired = setup.pairing(key, batch)
    drawn = setup.path.sample_source(jax.random.split(key)[0], x1.shape, x1.dtype)
    flat = drawn.reshape(8, -1)
    perm = jnp.argmin(jnp.sum((paired["x0"].reshape(8, 1, -1) - flat[None]) ** 2, axis=-1), axis=1)
    assert sorted(perm.tolist()) == list(range(8))  # a permutation of the drawn noise
    assert (labels[perm] == labels).all()  # that never crosses classes
    params = jax.jit(setup.init_state)().params
    loss = step_lib.loss_fn(setup, params, jax.random.key(0), paired)
    assert float(loss) == pytest.approx(float(jnp.mean(paired["x0"] ** 2)), rel=1e-5)
    # the jitted step on a mesh pairs inside it (the exact assignment is a host callback)
    mesh = fmjax.train.sharding.make_mesh()
    state, metrics = step_lib.build_train_step(setup, mesh)(jax.jit(setup.init_state)(), batch)
    assert int(state.step) == 1 and bool(jnp.isfinite(metrics["loss"]))
    with pytest.raises(images.ConfigError, match="train.coupling must be one of"):
        images.build(small_config(**{"train.coupling": "sinkhorn"}))
    with pytest.raises(images.ConfigError, match="train.pairing=host pairs by exact OT"):
        images.build(small_config(**{"train.coupling": "ot_sinkhorn", "train.pairing": "host"}))
    with pytest.raises(images.ConfigError, match="train.pairing must be one of"):
        images.build(small_config(**{"train.coupling": "ot", "train.pairing": "gpu"}))
