"""The super-resolution run's :class:`~experiments.images.Setup`: the image experiments'
one, with the UNet conditioned on the upsampled low-resolution image
(:class:`fmjax.models.conditioned_unet.ImageConditionedUNet`) and ``setup.condition`` the
map from a batch of high-resolution images to that input (:func:`fmjax.data.superres.condition`).

:func:`check` refuses, as a :class:`~experiments.images.ConfigError`, the ``superres``
values the run cannot use and the image experiments' features that have no meaning here:
class labels, minibatch-OT pairing (it would pair noise with images across conditions),
the trainer's unconditional sample grids and bits/dim (``train.sample_every``,
``train.eval_every``: the evaluation draws the grid) and mode ``sweep``.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
from jax.sharding import Mesh

from experiments.images import Setup
from experiments.images import setup as images_setup
from experiments.images.config import ConfigError
from fmjax.data import superres as superres_lib
from fmjax.models.conditioned_unet import image_conditioned

__all__ = ["MODES", "build", "check", "resolution"]

MODES = ("train", "eval", "train_and_eval")


def resolution(config) -> int:
    """The high (output) resolution: ``data.resolution``."""
    return int(config.data.resolution)


def _integer(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}; got {value!r}.")
    return value


def check(config) -> None:
    """Raise :class:`~experiments.images.ConfigError` naming the first ``superres`` (or
    incompatible image-experiment) value the run cannot use."""
    if config.mode not in MODES:
        raise ConfigError(f"mode must be one of {MODES} for super-resolution; got {config.mode!r}.")
    s = config.superres
    factor = _integer(s.factor, "superres.factor", 2)
    _integer(s.num_grid_images, "superres.num_grid_images", 1)
    for name, options in (
        ("downsample", superres_lib.DOWNSAMPLE),
        ("upsample", superres_lib.UPSAMPLE),
    ):
        if s[name] not in options:
            raise ConfigError(f"superres.{name} must be one of {options}; got {s[name]!r}.")
    res = _integer(resolution(config), "data.resolution", 1)  # the source's: images' check
    if res % factor:
        raise ConfigError(
            f"superres.factor={factor} must divide data.resolution={res} (the low resolution "
            "is data.resolution / superres.factor)."
        )
    if res < 11:
        raise ConfigError(f"data.resolution={res}: SSIM needs images of at least 11 x 11 pixels.")
    refused = (
        (config.model.num_classes is not None, "model.num_classes (class labels)", "None"),
        (config.train.coupling != "independent", "train.coupling", "'independent'"),
        (int(config.train.sample_every) != 0, "train.sample_every", "0"),
        (int(config.train.eval_every) != 0, "train.eval_every", "0"),
    )
    for bad, name, allowed in refused:
        if bad:
            raise ConfigError(
                f"{name} is not supported by super-resolution; set it to {allowed} (the model "
                "is conditioned on the low-resolution image; the evaluation draws its grid)."
            )


def build(config, mesh: Mesh | None = None, *, progress: bool | None = None) -> Setup:
    """Check ``config`` and build the super-resolution :class:`~experiments.images.Setup`."""
    check(config)
    base = images_setup.build(config, mesh, progress=progress)
    s = config.superres
    condition = functools.partial(
        superres_lib.condition,
        factor=int(s.factor),
        downsample_method=s.downsample,
        upsample_method=s.upsample,
    )
    model = image_conditioned(base.model, channels=base.image_shape[-1])
    setup = dataclasses.replace(base, model=model, condition=condition)
    try:
        shapes = jax.eval_shape(setup.init_state)
    except ValueError as e:
        raise ConfigError(f"model: {e}") from None
    return dataclasses.replace(setup, state_shapes=shapes)
