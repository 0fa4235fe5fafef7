"""Training: :func:`fmjax.train.fit` on the image step, with the run's hooks.

Data parallel over every device of every process (one global-view jit on a ``"data"``
mesh; each process reads its slice of every global batch). Resumes from the latest
checkpoint in ``workdir/checkpoints``, continuing exactly as if never stopped. The hooks:
logs from process 0 (``metrics.jsonl``, TensorBoard, the progress bar), checkpoints every
``train.checkpoint_every`` steps and at the end, bits/dim every ``train.eval_every`` steps
(mode ``train_and_eval``), and sample grids of the EMA model every ``train.sample_every``
steps. A non-finite loss stops the run with :class:`fmjax.train.NonFiniteLossError`;
nothing non-finite is checkpointed (the last checkpoint stays the last good one).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

from experiments.images import checkpoints, reflow
from experiments.images.config import ConfigError
from experiments.images.evaluators import bpd, grid
from experiments.images.step import build_train_step
from fmjax.train import NonFiniteLossError, fit
from fmjax.train import sharding as sharding_lib
from fmjax.train.logging import MetricWriter

if TYPE_CHECKING:
    from jax.sharding import Mesh

    from experiments.images.setup import Setup
    from fmjax.train import TrainState

__all__ = ["train"]


@jax.jit
def _all_finite(tree):
    leaves = [
        jnp.all(jnp.isfinite(x))
        for x in jax.tree_util.tree_leaves(tree)
        if jnp.issubdtype(x.dtype, jnp.inexact)
    ]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def _check_labels(labels, num_classes, source):
    """Labels outside [0, num_classes) index past the class embedding (NaN, not an error)."""
    labels = np.asarray(labels)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ConfigError(
            f"model.num_classes={num_classes}, but {source} has labels in "
            f"[{labels.min()}, {labels.max()}] in this batch; set model.num_classes to the "
            "dataset's number of classes (1000 for ImageNet, 10 for CIFAR-10)."
        )


class _DeviceBatches:
    """The global batches, sharded over the mesh, from this process's slices.

    ``wait_s`` sums the time the training loop spent waiting for them (reading, pairing
    when the pipeline pairs, and placing on the devices): the steps are dispatched
    asynchronously, so it bounds the devices' idle time for want of data from above."""

    def __init__(self, setup, iterator, mesh):
        self.setup, self.iterator, self.mesh = setup, iterator, mesh
        self.wait_s = 0.0

    def __iter__(self):
        return self

    def __next__(self):
        t0 = time.perf_counter()
        host = next(self.iterator)
        classes = self.setup.config.model.num_classes
        if classes is not None:
            _check_labels(host["label"], classes, self.setup.config.data.source)
        batch = sharding_lib.shard_batch(host, self.mesh)
        self.wait_s += time.perf_counter() - t0
        return batch


class _Hooks:
    """``fit``'s ``on_log`` and ``on_step`` for one training run up to step ``end``."""

    def __init__(self, setup, mesh, workdir, ckpt, writer, iterator, end):
        self.setup, self.mesh, self.workdir, self.end = setup, mesh, workdir, end
        self.ckpt, self.writer, self.iterator = ckpt, writer, iterator
        self.quiet = dataclasses.replace(setup, progress=False)  # periodic evaluation
        self.history, self.last_loss = [], None

    def on_log(self, record):
        t, step, sps = self.setup.config.train, record["step"], record["steps_per_s"]
        gbs = int(self.setup.config.data.global_batch_size)
        rec = {
            "loss": record["loss"],
            "grad_norm": record["grad_norm"],
            "learning_rate": float(self.setup.schedule(step - 1)),
            "steps_per_s": sps,  # training throughput: hooks' time left out
            "images_per_s": sps * gbs,
            "images_per_s_per_device": sps * gbs / self.mesh.size,
            "eta_s": (int(t.num_steps) - step) / max(sps, 1e-9),
        }
        self.writer.write_scalars(step, rec)
        self.history.append({"step": step, **rec})
        self.last_loss = rec["loss"]

    def on_step(self, step, state, metrics):
        c = self.setup.config
        every = int(c.train.eval_every)
        eval_now = c.mode == "train_and_eval" and every > 0 and step % every == 0
        eval_now = eval_now and step != self.end
        if self.ckpt.should_save(step) or step == self.end or eval_now:
            self._checkpoint(step, state, metrics, eval_now)
        every = int(c.train.sample_every)
        if every > 0 and (step % every == 0 or step == self.end):
            out = grid.run(self.setup, state, self.mesh, self.workdir)
            self.writer.write_images(step, "samples_ema", out["images"])
            self.writer.write_scalars(step, {"sample_nfe": out["sample_nfe"]})

    def _checkpoint(self, step, state, metrics, eval_now):
        loss = float(jax.device_get(metrics["loss"]))
        if not (math.isfinite(loss) and bool(_all_finite(state.params))):
            raise NonFiniteLossError("non-finite parameters", step=step, loss=loss)
        save_metrics = {"loss": loss if self.last_loss is None else self.last_loss}
        if eval_now:
            value = bpd.run(self.quiet, state, self.mesh, self.workdir)["value"]
            save_metrics["eval_bpd"] = value
            self.writer.write_scalars(step, {"eval_bpd": value})
        force = step == self.end or eval_now
        self.ckpt.save(step, state, self.iterator, metrics=save_metrics, force=force)

    def stopped(self, err: NonFiniteLossError) -> NonFiniteLossError:
        """The error to stop with: where the last good checkpoint is."""
        self.ckpt.wait()
        return NonFiniteLossError(
            f"non-finite loss ({err.loss}) by step {err.step}; stopping. The last good "
            f"checkpoint is step {self.ckpt.latest_step()} in {self.ckpt.directory} (nothing "
            "non-finite was saved). Lower train.learning_rate or set train.grad_clip_norm, "
            "then rerun to resume from it.",
            step=err.step,
            loss=err.loss,
        )


def _run(setup, mesh, workdir, state, start, end, ckpt, writer, iterator):
    hooks = _Hooks(setup, mesh, workdir, ckpt, writer, iterator, end)
    batches = _DeviceBatches(setup, iterator, mesh)
    t_start = time.perf_counter()
    try:
        state, _ = fit(
            state,
            build_train_step(setup, mesh),
            batches,
            end - start,
            log_every=int(setup.config.train.log_every),
            on_log=hooks.on_log,
            on_step=hooks.on_step,
            average=("loss",),
            progress=setup.progress and jax.process_index() == 0,
        )
    except NonFiniteLossError as err:
        raise hooks.stopped(err) from None
    seconds = time.perf_counter() - t_start
    return state, {
        "train_seconds": seconds,
        "steps_run": end - start,
        "steps_per_s": (end - start) / max(seconds, 1e-9),
        # the loop's wait for its next batch (an upper bound on the devices' wait)
        "data_wait_s": batches.wait_s,
        "data_wait_per_step_ms": 1e3 * batches.wait_s / max(end - start, 1),
        "final_loss": hooks.last_loss,
        "history": hooks.history,
    }


def train(
    setup: Setup, mesh: Mesh, workdir: str, *, stop_at: int | None = None
) -> tuple[TrainState, dict]:
    """Train (resuming from ``workdir/checkpoints``) -> ``(state, summary)``.

    ``stop_at``: return after that step (a checkpoint is saved there), as a preemption
    would; the next call continues."""
    workdir = os.path.abspath(os.fspath(workdir))
    num_steps = int(setup.config.train.num_steps)
    end = num_steps if stop_at is None else min(num_steps, int(stop_at))
    fresh, reflow_summary = None, None
    if reflow.enabled(setup.config):  # train on the teacher's pairs (drawn here if missing)
        prepared = reflow.prepare(setup, mesh, workdir)
        iterator, fresh, reflow_summary = (
            prepared[k] for k in ("iterator", "fresh_state", "summary")
        )
    else:
        iterator = setup.train_iterator()  # a missing dataset fails here, before any compile
    ckpt = checkpoints.open_for_training(setup, workdir)
    writer = None
    try:
        state, start = checkpoints.restore_or_init(setup, ckpt, mesh, iterator, fresh)
        writer = MetricWriter(workdir, resume_step=start)
        writer.write_config(setup.config)
        summary = {
            "start_step": start,
            "resumed": start > 0,
            "num_params": state.num_params(),
            "num_devices": int(mesh.size),
            "num_processes": jax.process_count(),
            "dataset": setup.config.data.source,
        }
        if reflow_summary is not None:
            summary["dataset"] = f"reflow pairs of {reflow_summary['teacher_workdir']}"
            summary["reflow"] = reflow_summary
        if start < end:
            state, run_summary = _run(
                setup, mesh, workdir, state, start, end, ckpt, writer, iterator
            )
            summary.update(run_summary)
        summary.update(end_step=max(start, end), stopped_early=max(start, end) < num_steps)
        return state, summary
    finally:
        ckpt.close()  # waits for pending async saves
        if writer is not None:
            writer.close()
        if hasattr(iterator, "close"):
            iterator.close()
