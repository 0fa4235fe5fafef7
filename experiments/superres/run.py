"""What a super-resolution run does, by ``config.mode`` (``train``, ``eval`` or
``train_and_eval``): :func:`experiments.images.train_and_evaluate` with the conditioned
setup (:func:`experiments.superres.setup.build`) and its evaluation
(:func:`experiments.superres.evaluation.evaluate`)."""

from __future__ import annotations

from jax.sharding import Mesh

from experiments.images import run as images_run
from experiments.superres import evaluation
from experiments.superres.setup import build
from fmjax.train import TrainState

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
    return images_run.evaluate(
        config,
        workdir,
        state=state,
        mesh=mesh,
        progress=progress,
        builder=build,
        evaluator=evaluation.evaluate,
    )


def train_and_evaluate(config, workdir: str, *, progress: bool | None = None) -> dict:
    """Run ``config.mode`` in ``workdir``; returns the summary (and eval metrics)."""
    return images_run.train_and_evaluate(
        config, workdir, progress=progress, builder=build, evaluator=evaluation.evaluate
    )
