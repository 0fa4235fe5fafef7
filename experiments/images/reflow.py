"""Reflow for the image experiments: train on pairs ``(x0, psi(x0))`` of a trained run.

``--config.reflow.teacher_workdir=RUN`` makes a training run one round of rectified flow's
reflow (Liu et al. 2023) on the run in ``RUN`` (its checkpoint ``reflow.teacher_step``,
default the latest, with its own saved config: model, path, prediction, guidance):

1. **pairs**: ``reflow.num_pairs`` source draws ``x0`` solved by the teacher's flow to
   ``x̂1`` (``reflow.solver`` at ``reflow.rtol`` / ``reflow.atol``), ``reflow.batch_size``
   per solve, each solve stored as one chunk in ``reflow.pairs_dir`` (default
   ``<workdir>/reflow_pairs``; :mod:`fmjax.data.reflow_pairs`). Drawn once: a rerun, a
   resumed run or another run pointed at the same directory reuses them, and a killed
   generation resumes at its first missing chunk. Class-conditional teachers draw each pair
   for a class (``0, 1, 2, ...`` mod ``num_classes``), stored with it.
2. **training**: the configured path and loss on those pairs in place of (noise, data) —
   the student learns the teacher's coupling, straighter with each round. By default
   (``reflow.init=teacher``) it starts from the teacher's (EMA) weights, as Liu et al. do:
   the teacher already carries the marginals, so a round needs far fewer steps than the
   base run; ``reflow.init=scratch`` trains a fresh model (any architecture).

A second round is a run whose teacher is the first round's workdir. ``--config.mode=sweep``
on each round's workdir measures what reflow is for: straightness and quality against NFE.
"""

from __future__ import annotations

import math
import os
import time
from typing import TYPE_CHECKING, Any

import jax
import ml_collections
import numpy as np

import fmjax
from experiments.images import checkpoints
from experiments.images import config as config_lib
from experiments.images.config import reflow_enabled as enabled
from experiments.images.setup import build
from fmjax.data.reflow_pairs import PairStore, make_pairs_iterator
from fmjax.train import TrainState
from fmjax.train import sharding as sharding_lib
from fmjax.train.checkpoint import CheckpointManager

if TYPE_CHECKING:
    from jax.sharding import Mesh

    from experiments.images.setup import Setup

__all__ = ["Teacher", "enabled", "pairs_dir", "prepare"]


def pairs_dir(config, workdir: str) -> str:
    """Where the round's pairs live: ``reflow.pairs_dir`` or ``<workdir>/reflow_pairs``."""
    d = config.reflow.pairs_dir or os.path.join(os.fspath(workdir), "reflow_pairs")
    return os.path.abspath(d)


def _overlay(cfg: ml_collections.ConfigDict, saved: dict) -> None:
    """Set ``cfg``'s fields to a saved config's values (fields ``cfg`` lacks are skipped;
    fields the saved config lacks keep ``cfg``'s: configs saved before a field existed)."""
    for k, v in saved.items():
        if k not in cfg:
            continue
        if isinstance(cfg[k], ml_collections.ConfigDict) and isinstance(v, dict):
            _overlay(cfg[k], v)
        else:
            cfg[k] = tuple(v) if isinstance(v, list) else v


class Teacher:
    """The teacher run: its config (the student's, overlaid with the saved one) and, on
    first use, its evaluation parameters (EMA unless its ``eval.use_ema`` is off)."""

    def __init__(self, setup: Setup, mesh: Mesh):
        r = setup.config.reflow
        self.workdir = os.path.abspath(r.teacher_workdir)
        with CheckpointManager(checkpoints.checkpoint_dir(self.workdir)) as ckpt:
            if not ckpt.all_steps():
                raise config_lib.ConfigError(
                    f"reflow.teacher_workdir: no checkpoint in {ckpt.directory} yet: train "
                    "the teacher first."
                )
            step = r.teacher_step if r.teacher_step is not None else ckpt.latest_step()
            if step not in ckpt.all_steps():
                raise config_lib.ConfigError(
                    f"reflow.teacher_step={r.teacher_step}: {ckpt.directory} has checkpoints "
                    f"{ckpt.all_steps()}."
                )
            self.step = int(step)
            meta = ckpt.metadata(self.step)
        cfg = ml_collections.ConfigDict(setup.config.to_dict())
        _overlay(cfg, meta["config"])
        cfg.eval.checkpoint_step = self.step
        cfg.reflow.teacher_workdir = ""
        self.setup = build(cfg, None, progress=False)  # (its batch sizes are not used)
        self.mesh, self._params = mesh, None
        student = setup.config
        config_lib.check_trained_as(student, meta, f"the teacher {self.workdir} (step {step})")
        if student.model.num_classes != cfg.model.num_classes:
            raise config_lib.ConfigError(
                f"model.num_classes={student.model.num_classes}, but the teacher was trained "
                f"with {cfg.model.num_classes}: the pairs carry its classes."
            )
        if student.reflow.init == "teacher":
            was, now = cfg.model.to_dict(), student.model.to_dict()
            diffs = [
                f"model.{k}={was[k]!r} (this config: {now[k]!r})" for k in now if was[k] != now[k]
            ]
            if diffs:
                raise config_lib.ConfigError(
                    "reflow.init=teacher starts from the teacher's weights, but it was trained "
                    "with " + "; ".join(diffs) + ": match its model or set reflow.init=scratch."
                )

    @property
    def params(self):
        if self._params is None:
            state, _ = checkpoints.load(self.setup, self.workdir, self.mesh)
            self._params = self.setup.eval_params(state)
        return self._params


def _settings(setup: Setup, teacher: Teacher, chunk: int, num_chunks: int) -> dict[str, Any]:
    r, ts = setup.config.reflow, teacher.setup
    return {
        "teacher_workdir": teacher.workdir,
        "teacher_step": teacher.step,
        "solver": r.solver,
        "rtol": float(r.rtol),
        "atol": float(r.atol),
        "seed": int(setup.config.seed),
        "shape": list(ts.image_shape),
        "source_std": ts.source_std,
        "t_range": list(ts.t_range),
        "guidance_scale": ts.guidance_scale,
        "chunk_size": chunk,
        "num_chunks": num_chunks,
    }


def _draw(teacher: Teacher, store: PairStore, options, seed: int, log) -> dict:
    """Draw the store's missing chunks with the teacher; returns the generation summary."""
    ts, mesh, n = teacher.setup, teacher.mesh, store.chunk_size
    missing, t_start = store.missing(), time.perf_counter()
    if missing:  # the field and the labels are every chunk's (the teacher loads only here)
        v, y = ts.sampling_field(teacher.params, n, mesh)
        labels = None if y is None else sharding_lib.to_host(y)
    t0, t1 = ts.t_range
    for i, k in enumerate(missing):
        t_chunk = time.perf_counter()
        key = jax.random.fold_in(jax.random.key(seed), k)
        x0 = ts.source_noise(key, n, mesh)
        x1, stats = fmjax.sample(v, x0, cond=y, options=options, t0=t0, t1=t1, throw=False)
        x0_h, x1_h = sharding_lib.to_host(x0), sharding_lib.to_host(x1)
        ok = bool(np.all(np.asarray(stats.success))) and np.isfinite(x1_h).all()
        if not ok:
            raise RuntimeError(
                f"the teacher's solve of reflow chunk {k} failed (solver {options.solver} at "
                f"rtol {options.rtol}): nothing was stored for it; loosen reflow.rtol / atol "
                "or check the teacher."
            )
        nfe = float(np.asarray(stats.nfe))
        if jax.process_index() == 0:
            info = {"nfe": nfe, "seconds": time.perf_counter() - t_chunk}
            store.write(k, x0_h, x1_h, labels, info=info)
        if jax.process_count() > 1:  # every process reads the chunk from a shared directory
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"reflow_chunk_{k}")
        log(f"reflow pairs: chunk {k + 1}/{store.num_chunks} ({i + 1} drawn now), NFE {nfe:.0f}")
    return {"pairs_drawn_now": len(missing) * n, "pairs_seconds": time.perf_counter() - t_start}


def prepare(setup: Setup, mesh: Mesh, workdir: str) -> dict:
    """Load the teacher and draw the missing pairs; returns ``{"iterator", "fresh_state",
    "summary"}``: the pairs' training iterator, the student's state at step 0 (a callable;
    the teacher's weights for ``reflow.init=teacher``) and what the round records."""
    c, r = setup.config, setup.config.reflow
    teacher = Teacher(setup, mesh)
    chunk = int(math.ceil(int(r.batch_size) / mesh.size) * mesh.size)
    num_chunks = int(math.ceil(int(r.num_pairs) / chunk))
    directory = pairs_dir(c, workdir)
    try:
        store = PairStore(directory, _settings(setup, teacher, chunk, num_chunks))
    except ValueError as e:
        raise config_lib.ConfigError(f"reflow.pairs_dir: {e}") from None
    options = fmjax.SolverOptions(r.solver, rtol=float(r.rtol), atol=float(r.atol))
    quiet = not (setup.progress and jax.process_index() == 0)
    summary = _draw(teacher, store, options, int(c.seed), lambda s: quiet or print(s, flush=True))
    infos = store.chunk_info()
    summary.update(
        teacher_workdir=teacher.workdir,
        teacher_step=teacher.step,
        init=r.init,
        pairs_dir=directory,
        num_pairs=num_chunks * chunk,
        pairs_nfe_mean=float(np.mean([i["nfe"] for i in infos])),
        # every chunk's solve, whichever run drew it (compilation included)
        pairs_seconds_all=float(sum(i.get("seconds", math.nan) for i in infos)),
    )
    d = c.data
    iterator = make_pairs_iterator(
        directory,
        global_batch_size=int(d.global_batch_size),
        seed=int(c.seed),
        worker_count=int(d.worker_count),
        read_threads=int(d.read_threads),
    )

    def fresh_state() -> TrainState:
        if r.init == "scratch":
            return jax.jit(setup.init_state, out_shardings=sharding_lib.replicated_sharding(mesh))()
        k_train = jax.random.split(jax.random.key(int(c.seed)))[1]  # as init_state's
        create = jax.jit(
            lambda p: TrainState.create(p, setup.tx, k_train),
            out_shardings=sharding_lib.replicated_sharding(mesh),
        )
        return create(teacher.params)

    return {"iterator": iterator, "fresh_state": fresh_state, "summary": summary}
