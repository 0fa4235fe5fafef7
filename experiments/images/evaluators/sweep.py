"""The sampling-efficiency study of an image model (``--config.mode=sweep``).

From ``eval.sweep_samples`` source draws (the same ones for every row): the flow's
straightness and transport cost (one solve with the evaluation solver), then every solver of
``eval.sweep_solvers`` at every step count of ``eval.sweep_steps`` and dopri5 at each
tolerance of ``eval.sweep_tols``, each with its true NFE, its ODE error against the
evaluation solver's solve and, with Inception weights, its FID against the train split's
statistics (:func:`fmjax.metrics.efficiency.sweep`). Writes ``sweep_metrics.json`` and
``nfe_quality.png``.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

import jax

from experiments.images.evaluators import at_eval_precision, fid
from experiments.images.setup import rounded_up
from experiments.plots import plot_sweep
from fmjax.metrics import efficiency
from fmjax.train import sharding as sharding_lib
from fmjax.train.logging import write_json

if TYPE_CHECKING:
    from jax.sharding import Mesh

    from experiments.images.setup import Setup
    from fmjax.train import TrainState

__all__ = ["run"]


@at_eval_precision
def run(setup: Setup, state: TrainState, mesh: Mesh, workdir: str) -> dict:
    """The study's records and the flow's straightness and transport cost."""
    e = setup.config.eval
    n = rounded_up(int(e.sweep_samples), mesh)
    params = setup.eval_params(state)
    v, y = setup.sampling_field(params, n, mesh)
    x0 = setup.source_noise(jax.random.key(int(setup.config.seed) + 4), n, mesh)
    t0, t1 = setup.t_range
    ref = setup.eval_solver
    quality = None
    if fid.check_weights(setup.config) is not None:

        def quality(x1):
            return {"fid": fid.score(setup, workdir, sharding_lib.to_host(x1))}

    start = time.perf_counter()
    flow = efficiency.straightness(
        v, x0, t0=t0, t1=t1, solver=ref.solver, rtol=ref.rtol, atol=ref.atol, cond=y, mesh=mesh
    )
    records = efficiency.sweep(
        v,
        x0,
        solvers=tuple(e.sweep_solvers),
        steps=tuple(int(k) for k in e.sweep_steps),
        adaptive="dopri5",
        tolerances=tuple(float(tol) for tol in e.sweep_tols),
        reference_tol=ref.rtol,
        quality=quality,
        t0=t0,
        t1=t1,
        cond=y,
        mesh=mesh,
    )
    out = {
        "num_samples": n,
        "straightness": float(flow.straightness),
        "transport_cost": float(flow.transport_cost),
        "reference": {"solver": ref.solver, "rtol": ref.rtol, "atol": ref.atol},
        "guidance_scale": setup.guidance_scale,
        "matmul_precision": str(e.matmul_precision),
        "sweep": records,
        "seconds": time.perf_counter() - start,
    }
    workdir = os.fspath(workdir)
    write_json(os.path.join(workdir, "sweep_metrics.json"), out)
    if jax.process_index() == 0:
        plot_sweep(os.path.join(workdir, "nfe_quality.png"), records, "fid" if quality else None)
    return out
