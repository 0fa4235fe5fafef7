"""Image values (fmjax.data.quantization): bin edges, their inverse and dequantization."""

import numpy as np

from fmjax.data import images as di
from fmjax.data import quantization as q


def test_dequantize_helpers_numpy_and_jax():
    import jax

    x = np.full((1000,), 255, np.uint8)
    v = di.dequantize(x, np.random.default_rng(0))
    assert v.dtype == np.float32 and v.min() >= 255 / 256 and v.max() < 1.0
    y = di.to_model_space(v)
    assert y.dtype == np.float32 and y.max() < 1.0
    np.testing.assert_array_equal(di.to_uint8(y), x)
    vj = np.asarray(di.dequantize(np.arange(256, dtype=np.uint8), jax.random.key(0)))
    assert (vj >= np.arange(256) / 256).all() and (vj < (np.arange(256) + 1) / 256).all()
    assert di.to_model_space(np.float32(0.0)) == -1.0


def test_levels_are_lower_bin_edges_and_to_uint8_inverts_them():
    x = np.arange(256, dtype=np.uint8)
    levels = q.quantized_levels(x)
    assert levels.dtype == np.float32
    np.testing.assert_array_equal(levels, (2 * x.astype(int) / 256 - 1).astype(np.float32))
    np.testing.assert_array_equal(q.to_uint8(levels), x)
    np.testing.assert_array_equal(q.to_uint8(levels + 0.99 * q.BIN_WIDTH), x)


def test_dequantized_pixels_stay_in_their_bin():
    x = np.tile(np.arange(256, dtype=np.uint8), 20)
    y = q.to_model_space(q.dequantize(x, np.random.default_rng(0)))
    assert y.min() >= -1.0 and y.max() < 1.0
    np.testing.assert_array_equal(q.to_uint8(y), x)
