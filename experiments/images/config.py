"""The image experiments' config check: every value the run uses, before any work.

:func:`check` raises :class:`ConfigError` (a ``ValueError``), which the command line prints
as one ``error: bad config: ...`` line. With a mesh it also checks what depends on the
devices: the global batches split over them, and ``train.microbatches`` divides each
device's rows.
"""

from __future__ import annotations

import os

import fmjax
from experiments import path_config
from fmjax import checks
from fmjax.data import images as images_lib
from fmjax.train import sharding as sharding_lib

__all__ = [
    "DTYPES",
    "MATMUL_PRECISIONS",
    "MODES",
    "PAIRINGS",
    "ConfigError",
    "check",
    "check_trained_as",
    "reflow_enabled",
]

MODES = ("train", "eval", "train_and_eval", "sweep")
DTYPES = ("float32", "bfloat16")
# eval.matmul_precision: the names jax.default_matmul_precision takes for float32 matmuls
# (default = bfloat16: the chip's fastest; high = tensorfloat32; highest = float32)
MATMUL_PRECISIONS = ("default", "high", "highest", "bfloat16", "tensorfloat32", "float32")
ADAPTIVE = tuple(fmjax.ode.ADAPTIVE_SOLVERS)
LOSS_REDUCTIONS = ("mean", "sum")  # a scalar loss to differentiate
PAIRINGS = ("auto", "host", "device")  # where train.coupling's OT pairing runs
REFLOW_INITS = ("teacher", "scratch")  # a reflow round's first weights
# fmjax.couplings' names, and the sb_cfm path's own: its entropic plan (epsilon = 2 sigma^2)
COUPLINGS = (*fmjax.couplings.COUPLINGS, "entropic")


class ConfigError(ValueError):
    """A config value the run cannot use (the command line prints it without a traceback)."""


# integer fields: (section, name, least allowed value), 0 where the configs document 0 as
# "off" or "all"; FID needs two samples for a covariance
INT_FIELDS = (
    ("data", "global_batch_size", 1),
    ("data", "resolution", 1),
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
    ("eval", "sweep_samples", 2),
    ("model", "num_classes", 1),
)
OPTIONAL_INT_FIELDS = {("eval", "checkpoint_step"), ("model", "num_classes")}  # None: unset
# real fields: (section, name, the interval of allowed values, each end open or closed)
REAL_FIELDS = (
    ("train", "learning_rate", "(0, inf)"),
    ("train", "end_learning_rate", "[0, inf)"),
    ("train", "decay_power", "(0, inf)"),
    ("train", "adam_b1", "[0, 1)"),
    ("train", "adam_b2", "[0, 1)"),
    ("train", "adam_eps", "[0, inf)"),
    ("train", "grad_clip_norm", "[0, inf)"),  # 0: off
    ("train", "ema_decay", "[0, 1)"),
    ("model", "dropout", "[0, 1)"),
    ("model", "class_dropout", "[0, 1]"),  # label -> null class
    ("eval", "t_margin", "(0, 0.5)"),
    ("eval", "guidance_scale", "(-inf, inf)"),  # 1: off
)


def _check_integer(value, name: str, minimum: int) -> None:
    try:
        checks.integer(value, name, minimum=minimum)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def _check_real(value, name: str, interval: str) -> None:
    """``interval`` as written in :data:`REAL_FIELDS`, e.g. ``"[0, 1)"``."""
    low, high = (float(end) for end in interval[1:-1].split(","))
    try:
        checks.real(
            value,
            name,
            low=low,
            high=high,
            low_open=interval[0] == "(",
            high_open=interval[-1] == ")",
        )
    except ValueError as err:
        raise ConfigError(str(err)) from None


def _one_of(value, options, name: str) -> None:
    if value not in options:
        raise ConfigError(f"{name} must be one of {options}; got {value!r}.")


def _make_path(config):
    """The configured path (:mod:`experiments.path_config`), as a ConfigError when invalid."""
    try:
        return path_config.make_path(config.path, noisy=True)  # (the step draws sb_cfm's z)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _check_numbers(config) -> None:
    for section, name, minimum in INT_FIELDS:
        value = config[section][name]
        if not (value is None and (section, name) in OPTIONAL_INT_FIELDS):
            _check_integer(value, f"{section}.{name}", minimum)
    for section, name, interval in REAL_FIELDS:
        _check_real(config[section][name], f"{section}.{name}", interval)


def _check_solvers(config) -> None:
    t, e = config.train, config.eval
    for solver_key, solver, tol_keys, rtol, atol in (
        ("train.sample_solver", t.sample_solver, "train.sample_tol", t.sample_tol, t.sample_tol),
        ("eval.solver", e.solver, "eval.rtol / eval.atol", e.rtol, e.atol),
    ):
        if solver not in ADAPTIVE:
            raise ConfigError(
                f"{solver_key} must be an adaptive solver {ADAPTIVE}; got {solver!r}."
            )
        try:
            fmjax.SolverOptions(solver, rtol=rtol, atol=atol)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"{tol_keys}: {err}") from None


def _check_classes(config) -> None:
    m, e = config.model, config.eval
    if m.num_classes is not None and config.data.source.startswith("downsampled_imagenet/"):
        raise ConfigError(
            f"{config.data.source} has no labels: a class-conditional "
            "model (model.num_classes) needs another source."
        )
    if float(e.guidance_scale) != 1.0 and (m.num_classes is None or float(m.class_dropout) == 0):
        raise ConfigError(
            f"eval.guidance_scale={e.guidance_scale} needs a class-conditional model trained "
            "with a null class: set model.num_classes and model.class_dropout > 0 (got "
            f"num_classes={m.num_classes}, class_dropout={m.class_dropout}), or leave "
            "eval.guidance_scale at 1."
        )


def _check_devices(config, mesh) -> None:
    batches = []
    if config.mode != "eval":
        batches.append((int(config.data.global_batch_size), "global batch"))
    if config.mode != "train":  # what evaluation needs fails before training, not after it
        batches.append((int(config.eval.global_batch_size), "eval global batch"))
    for size, what in batches:
        try:
            sharding_lib.check_batch_divisible(size, mesh, what=what)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    gbs, k = int(config.data.global_batch_size), int(config.train.microbatches)
    if config.mode != "eval" and (gbs // mesh.size) % k:
        raise ConfigError(
            f"train.microbatches={k} must divide each device's rows of the global batch "
            f"(data.global_batch_size={gbs} over {mesh.size} device(s): {gbs // mesh.size} "
            "rows each)."
        )


def reflow_enabled(config) -> bool:
    """Whether ``config`` is a reflow round (``reflow.teacher_workdir`` set)."""
    return "reflow" in config and bool(config.reflow.teacher_workdir)


def _check_reflow(config) -> None:
    """A reflow round's settings (:mod:`experiments.images.reflow`)."""
    if not reflow_enabled(config):
        return
    r = config.reflow
    _one_of(r.init, REFLOW_INITS, "reflow.init")
    for name in ("num_pairs", "batch_size"):
        _check_integer(r[name], f"reflow.{name}", 1)
    if r.teacher_step is not None:
        _check_integer(r.teacher_step, "reflow.teacher_step", 0)
    if r.solver not in ADAPTIVE:
        raise ConfigError(f"reflow.solver must be an adaptive solver {ADAPTIVE}; got {r.solver!r}.")
    try:
        fmjax.SolverOptions(r.solver, rtol=r.rtol, atol=r.atol)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"reflow.rtol / reflow.atol: {err}") from None
    if config.train.coupling != "independent":
        raise ConfigError(
            "a reflow round trains on its teacher's pairs, which are its coupling: set "
            f"train.coupling=independent (got {config.train.coupling!r})."
        )
    if "superres" in config:
        raise ConfigError(
            "reflow of a super-resolution model is not supported: its condition (the "
            "low-resolution input) would have to be stored with each pair."
        )
    ckpt = os.path.join(os.path.abspath(r.teacher_workdir), "checkpoints")
    if not os.path.isdir(ckpt):
        raise ConfigError(
            f"reflow.teacher_workdir: no checkpoints in {r.teacher_workdir!r} (expected "
            f"{ckpt}): point it at a trained run."
        )


def check(config, mesh=None) -> fmjax.paths.GaussianPath:
    """Raise :class:`ConfigError` naming the first field the run cannot use; with ``mesh``
    also the batch sizes over its devices (those ``config.mode`` runs). Returns the
    configured path, built while checking its span for ``train.prediction``."""
    _one_of(config.mode, MODES, "mode")
    if config.data.source not in images_lib.SOURCES:
        raise ConfigError(
            f"data.source: Unknown image source {config.data.source!r}; known sources: "
            f"{', '.join(sorted(images_lib.SOURCES))}"
        )
    _check_numbers(config)
    try:  # a source of fixed-size images is read at its size; "folder" at any
        images_lib.source_resolution(config.data.source, int(config.data.resolution))
    except ValueError as e:
        raise ConfigError(f"data.resolution: {e}") from None
    t, e = config.train, config.eval
    _one_of(t.loss_reduction, LOSS_REDUCTIONS, "train.loss_reduction")
    _one_of(e.probe, fmjax.likelihood.PROBES, "eval.probe")
    _one_of(config.model.dtype, DTYPES, "model.dtype")
    _one_of(e.matmul_precision, MATMUL_PRECISIONS, "eval.matmul_precision")
    if e.fid_reference_stats and not os.path.isfile(e.fid_reference_stats):
        raise ConfigError(
            f"eval.fid_reference_stats: no file {e.fid_reference_stats!r} (set "
            "it to '' to compute the statistics from the train split)."
        )
    _check_solvers(config)
    _one_of(t.prediction, fmjax.predictions.PREDICTIONS, "train.prediction")
    _one_of(t.coupling, COUPLINGS, "train.coupling")
    _one_of(t.pairing, PAIRINGS, "train.pairing")
    if t.pairing == "host" and t.coupling != "ot":
        raise ConfigError(
            "train.pairing=host pairs by exact OT in the input pipeline, so it needs "
            f"train.coupling=ot; got train.coupling={t.coupling!r} (use train.pairing=device "
            "or auto)."
        )
    for solver in e.sweep_solvers:
        _one_of(solver, tuple(fmjax.ode.FIXED_SOLVERS), "eval.sweep_solvers entries")
    for k in e.sweep_steps:
        _check_integer(k, "eval.sweep_steps entries", 1)
    for tol in e.sweep_tols:
        _check_real(tol, "eval.sweep_tols entries", "(0, inf)")
    path = _make_path(config)
    try:
        path.velocity_range(t.prediction, float(e.t_margin))
    except ValueError as err:
        raise ConfigError(f"train.prediction: {err}") from None
    if t.coupling == "entropic" and not hasattr(path, "coupling"):
        raise ConfigError(
            "train.coupling='entropic' is the sb_cfm path's own (SB-CFM): set "
            f"path.name=sb_cfm (got path.name={config.path.name!r})."
        )
    _check_classes(config)
    _check_reflow(config)
    if mesh is not None:
        _check_devices(config, mesh)
    return path


def _superres(config) -> dict | None:
    """The super-resolution settings of a config (a dict or ConfigDict), None without."""
    if "superres" not in config:
        return None
    s = config["superres"]
    return {k: s[k] for k in ("factor", "downsample", "upsample")}


def check_trained_as(config, meta: dict, what: str) -> None:
    """Refuse a checkpoint whose saved config trained another path, prediction or resolution:
    its parameters mean something else (an eps-model's output read as a velocity; attention
    at other levels of the UNet)."""
    saved = meta["config"]
    diffs = []
    was = saved["data"].get("resolution", images_lib.IMAGE_SHAPE[0])  # (before data.resolution)
    if was != config.data.resolution:
        diffs.append(f"data.resolution={was} (this config: {config.data.resolution})")
    was, now = path_config.path_params(saved["path"]), path_config.path_params(config.path)
    if was[:2] != now[:2]:
        diffs.append(f"path {was[0]} {was[1]} (this config: {now[0]} {now[1]})")
    was = saved["train"]["prediction"]
    if was != config.train.prediction:
        diffs.append(f"train.prediction={was!r} (this config: {config.train.prediction!r})")
    was, now = _superres(saved), _superres(config)  # what the model's input channels mean
    if was != now:
        diffs.append(f"super-resolution {was} (this config: {now})")
    if diffs:
        raise ConfigError(
            f"{what} was trained with " + "; ".join(diffs) + ": set the config "
            "to match, or use another --workdir."
        )
