"""Test-set bits/dim by the paper's protocol (:func:`fmjax.metrics.nll.evaluate_bpd`):
the evaluation solver, Hutchinson divergence, ``eval.num_dequant`` uniform-dequantization
samples, the [-1, 1] scaling accounted for.

Resumable: the running totals are kept in ``workdir/eval/bpd_step<step>_<id>.json``, where
``<id>`` digests what the number depends on (which parameters and a sample of their
values, the dataset, the solver settings, the source noise, the prediction and its span),
so another setting, or a model retrained in the same workdir, starts its own file instead
of returning a stale result.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

from experiments.images.evaluators import at_eval_precision
from experiments.images.setup import solver_record
from fmjax.data import images as images_lib
from fmjax.metrics import nll
from fmjax.train import sharding as sharding_lib

if TYPE_CHECKING:
    from jax.sharding import Mesh

    from experiments.images.setup import Setup
    from fmjax.train import TrainState

__all__ = ["eval_batches", "run"]


def eval_batches(setup: Setup, mesh: Mesh) -> Callable:
    """``make_iterator()``: a fresh pass over the evaluation split's global batches."""
    c = setup.config

    def make_iterator():
        return images_lib.make_eval_iterator(
            c.data.source,
            global_batch_size=int(c.eval.global_batch_size),
            data_dir=c.data.data_dir,
            split=c.eval.split,
            dequantize=False,
            read_threads=int(c.data.read_threads),
            resolution=int(c.data.resolution),
        )

    del mesh  # the batch size was checked against it with the config
    return make_iterator


@jax.jit
def _params_sample(params):
    """The first and last 4 values of every parameter array (one small transfer)."""
    leaves = jax.tree_util.tree_leaves(params)
    return jnp.concatenate(
        [jnp.concatenate([x.ravel()[:4], x.ravel()[-4:]]).astype(jnp.float32) for x in leaves]
    )


def _digest(setup, params) -> str:
    c, e = setup.config, setup.config.eval
    values = np.asarray(sharding_lib.to_host(_params_sample(params)), np.float32)
    about = {
        "shapes": [list(x.shape) for x in jax.tree_util.tree_leaves(params)],
        "values": hashlib.sha256(values.tobytes()).hexdigest(),
        "params": "ema" if e.use_ema else "raw",
        "source": c.data.source,
        "split": setup.eval_dataset,
        "data_dir": str(c.data.data_dir),
        "num_dequant": int(e.num_dequant),
        **solver_record(setup.eval_solver),
        "probe": e.probe,
        "matmul_precision": str(e.matmul_precision),
        "seed": int(c.seed),
        "source_std": setup.source_std,
        "prediction": setup.prediction,
        "t_range": list(setup.t_range),
    }
    if c.data.source == "folder":  # (the other sources have one resolution)
        about["resolution"] = int(c.data.resolution)
    return hashlib.sha256(json.dumps(about, sort_keys=True).encode()).hexdigest()[:12]


@at_eval_precision
def run(setup: Setup, state: TrainState, mesh: Mesh, workdir: str) -> dict:
    """Bits/dim of ``setup.eval_params(state)`` on the evaluation split."""
    from tqdm.auto import tqdm

    e = setup.config.eval
    params = setup.eval_params(state)
    step = int(jax.device_get(state.step))
    name = f"bpd_step{step}_{_digest(setup, params)}.json"
    state_file = os.path.join(os.fspath(workdir), "eval", name)
    if jax.process_index() == 0:
        os.makedirs(os.path.dirname(state_file), exist_ok=True)
    bar = tqdm(
        desc=f"eval bpd (step {step})",
        unit="batch",
        total=int(e.num_batches) or None,
        disable=not (setup.progress and jax.process_index() == 0),
        dynamic_ncols=True,
    )

    def callback(summary):
        bar.update(summary["num_batches"] - bar.n)
        bar.set_postfix(bpd=f"{summary['bpd']:.4f}", nfe=f"{summary['nfe_mean']:.0f}")

    t0, t1 = setup.t_range
    with bar:
        res = nll.evaluate_bpd(
            setup.velocity(params),  # conditional models: the null class
            eval_batches(setup, mesh),
            jax.random.key(int(setup.config.seed) + 1),
            num_dequant=int(e.num_dequant),
            mesh=mesh,
            state_file=state_file,
            max_batches=int(e.num_batches) or None,
            callback=callback,
            divergence="hutchinson",
            options=setup.eval_solver,
            probe=e.probe,
            source_std=setup.source_std,
            t0=t0,
            t1=t1,
        )
    return {
        "value": float(res["bpd"]),
        **res,
        "dataset": setup.eval_dataset,
        "num_dequant": int(e.num_dequant),
        "divergence": "hutchinson",
        "probe": e.probe,
        "matmul_precision": str(e.matmul_precision),
        **solver_record(setup.eval_solver),
        "requested_batches": int(e.num_batches) or "all",
    }
