"""The low-resolution inputs of super-resolution: area downsampling is the block mean,
upsampling keeps constants and reaches the size, the condition has the image's shape."""

import jax.numpy as jnp
import numpy as np
import pytest

from fmjax.data import superres


def test_area_downsampling_is_the_block_mean():
    x = np.random.default_rng(0).standard_normal((2, 8, 12, 3)).astype(np.float32)
    low = superres.downsample(x, 4)
    assert low.shape == (2, 2, 3, 3)
    xn = np.asarray(x)
    np.testing.assert_allclose(low[1, 1, 2], xn[1, 4:8, 8:12].mean(axis=(0, 1)), rtol=1e-5)
    # block-constant images come back exactly, by every downsampling method
    blocks = np.random.default_rng(1).standard_normal((2, 4, 4, 3)).astype(np.float32)
    up = jnp.repeat(jnp.repeat(blocks, 2, axis=1), 2, axis=2)
    np.testing.assert_allclose(superres.downsample(up, 2), blocks, rtol=1e-6)
    assert superres.downsample(up, 2, "cubic").shape == blocks.shape


@pytest.mark.parametrize("method", superres.UPSAMPLE)
def test_upsampling_keeps_constants(method):
    x = jnp.full((1, 4, 4, 3), 0.25)
    up = superres.upsample(x, 4, method)
    assert up.shape == (1, 16, 16, 3)
    np.testing.assert_allclose(up, 0.25, rtol=1e-6)


def test_condition_has_the_image_shape_and_loses_detail():
    x = np.random.default_rng(2).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    c = superres.condition(x, 2)
    assert c.shape == x.shape
    # noise has no low frequencies to keep: the condition is far from it, but its block means
    # are the image's (area downsampling of a nearest upsampling is the identity)
    assert float(jnp.mean((c - x) ** 2)) > 0.1
    nearest = superres.condition(x, 2, upsample_method="nearest")
    np.testing.assert_allclose(
        superres.downsample(nearest, 2), superres.downsample(x, 2), atol=1e-6
    )


def test_bad_input_is_refused():
    x = jnp.zeros((1, 10, 10, 3))
    with pytest.raises(ValueError, match="multiples of factor=4"):
        superres.downsample(x, 4)
    with pytest.raises(ValueError, match="integer >= 1"):
        superres.upsample(x, 0)
    with pytest.raises(ValueError, match="one of"):
        superres.downsample(x, 2, "lanczos")
    with pytest.raises(ValueError, match=r"batch \(B, H, W, C\)"):
        superres.condition(x[0], 2)
