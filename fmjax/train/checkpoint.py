"""Checkpoints of a training run: the train state, the data position and the config.

:class:`CheckpointManager` wraps ``orbax.checkpoint.CheckpointManager``:

* periodic, asynchronous saves (``save_every`` steps; the device-to-host copy happens in
  :meth:`~CheckpointManager.save`, the writing in the background, so the state may be
  donated to the next step right away);
* keeps the last ``keep`` checkpoints plus the best one by a metric (e.g. eval BPD or the
  training loss, ``best_mode='min'``);
* each checkpoint holds three items: ``state`` (the :class:`~fmjax.train.TrainState`:
  parameters, EMA, optimizer state, step and PRNG key, restored onto the shardings of the
  target you pass), ``data`` (the grain iterator position, one JSON file per process, through
  grain's orbax handler) and ``meta`` (JSON: step, metrics, the config, process 0's data
  position);
* the config is also written beside the checkpoints as ``config.json``;
* :meth:`~CheckpointManager.restore` resumes from the latest checkpoint (or a given step).

Atomicity is orbax's: a checkpoint is written to a temporary directory and renamed when
complete, so a run killed at any moment leaves the previous checkpoint as the latest one;
temporary leftovers are removed on the next start. Call :meth:`~CheckpointManager.close`
(or use the manager as a context manager) before exiting so pending writes finish.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from fmjax.checks import integer

__all__ = ["CheckpointManager", "abstract_like", "with_sharding"]

log = logging.getLogger(__name__)


def with_sharding(abstract_tree, sharding):
    """``abstract_tree`` (e.g. from ``jax.eval_shape``) with ``sharding`` on every leaf."""
    return jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), abstract_tree
    )


def abstract_like(tree):
    """Shape, dtype and sharding of every array of ``tree`` (a restore target)."""

    def leaf(x):
        if isinstance(x, jax.ShapeDtypeStruct):
            return x
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))

    return jax.tree_util.tree_map(leaf, tree)


def _config_dict(config) -> Any:
    if config is None:
        return None
    if hasattr(config, "to_json_best_effort"):
        return json.loads(config.to_json_best_effort())
    return json.loads(json.dumps(config, default=str))


def _float_metrics(metrics) -> dict:
    out = {}
    for k, v in (metrics or {}).items():
        try:
            out[k] = float(np.asarray(v))
        except (TypeError, ValueError):
            continue
    return out


class _FrozenIteratorState:
    """What grain's orbax handler sees at save time: the state captured then, as JSON bytes.

    (Any save path of orbax, present or future, that runs the handler later in a background
    thread would otherwise record where the iterator is by then, not where it was.)
    """

    def __init__(self, state):
        self._json = json.dumps(state)

    def get_state(self) -> bytes:
        return self._json.encode()


class _IteratorRestoreTarget:
    """Receives the JSON bytes grain's handler reads back and sets them on the iterator."""

    def __init__(self, iterator):
        self.iterator = iterator

    def set_state(self, state: bytes):
        self.iterator.set_state(json.loads(state.decode() if isinstance(state, bytes) else state))

    def start_prefetch(self):
        pass


class CheckpointManager:
    """Saves and restores ``TrainState`` + data iterator position + config (see module doc).

    Args:
      directory: where the checkpoints go (created if needed), e.g. ``workdir/checkpoints``.
      save_every: save when ``step % save_every == 0`` (``save(..., force=True)`` always
        saves, e.g. at the end of training).
      keep: how many of the most recent checkpoints to keep.
      best_metric: name of a metric passed to :meth:`save` by which the best checkpoint is
        also kept (None: only the last ``keep``); a checkpoint saved without that metric
        never counts as the best.
      best_mode: ``'min'`` (loss, BPD) or ``'max'``.
      async_save: write in the background (the default); :meth:`wait` / :meth:`close` wait.
      config: the run's config (``ml_collections.ConfigDict`` or a JSON-able dict), written
        as ``config.json`` beside the checkpoints and into each checkpoint's ``meta``.
    """

    def __init__(
        self,
        directory,
        *,
        save_every: int = 1000,
        keep: int = 3,
        best_metric: str | None = None,
        best_mode: str = "min",
        async_save: bool = True,
        config=None,
    ):
        save_every, keep = integer(save_every, "save_every"), integer(keep, "keep")
        if best_mode not in ("min", "max"):
            raise ValueError(f"best_mode must be 'min' or 'max'; got {best_mode!r}.")
        self.directory = epath.Path(os.path.abspath(os.fspath(directory)))
        self.save_every = int(save_every)
        self.best_metric = best_metric or None
        self.best_mode = best_mode
        self._config = _config_dict(config)

        worst = math.inf if best_mode == "min" else -math.inf

        def metric_fn(metrics):
            value = (metrics or {}).get(self.best_metric, worst)
            value = float(value)
            return value if math.isfinite(value) else worst

        cm = ocp.checkpoint_managers
        policies = [cm.LatestN(n=int(keep))]
        if self.best_metric:
            policies.append(
                cm.BestN(
                    get_metric_fn=metric_fn,
                    reverse=best_mode == "min",
                    n=1,
                    keep_checkpoints_without_metrics=False,
                )
            )
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=self.save_every,
            preservation_policy=cm.AnyPreservationPolicy(policies),
            best_fn=metric_fn if self.best_metric else None,
            best_mode=best_mode,
            enable_async_checkpointing=bool(async_save),
            cleanup_tmp_directories=True,
            create=True,
        )
        self._mngr = ocp.CheckpointManager(self.directory, options=options)
        if self._config is not None and jax.process_index() == 0:
            self._write_config()

    # ------------------------------------------------------------------ config

    def _write_config(self):
        path = self.directory / "config.json"
        text = json.dumps(self._config, indent=2, sort_keys=True)
        if path.exists():
            old = path.read_text()
            if old == text:
                return
            log.warning(
                "the config differs from the one saved in %s; keeping the old one "
                "as config.previous.json",
                path,
            )
            (self.directory / "config.previous.json").write_text(old)
        tmp = self.directory / "config.json.tmp"
        tmp.write_text(text)
        tmp.replace(path)

    # ------------------------------------------------------------------ queries

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self._mngr.latest_step()

    def best_step(self) -> int | None:
        """The best checkpoint's step by ``best_metric`` (the latest without one)."""
        return self._mngr.best_step()

    def all_steps(self) -> list[int]:
        return sorted(self._mngr.all_steps())

    def should_save(self, step: int) -> bool:
        """A multiple of ``save_every``, or a preemption notice reached (Cloud TPU/GKE)."""
        step = int(step)
        if step % self.save_every == 0:
            return True
        try:
            return bool(self._mngr.reached_preemption(step))
        except Exception:  # noqa: BLE001 - no preemption service (single process, CPU)
            return False

    # ------------------------------------------------------------------ save / restore

    def save(
        self, step: int, state, data_iterator=None, *, metrics=None, force: bool = False
    ) -> bool:
        """Save ``state`` (and the iterator's position) as checkpoint ``step``.

        Returns whether a checkpoint was started (``step`` is a save step, or ``force``).
        Returns once the arrays are copied to host; the files are written in the background.
        """
        step = int(step)
        if step in self._mngr.all_steps():
            return False
        if not (force or self.should_save(step)):
            return False
        metrics = _float_metrics(metrics)
        meta = {
            "step": step,
            "time": time.time(),
            "metrics": metrics,
            "config": self._config,
            "process_count": jax.process_count(),
        }
        items = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None:
            import grain.checkpoint

            data_state = data_iterator.get_state()
            meta["data_state"] = data_state
            items["data"] = grain.checkpoint.CheckpointSave(_FrozenIteratorState(data_state))
        items["meta"] = ocp.args.JsonSave(meta)
        saved = self._mngr.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)
        return bool(saved)

    def restore(self, target, data_iterator=None, *, step: int | None = None):
        """Restore checkpoint ``step`` (default the latest) -> ``(state, meta)``.

        ``target`` is a state with the right structure: concrete arrays or
        ``jax.ShapeDtypeStruct`` leaves, each with the sharding to restore onto (see
        :func:`with_sharding`). ``data_iterator``, a freshly built iterator with the same
        arguments as the saved one, is moved to the saved position. Returns None when there
        is no checkpoint.
        """
        step = self.latest_step() if step is None else int(step)
        if step is None:
            return None
        abstract = abstract_like(target)
        missing = [x for x in jax.tree_util.tree_leaves(abstract) if x.sharding is None]
        if missing:
            raise ValueError(
                "restore() needs a target with a sharding on every array (pass "
                "the live state, or use with_sharding(jax.eval_shape(...), "
                "sharding))."
            )
        items = {"state": ocp.args.StandardRestore(abstract), "meta": ocp.args.JsonRestore()}
        restored = self._mngr.restore(step, args=ocp.args.Composite(**items))
        meta = dict(restored["meta"] or {})
        if data_iterator is not None:
            self._restore_data(step, data_iterator, meta)
        return restored["state"], meta

    def _restore_data(self, step, iterator, meta):
        import grain.checkpoint

        try:
            self._mngr.restore(
                step,
                args=ocp.args.Composite(
                    data=grain.checkpoint.CheckpointRestore(_IteratorRestoreTarget(iterator))
                ),
            )
        except (ValueError, FileNotFoundError, KeyError) as e:
            saved = meta.get("data_state")
            if saved is None:
                raise ValueError(
                    f"checkpoint {step} in {self.directory} has no data iterator position "
                    f"for this process ({e})."
                ) from e
            # Saved with another process count: the pipeline's position (global batches
            # consumed) is the same in every process, so process 0's state applies.
            log.warning(
                "no data position saved for process %d of %d at step %d (saved with "
                "%s processes); using process 0's",
                jax.process_index(),
                jax.process_count(),
                step,
                meta.get("process_count"),
            )
            iterator.set_state(saved)

    def metadata(self, step: int | None = None) -> dict | None:
        """The ``meta`` item (step, metrics, config) of a checkpoint, or None."""
        step = self.latest_step() if step is None else int(step)
        if step is None:
            return None
        restored = self._mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(restored["meta"])

    # ------------------------------------------------------------------ lifecycle

    def wait(self):
        """Block until every pending save is written."""
        self._mngr.wait_until_finished()

    def close(self):
        """Wait for pending saves and release the manager."""
        self._mngr.wait_until_finished()
        self._mngr.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
