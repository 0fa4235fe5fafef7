"""What a super-resolution run does, by ``config.mode`` (``train``, ``eval`` or
``train_and_eval``): the image experiments' trainer on the conditioned :class:`Setup`,
then :func:`experiments.superres.evaluation.evaluate`."""

from __future__ import annotations

import os

from jax.sharding import Mesh

from experiments.images import trainer
from experiments.images.evaluators import fid
from experiments.superres import evaluation
from experiments.superres.setup import build
from fmjax.data import images as images_lib
from fmjax.train import TrainState
from fmjax.train import sharding as sharding_lib
from fmjax.train.logging import write_json

__all__ = ["evaluate", "train_and_evaluate"]


def evaluate(
    config,
    workdir: str,
    *,
    state: TrainState | None = None,
    mesh: Mesh | None = None,
    progress: bool | None = None,
) -> dict:
    """Evaluate ``state`` or a checkpoint (:func:`experiments.superres.evaluation.evaluate`)."""
    mesh = mesh or sharding_lib.make_mesh()
    setup = build(config, mesh, progress=progress)
    return evaluation.evaluate(setup, mesh, workdir, state=state)


def train_and_evaluate(config, workdir: str, *, progress: bool | None = None) -> dict:
    """Run ``config.mode`` in ``workdir``; returns the summary (and eval metrics)."""
    mesh = sharding_lib.make_mesh()
    setup = build(config, mesh, progress=progress)
    if config.mode != "train":  # what evaluation needs fails before training, not after it
        fid.check_weights(config)
    if config.mode == "train_and_eval":
        images_lib.num_examples(config.data.source, setup.eval_split, data_dir=config.data.data_dir)
    out = {"mode": config.mode, "workdir": os.path.abspath(os.fspath(workdir))}
    state = None
    if config.mode != "eval":
        state, summary = trainer.train(setup, mesh, workdir)
        summary.pop("history", None)
        out["train"] = summary
        write_json(os.path.join(out["workdir"], "train_summary.json"), summary)
    if config.mode != "train":
        out["eval"] = evaluation.evaluate(setup, mesh, workdir, state=state)
    return out
