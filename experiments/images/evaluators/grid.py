"""The training run's sample grid: ``train.num_sample_images`` images of the EMA model,
solved with ``train.sample_solver`` at ``train.sample_tol``, the same noise every time."""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import numpy as np

if TYPE_CHECKING:
    from jax.sharding import Mesh

    from experiments.images.setup import Setup
    from fmjax.train import TrainState

__all__ = ["run"]


def run(setup: Setup, state: TrainState, mesh: Mesh, workdir: str) -> dict:
    """``{"images": (n, R, R, 3) numpy, "sample_nfe": float}`` (``workdir`` unused: the
    trainer writes the grid with its other logs)."""
    del workdir
    key = jax.random.fold_in(jax.random.key(int(setup.config.seed)), 7)
    num = int(setup.config.train.num_sample_images)
    images, stats = setup.sample(state.ema_params, key, num, mesh, setup.grid_solver)
    return {"images": images, "sample_nfe": float(np.asarray(stats.nfe))}
