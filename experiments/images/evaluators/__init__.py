"""Evaluators of a trained state, one per module, each ``run(setup, state, mesh, workdir)
-> dict``: ``bpd`` (test-set bits/dim), ``nfe`` (function evaluations of adaptive
sampling), ``fid`` (FID against the train split), ``sweep`` (quality and error against
NFE) and ``grid`` (a sample grid of the EMA model).

All but ``grid`` (a training-time picture) trace and run their solves at the matmul
precision ``eval.matmul_precision`` (:func:`at_eval_precision`), so that their numbers do
not depend on the chip's default (one bfloat16 pass on TPUs, TF32 on recent NVIDIA GPUs).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax

__all__ = ["at_eval_precision", "eval_precision"]


def eval_precision(config):
    """``jax.default_matmul_precision(config.eval.matmul_precision)``: a context in which
    every matmul and convolution traced (without its own precision) gets that precision."""
    return jax.default_matmul_precision(str(config.eval.matmul_precision))


def at_eval_precision(run: Callable) -> Callable:
    """Decorates an evaluator's ``run(setup, ...)`` to trace and run inside
    :func:`eval_precision` (the setting must be in effect when ``jit`` traces)."""

    @functools.wraps(run)
    def wrapped(setup, *args, **kwargs):
        with eval_precision(setup.config):
            return run(setup, *args, **kwargs)

    return wrapped
