"""One training step of the image trainer: ``train_step -> loss_fn -> UNet``.

:func:`loss_fn` is the conditional Flow Matching loss of the UNet on a batch of images
(:func:`fmjax.losses.cfm_loss`'s draws: the same keys give the same numbers), with the
labels of a class-conditional model dropped to the null class with probability
``model.class_dropout``, or the condition ``setup.condition`` derives from the images
(super-resolution: their low-resolution input). The step is the one-device step on every
mesh (one global-view jit: XLA all-reduces the gradients); with ``train.microbatches = k >
1`` it is :func:`fmjax.train.make_train_step`'s accumulating step, each device summing its
``k`` parts before one all-reduce. With ``train.coupling`` other than ``independent`` the
step first pairs source noise with the whole global batch (``setup.pairing``: minibatch
OT, within classes for a class-conditional model; SB-CFM's entropic plan) and the loss uses
those pairs. The noisy interpolant (``path.name=sb_cfm``) gets its noise ``z`` drawn as
:func:`fmjax.losses.cfm_loss` draws it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import optax

from fmjax.losses import uniform_time
from fmjax.train import PREPARE_KEY_INDEX, apply_update, make_train_step, step_keys
from fmjax.train import sharding as sharding_lib

if TYPE_CHECKING:
    from jax.sharding import Mesh

    from experiments.images.setup import Setup
    from fmjax.train import TrainState

__all__ = ["build_train_step", "loss_fn"]


def loss_fn(setup: Setup, params, key: jax.Array, batch: dict) -> jax.Array:
    """The CFM loss of ``setup.model`` predicting ``train.prediction`` on ``batch``."""
    c = setup.config
    x1 = batch["image"]
    k_cfm, k_dropout, k_label = jax.random.split(key, 3)
    k_x0, k_t, _ = jax.random.split(k_cfm, 3)
    x0 = batch["x0"] if "x0" in batch else jax.random.normal(k_x0, x1.shape, x1.dtype)
    t = uniform_time(k_t, x1.shape[0], setup.path.t_range, x1.dtype)
    y = None if setup.condition is None else setup.condition(x1)  # e.g. the low-res input
    classes, p_drop = c.model.num_classes, float(c.model.class_dropout)
    if classes is not None:
        y = batch["label"].astype(jnp.int32)
        if p_drop > 0:
            y = jnp.where(jax.random.bernoulli(k_label, p_drop, y.shape), classes, y)
    if getattr(setup.path, "needs_noise", False):  # sb_cfm: z drawn as cfm_loss draws it
        noise = jax.random.normal(jax.random.fold_in(k_cfm, 3), x1.shape, x1.dtype)
        xt, target = setup.path.interpolate_and_target(x0, x1, t, noise)
    elif setup.prediction == "velocity":
        xt, target = setup.path.interpolate_and_target(x0, x1, t)
    else:
        xt = setup.path.interpolate(x0, x1, t)
        target = setup.path.prediction_target(x0, x1, t, setup.prediction)
    pred = setup.model.apply(params, t, xt, y, train=True, rngs={"dropout": k_dropout})
    sq_err = jnp.square(pred - target).reshape(x1.shape[0], -1)
    if c.train.loss_reduction == "sum":  # the paper's squared norm: sum over dimensions
        return jnp.mean(jnp.sum(sq_err, axis=1))
    return jnp.mean(sq_err)


def train_step(setup: Setup, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    """One Adam step (and EMA update) on the loss of ``batch``: ``(state, metrics)``."""
    key = step_keys(state.rng, state.step)[0]
    if setup.pairing is not None:  # the whole global batch, as make_train_step(prepare=) does
        batch = setup.pairing(jax.random.fold_in(key, PREPARE_KEY_INDEX), batch)
    loss, grads = jax.value_and_grad(functools.partial(loss_fn, setup))(state.params, key, batch)
    ema = float(setup.config.train.ema_decay) or None
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
    return apply_update(state, grads, setup.tx, ema), metrics


def build_train_step(setup: Setup, mesh: Mesh) -> Callable:
    """The jitted ``step(state, batch) -> (state, metrics)`` on ``mesh``, state donated."""
    k = int(setup.config.train.microbatches)
    if k > 1:
        return make_train_step(
            functools.partial(loss_fn, setup),
            setup.tx,
            ema_decay=float(setup.config.train.ema_decay) or None,
            mesh=mesh,
            shard_loss=True,
            microbatches=k,
            prepare=setup.pairing,
        )
    replicated = sharding_lib.replicated_sharding(mesh)
    return jax.jit(
        functools.partial(train_step, setup),
        in_shardings=(replicated, sharding_lib.data_sharding(mesh)),
        out_shardings=(replicated, replicated),
        donate_argnums=0,
    )
