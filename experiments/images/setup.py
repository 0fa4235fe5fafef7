"""What a run is built from, once per checked config: :class:`Setup`.

The ADM UNet of ``config.model``, Adam on the paper's schedule (optionally after clipping),
the configured path with the span its prediction is solved over and its source noise, the
solver settings of every solve, and the sampler that draws images with them.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

import fmjax
from experiments.images import config as config_lib
from fmjax.data import images as images_lib
from fmjax.data.pairing import PairBatch
from fmjax.models import unet as unet_lib
from fmjax.train import TrainState
from fmjax.train import sharding as sharding_lib
from fmjax.train.checkpoint import with_sharding

__all__ = [
    "IMAGE_SHAPE",
    "Setup",
    "solver_record",
    "build",
    "build_model",
    "image_shape",
    "make_optimizer",
    "make_schedule",
    "pairing_place",
    "rounded_up",
]

IMAGE_SHAPE = images_lib.IMAGE_SHAPE  # at the default resolution; a run's: Setup.image_shape
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def solver_record(options: fmjax.SolverOptions) -> dict[str, Any]:
    """The adaptive solve's settings as ``eval_metrics.json`` records them."""
    return {"solver": options.solver, "rtol": options.rtol, "atol": options.atol}


def build_model(config) -> unet_lib.UNet:
    """The UNet of ``config.model`` (the fields of :class:`fmjax.models.UNet`)."""
    m = config.model
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


def make_schedule(config) -> optax.Schedule:
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


def make_optimizer(config) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Adam (no weight decay) on the paper's schedule, after optional clipping."""
    t = config.train
    schedule = make_schedule(config)
    adam = optax.adam(schedule, b1=float(t.adam_b1), b2=float(t.adam_b2), eps=float(t.adam_eps))
    if t.grad_clip_norm and t.grad_clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(float(t.grad_clip_norm)), adam), schedule
    return adam, schedule


def rounded_up(n: int, mesh: Mesh) -> int:
    """``n`` rounded up to a multiple of the mesh's data-parallel size."""
    k = int(mesh.shape[sharding_lib.DATA_AXIS])
    return int(math.ceil(n / k) * k)


def image_shape(config) -> tuple[int, int, int]:
    """``(R, R, 3)`` of ``config.data.resolution``."""
    return images_lib.image_shape(int(config.data.resolution))


def _init_state(model, tx, config, condition=None) -> TrainState:
    k_init, k_train = jax.random.split(jax.random.key(int(config.seed)))
    y = None if config.model.num_classes is None else jnp.zeros((1,), jnp.int32)
    images = jnp.zeros((1, *image_shape(config)))
    if condition is not None:
        y = condition(images)
    params = model.init({"params": k_init, "dropout": k_init}, jnp.zeros((1,)), images, y)
    return TrainState.create(params, tx, k_train)


def _apply_velocity(model, params, t, x, y=None):
    return model.apply(params, t, x, y, train=False)


@functools.lru_cache(maxsize=16)
def _field(model):
    """``field(params, t, x, y=None)``; one function object per (equal) model, so that
    jitted solvers compile once per model."""
    return functools.partial(_apply_velocity, model)


@dataclasses.dataclass(frozen=True)
class Setup:
    """A checked config and everything built from it (see :func:`build`).

    ``t_range`` is ``path.velocity_range(prediction, eval.t_margin)``: the span the model's
    field is solved over (sampling and bits/dim), moved in from an end where the conversion
    of an x1 / eps / score prediction to a velocity divides by zero. Samples and bits/dim
    start from the path's own source noise ``N(0, source_std^2 I)``. ``condition``, when
    set, maps a batch of images to the model's ``cond`` (super-resolution:
    :mod:`experiments.superres`), which the step passes in place of labels.
    """

    config: Any
    model: Any
    path: Any
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    prediction: str
    t_range: tuple[float, float]
    source_std: float
    grid_solver: fmjax.SolverOptions
    eval_solver: fmjax.SolverOptions
    state_shapes: Any
    progress: bool
    pairing: Callable | None = None
    condition: Callable | None = None

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(R, R, 3)``: the images of ``data.resolution`` the run trains on and samples."""
        return image_shape(self.config)

    @property
    def guidance_scale(self) -> float | None:
        """The guidance weight samples are drawn with (None: an unconditional model)."""
        if self.config.model.num_classes is None:
            return None
        return float(self.config.eval.guidance_scale)

    def init_state(self) -> TrainState:
        """A fresh state (jit it with the replicated sharding to place it)."""
        return _init_state(self.model, self.tx, self.config, self.condition)

    def abstract_state(self, mesh: Mesh) -> TrainState:
        """The state's shapes, replicated on ``mesh`` (what a checkpoint restores into)."""
        return with_sharding(self.state_shapes, sharding_lib.replicated_sharding(mesh))

    def eval_params(self, state: TrainState):
        return state.ema_params if self.config.eval.use_ema else state.params

    def velocity(self, params) -> Callable:
        """The UNet as a velocity ``v(t, x)`` (``v(t, x, y)`` with labels) over
        :attr:`t_range`: an x1, eps or score prediction converted by the path."""
        v = jax.tree_util.Partial(_field(self.model), params)
        return self.path.velocity_field(v, self.prediction)

    def sample(
        self,
        params,
        key: jax.Array,
        num: int,
        mesh: Mesh,
        solver: fmjax.SolverOptions,
        cond: Any = None,
    ) -> tuple[np.ndarray, Any]:
        """``num`` images by the flow of the UNet from the source noise, data parallel.

        Class-conditional models get labels ``0, 1, 2, ...`` (mod num_classes), sampled with
        classifier-free guidance of weight ``eval.guidance_scale`` against the null class.
        ``cond``: the conditions of a :attr:`condition` model, one row per image (``num``
        rows, divisible over ``mesh``). Returns ``(images (num, R, R, 3) numpy, stats)``;
        a failed solve does not raise (check ``stats.success``)."""
        n = num if cond is not None else rounded_up(num, mesh)
        if cond is not None:
            v, y = self.velocity(params), fmjax.batching.place_cond(cond, mesh)
        else:
            v, y = self.sampling_field(params, n, mesh)
        t0, t1 = self.t_range
        x0 = self.source_noise(key, n, mesh)
        x1, stats = fmjax.sample(v, x0, cond=y, options=solver, t0=t0, t1=t1, throw=False)
        return sharding_lib.to_host(x1)[:num], stats

    def source_noise(self, key: jax.Array, n: int, mesh: Mesh) -> jax.Array:
        """``n`` draws of the path's source ``N(0, source_std^2 I)``, split over ``mesh``."""
        s0, shape = self.source_std, self.image_shape
        draw = jax.jit(
            lambda k: s0 * jax.random.normal(k, (n, *shape)),
            out_shardings=sharding_lib.data_sharding(mesh),
        )
        return draw(key)

    def sampling_field(self, params, n: int, mesh: Mesh) -> tuple[Callable, Any]:
        """``(v, y)``: the field samples are drawn with and the labels of ``n`` rows
        (``0, 1, 2, ...`` mod num_classes, with classifier-free guidance of weight
        ``eval.guidance_scale``; ``y`` None for an unconditional model)."""
        v = self.velocity(params)
        y, classes = None, self.config.model.num_classes
        if classes is not None:  # guidance weight 1: the conditional field itself
            data = sharding_lib.data_sharding(mesh)
            y = jax.jit(lambda: jnp.arange(n, dtype=jnp.int32) % classes, out_shardings=data)()
            v = fmjax.guidance.classifier_free(v, None, classes, self.guidance_scale)
        return v, y

    def train_iterator(self, **overrides) -> Iterator:
        """This process's slices of the training batches (``overrides``: of
        :func:`fmjax.data.images.make_train_iterator`'s keywords)."""
        c = self.config
        d = c.data
        kwargs = {
            "global_batch_size": int(d.global_batch_size),
            "seed": int(c.seed),
            "data_dir": d.data_dir,
            "random_flip": bool(d.random_flip),
            "worker_count": int(d.worker_count),
            "read_threads": int(d.read_threads),
            "resolution": int(d.resolution),
        }
        if pairing_place(c) == "host":  # exact OT in the pipeline's threads (per process)
            conditional = c.model.num_classes is not None
            kwargs["pairing"] = PairBatch(data="image", by_label=conditional)
            kwargs["source_std"] = float(self.path.source_std())
        return images_lib.make_train_iterator(d.source, **{**kwargs, **overrides})

    @property
    def eval_split(self) -> str:
        return self.config.eval.split or images_lib.SOURCES[self.config.data.source][2]

    @property
    def eval_dataset(self) -> str:
        """``source:split`` of the evaluation data: every reported number names it."""
        return f"{self.config.data.source}:{self.eval_split}"


def _state_shapes(model, tx, config):
    try:  # the first trace of the model: the UNet checks its fields against the image shape
        return jax.eval_shape(functools.partial(_init_state, model, tx, config))
    except ValueError as e:
        raise config_lib.ConfigError(f"model: {e}") from None


def build(config, mesh: Mesh | None = None, *, progress: bool | None = None) -> Setup:
    """Check ``config`` (with ``mesh``: its batch sizes too) and build the run from it;
    a bad value is a :class:`~experiments.images.config.ConfigError`."""
    path = config_lib.check(config, mesh)
    model = build_model(config)
    tx, schedule = make_optimizer(config)
    t, e = config.train, config.eval
    return Setup(
        config=config,
        model=model,
        path=path,
        tx=tx,
        schedule=schedule,
        prediction=t.prediction,
        t_range=path.velocity_range(t.prediction, float(e.t_margin)),
        source_std=float(path.source_std()),
        grid_solver=fmjax.SolverOptions(t.sample_solver, rtol=t.sample_tol, atol=t.sample_tol),
        eval_solver=fmjax.SolverOptions(e.solver, rtol=e.rtol, atol=e.atol),
        state_shapes=_state_shapes(model, tx, config),
        progress=bool(t.progress) if progress is None else bool(progress),
        pairing=_pairing(config, path),
    )


def pairing_place(config) -> str | None:
    """Where ``train.coupling`` pairs: 'host' (the input pipeline), 'device' (the jitted
    step) or None (independent: no pairing)."""
    t = config.train
    if t.coupling == "independent":
        return None
    if t.pairing == "auto":
        return "host" if t.coupling == "ot" else "device"
    return t.pairing


def _pairing(config, path) -> Callable | None:
    """The batch transform that pairs source noise with each step's whole global batch by
    ``train.coupling`` (within classes for a class-conditional model), for pairing on the
    device; None: independent, or paired in the input pipeline."""
    coupling = config.train.coupling
    if pairing_place(config) != "device":
        return None
    cond = None if config.model.num_classes is None else "label"
    if coupling == "entropic":  # the sb_cfm path's own plan
        coupling = path.coupling
    return fmjax.couplings.pairing(coupling, source=path.sample_source, data="image", cond=cond)
