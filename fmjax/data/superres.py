"""Low-resolution inputs of super-resolution, made from the high-resolution images.

Super-resolution pairs are derived from any image batch ``(B, H, W, C)``: the
high-resolution image is the target and :func:`condition` (downsampled by ``factor``, then
upsampled back to ``H x W``) is the model's input, as SR3 (Saharia et al. 2021) and Flow
Matching (Lipman et al. 2023, section 6.3) condition their UNets. So every image source at
resolution ``R`` gives pairs ``R / factor -> R`` with no dataset of its own.

Downsampling (:data:`DOWNSAMPLE`): ``"area"`` averages each ``factor x factor`` block (a
box filter: exact and anti-aliased), ``"cubic"`` is :func:`jax.image.resize`'s Keys cubic
with anti-aliasing (the kernel widened by ``factor``, like PIL's bicubic reduction).
Upsampling (:data:`UPSAMPLE`) is :func:`jax.image.resize` without anti-aliasing
(``"cubic"``: bicubic, SR3's; ``"linear"``; ``"nearest"``). All run under ``jit``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["DOWNSAMPLE", "UPSAMPLE", "condition", "downsample", "upsample"]

#: Downsampling methods of :func:`downsample`.
DOWNSAMPLE = ("area", "cubic")
#: Upsampling methods of :func:`upsample`.
UPSAMPLE = ("cubic", "linear", "nearest")


def _check(images, factor: int, method: str, methods: tuple, fn: str) -> None:
    shape = jnp.shape(images)
    if len(shape) != 4:
        raise ValueError(f"{fn}: images must be a batch (B, H, W, C); got shape {shape}.")
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
        raise ValueError(f"{fn}: factor must be an integer >= 1; got {factor!r}.")
    if method not in methods:
        raise ValueError(f"{fn}: method must be one of {methods}; got {method!r}.")


def downsample(images, factor: int, method: str = "area") -> jax.Array:
    """``images (B, H, W, C)`` reduced to ``(B, H / factor, W / factor, C)``; ``H`` and
    ``W`` must be multiples of ``factor``."""
    _check(images, factor, method, DOWNSAMPLE, "downsample")
    b, h, w, c = jnp.shape(images)
    if h % factor or w % factor:
        raise ValueError(
            f"downsample: H and W must be multiples of factor={factor}; got images of shape "
            f"{jnp.shape(images)}."
        )
    x = jnp.asarray(images)
    if method == "area":
        return x.reshape(b, h // factor, factor, w // factor, factor, c).mean(axis=(2, 4))
    return jax.image.resize(x, (b, h // factor, w // factor, c), "cubic", antialias=True)


def upsample(images, factor: int, method: str = "cubic") -> jax.Array:
    """``images (B, h, w, C)`` enlarged to ``(B, h * factor, w * factor, C)``."""
    _check(images, factor, method, UPSAMPLE, "upsample")
    b, h, w, c = jnp.shape(images)
    return jax.image.resize(jnp.asarray(images), (b, h * factor, w * factor, c), method)


def condition(
    images, factor: int, downsample_method: str = "area", upsample_method: str = "cubic"
) -> jax.Array:
    """The super-resolution input of ``images``: :func:`downsample` by ``factor``, then
    :func:`upsample` back to the same shape (so it can be concatenated to ``x_t``)."""
    low = downsample(images, factor, downsample_method)
    return upsample(low, factor, upsample_method)
