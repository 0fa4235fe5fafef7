"""Image values: 8-bit pixels, their dequantization, and the model space ``[-1, 1)``.

Pixels ``x`` in {0, ..., 255} are uniformly dequantized to ``(x + u) / 256`` with
``u ~ U[0, 1)`` drawn from a per-example seeded RNG, then mapped to model space
``y = 2 * v - 1``, so ``y`` lies in ``[-1, 1)``.  Without dequantization the
image is the bin's lower edge ``y_q = 2 * x / 256 - 1`` (in ``[-1, 1 - 2/256]``),
and an evaluator dequantizes it itself as ``y_q + BIN_WIDTH * u``
(``BIN_WIDTH = 2 / 256``; see ``dequantize``/``to_model_space``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["BIN_WIDTH", "dequantize", "quantized_levels", "to_model_space", "to_uint8"]

#: Width of one quantization bin in model space ([-1, 1] spans 256 bins).
BIN_WIDTH = 2.0 / 256.0
# Largest float32 below 1: keeps (255 + u) / 256 < 1 despite float32 rounding.
_ONE_BELOW = np.float32(np.nextafter(np.float32(1.0), np.float32(0.0)))


def dequantize(images_uint8: Any, rng: Any) -> Any:
    """Uniform dequantization ``(x + u) / 256`` with ``u ~ U[0, 1)``; result in ``[0, 1)``.

    ``rng`` is a ``np.random.Generator`` (numpy in, numpy float32 out) or a JAX PRNG
    key (JAX float32 out, usable under ``jit``).
    """
    if isinstance(rng, np.random.Generator):
        x = np.asarray(images_uint8, dtype=np.float32)
        u = rng.random(x.shape, dtype=np.float32)
        return np.minimum((x + u) * np.float32(1.0 / 256.0), _ONE_BELOW)
    import jax
    import jax.numpy as jnp

    x = jnp.asarray(images_uint8, dtype=jnp.float32)
    u = jax.random.uniform(rng, x.shape, dtype=jnp.float32)
    return jnp.minimum((x + u) * (1.0 / 256.0), _ONE_BELOW)


def to_model_space(x: Any) -> Any:
    """Maps ``[0, 1)`` to ``[-1, 1)``: ``y = 2 * x - 1`` (dtype preserved)."""
    return x * 2 - 1


def to_uint8(y: Any) -> np.ndarray:
    """Inverse of the pipeline's mapping: model-space ``y`` -> uint8 ``floor((y + 1) * 128)``."""
    y = np.asarray(y, dtype=np.float32)
    return np.clip(np.floor((y + 1.0) * 128.0), 0, 255).astype(np.uint8)


def quantized_levels(image_uint8: Any) -> np.ndarray:
    """uint8 pixels ``x`` -> the lower edges of their bins in model space, ``2 * x / 256 - 1``
    (float32)."""
    return to_model_space(np.asarray(image_uint8, dtype=np.float32) * np.float32(1.0 / 256.0))
