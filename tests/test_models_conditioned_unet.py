"""The image-conditioned UNet: the condition enters as input channels and changes the
output; shapes are checked with clear errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmjax.models import unet_presets
from fmjax.models.conditioned_unet import ImageConditionedUNet, image_conditioned


@pytest.fixture(scope="module")
def model_and_params():
    m = image_conditioned(unet_presets.tiny(ch=16, ch_mult=(1,), attn_resolutions=()), channels=3)
    x = jnp.zeros((2, 8, 8, 3))
    # random weights of the parameters' shapes (traced, not compiled: a fresh UNet outputs
    # exactly 0 through its zero-initialised output layers, so it would show nothing)
    shapes = jax.eval_shape(m.init, jax.random.key(0), jnp.zeros((2,)), x, x)
    rng = np.random.default_rng(1)
    return m, jax.tree_util.tree_map(
        lambda p: jnp.asarray(0.2 * rng.standard_normal(p.shape), jnp.float32), shapes
    )


def test_the_condition_is_input_channels_and_changes_the_output(model_and_params):
    m, params = model_and_params
    assert m.unet.out_channels == 3
    assert params["params"]["unet"]["conv_in"]["kernel"].shape[-2] == 6  # x_t and cond
    t = jnp.array([0.3, 0.7])
    x = jax.random.normal(jax.random.key(2), (2, 8, 8, 3))
    c1, c2 = (jax.random.normal(jax.random.key(k), (2, 8, 8, 3)) for k in (3, 4))
    apply = jax.jit(m.apply)
    v1, v2 = apply(params, t, x, c1), apply(params, t, x, c2)
    assert v1.shape == x.shape and v1.dtype == jnp.float32
    assert float(jnp.max(jnp.abs(v1 - v2))) > 1e-3
    # each row depends only on its own condition
    v_mixed = apply(params, t, x, jnp.concatenate([c1[:1], c2[1:]]))
    np.testing.assert_allclose(v_mixed, jnp.concatenate([v1[:1], v2[1:]]), rtol=1e-5, atol=1e-6)


def test_bad_condition_shapes_are_refused(model_and_params):
    m, params = model_and_params
    t, x = jnp.zeros((2,)), jnp.zeros((2, 8, 8, 3))
    with pytest.raises(
        ValueError, match=r"x's batch, height and width .*got cond of shape \(2, 4, 4, 3\)"
    ):
        m.apply(params, t, x, jnp.zeros((2, 4, 4, 3)))
    with pytest.raises(ValueError, match="got cond of shape \\(1, 8, 8, 3\\)"):
        m.apply(params, t, x, jnp.zeros((1, 8, 8, 3)))
    with pytest.raises(ValueError, match="needs cond"):
        m.apply(params, t, x, None)
    with pytest.raises(ValueError, match="initialised for inputs with 6 channels"):
        m.apply(params, t, x, jnp.zeros((2, 8, 8, 1)))
    bare = ImageConditionedUNet(unet_presets.tiny(ch=16, ch_mult=(1,), attn_resolutions=()))
    with pytest.raises(ValueError, match="out_channels=3"):
        bare.init(jax.random.key(0), t, x, x)
