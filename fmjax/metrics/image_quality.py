"""Full-reference image quality: PSNR and SSIM per image, by dm-pix.

The images are batches ``(B, H, W, C)`` (or one image ``(H, W, C)``) with values in
``value_range`` (default ``(-1, 1)``, fmjax's model space); both are mapped to ``[0, 1]``
and scored with :func:`dm_pix.psnr` and :func:`dm_pix.ssim` (Gaussian window 11, sigma
1.5, ``k1 = 0.01``, ``k2 = 0.03``, the constants of Wang et al. 2004). So PSNR is
``10 log10(R^2 / MSE)`` with ``R`` the width of ``value_range``: identical images score
``inf`` dB and SSIM 1. Neither clips nor quantizes: round samples to 8 bits first to
score them as the saved images (:func:`fmjax.data.quantization.to_uint8`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

__all__ = ["psnr", "ssim"]


def _check(a, b, value_range: tuple[float, float], fn: str) -> tuple[float, float]:
    """Check ``a`` and ``b`` (one shape, rank 3 or 4) and ``value_range``; ``(low, high)``."""
    sa, sb = jnp.shape(a), jnp.shape(b)
    if sa != sb or len(sa) not in (3, 4):
        raise ValueError(
            f"{fn}: a and b must be images of one shape, (B, H, W, C) or (H, W, C); got "
            f"shapes {sa} and {sb}."
        )
    lo, hi = (float(v) for v in value_range)
    if not hi > lo:
        raise ValueError(
            f"{fn}: value_range must be (low, high) with high > low; got {value_range}."
        )
    return lo, hi


@functools.cache
def _scorers() -> dict:
    """dm-pix's PSNR and SSIM of images mapped from ``[lo, hi]`` to [0, 1], jitted."""
    import dm_pix

    def unit(x, lo, hi):
        return (jnp.asarray(x, jnp.float32) - lo) / (hi - lo)

    return {
        "psnr": jax.jit(lambda a, b, lo, hi: dm_pix.psnr(unit(a, lo, hi), unit(b, lo, hi))),
        "ssim": jax.jit(
            lambda a, b, lo, hi: dm_pix.ssim(unit(a, lo, hi), unit(b, lo, hi), max_val=1.0)
        ),
    }


def psnr(a, b, *, value_range: tuple[float, float] = (-1.0, 1.0)) -> jax.Array:
    """Peak signal-to-noise ratio in dB of each image of ``b`` against ``a``: shape ``(B,)``
    (a scalar for single images); ``inf`` where they are equal."""
    lo, hi = _check(a, b, value_range, "psnr")
    return _scorers()["psnr"](a, b, lo, hi)


def ssim(a, b, *, value_range: tuple[float, float] = (-1.0, 1.0)) -> jax.Array:
    """Structural similarity of each image of ``b`` against ``a`` (mean over the valid
    11 x 11 windows and the channels): shape ``(B,)``; 1 where they are equal. Images must
    be at least 11 pixels high and wide."""
    lo, hi = _check(a, b, value_range, "ssim")
    if min(jnp.shape(a)[-3:-1]) < 11:
        raise ValueError(
            f"ssim: images must be at least 11 x 11 pixels (its Gaussian window); got "
            f"{jnp.shape(a)[-3]} x {jnp.shape(a)[-2]}."
        )
    return _scorers()["ssim"](a, b, lo, hi)
