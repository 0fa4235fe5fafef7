"""What a run does, by ``config.mode`` (``train``, ``eval``, ``train_and_eval`` or ``sweep``), for a
config: each entry point checks the config once and builds its :class:`Setup` once."""

from __future__ import annotations

import os
from collections.abc import Callable

from jax.sharding import Mesh

from experiments.images import checkpoints, evaluation, trainer
from experiments.images.evaluators import fid, sweep
from experiments.images.setup import build
from fmjax.data import images as images_lib
from fmjax.train import TrainState
from fmjax.train import sharding as sharding_lib
from fmjax.train.logging import write_json

__all__ = ["evaluate", "train", "train_and_evaluate"]


def train(
    config,
    workdir: str,
    *,
    progress: bool | None = None,
    stop_at: int | None = None,
    mesh: Mesh | None = None,
) -> tuple[TrainState, dict]:
    """Train (resuming from ``workdir/checkpoints``) -> ``(state, summary)``; see
    :func:`experiments.images.trainer.train`."""
    mesh = mesh or sharding_lib.make_mesh()
    setup = build(config, mesh, progress=progress)
    return trainer.train(setup, mesh, workdir, stop_at=stop_at)


def evaluate(
    config,
    workdir: str,
    *,
    state: TrainState | None = None,
    mesh: Mesh | None = None,
    progress: bool | None = None,
    builder: Callable | None = None,
    evaluator: Callable | None = None,
) -> dict:
    """Evaluate ``state`` or a checkpoint; see :func:`experiments.images.evaluation.evaluate`
    (``builder`` and ``evaluator``: as in :func:`train_and_evaluate`)."""
    mesh = mesh or sharding_lib.make_mesh()
    setup = (builder or build)(config, mesh, progress=progress)
    return (evaluator or evaluation.evaluate)(setup, mesh, workdir, state=state)


def train_and_evaluate(
    config,
    workdir: str,
    *,
    progress: bool | None = None,
    builder: Callable | None = None,
    evaluator: Callable | None = None,
) -> dict:
    """Run ``config.mode`` in ``workdir``; returns the summary (and eval metrics).

    ``builder(config, mesh, progress=)`` makes the :class:`Setup` (default :func:`build`)
    and ``evaluator(setup, mesh, workdir, state=)`` evaluates it (default
    :func:`experiments.images.evaluation.evaluate`): :mod:`experiments.superres` passes
    its own."""
    mesh = sharding_lib.make_mesh()
    setup = (builder or build)(config, mesh, progress=progress)
    if config.mode != "train":  # what evaluation needs fails before training, not after it
        fid.check_weights(config)
    if config.mode == "train_and_eval":  # (mode eval finds a missing checkpoint first)
        d = config.data
        images_lib.num_examples(d.source, setup.eval_split, d.data_dir, int(d.resolution))
    out = {"mode": config.mode, "workdir": os.path.abspath(os.fspath(workdir))}
    state = None
    if config.mode in ("train", "train_and_eval"):
        state, summary = trainer.train(setup, mesh, workdir)
        summary.pop("history", None)
        out["train"] = summary
        write_json(os.path.join(out["workdir"], "train_summary.json"), summary)
    if config.mode in ("eval", "train_and_eval"):
        out["eval"] = (evaluator or evaluation.evaluate)(setup, mesh, workdir, state=state)
    if config.mode == "sweep":
        state, step = checkpoints.load(setup, workdir, mesh)
        out["sweep"] = {"checkpoint_step": step, **sweep.run(setup, state, mesh, workdir)}
    return out
