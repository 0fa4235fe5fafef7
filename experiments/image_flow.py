"""Flow Matching on 32x32 images (ImageNet 32x32, CIFAR-10): the library trainer.

``python -m experiments.imagenet32`` and ``python -m experiments.cifar10`` are thin entry
points over :func:`train_and_evaluate`, which notebooks call directly::

    from experiments import image_flow
    from experiments.configs import imagenet32
    cfg = imagenet32.get_config("tiny")
    cfg.data.data_dir = "/data/tfds"
    image_flow.train_and_evaluate(cfg, "out/imagenet32_tiny")

What a run does (``config.mode``: ``train``, ``eval`` or ``train_and_eval``):

* builds the ADM UNet from ``config.model`` (optionally class-conditional, labels dropped
  to the null class with probability ``class_dropout``; optional bfloat16 compute), Adam
  with the paper's schedule (linear warm-up from 0, then linear/polynomial decay to
  ``end_learning_rate`` at ``num_steps``), optional global-norm clipping, EMA, and the
  configured path (CondOT by default; any of :mod:`experiments.path_config`'s), with the
  UNet predicting ``train.prediction``: the velocity (the paper's models), x1, eps (DDPM's
  parameterisation on the VP path) or the score, converted to a velocity for sampling and
  bits/dim over the path's ``velocity_range``;
* trains data parallel over every device of every process (one global-view jit on a
  ``"data"`` mesh; each process reads its slice of every global batch);
* checkpoints every ``checkpoint_every`` steps (async orbax; params, EMA, optimizer state,
  step, PRNG key and the data iterator position) and resumes from the latest checkpoint
  in ``workdir/checkpoints`` automatically, continuing exactly as if never stopped; a
  checkpoint trained on another path or prediction is refused (resume and evaluation);
* stops on a non-finite loss with :class:`fmjax.train.NonFiniteLossError`, never
  checkpointing non-finite parameters (the last checkpoint stays the last good one);
* logs (process 0): a progress bar with steps/s, ETA and loss; ``metrics.jsonl`` and
  TensorBoard events; sample grids of the EMA model in ``workdir/samples``;
* evaluates: test-set bits/dim by the paper's protocol (dopri5 rtol = atol = 1e-5,
  Hutchinson divergence, K uniform-dequantization samples, [-1, 1] scaling accounted for),
  the NFE of dopri5 sampling, and FID when Inception weights are configured; writes
  ``eval_metrics.json`` where every number names the dataset source and split.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import fmjax
from experiments import path_config
from fmjax._checks import integer, real
from fmjax.data import images as images_lib
from fmjax.models import unet as unet_lib
from fmjax.train import NonFiniteLossError, TrainState, make_train_step
from fmjax.train import sharding as sharding_lib
from fmjax.train.checkpoint import CheckpointManager, with_sharding
from fmjax.train.logging import MetricWriter, write_json

__all__ = [
    "MODES",
    "ConfigError",
    "build_model",
    "checkpoint_dir",
    "evaluate",
    "make_loss_fn",
    "make_optimizer",
    "make_path",
    "make_schedule",
    "sample_images",
    "source_std",
    "train",
    "train_and_evaluate",
]

MODES = ("train", "eval", "train_and_eval")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
_ADAPTIVE = tuple(fmjax.ode.ADAPTIVE_SOLVERS)
IMAGE_SHAPE = images_lib.IMAGE_SHAPE


class ConfigError(ValueError):
    """A config value the run cannot use (the command line prints it without a traceback)."""


# ----------------------------------------------------------------------------- pieces


def checkpoint_dir(workdir) -> str:
    return os.path.join(os.path.abspath(os.fspath(workdir)), "checkpoints")


def build_model(config) -> unet_lib.UNet:
    """The UNet of ``config.model`` (the fields of :class:`fmjax.models.UNet`)."""
    m = config.model
    if m.dtype not in _DTYPES:
        raise ConfigError(f"model.dtype must be one of {sorted(_DTYPES)}; got {m.dtype!r}.")
    return unet_lib.UNet(
        ch=int(m.ch),
        ch_mult=tuple(m.ch_mult),
        num_res_blocks=int(m.num_res_blocks),
        attn_resolutions=tuple(m.attn_resolutions),
        num_heads=int(m.num_heads),
        num_head_channels=None if m.num_head_channels is None else int(m.num_head_channels),
        dropout=float(m.dropout),
        num_classes=m.num_classes,
        resblock_updown=bool(m.resblock_updown),
        use_scale_shift_norm=bool(m.use_scale_shift_norm),
        dtype=_DTYPES[m.dtype],
    )


def make_schedule(config):
    """Linear warm-up 0 -> lr over ``warmup_steps``, then polynomial decay to
    ``end_learning_rate`` at ``num_steps`` (power 1: the paper's linear decay)."""
    t = config.train
    lr, warm, total = float(t.learning_rate), int(t.warmup_steps), int(t.num_steps)
    decay = optax.polynomial_schedule(
        lr, float(t.end_learning_rate), float(t.decay_power), transition_steps=max(1, total - warm)
    )
    if warm <= 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warm), decay], [warm])


def make_optimizer(config):
    """Adam (no weight decay) on the paper's schedule, after optional clipping."""
    t = config.train
    schedule = make_schedule(config)
    adam = optax.adam(schedule, b1=float(t.adam_b1), b2=float(t.adam_b2), eps=float(t.adam_eps))
    if t.grad_clip_norm and t.grad_clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(float(t.grad_clip_norm)), adam), schedule
    return adam, schedule


def make_path(config):
    """The configured path (:mod:`experiments.path_config`), as a ConfigError when invalid.

    Sampling and bits/dim start from the path's own source noise, ``N(0, s^2 I)`` with
    ``s = path.source_std()`` (1 for CondOT, ~1 for VP, ``sigma_max`` for VE)."""
    try:
        return path_config.make_path(config.path)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def source_std(config) -> float:
    """The std of the configured path's source noise (see :func:`make_path`)."""
    return float(make_path(config).source_std())


def make_loss_fn(model, path, config):
    """``loss_fn(params, key, batch)``: the CFM loss of the UNet on a batch of images."""
    num_classes = config.model.num_classes
    p_drop = float(config.model.class_dropout)
    reduction = config.train.loss_reduction
    prediction = config.train.prediction

    def loss_fn(params, key, batch):
        k_cfm, k_dropout, k_label = jax.random.split(key, 3)
        y = None
        if num_classes is not None:
            y = batch["label"].astype(jnp.int32)
            if p_drop > 0:
                drop = jax.random.bernoulli(k_label, p_drop, y.shape)
                y = jnp.where(drop, num_classes, y)

        def v(t, x):
            return model.apply(params, t, x, y, train=True, rngs={"dropout": k_dropout})

        return fmjax.losses.cfm_loss(
            v, path, k_cfm, batch["image"], reduction=reduction, prediction=prediction
        )

    return loss_fn


def build_train_step(config, model, path, tx, mesh):
    """The trainer's jitted ``step(state, batch) -> (state, metrics)`` on ``mesh``: the CFM
    loss of :func:`make_loss_fn`, ``tx``, EMA ``train.ema_decay`` and gradient accumulation
    over ``train.microbatches`` parts of each device's rows."""
    k = int(config.train.microbatches)
    # with microbatches each device accumulates its parts and all-reduces once per step
    # (the global view would all-reduce every part's gradients inside the scan)
    return make_train_step(
        make_loss_fn(model, path, config),
        tx,
        ema_decay=float(config.train.ema_decay) or None,
        mesh=mesh,
        shard_loss=k > 1,
        microbatches=k,
    )


def _apply_velocity(model, params, t, x, y=None):
    return model.apply(params, t, x, y, train=False)


@functools.lru_cache(maxsize=16)
def _field(model):
    """``field(params, t, x, y=None)``: ``Partial(field, params)`` is the model's ``v(t, x)``
    (conditional models: the null class) and its ``v(t, x, cond)`` with labels. One function
    object per (equal) model, so jitted solvers compile once per model."""
    return functools.partial(_apply_velocity, model)


def model_velocity(model, params, path=None, prediction="velocity", t_margin=1e-3):
    """``(v, (t0, t1))``: the UNet's field as a velocity ``v(t, x)`` (and ``v(t, x, cond)``
    with labels), and the time span to solve it over.

    With ``path``, a ``prediction`` other than 'velocity' (x1, eps, score) is converted by
    ``path.velocity_field``, and the span is ``path.velocity_range(prediction, t_margin)``:
    the path's ``t_range`` (``(0, 1 - 1e-5)`` for VP, where the path is singular at 1),
    moved in where the conversion divides by zero. Without it: a velocity over ``[0, 1]``.
    """
    v = jax.tree_util.Partial(_field(model), params)
    if path is None:
        if prediction != "velocity":
            raise ValueError(
                f"a model that predicts {prediction!r} needs its path to be "
                "sampled or scored (path=...)."
            )
        return v, (0.0, 1.0)
    return path.velocity_field(v, prediction), path.velocity_range(prediction, t_margin)


def _model_velocity(config, model, params):
    return model_velocity(
        model, params, make_path(config), config.train.prediction, float(config.eval.t_margin)
    )


def _t_range(config):
    """The span :func:`_model_velocity`'s field is solved over."""
    return make_path(config).velocity_range(config.train.prediction, float(config.eval.t_margin))


def _check_trained_as(config, meta, what):
    """Refuse a checkpoint whose saved config trained another path or prediction: its
    parameters mean something else (an eps-model's output read as a velocity)."""
    saved = (meta or {}).get("config") or {}
    if not saved:  # a checkpoint saved without its config: nothing to compare
        return
    diffs = []
    if "path" in saved:
        was, now = path_config.path_params(saved["path"]), path_config.path_params(config.path)
        if was[:2] != now[:2]:
            diffs.append(f"path {was[0]} {was[1]} (this config: {now[0]} {now[1]})")
    was = saved.get("train", {}).get("prediction", "velocity")  # (before the field existed)
    if was != config.train.prediction:
        diffs.append(f"train.prediction={was!r} (this config: {config.train.prediction!r})")
    if diffs:
        raise ConfigError(
            f"{what} was trained with " + "; ".join(diffs) + ": set the config "
            "to match, or use another --workdir."
        )


# integer config fields: (section, name, least allowed value), 0 where the configs document
# 0 as "off" or "all"; FID needs two samples for a covariance
_INT_FIELDS = (
    ("data", "global_batch_size", 1),
    ("data", "worker_count", 0),
    ("data", "read_threads", 1),
    ("train", "num_steps", 1),
    ("train", "warmup_steps", 0),
    ("train", "log_every", 1),
    ("train", "checkpoint_every", 1),
    ("train", "keep_checkpoints", 1),
    ("train", "microbatches", 1),
    ("train", "sample_every", 0),
    ("train", "num_sample_images", 1),
    ("train", "eval_every", 0),
    ("eval", "checkpoint_step", 0),
    ("eval", "global_batch_size", 1),
    ("eval", "num_batches", 0),
    ("eval", "num_dequant", 1),
    ("eval", "nfe_num_samples", 0),
    ("eval", "sample_batch_size", 1),
    ("eval", "fid_num_samples", 2),
    ("model", "num_classes", 1),
)
_OPTIONAL_INT_FIELDS = {("eval", "checkpoint_step"), ("model", "num_classes")}  # None: unset
# real config fields: (section, name, keyword bounds of fmjax._checks.real)
_REAL_FIELDS = (
    ("train", "learning_rate", {"low": 0.0, "low_open": True}),
    ("train", "end_learning_rate", {"low": 0.0}),
    ("train", "decay_power", {"low": 0.0, "low_open": True}),
    ("train", "adam_b1", {"low": 0.0, "high": 1.0, "high_open": True}),
    ("train", "adam_b2", {"low": 0.0, "high": 1.0, "high_open": True}),
    ("train", "adam_eps", {"low": 0.0}),
    ("train", "grad_clip_norm", {"low": 0.0}),  # 0: off
    ("train", "ema_decay", {"low": 0.0, "high": 1.0, "high_open": True}),
    ("model", "dropout", {"low": 0.0, "high": 1.0, "high_open": True}),
    ("model", "class_dropout", {"low": 0.0, "high": 1.0}),  # label -> null class
    ("eval", "t_margin", {"low": 0.0, "high": 0.5, "low_open": True, "high_open": True}),
    ("eval", "guidance_scale", {}),
)  # classifier-free guidance weight w (1: off)
_LOSS_REDUCTIONS = ("mean", "sum")  # a scalar loss to differentiate


def _check_config(config):
    if config.mode not in MODES:
        raise ConfigError(f"mode must be one of {MODES}; got {config.mode!r}.")
    try:
        images_lib._lookup(config.data.source)  # unknown source -> ValueError listing them
    except ValueError as e:
        raise ConfigError(f"data.source: {e}") from e
    for section, name, minimum in _INT_FIELDS:
        value = config[section][name]
        if not (value is None and (section, name) in _OPTIONAL_INT_FIELDS):
            try:
                integer(value, f"{section}.{name}", minimum=minimum)
            except ValueError as e:
                raise ConfigError(str(e)) from None
    for section, name, bounds in _REAL_FIELDS:
        try:
            real(config[section][name], f"{section}.{name}", **bounds)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    t = config.train
    if t.loss_reduction not in _LOSS_REDUCTIONS:
        raise ConfigError(
            f"train.loss_reduction must be one of {_LOSS_REDUCTIONS}; got {t.loss_reduction!r}."
        )
    e = config.eval
    if e.probe not in fmjax.likelihood.PROBES:
        raise ConfigError(f"eval.probe must be one of {fmjax.likelihood.PROBES}; got {e.probe!r}.")
    if e.fid_reference_stats and not os.path.isfile(e.fid_reference_stats):
        raise ConfigError(
            f"eval.fid_reference_stats: no file {e.fid_reference_stats!r} (set "
            "it to '' to compute the statistics from the train split)."
        )
    for solver_key, solver, tol_keys, rtol, atol in (
        ("train.sample_solver", t.sample_solver, "train.sample_tol", t.sample_tol, t.sample_tol),
        ("eval.solver", e.solver, "eval.rtol / eval.atol", e.rtol, e.atol),
    ):
        if solver not in _ADAPTIVE:
            raise ConfigError(
                f"{solver_key} must be an adaptive solver {_ADAPTIVE}; got {solver!r}."
            )
        try:
            fmjax.ode.check_solver_args(solver, None, None, 0.0, 1.0, rtol=rtol, atol=atol)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"{tol_keys}: {err}") from err
    try:
        fmjax.paths.check_prediction(t.prediction, "train.prediction")
    except ValueError as err:
        raise ConfigError(str(err)) from None
    make_path(config).velocity_range(t.prediction, float(e.t_margin))
    if config.model.num_classes is not None and config.data.source == "downsampled_imagenet/32x32":
        raise ConfigError(
            "downsampled_imagenet/32x32 has no labels: a class-conditional "
            "model (model.num_classes) needs another source."
        )
    if float(e.guidance_scale) != 1.0 and (
        config.model.num_classes is None or float(config.model.class_dropout) == 0.0
    ):
        raise ConfigError(
            f"eval.guidance_scale={e.guidance_scale} needs a class-conditional model trained "
            "with a null class: set model.num_classes and model.class_dropout > 0 (got "
            f"num_classes={config.model.num_classes}, class_dropout="
            f"{config.model.class_dropout}), or leave eval.guidance_scale at 1."
        )
    build_model(config)  # model.dtype


def _check_divisible(global_batch_size, mesh, what):
    try:
        sharding_lib.check_batch_divisible(global_batch_size, mesh, what=what)
    except ValueError as e:
        raise ConfigError(str(e)) from e


def _check_microbatches(config, mesh):
    gbs, k = int(config.data.global_batch_size), int(config.train.microbatches)
    if (gbs // mesh.size) % k:
        raise ConfigError(
            f"train.microbatches={k} must divide each device's rows of the global batch "
            f"(data.global_batch_size={gbs} over {mesh.size} device(s): {gbs // mesh.size} "
            "rows each)."
        )


def _init_fn(config, model, tx):
    k_init, k_train = jax.random.split(jax.random.key(int(config.seed)))
    y = None if config.model.num_classes is None else jnp.zeros((1,), jnp.int32)

    def init():
        params = model.init(
            {"params": k_init, "dropout": k_init}, jnp.zeros((1,)), jnp.zeros((1, *IMAGE_SHAPE)), y
        )
        return TrainState.create(params, tx, k_train)

    return init


def _abstract_state(config, model, tx, mesh):
    init = _init_fn(config, model, tx)
    try:  # the first trace of the model: the UNet checks its fields against the image shape
        shapes = jax.eval_shape(init)
    except ValueError as e:
        raise ConfigError(f"model: {e}") from e
    return init, with_sharding(shapes, sharding_lib.replicated_sharding(mesh))


@jax.jit
def _all_finite(tree):
    leaves = [
        jnp.all(jnp.isfinite(x))
        for x in jax.tree_util.tree_leaves(tree)
        if jnp.issubdtype(x.dtype, jnp.inexact)
    ]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def _train_iterator(config, **overrides):
    d = config.data
    kwargs = {
        "global_batch_size": int(d.global_batch_size),
        "seed": int(config.seed),
        "data_dir": d.data_dir,
        "random_flip": bool(d.random_flip),
        "worker_count": int(d.worker_count),
        "read_threads": int(d.read_threads),
    }
    kwargs.update(overrides)
    return images_lib.make_train_iterator(d.source, **kwargs)


def _rounded_up(n, mesh):
    k = int(mesh.shape[sharding_lib.DATA_AXIS])
    return int(math.ceil(n / k) * k)


def sample_images(
    model,
    params,
    key,
    num,
    mesh,
    *,
    num_classes=None,
    solver="dopri5",
    rtol=1e-5,
    atol=1e-5,
    source_std=1.0,
    guidance_scale=1.0,
    path=None,
    prediction="velocity",
    t_margin=1e-3,
):
    """``num`` images from ``N(0, source_std^2 I)`` noise (the path's source: see
    :func:`source_std`) by the flow of the UNet, data parallel over the mesh.

    Class-conditional models get labels ``0, 1, 2, ...`` (mod num_classes), given to the
    solve with their rows (``fmjax.sample(cond=...)``) and sampled with classifier-free
    guidance of weight ``guidance_scale`` against the null class ``num_classes``
    (:func:`fmjax.guidance.classifier_free`; 1: the conditional field). A model that
    predicts x1, eps or the score (``prediction``) is solved as the velocity of ``path`` over
    its ``velocity_range`` (:func:`model_velocity`). Returns
    ``(images (num, 32, 32, 3) numpy in [-1, 1]-ish, stats)``; the solve does not raise on
    failure (check ``stats.success``).
    """
    v, (t0, t1) = model_velocity(model, params, path, prediction, t_margin)
    n = _rounded_up(num, mesh)
    data = sharding_lib.data_sharding(mesh)
    s0 = float(source_std)
    x0 = jax.jit(lambda k: s0 * jax.random.normal(k, (n, *IMAGE_SHAPE)), out_shardings=data)(key)
    y = None
    if num_classes is not None:  # guidance weight 1: the conditional field itself
        y = jax.jit(lambda: jnp.arange(n, dtype=jnp.int32) % num_classes, out_shardings=data)()
        v = fmjax.guidance.classifier_free(v, None, num_classes, float(guidance_scale))
    x1, stats = fmjax.sample(
        v, x0, cond=y, solver=solver, rtol=rtol, atol=atol, t0=t0, t1=t1, throw=False
    )
    return sharding_lib.to_host(x1)[:num], stats


# ----------------------------------------------------------------------------- training


def _restore_or_init(config, ckpt, model, tx, mesh, iterator):
    init, abstract = _abstract_state(config, model, tx, mesh)
    if ckpt.latest_step() is not None:
        _check_trained_as(config, ckpt.metadata(), f"the checkpoint in {ckpt.directory}")
        state, meta = ckpt.restore(abstract, iterator)
        return state, int(meta.get("step", int(state.step)))
    state = jax.jit(init, out_shardings=sharding_lib.replicated_sharding(mesh))()
    return state, 0


def train(config, workdir, *, progress: bool | None = None, stop_at: int | None = None, mesh=None):
    """Train (resuming from ``workdir/checkpoints`` if there is a checkpoint).

    ``stop_at``: return after that step (a checkpoint is saved there), as a preemption
    would; the next call continues. Returns ``(state, summary)``.
    """
    _check_config(config)
    mesh = mesh or sharding_lib.make_mesh()
    t = config.train
    gbs = int(config.data.global_batch_size)
    _check_divisible(gbs, mesh, "global batch")
    if progress is None:
        progress = bool(t.progress)
    workdir = os.path.abspath(os.fspath(workdir))
    model = build_model(config)
    tx, schedule = make_optimizer(config)
    path = make_path(config)
    iterator = _train_iterator(config)  # a missing dataset fails here, before any compile

    ckpt = CheckpointManager(
        checkpoint_dir(workdir),
        save_every=int(t.checkpoint_every),
        keep=int(t.keep_checkpoints),
        best_metric=t.best_metric or None,
        best_mode="min",
        async_save=bool(t.async_checkpointing),
        config=config,
    )
    writer = None
    try:
        state, start = _restore_or_init(config, ckpt, model, tx, mesh, iterator)
        writer = MetricWriter(workdir, resume_step=start)
        writer.write_config(config)
        num_steps = int(t.num_steps)
        end = num_steps if stop_at is None else min(num_steps, int(stop_at))
        summary = {
            "start_step": start,
            "resumed": start > 0,
            "num_params": state.num_params(),
            "num_devices": int(mesh.size),
            "num_processes": jax.process_count(),
            "dataset": config.data.source,
        }
        if start >= end:
            summary.update(end_step=start, stopped_early=start < num_steps)
            return state, summary
        state, loop_summary = _train_loop(
            config,
            workdir,
            state,
            start,
            end,
            model,
            tx,
            schedule,
            path,
            iterator,
            ckpt,
            writer,
            mesh,
            progress,
        )
        summary.update(loop_summary, end_step=end, stopped_early=end < num_steps)
        return state, summary
    finally:
        ckpt.close()  # waits for pending async saves
        if writer is not None:
            writer.close()
        if hasattr(iterator, "close"):
            iterator.close()


def _check_labels(labels, num_classes, source):
    """Labels outside [0, num_classes) index past the class embedding (NaN, not an error)."""
    labels = np.asarray(labels)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ConfigError(
            f"model.num_classes={num_classes}, but {source} has labels in "
            f"[{labels.min()}, {labels.max()}] in this batch; set model.num_classes to the "
            "dataset's number of classes (1000 for ImageNet, 10 for CIFAR-10)."
        )


def _train_loop(
    config,
    workdir,
    state,
    start,
    end,
    model,
    tx,
    schedule,
    path,
    iterator,
    ckpt,
    writer,
    mesh,
    progress,
):
    from tqdm.auto import tqdm

    t = config.train
    gbs = int(config.data.global_batch_size)
    step_fn = build_train_step(config, model, path, tx, mesh)
    sample_key = jax.random.fold_in(jax.random.key(int(config.seed)), 7)
    main = jax.process_index() == 0
    bar = tqdm(
        total=end, initial=start, desc="train", dynamic_ncols=True, disable=not (progress and main)
    )
    pending, last_loss = [], None
    t_last, step_last, paused = time.perf_counter(), start, 0.0
    t_start = t_last
    history = []
    metrics = None

    def fail(step, loss):
        ckpt.wait()
        good = ckpt.latest_step()
        bar.close()
        raise NonFiniteLossError(
            f"non-finite loss ({loss}) by step {step}; stopping. The last good checkpoint is "
            f"step {good} in {ckpt.directory} (nothing non-finite was saved). Lower "
            "train.learning_rate or set train.grad_clip_norm, then rerun to resume from it."
        )

    num_classes = config.model.num_classes
    for step in range(start + 1, end + 1):
        host_batch = next(iterator)
        if num_classes is not None:
            _check_labels(host_batch["label"], num_classes, config.data.source)
        batch = sharding_lib.shard_batch(host_batch, mesh)
        state, metrics = step_fn(state, batch)
        pending.append(metrics)

        if step % int(t.log_every) == 0 or step == end:
            host = jax.device_get(pending)
            pending = []
            losses = np.array([float(m["loss"]) for m in host])
            if not np.all(np.isfinite(losses)):
                fail(step, losses[~np.isfinite(losses)][0])
            now = time.perf_counter()
            # training throughput: checkpoint, sampling and eval time left out
            sps = (step - step_last) / max(now - t_last - paused, 1e-9)
            t_last, step_last, paused = now, step, 0.0
            last_loss = float(losses.mean())
            rec = {
                "loss": last_loss,
                "grad_norm": float(host[-1]["grad_norm"]),
                "learning_rate": float(schedule(step - 1)),
                "steps_per_s": sps,
                "images_per_s": sps * gbs,
                "images_per_s_per_device": sps * gbs / mesh.size,
                "eta_s": (int(config.train.num_steps) - step) / max(sps, 1e-9),
            }
            writer.write_scalars(step, rec)
            history.append({"step": step, **rec})
            bar.update(step - bar.n)
            bar.set_postfix(loss=f"{last_loss:.4f}", steps_s=f"{sps:.2f}")

        eval_now = (
            config.mode == "train_and_eval"
            and int(t.eval_every) > 0
            and step % int(t.eval_every) == 0
            and step != end
        )
        t_other = time.perf_counter()
        if ckpt.should_save(step) or step == end or eval_now:
            loss_now = float(jax.device_get(metrics["loss"]))
            if not (math.isfinite(loss_now) and bool(_all_finite(state.params))):
                fail(step, loss_now)
            save_metrics = {"loss": loss_now if last_loss is None else last_loss}
            if eval_now:
                res = _bpd(
                    config,
                    model,
                    state.ema_params if config.eval.use_ema else state.params,
                    mesh,
                    workdir,
                    step=step,
                    progress=False,
                )
                save_metrics["eval_bpd"] = res["value"]
                writer.write_scalars(step, {"eval_bpd": res["value"]})
            ckpt.save(step, state, iterator, metrics=save_metrics, force=step == end or eval_now)

        if int(t.sample_every) > 0 and (step % int(t.sample_every) == 0 or step == end):
            imgs, stats = sample_images(
                model,
                state.ema_params,
                sample_key,
                int(t.num_sample_images),
                mesh,
                num_classes=config.model.num_classes,
                solver=t.sample_solver,
                rtol=float(t.sample_tol),
                atol=float(t.sample_tol),
                source_std=float(path.source_std()),
                guidance_scale=float(config.eval.guidance_scale),
                path=path,
                prediction=config.train.prediction,
                t_margin=float(config.eval.t_margin),
            )
            writer.write_images(step, "samples_ema", imgs)
            writer.write_scalars(step, {"sample_nfe": float(np.asarray(stats.nfe))})
        paused += time.perf_counter() - t_other

    bar.close()
    seconds = time.perf_counter() - t_start
    done = end - start
    return state, {
        "train_seconds": seconds,
        "steps_run": done,
        "steps_per_s": done / max(seconds, 1e-9),
        "final_loss": last_loss,
        "history": history,
    }


# ----------------------------------------------------------------------------- evaluation


def _dataset_name(config, split):
    d = config.data
    split = split or images_lib.SOURCES[d.source][2]
    return f"{d.source}:{split}"


def _eval_iterator_factory(config, mesh):
    e = config.eval
    gbs = int(e.global_batch_size)
    _check_divisible(gbs, mesh, "eval global batch")

    def make_iterator():
        return images_lib.make_eval_iterator(
            config.data.source,
            global_batch_size=gbs,
            data_dir=config.data.data_dir,
            split=e.split,
            dequantize=False,
            read_threads=int(config.data.read_threads),
        )

    return make_iterator


@jax.jit
def _params_sample(params):
    """The first and last 4 values of every parameter array (one small transfer)."""
    leaves = jax.tree_util.tree_leaves(params)
    return jnp.concatenate(
        [jnp.concatenate([x.ravel()[:4], x.ravel()[-4:]]).astype(jnp.float32) for x in leaves]
    )


def _bpd_id(config, params, s0) -> str:
    """A short digest of the bits/dim evaluation's inputs: the parameters (shapes and a
    sample of values), EMA or raw, the dataset, the solver settings and the source noise."""
    e, d = config.eval, config.data
    shapes = [list(x.shape) for x in jax.tree_util.tree_leaves(params)]
    values = np.asarray(sharding_lib.to_host(_params_sample(params)), np.float32)
    about = {
        "shapes": shapes,
        "values": hashlib.sha256(values.tobytes()).hexdigest(),
        "params": "ema" if e.use_ema else "raw",
        "source": d.source,
        "split": _dataset_name(config, e.split),
        "data_dir": str(d.data_dir),
        "num_dequant": int(e.num_dequant),
        "solver": e.solver,
        "rtol": float(e.rtol),
        "atol": float(e.atol),
        "probe": e.probe,
        "seed": int(config.seed),
        "source_std": s0,
    }
    span = _t_range(config)
    if config.train.prediction != "velocity" or span != (0.0, 1.0):  # (absent otherwise,
        about.update(prediction=config.train.prediction, t_range=list(span))  # as before)
    return hashlib.sha256(json.dumps(about, sort_keys=True).encode()).hexdigest()[:12]


def _bpd(config, model, params, mesh, workdir, *, step, progress=True):
    """Bits/dim on the eval split by the paper's protocol (:func:`fmjax.metrics.nll.evaluate_bpd`).

    Resumable: the running totals are kept in ``workdir/eval/bpd_step<step>_<id>.json``,
    where ``<id>`` digests what the number depends on beyond the solver settings (which
    parameters, a sample of their values, the dataset, the source noise), so another
    setting, or a model retrained in the same workdir, starts its own file instead of
    returning a stale result.
    """
    from tqdm.auto import tqdm

    from fmjax.metrics import nll

    e = config.eval
    v, (t0, t1) = _model_velocity(config, model, params)  # conditional: the null class
    s0 = source_std(config)
    state_file = os.path.join(workdir, "eval", f"bpd_step{step}_{_bpd_id(config, params, s0)}.json")
    if jax.process_index() == 0:
        os.makedirs(os.path.dirname(state_file), exist_ok=True)
    bar = tqdm(
        desc=f"eval bpd (step {step})",
        unit="batch",
        total=int(e.num_batches) or None,
        disable=not (progress and jax.process_index() == 0),
        dynamic_ncols=True,
    )

    def callback(summary):
        bar.update(summary["num_batches"] - bar.n)
        bar.set_postfix(bpd=f"{summary['bpd']:.4f}", nfe=f"{summary['nfe_mean']:.0f}")

    try:
        res = nll.evaluate_bpd(
            v,
            _eval_iterator_factory(config, mesh),
            jax.random.key(int(config.seed) + 1),
            num_dequant=int(e.num_dequant),
            mesh=mesh,
            state_file=state_file,
            max_batches=int(e.num_batches) or None,
            callback=callback,
            divergence="hutchinson",
            solver=e.solver,
            rtol=float(e.rtol),
            atol=float(e.atol),
            probe=e.probe,
            source_std=s0,
            t0=t0,
            t1=t1,
        )
    finally:
        bar.close()
    return {"value": float(res["bpd"]), **res}


def _prediction_kw(config):
    """:func:`sample_images`' arguments for the model's prediction type."""
    return {
        "path": make_path(config),
        "prediction": config.train.prediction,
        "t_margin": float(config.eval.t_margin),
    }


def _guidance(config):
    """The guidance weight samples are drawn with (None: an unconditional model)."""
    if config.model.num_classes is None:
        return None
    return float(config.eval.guidance_scale)


def _nfe(config, model, params, mesh):
    e = config.eval
    total = int(e.nfe_num_samples)
    if total <= 0:
        return None
    per = _rounded_up(min(int(e.sample_batch_size), total), mesh)
    key = jax.random.key(int(config.seed) + 2)
    s0 = source_std(config)
    prediction_kw = _prediction_kw(config)
    nfes, counts, ok = [], [], True
    done, i = 0, 0
    t0 = time.perf_counter()
    while done < total:
        _, stats = sample_images(
            model,
            params,
            jax.random.fold_in(key, i),
            per,
            mesh,
            num_classes=config.model.num_classes,
            solver=e.solver,
            rtol=float(e.rtol),
            atol=float(e.atol),
            source_std=s0,
            guidance_scale=float(e.guidance_scale),
            **prediction_kw,
        )
        nfes.append(float(np.asarray(stats.nfe)))
        ok = ok and bool(np.all(np.asarray(stats.success)))
        counts.append(min(per, total - done))
        done += per
        i += 1
    return {
        "value": float(np.average(nfes, weights=counts)),
        "num_samples": total,
        "batch_size": per,
        "solver": e.solver,
        "rtol": float(e.rtol),
        "guidance_scale": _guidance(config),
        "atol": float(e.atol),
        "all_solves_succeeded": ok,
        "seconds": time.perf_counter() - t0,
        "note": "NFE per batch solve (one adaptive step sequence per batch, batch-wide "
        "error norm), averaged over batches",
    }


def _fid_weights(config):
    """The configured Inception weights path, or None; a configured but missing file fails
    here, before any evaluation work."""
    path = config.eval.fid_inception_weights
    if not path:
        return None
    from fmjax.metrics import fid

    reason = fid.fid_skip_reason(path)
    if reason is not None:
        raise fid.FIDWeightsNotFoundError(f"eval.fid_inception_weights: {reason}")
    return path


def _fid(config, model, params, mesh, workdir):
    """FID of ``eval.fid_num_samples`` dopri5 samples against the train split's statistics
    (computed once and cached in ``workdir/eval``, or ``eval.fid_reference_stats``)."""
    e = config.eval
    weights = _fid_weights(config)
    if weights is None:
        return {
            "value": None,
            "skipped": "no Inception weights configured (eval.fid_inception_weights)",
        }
    from fmjax.metrics import fid

    num = int(e.fid_num_samples)
    per = _rounded_up(min(int(e.sample_batch_size), num), mesh)
    key = jax.random.key(int(config.seed) + 3)
    s0 = source_std(config)
    prediction_kw = _prediction_kw(config)

    def sample_fn(i):
        imgs, _ = sample_images(
            model,
            params,
            jax.random.fold_in(key, i),
            per,
            mesh,
            num_classes=config.model.num_classes,
            solver=e.solver,
            rtol=float(e.rtol),
            atol=float(e.atol),
            source_std=s0,
            guidance_scale=float(e.guidance_scale),
            **prediction_kw,
        )
        return imgs

    ref_stats = e.fid_reference_stats or None
    save_ref = None
    if ref_stats is None:
        cached = os.path.join(
            workdir, "eval", f"fid_reference_stats_{config.data.source.replace('/', '_')}_{num}.npz"
        )
        if os.path.exists(cached):
            ref_stats = cached
        elif jax.process_index() == 0:
            os.makedirs(os.path.dirname(cached), exist_ok=True)
            save_ref = cached
    # every process computes the same FID on all images (the reference iterator is not
    # split over processes; generated images are gathered)
    ref_iter = (
        None
        if ref_stats is not None
        else _train_iterator(
            config,
            random_flip=False,
            dequantize=False,
            num_epochs=1,
            process_index=0,
            process_count=1,
            global_batch_size=per,
        )
    )
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
        "guidance_scale": _guidance(config),
        "rtol": float(e.rtol),
        "atol": float(e.atol),
        "weights": weights,
        "seconds": time.perf_counter() - t0,
    }


def _load_for_eval(config, workdir, model, mesh):
    tx, _ = make_optimizer(config)
    ckpt = CheckpointManager(
        checkpoint_dir(workdir),
        save_every=int(config.train.checkpoint_every),
        keep=int(config.train.keep_checkpoints),
        best_metric=config.train.best_metric or None,
    )
    try:
        step = config.eval.checkpoint_step
        if ckpt.latest_step() is None:
            raise FileNotFoundError(
                f"no checkpoint in {ckpt.directory}: train first (mode 'train' or "
                "'train_and_eval') or point --workdir at a trained run."
            )
        _check_trained_as(
            config,
            ckpt.metadata(step),
            f"checkpoint {step if step is not None else ckpt.latest_step()}",
        )
        _, abstract = _abstract_state(config, model, tx, mesh)
        state, meta = ckpt.restore(abstract, step=step)
        return state, int(meta.get("step", int(state.step)))
    finally:
        ckpt.close()


def evaluate(config, workdir, *, state=None, mesh=None, progress: bool | None = None) -> dict:
    """Evaluate a checkpoint (``config.eval.checkpoint_step``, default the latest) or ``state``.

    Writes and returns ``eval_metrics.json``: bits/dim (paper protocol), NFE of dopri5
    sampling, FID (or why it was skipped); each result names its dataset (source:split).
    """
    _check_config(config)
    mesh = mesh or sharding_lib.make_mesh()
    progress = bool(config.train.progress) if progress is None else progress
    model = build_model(config)
    workdir = os.path.abspath(os.fspath(workdir))
    _fid_weights(config)  # a configured but missing weights file fails before the work
    if state is None:
        state, step = _load_for_eval(config, workdir, model, mesh)
    else:
        step = int(jax.device_get(state.step))
    e = config.eval
    params = state.ema_params if e.use_ema else state.params
    dataset = _dataset_name(config, e.split)
    t0 = time.perf_counter()
    results = {}
    bpd = _bpd(config, model, params, mesh, workdir, step=step, progress=progress)
    results["bpd"] = {
        **bpd,
        "dataset": dataset,
        "num_dequant": int(e.num_dequant),
        "divergence": "hutchinson",
        "probe": e.probe,
        "solver": e.solver,
        "rtol": float(e.rtol),
        "atol": float(e.atol),
        "requested_batches": int(e.num_batches) or "all",
    }
    nfe = _nfe(config, model, params, mesh)
    if nfe is not None:
        results["nfe"] = {**nfe, "dataset": f"{config.data.source} (model trained on)"}
    results["fid"] = {
        **_fid(config, model, params, mesh, workdir),
        "dataset": f"{config.data.source}:train (reference statistics)",
    }
    span = _t_range(config)
    out = {
        "dataset": {
            "source": config.data.source,
            "split": dataset.split(":", 1)[1],
            "name": dataset,
        },
        "checkpoint_step": step,
        "prediction": config.train.prediction,
        "t_range": list(span),  # the span samples and bits/dim are solved over
        "params": "ema" if e.use_ema else "raw",
        "results": results,
        "summary": {
            f"bpd[{dataset}]": results["bpd"]["value"],
            **({f"nfe[{config.data.source}]": results["nfe"]["value"]} if "nfe" in results else {}),
            f"fid[{config.data.source}]": results["fid"].get("value"),
        },
        "eval_seconds": time.perf_counter() - t0,
        "num_devices": int(mesh.size),
    }
    write_json(os.path.join(workdir, "eval_metrics.json"), out)
    return out


def train_and_evaluate(config, workdir, *, progress: bool | None = None) -> dict:
    """Run ``config.mode`` in ``workdir``; returns the summary (and eval metrics)."""
    _check_config(config)
    mesh = sharding_lib.make_mesh()
    if config.mode != "eval":
        _check_divisible(int(config.data.global_batch_size), mesh, "global batch")
        _check_microbatches(config, mesh)
    if config.mode != "train":  # what evaluation needs fails before training, not after it
        _fid_weights(config)
        _check_divisible(int(config.eval.global_batch_size), mesh, "eval global batch")
    if config.mode == "train_and_eval":  # (mode eval finds a missing checkpoint first)
        split = _dataset_name(config, config.eval.split).split(":", 1)[1]
        images_lib.num_examples(config.data.source, split, data_dir=config.data.data_dir)
    out = {"mode": config.mode, "workdir": os.path.abspath(os.fspath(workdir))}
    state = None
    if config.mode in ("train", "train_and_eval"):
        state, summary = train(config, workdir, progress=progress, mesh=mesh)
        summary.pop("history", None)
        out["train"] = summary
        write_json(os.path.join(out["workdir"], "train_summary.json"), summary)
    if config.mode in ("eval", "train_and_eval"):
        out["eval"] = evaluate(config, workdir, state=state, mesh=mesh, progress=progress)
    return out


# ----------------------------------------------------------------------------- command line


def define_flags(default_config_path: str):
    """The flags of the thin entry points: --config (file[:preset]), --workdir, multi-host."""
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file(
        "config", default_config_path, "Config file (path[:preset]).", lock_config=True
    )
    flags.DEFINE_string("workdir", None, "Where checkpoints, logs and metrics go.", required=True)
    flags.DEFINE_string(
        "coordinator_address",
        None,
        "Multi-host: host:port of process 0 (else auto-detected, or none).",
    )
    flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
    flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.")
    flags.DEFINE_boolean(
        "tune_cpu_allocator",
        True,
        "Keep XLA's per-step scratch memory mapped (fmjax.tune_cpu_allocator).",
    )


def main(argv):
    """absl main: start the multi-host runtime if any, run the config, print the summary."""
    del argv
    from absl import flags

    f = flags.FLAGS
    if f.tune_cpu_allocator:
        fmjax.tune_cpu_allocator(warn_if_late=False)
    if not f["verbosity"].present:  # orbax logs every save at INFO
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.WARNING)
    sharding_lib.initialize_distributed(f.coordinator_address, f.num_processes, f.process_id)
    try:
        out = train_and_evaluate(f.config, f.workdir)
    except images_lib.DatasetNotFoundError as e:
        sys.exit(f"error: dataset not found: {e}")
    except NonFiniteLossError as e:
        sys.exit(f"error: {e}")
    except ConfigError as e:
        sys.exit(f"error: bad config: {e}")
    if jax.process_index() == 0:
        print(json.dumps(out, indent=2, default=str))
        print(f"wrote results to {out['workdir']}")
