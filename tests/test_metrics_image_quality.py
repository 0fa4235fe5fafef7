"""PSNR and SSIM (dm-pix) against their definitions: identical images, a known noise level,
constant images (SSIM's closed form), the value range and bad input."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from fmjax.metrics import image_quality


def _images(seed=0, shape=(3, 16, 16, 3)):
    return np.random.default_rng(seed).uniform(size=shape).astype(np.float32)


def test_identical_images_score_inf_and_one():
    a = _images()
    assert np.all(np.isinf(image_quality.psnr(a, a, value_range=(0, 1))))
    np.testing.assert_allclose(image_quality.ssim(a, a, value_range=(0, 1)), 1.0, atol=1e-6)


def test_psnr_of_a_known_noise_level():
    # +-delta on every pixel (random signs): MSE = delta^2 exactly, PSNR = 10 log10(1 / MSE)
    a = _images(1)
    for delta in (0.01, 0.05, 0.2):
        signs = np.sign(np.random.default_rng(2).standard_normal(a.shape)).astype(np.float32)
        b = a + delta * signs
        got = image_quality.psnr(a, b, value_range=(0, 1))
        np.testing.assert_allclose(got, 10 * math.log10(1 / delta**2), rtol=1e-4)
        # the same images in model space [-1, 1] (twice the range and the error): same PSNR
        got = image_quality.psnr(2 * a - 1, 2 * b - 1)
        np.testing.assert_allclose(got, 10 * math.log10(1 / delta**2), rtol=1e-4)
        # 8-bit scale: 10 log10(255^2 / MSE)
        got = image_quality.psnr(255 * a, 255 * b, value_range=(0, 255))
        np.testing.assert_allclose(got, 10 * math.log10(1 / delta**2), rtol=1e-4)


def test_ssim_of_constant_images_is_the_luminance_term():
    # no variance: SSIM = (2 mu_a mu_b + C1) / (mu_a^2 + mu_b^2 + C1), C1 = (0.01 L)^2, L = 1
    c1 = 0.01**2
    for ma, mb in ((0.2, 0.7), (0.5, 0.5), (0.9, 0.1)):
        a, b = jnp.full((1, 16, 16, 3), ma), jnp.full((1, 16, 16, 3), mb)
        want = (2 * ma * mb + c1) / (ma**2 + mb**2 + c1)
        got = image_quality.ssim(a, b, value_range=(0, 1))
        np.testing.assert_allclose(got, want, rtol=1e-5)


def test_noise_lowers_ssim_monotonically():
    a = _images(3)
    noise = np.random.default_rng(4).standard_normal(a.shape).astype(np.float32)
    ssims = [
        float(image_quality.ssim(a, a + s * noise, value_range=(0, 1)).mean())
        for s in (0.01, 0.1, 0.5)
    ]
    assert 1 > ssims[0] > ssims[1] > ssims[2]


def test_bad_input_is_refused():
    a = _images()
    with pytest.raises(ValueError, match="one shape"):
        image_quality.psnr(a, a[:, :8])
    with pytest.raises(ValueError, match="one shape"):
        image_quality.ssim(a[0, 0], a[0, 0])
    with pytest.raises(ValueError, match="high > low"):
        image_quality.psnr(a, a, value_range=(1, 1))
    with pytest.raises(ValueError, match="at least 11 x 11"):
        image_quality.ssim(a[:, :8, :8], a[:, :8, :8])
