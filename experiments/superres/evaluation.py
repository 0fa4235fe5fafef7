"""Evaluation of a super-resolution checkpoint or state, written to
``workdir/eval_metrics.json`` (every number names its dataset, source:split).

For each validation image (``eval.num_batches`` batches of ``eval.global_batch_size``; 0:
the whole split) the low-resolution input is made as in training and one sample is drawn
with the evaluation solver. Scores, on the 8-bit images (:func:`fmjax.data.quantization.to_uint8`):

* ``psnr`` and ``ssim`` (:mod:`fmjax.metrics.image_quality`, dm-pix) of the sample against
  the image, averaged over images;
* ``baseline``: the same scores of the model's input itself (the low-resolution image
  upsampled by ``superres.upsample``: bicubic by default), the baseline;
* ``fid`` of the samples against the train split, with ``eval.fid_inception_weights``
  (:func:`experiments.images.evaluators.fid.score`), else why it was skipped;
* ``nfe``: the function evaluations of the sampling solves.

``superres_grid.png``: ``superres.num_grid_images`` rows of low-res (shown with nearest
upsampling) | sample | high-res.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

from experiments.images import checkpoints
from experiments.images.evaluators import bpd, fid
from experiments.images.setup import solver_record
from experiments.superres.setup import resolution
from fmjax.data import superres as superres_lib
from fmjax.data.quantization import to_uint8
from fmjax.metrics import image_quality
from fmjax.train import sharding as sharding_lib
from fmjax.train.logging import save_image_grid, write_json

if TYPE_CHECKING:
    from jax.sharding import Mesh

    from experiments.images import Setup
    from fmjax.train import TrainState

__all__ = ["GRID_FILE", "evaluate", "scores"]

#: The grid of low-res | sample | high-res rows, in the workdir.
GRID_FILE = "superres_grid.png"


def scores(reference, images) -> dict[str, np.ndarray]:
    """Per-image ``psnr`` and ``ssim`` of model-space ``images`` against ``reference``,
    both rounded to 8 bits first."""
    ref = jnp.asarray(to_uint8(reference), jnp.float32)
    img = jnp.asarray(to_uint8(images), jnp.float32)
    return {
        "psnr": np.asarray(image_quality.psnr(ref, img, value_range=(0.0, 255.0))),
        "ssim": np.asarray(image_quality.ssim(ref, img, value_range=(0.0, 255.0))),
    }


def _grid_rows(setup, high, samples) -> np.ndarray:
    """Rows of (low-res shown with nearest upsampling, sample, high-res)."""
    s = setup.config.superres
    factor = int(s.factor)
    low = superres_lib.downsample(jnp.asarray(high), factor, s.downsample)
    low = np.asarray(superres_lib.upsample(low, factor, "nearest"))
    return np.stack([low, samples, high], axis=1).reshape(-1, *high.shape[1:])


def evaluate(setup: Setup, mesh: Mesh, workdir: str, *, state: TrainState | None = None) -> dict:
    """Evaluate ``state``, or checkpoint ``eval.checkpoint_step`` (default the latest);
    writes and returns ``eval_metrics.json``."""
    workdir = os.path.abspath(os.fspath(workdir))
    c, e = setup.config, setup.config.eval
    fid.check_weights(c)  # a configured but missing file fails before the work
    if state is None:
        state, step = checkpoints.load(setup, workdir, mesh)
    else:
        step = int(jax.device_get(state.step))
    params = setup.eval_params(state)
    condition = jax.jit(setup.condition, out_shardings=sharding_lib.data_sharding(mesh))
    key = jax.random.key(int(c.seed) + 5)
    max_batches = int(e.num_batches) or None
    per_image = {"psnr": [], "ssim": [], "baseline_psnr": [], "baseline_ssim": []}
    kept, grid, nfes, ok = [], [], [], True
    t0 = time.perf_counter()
    for i, host in enumerate(bpd.eval_batches(setup, mesh)()):
        if max_batches is not None and i >= max_batches:
            break
        batch = sharding_lib.shard_batch(host, mesh)
        cond = condition(batch["image"])
        n = int(batch["image"].shape[0])
        samples, stats = setup.sample(
            params, jax.random.fold_in(key, i), n, mesh, setup.eval_solver, cond=cond
        )
        nfes.append(float(np.asarray(stats.nfe)))
        ok = ok and bool(np.all(np.asarray(stats.success)))
        mask = sharding_lib.to_host(batch["mask"]).astype(bool)
        high = sharding_lib.to_host(batch["image"])[mask]
        samples, cond = samples[mask], sharding_lib.to_host(cond)[mask]
        for name, values in scores(high, samples).items():
            per_image[name].append(values)
        for name, values in scores(high, cond).items():
            per_image[f"baseline_{name}"].append(values)
        kept.append(samples)
        grid.append(_grid_rows(setup, high, samples))
    if not kept:
        raise ValueError(f"the evaluation split {setup.eval_dataset} has no images.")
    per_image = {k: np.concatenate(v) for k, v in per_image.items()}
    samples = np.concatenate(kept)
    seconds = time.perf_counter() - t0
    dataset, source = setup.eval_dataset, c.data.source
    s = c.superres
    res = resolution(c)
    task = {
        "factor": int(s.factor),
        "low_resolution": res // int(s.factor),
        "resolution": res,
        "downsample": s.downsample,
        "upsample": s.upsample,
    }

    def score(name, of):
        return {"value": float(np.mean(per_image[name])), "of": of, "dataset": dataset}

    results = {
        "psnr": score("psnr", "samples (8-bit), dB, mean over images"),
        "ssim": score("ssim", "samples (8-bit), mean over images"),
        "baseline": {
            "psnr": float(np.mean(per_image["baseline_psnr"])),
            "ssim": float(np.mean(per_image["baseline_ssim"])),
            "of": f"the model's input ({s.upsample} upsampling of the {s.downsample}-"
            "downsampled image), 8-bit",
            "dataset": dataset,
        },
        "nfe": {
            "value": float(np.mean(nfes)),
            **solver_record(setup.eval_solver),
            "all_solves_succeeded": ok,
            "note": "NFE per batch solve, averaged over batches",
            "dataset": dataset,
        },
        "fid": _fid(setup, workdir, samples),
    }
    if jax.process_index() == 0:
        rows = np.concatenate(grid)[: 3 * int(s.num_grid_images)]
        save_image_grid(rows, os.path.join(workdir, GRID_FILE), nrow=3)
    out = {
        "dataset": {"source": source, "split": setup.eval_split, "name": dataset},
        "superres": task,
        "checkpoint_step": step,
        "num_images": len(samples),
        "params": "ema" if e.use_ema else "raw",
        "results": results,
        "summary": {
            f"psnr[{dataset}]": results["psnr"]["value"],
            f"ssim[{dataset}]": results["ssim"]["value"],
            f"baseline_psnr[{dataset}]": results["baseline"]["psnr"],
            f"baseline_ssim[{dataset}]": results["baseline"]["ssim"],
            f"fid[{source}]": results["fid"]["value"],
        },
        "grid": GRID_FILE,
        "eval_seconds": seconds,
        "num_devices": int(mesh.size),
    }
    write_json(os.path.join(workdir, "eval_metrics.json"), out)
    return out


def _fid(setup, workdir, samples) -> dict:
    source = f"{setup.config.data.source}:train (reference statistics)"
    if fid.check_weights(setup.config) is None:
        return {
            "value": None,
            "skipped": "no Inception weights configured (eval.fid_inception_weights)",
            "dataset": source,
        }
    if len(samples) < 2:
        return {"value": None, "skipped": "FID needs at least 2 samples", "dataset": source}
    t0 = time.perf_counter()
    value = fid.score(setup, workdir, samples)
    return {
        "value": value,
        "num_samples": len(samples),
        "num_reference": int(setup.config.eval.fid_num_samples),
        "seconds": time.perf_counter() - t0,
        "dataset": source,
    }
