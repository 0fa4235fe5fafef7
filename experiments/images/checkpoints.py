"""The run's checkpoints in ``workdir/checkpoints``: opened for training (async orbax;
params, EMA, optimizer state, step, PRNG key and the data iterator position) and loaded
for evaluation. A checkpoint trained on another path or prediction is refused."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import jax

from experiments.images import config as config_lib
from fmjax.train import sharding as sharding_lib
from fmjax.train.checkpoint import CheckpointManager

if TYPE_CHECKING:
    from jax.sharding import Mesh

    from experiments.images.setup import Setup
    from fmjax.train import TrainState

__all__ = ["checkpoint_dir", "load", "open_for_training", "restore_or_init"]


def checkpoint_dir(workdir) -> str:
    return os.path.join(os.path.abspath(os.fspath(workdir)), "checkpoints")


def _manager(setup, workdir, **options) -> CheckpointManager:
    t = setup.config.train
    return CheckpointManager(
        checkpoint_dir(workdir),
        save_every=int(t.checkpoint_every),
        keep=int(t.keep_checkpoints),
        best_metric=t.best_metric or None,
        **options,
    )


def open_for_training(setup: Setup, workdir: str) -> CheckpointManager:
    """The manager that saves every ``train.checkpoint_every`` steps (and the config)."""
    async_save = bool(setup.config.train.async_checkpointing)
    return _manager(setup, workdir, async_save=async_save, config=setup.config)


def restore_or_init(
    setup: Setup, ckpt: CheckpointManager, mesh: Mesh, iterator, fresh=None
) -> tuple[TrainState, int]:
    """``(state, step)``: the latest checkpoint (and the data position into ``iterator``),
    or a fresh state at step 0 (``fresh()``, default ``setup.init_state`` placed on
    ``mesh``)."""
    if ckpt.latest_step() is not None:
        config_lib.check_trained_as(
            setup.config, ckpt.metadata(), f"the checkpoint in {ckpt.directory}"
        )
        state, meta = ckpt.restore(setup.abstract_state(mesh), iterator)
        return state, int(meta["step"])
    if fresh is not None:
        return fresh(), 0
    state = jax.jit(setup.init_state, out_shardings=sharding_lib.replicated_sharding(mesh))()
    return state, 0


def load(setup: Setup, workdir: str, mesh: Mesh) -> tuple[TrainState, int]:
    """``(state, step)`` of ``eval.checkpoint_step`` (default: the latest checkpoint)."""
    with _manager(setup, workdir) as ckpt:
        step = setup.config.eval.checkpoint_step
        if ckpt.latest_step() is None:
            raise FileNotFoundError(
                f"no checkpoint in {ckpt.directory}: train first (mode 'train' or "
                "'train_and_eval') or point --workdir at a trained run."
            )
        shown = step if step is not None else ckpt.latest_step()
        config_lib.check_trained_as(setup.config, ckpt.metadata(step), f"checkpoint {shown}")
        state, meta = ckpt.restore(setup.abstract_state(mesh), step=step)
        return state, int(meta["step"])
