"""FID of ``eval.fid_num_samples`` samples (the evaluation solver) against the train
split's statistics, computed once and cached in ``workdir/eval`` (or
``eval.fid_reference_stats``), with the Inception weights of ``eval.fid_inception_weights``.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

import jax

from experiments.images.evaluators import at_eval_precision
from experiments.images.setup import rounded_up
from fmjax.metrics import fid

if TYPE_CHECKING:
    from jax.sharding import Mesh

    from experiments.images.setup import Setup
    from fmjax.train import TrainState

__all__ = ["check_weights", "run", "score"]


def check_weights(config) -> str | None:
    """The configured Inception weights path, or None when FID is off; a configured but
    missing file is a :class:`fmjax.metrics.fid.FIDWeightsNotFoundError`."""
    path = config.eval.fid_inception_weights
    if not path:
        return None
    reason = fid.fid_skip_reason(path)
    if reason is not None:
        raise fid.FIDWeightsNotFoundError(f"eval.fid_inception_weights: {reason}")
    return path


def _reference(setup, workdir, num: int) -> tuple[str | None, str | None]:
    """``(stats file to read, stats file to write)``: the configured or cached statistics,
    or where process 0 caches the ones it computes."""
    c = setup.config
    if c.eval.fid_reference_stats:
        return c.eval.fid_reference_stats, None
    name = f"fid_reference_stats_{c.data.source.replace('/', '_')}_{num}.npz"
    if c.data.source == "folder":  # (the other sources have one resolution)
        name = name.replace(".npz", f"_{int(c.data.resolution)}px.npz")
    cached = os.path.join(os.fspath(workdir), "eval", name)
    if os.path.exists(cached):
        return cached, None
    if jax.process_index() == 0:
        os.makedirs(os.path.dirname(cached), exist_ok=True)
        return None, cached
    return None, None


def score(setup: Setup, workdir: str, images) -> float:
    """The FID of ``images`` (numpy ``(n, H, W, 3)`` in model space) against the reference
    statistics of ``eval.fid_num_samples`` train images (cached as :func:`run` caches them)."""
    weights = check_weights(setup.config)
    num_ref = int(setup.config.eval.fid_num_samples)
    ref_stats, save_ref = _reference(setup, workdir, num_ref)
    ref_iter = None if ref_stats is not None else _reference_iterator(setup, len(images))
    return float(
        fid.compute_fid(
            lambda i: images,
            ref_iter,
            weights,
            len(images),
            num_ref=num_ref,
            ref_stats=ref_stats,
            save_ref_stats=save_ref,
        )
    )


def _reference_iterator(setup, batch_size: int):
    # every process reads all reference images (the iterator is not split over processes)
    return setup.train_iterator(
        random_flip=False,
        dequantize=False,
        num_epochs=1,
        process_index=0,
        process_count=1,
        global_batch_size=batch_size,
        pairing=None,  # images only: no source noise to pair
    )


@at_eval_precision
def run(setup: Setup, state: TrainState, mesh: Mesh, workdir: str) -> dict:
    """FID, or ``{"value": None, "skipped": why}`` without Inception weights."""
    source = f"{setup.config.data.source}:train (reference statistics)"
    weights = check_weights(setup.config)
    if weights is None:
        return {
            "value": None,
            "skipped": "no Inception weights configured (eval.fid_inception_weights)",
            "dataset": source,
        }
    e = setup.config.eval
    params = setup.eval_params(state)
    num = int(e.fid_num_samples)
    per = rounded_up(min(int(e.sample_batch_size), num), mesh)
    key = jax.random.key(int(setup.config.seed) + 3)

    def sample_fn(i):
        return setup.sample(params, jax.random.fold_in(key, i), per, mesh, setup.eval_solver)[0]

    ref_stats, save_ref = _reference(setup, workdir, num)
    # every process computes the same FID on all images (generated images are gathered)
    ref_iter = None if ref_stats is not None else _reference_iterator(setup, per)
    t0 = time.perf_counter()
    value = fid.compute_fid(
        sample_fn, ref_iter, weights, num, num_ref=num, ref_stats=ref_stats, save_ref_stats=save_ref
    )
    return {
        "value": float(value),
        "num_samples": num,
        "num_reference": num,
        "reference_stats": ref_stats or save_ref,
        "solver": e.solver,
        "guidance_scale": setup.guidance_scale,
        "rtol": float(e.rtol),
        "atol": float(e.atol),
        "weights": weights,
        "seconds": time.perf_counter() - t0,
        "dataset": source,
    }
