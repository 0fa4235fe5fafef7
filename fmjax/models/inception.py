"""The FID Inception-v3 (pool3, 2048-d features) in Flax linen.

The network is the FID variant of Inception-v3 used by pytorch-fid (a port of the TensorFlow
2015-12-05 graph of the original FID code): torchvision's Inception-v3 layout, with the
Mixed_5b/c/d (A), Mixed_6b..e (C) and Mixed_7b (E_1) pool branches averaging over the valid
(unpadded) window only, and Mixed_7c (E_2) max-pooling its pool branch.  Images in
``[-1, 1]`` are resized to 299x299 (bilinear, half-pixel centres, no antialiasing: as
``torch.nn.functional.interpolate(mode='bilinear', align_corners=False)``), and the features
are the spatial mean of the last block.

Its params (94 conv + batch-norm + ReLU units named by their torchvision module paths), their
npz layout and the conversion of pytorch-fid's weights are
:mod:`fmjax.models.inception_weights`; the FID itself is :mod:`fmjax.metrics.fid`.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = [
    "BN_EPS",
    "FEATURE_DIM",
    "BasicConv",
    "InceptionV3FID",
    "inception_features",
    "resize_bilinear",
    "unwrap_params",
]

#: Epsilon of the batch norms: a unit computes ``relu((conv(x) - mean) * scale /
#: sqrt(var + BN_EPS) + bias)``.
BN_EPS = 1e-3
#: Size of the pool3 features.
FEATURE_DIM = 2048


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


class BasicConv(nn.Module):
    """Convolution (no bias) + inference batch norm (eps 1e-3) + ReLU."""

    features: int
    kernel_size: Any = 1
    strides: Any = 1
    padding: Any = 0
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x):
        kh, kw = _pair(self.kernel_size)
        ph, pw = _pair(self.padding)
        c_in = x.shape[-1]
        kernel = self.param("kernel", nn.initializers.he_normal(), (kh, kw, c_in, self.features))
        scale = self.param("scale", nn.initializers.ones, (self.features,))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        mean = self.param("mean", nn.initializers.zeros, (self.features,))
        var = self.param("var", nn.initializers.ones, (self.features,))
        y = jax.lax.conv_general_dilated(
            x,
            kernel.astype(x.dtype),
            window_strides=_pair(self.strides),
            padding=((ph, ph), (pw, pw)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            precision=self.precision,
        )
        mult = scale * jax.lax.rsqrt(var + BN_EPS)
        return nn.relu(y * mult + (bias - mean * mult))


def resize_bilinear(images, size: int) -> jax.Array:
    """``(B, H, W, C)`` -> ``(B, size, size, C)``, bilinear with half-pixel centres and no
    antialiasing (= torch ``interpolate(mode='bilinear', align_corners=False)``)."""
    if images.shape[1:3] == (size, size):
        return images
    return jax.image.resize(
        images, (images.shape[0], size, size, images.shape[3]), method="bilinear", antialias=False
    )


def _avg_pool_valid(x):
    """3x3, stride 1, padding 1, averaging over the in-image part of each window only."""
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_same(x):
    return nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))


def _max_pool_down(x):
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class InceptionA(nn.Module):  # Mixed_5b/c/d, 35x35
    pool_features: int
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x):
        conv = functools.partial(BasicConv, precision=self.precision)
        b1 = conv(64, name="branch1x1")(x)
        b5 = conv(48, name="branch5x5_1")(x)
        b5 = conv(64, 5, padding=2, name="branch5x5_2")(b5)
        b3 = conv(64, name="branch3x3dbl_1")(x)
        b3 = conv(96, 3, padding=1, name="branch3x3dbl_2")(b3)
        b3 = conv(96, 3, padding=1, name="branch3x3dbl_3")(b3)
        bp = conv(self.pool_features, name="branch_pool")(_avg_pool_valid(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):  # Mixed_6a, 35x35 -> 17x17
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x):
        conv = functools.partial(BasicConv, precision=self.precision)
        b3 = conv(384, 3, strides=2, name="branch3x3")(x)
        bd = conv(64, name="branch3x3dbl_1")(x)
        bd = conv(96, 3, padding=1, name="branch3x3dbl_2")(bd)
        bd = conv(96, 3, strides=2, name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool_down(x)], axis=-1)


class InceptionC(nn.Module):  # Mixed_6b/c/d/e, 17x17, factorised 7x7
    channels_7x7: int
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x):
        conv = functools.partial(BasicConv, precision=self.precision)
        c7 = self.channels_7x7
        b1 = conv(192, name="branch1x1")(x)
        b7 = conv(c7, name="branch7x7_1")(x)
        b7 = conv(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
        b7 = conv(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
        bd = conv(c7, name="branch7x7dbl_1")(x)
        bd = conv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
        bd = conv(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
        bd = conv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
        bd = conv(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
        bp = conv(192, name="branch_pool")(_avg_pool_valid(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):  # Mixed_7a, 17x17 -> 8x8
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x):
        conv = functools.partial(BasicConv, precision=self.precision)
        b3 = conv(192, name="branch3x3_1")(x)
        b3 = conv(320, 3, strides=2, name="branch3x3_2")(b3)
        b7 = conv(192, name="branch7x7x3_1")(x)
        b7 = conv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = conv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = conv(192, 3, strides=2, name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool_down(x)], axis=-1)


class InceptionE(nn.Module):  # Mixed_7b (pool='avg': FID E_1), Mixed_7c (pool='max': E_2)
    pool: str
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x):
        conv = functools.partial(BasicConv, precision=self.precision)
        b1 = conv(320, name="branch1x1")(x)
        b3 = conv(384, name="branch3x3_1")(x)
        b3 = jnp.concatenate(
            [
                conv(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                conv(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3),
            ],
            axis=-1,
        )
        bd = conv(448, name="branch3x3dbl_1")(x)
        bd = conv(384, 3, padding=1, name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate(
            [
                conv(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                conv(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd),
            ],
            axis=-1,
        )
        pooled = _avg_pool_valid(x) if self.pool == "avg" else _max_pool_same(x)
        bp = conv(192, name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3FID(nn.Module):
    """FID Inception-v3 up to pool3: ``(B, H, W, 3)`` images in ``[-1, 1]`` -> ``(B, 2048)``.

    ``resize_to``: the square size images are bilinearly resized to first (299 for FID; a
    smaller size, at least 75, only for fast tests; ``None`` keeps the input size).
    """

    resize_to: int | None = 299
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, images):
        x = jnp.asarray(images, jnp.float32)
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"images must be (B, H, W, 3); got shape {x.shape}.")
        if self.resize_to is not None:
            x = resize_bilinear(x, self.resize_to)
        conv = functools.partial(BasicConv, precision=self.precision)
        p = self.precision
        x = conv(32, 3, strides=2, name="Conv2d_1a_3x3")(x)
        x = conv(32, 3, name="Conv2d_2a_3x3")(x)
        x = conv(64, 3, padding=1, name="Conv2d_2b_3x3")(x)
        x = _max_pool_down(x)
        x = conv(80, 1, name="Conv2d_3b_1x1")(x)
        x = conv(192, 3, name="Conv2d_4a_3x3")(x)
        x = _max_pool_down(x)
        x = InceptionA(32, precision=p, name="Mixed_5b")(x)
        x = InceptionA(64, precision=p, name="Mixed_5c")(x)
        x = InceptionA(64, precision=p, name="Mixed_5d")(x)
        x = InceptionB(precision=p, name="Mixed_6a")(x)
        x = InceptionC(128, precision=p, name="Mixed_6b")(x)
        x = InceptionC(160, precision=p, name="Mixed_6c")(x)
        x = InceptionC(160, precision=p, name="Mixed_6d")(x)
        x = InceptionC(192, precision=p, name="Mixed_6e")(x)
        x = InceptionD(precision=p, name="Mixed_7a")(x)
        x = InceptionE("avg", precision=p, name="Mixed_7b")(x)
        x = InceptionE("max", precision=p, name="Mixed_7c")(x)
        return jnp.mean(x, axis=(1, 2))


def unwrap_params(params) -> Any:
    """The params tree from ``{"params": tree}`` (as returned by
    :func:`fmjax.models.inception_weights.load_weights` and ``init``) or the tree itself."""
    if isinstance(params, dict) and set(params) == {"params"}:
        return params["params"]
    return params


@functools.partial(jax.jit, static_argnames=("resize_to",))
def _features(params, images, resize_to):
    return InceptionV3FID(resize_to=resize_to).apply({"params": params}, images)


def inception_features(params, images, *, resize_to: int | None = 299) -> jax.Array:
    """Pool3 features ``(B, 2048)`` float32 of images ``(B, H, W, 3)`` in ``[-1, 1]``.

    ``params``: from :func:`fmjax.models.inception_weights.load_weights` (or the params tree
    itself).  Compiled once per input shape: feed fixed-size batches (as
    :func:`fmjax.metrics.fid.compute_fid` does).
    """
    images = jnp.asarray(images, jnp.float32)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be (B, H, W, 3) in [-1, 1]; got shape {images.shape}.")
    return _features(unwrap_params(params), images, resize_to)
