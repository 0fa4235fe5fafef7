"""Evaluation of a checkpoint or a state: bits/dim, NFE and FID, written to
``workdir/eval_metrics.json``, where every number names its dataset (source:split)."""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

import jax

from experiments.images import checkpoints
from experiments.images.evaluators import bpd, fid, nfe
from fmjax.train.logging import write_json

if TYPE_CHECKING:
    from jax.sharding import Mesh

    from experiments.images.setup import Setup
    from fmjax.train import TrainState

__all__ = ["evaluate"]


def evaluate(setup: Setup, mesh: Mesh, workdir: str, *, state: TrainState | None = None) -> dict:
    """Evaluate ``state``, or checkpoint ``eval.checkpoint_step`` (default the latest).

    Writes and returns ``eval_metrics.json``: bits/dim (the paper's protocol), the NFE of
    adaptive sampling, FID (or why it was skipped), each solved at the matmul precision
    ``eval.matmul_precision`` (recorded as ``matmul_precision``)."""
    workdir = os.path.abspath(os.fspath(workdir))
    fid.check_weights(setup.config)  # a configured but missing file fails before the work
    if state is None:
        state, step = checkpoints.load(setup, workdir, mesh)
    else:
        step = int(jax.device_get(state.step))
    c = setup.config
    source, dataset = c.data.source, setup.eval_dataset
    t0 = time.perf_counter()
    results = {"bpd": bpd.run(setup, state, mesh, workdir)}
    if int(c.eval.nfe_num_samples) > 0:
        results["nfe"] = nfe.run(setup, state, mesh, workdir)
    results["fid"] = fid.run(setup, state, mesh, workdir)
    summary = {f"bpd[{dataset}]": results["bpd"]["value"]}
    if "nfe" in results:
        summary[f"nfe[{source}]"] = results["nfe"]["value"]
    summary[f"fid[{source}]"] = results["fid"]["value"]
    out = {
        "dataset": {"source": source, "split": setup.eval_split, "name": dataset},
        "checkpoint_step": step,
        "prediction": setup.prediction,
        "t_range": list(setup.t_range),  # the span samples and bits/dim are solved over
        "params": "ema" if c.eval.use_ema else "raw",
        "matmul_precision": str(c.eval.matmul_precision),  # of every solve above
        "results": results,
        "summary": summary,
        "eval_seconds": time.perf_counter() - t0,
        "num_devices": int(mesh.size),
    }
    write_json(os.path.join(workdir, "eval_metrics.json"), out)
    return out
