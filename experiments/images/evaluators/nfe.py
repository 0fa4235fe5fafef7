"""The NFE of adaptive sampling: ``eval.nfe_num_samples`` samples in batches of
``eval.sample_batch_size``, solved with the evaluation solver."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import jax
import numpy as np

from experiments.images.evaluators import at_eval_precision
from experiments.images.setup import rounded_up

if TYPE_CHECKING:
    from jax.sharding import Mesh

    from experiments.images.setup import Setup
    from fmjax.train import TrainState

__all__ = ["run"]


@at_eval_precision
def run(setup: Setup, state: TrainState, mesh: Mesh, workdir: str) -> dict:
    """The NFE per batch solve, averaged over batches (weighted by their samples)."""
    del workdir
    e = setup.config.eval
    total = int(e.nfe_num_samples)
    params = setup.eval_params(state)
    per = rounded_up(min(int(e.sample_batch_size), total), mesh)
    key = jax.random.key(int(setup.config.seed) + 2)
    nfes, counts, ok = [], [], True
    t0 = time.perf_counter()
    for i, done in enumerate(range(0, total, per)):
        _, stats = setup.sample(params, jax.random.fold_in(key, i), per, mesh, setup.eval_solver)
        nfes.append(float(np.asarray(stats.nfe)))
        ok = ok and bool(np.all(np.asarray(stats.success)))
        counts.append(min(per, total - done))
    solver = setup.eval_solver
    return {
        "value": float(np.average(nfes, weights=counts)),
        "num_samples": total,
        "batch_size": per,
        "solver": solver.solver,
        "rtol": solver.rtol,
        "guidance_scale": setup.guidance_scale,
        "atol": solver.atol,
        "all_solves_succeeded": ok,
        "seconds": time.perf_counter() - t0,
        "note": "NFE per batch solve (one adaptive step sequence per batch, batch-wide "
        "error norm), averaged over batches",
        "dataset": f"{setup.config.data.source} (model trained on)",
    }
