"""The UNets of Lipman et al. (2023), Table 3, and a tiny one, as :class:`UNet` presets; and
:func:`count_params` (parameter counts without allocating any).

Each preset takes keyword overrides of any :class:`fmjax.models.unet.UNet` field.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from fmjax.models.unet import UNet

__all__ = ["cifar10_paper", "count_params", "imagenet32_paper", "imagenet64_paper", "tiny"]


def imagenet32_paper(num_classes: int | None = None, **overrides) -> UNet:
    """ImageNet-32 model of Lipman et al. (2023), Table 3.

    channels 256, depth (res blocks per level) 3, channel multiplier (1, 2, 2, 2),
    4 heads / 64 head channels (the latter takes precedence, as in ADM), attention at
    resolutions 16 and 8, dropout 0.0. ADM defaults: residual up/down sampling and
    scale-shift norm.
    """
    cfg = {
        "ch": 256,
        "ch_mult": (1, 2, 2, 2),
        "num_res_blocks": 3,
        "attn_resolutions": (16, 8),
        "num_heads": 4,
        "num_head_channels": 64,
        "dropout": 0.0,
        "num_classes": num_classes,
        "resblock_updown": True,
        "use_scale_shift_norm": True,
    }
    cfg.update(overrides)
    return UNet(**cfg)


def imagenet64_paper(num_classes: int | None = None, **overrides) -> UNet:
    """ImageNet-64 model of Lipman et al. (2023), Table 3 (as fmjax's docs report it).

    The ImageNet-32 model (:func:`imagenet32_paper`) with channels 192, channel multiplier
    (1, 2, 3, 4) and attention at resolutions 32, 16 and 8: depth 3, 4 heads / 64 head
    channels, dropout 0.0, residual up/down sampling and scale-shift norm as there.
    """
    cfg = {"ch": 192, "ch_mult": (1, 2, 3, 4), "attn_resolutions": (32, 16, 8)}
    return imagenet32_paper(num_classes, **{**cfg, **overrides})


def cifar10_paper(**overrides) -> UNet:
    """CIFAR-10 model of Lipman et al. (2023), Table 3.

    channels 256, depth 2, channel multiplier (1, 2, 2, 2), 4 heads / 64 head channels,
    attention at resolution 16, dropout 0.0 (as listed in the paper's Table 3).
    """
    cfg = {
        "ch": 256,
        "ch_mult": (1, 2, 2, 2),
        "num_res_blocks": 2,
        "attn_resolutions": (16,),
        "num_heads": 4,
        "num_head_channels": 64,
        "dropout": 0.0,
        "resblock_updown": True,
        "use_scale_shift_norm": True,
    }
    cfg.update(overrides)
    return UNet(**cfg)


def tiny(**overrides) -> UNet:
    """A small ADM UNet for tests and CPU smoke runs at 32x32 (two levels, attention at 16)."""
    cfg = {
        "ch": 32,
        "ch_mult": (1, 2),
        "num_res_blocks": 1,
        "attn_resolutions": (16,),
        "num_heads": 2,
        "num_head_channels": 16,
        "dropout": 0.0,
    }
    cfg.update(overrides)
    return UNet(**cfg)


def count_params(
    module: nn.Module, input_shape: tuple = (1, 32, 32, 3), with_labels: bool = False
) -> int:
    """Number of parameters of ``module`` for inputs of ``input_shape`` (NHWC).

    Uses ``jax.eval_shape`` on ``module.init``, so no parameter is ever allocated.
    ``with_labels`` passes integer labels (requires ``module.num_classes``); note that a
    class-conditional module has its label embedding whether or not labels are passed.
    """
    b = input_shape[0]
    y = None
    if with_labels:
        if getattr(module, "num_classes", None) is None:
            raise ValueError("with_labels=True needs a module with num_classes set")
        y = jax.ShapeDtypeStruct((b,), jnp.int32)
    t = jax.ShapeDtypeStruct((b,), jnp.float32)
    x = jax.ShapeDtypeStruct(tuple(input_shape), jnp.float32)
    shapes = jax.eval_shape(
        lambda key, t, x, y: module.init(key, t, x, y), jax.random.key(0), t, x, y
    )
    return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(shapes["params"]))
