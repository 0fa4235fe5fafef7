"""Two-sample distances against direct float64 computations and Gaussian closed forms."""

import jax
import numpy as np
import pytest

from fmjax.metrics import mmd, sliced_wasserstein

BANDWIDTHS = (0.1, 0.2, 0.5, 1.0, 2.0)


def _mmd_float64(x, y, bandwidths=BANDWIDTHS):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)

    def k(a, b):
        d2 = np.sum((a[:, None] - b[None]) ** 2, -1)
        return sum(np.exp(-d2 / (2 * h * h)) for h in bandwidths)

    n, m = len(x), len(y)
    kxx, kyy = k(x, x), k(y, y)
    return (
        (kxx.sum() - np.trace(kxx)) / (n * (n - 1))
        + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
        - 2 * k(x, y).mean()
    )


@pytest.mark.parametrize("n,m", [(2, 3), (7, 5), (256, 300), (1001, 999)])
def test_mmd_equals_the_direct_sum_for_any_sample_sizes(n, m):
    # (the blocked sum once padded rows with +inf, and inf - inf counted as kernel value 1:
    # wrong unless both sizes were multiples of its block)
    rng = np.random.default_rng(n)
    x = rng.normal(size=(n, 2)).astype(np.float32)
    y = (rng.normal(size=(m, 2)) * 1.2 + 0.3).astype(np.float32)
    np.testing.assert_allclose(float(mmd(x, y)), _mmd_float64(x, y), atol=2e-6)
    np.testing.assert_allclose(float(jax.jit(mmd)(y, x)), _mmd_float64(y, x), atol=2e-6)


def test_mmd_matches_the_gaussian_closed_form():
    # x ~ N(0, s^2 I), y ~ N(mu, s^2 I) in D dims: for k_h = exp(-|a-b|^2 / (2 h^2)),
    # E k_h = c_h exp(-|mean difference|^2 / (2 (h^2 + 2 s^2))), c_h = (h^2/(h^2+2s^2))^(D/2)
    s, d, mu = 0.7, 3, np.array([0.4, -0.2, 0.1])
    c = [(h * h / (h * h + 2 * s * s)) ** (d / 2) for h in BANDWIDTHS]
    expected = sum(
        2 * ch * (1 - np.exp(-mu @ mu / (2 * (h * h + 2 * s * s))))
        for ch, h in zip(c, BANDWIDTHS, strict=True)
    )
    rng = np.random.default_rng(0)
    x = (s * rng.normal(size=(4000, d))).astype(np.float32)
    y = (mu + s * rng.normal(size=(3000, d))).astype(np.float32)
    np.testing.assert_allclose(float(mmd(x, y)), expected, rtol=0.1)
    same = float(mmd(x, (s * rng.normal(size=(3000, d))).astype(np.float32)))
    assert abs(same) < 0.1 * expected


def test_sliced_wasserstein_in_one_dimension_and_of_a_shift():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(500, 1)).astype(np.float32)
    y = rng.exponential(size=(500, 1)).astype(np.float32)
    w2 = np.sqrt(np.mean((np.sort(x[:, 0]) - np.sort(y[:, 0])) ** 2))  # 1-D W2 of samples
    np.testing.assert_allclose(float(sliced_wasserstein(jax.random.key(0), x, y, 4)), w2, rtol=1e-5)
    # a shift c of a 2-D cloud: each projection moves by theta.c; E (theta.c)^2 = |c|^2 / 2
    x2 = rng.normal(size=(500, 2)).astype(np.float32)
    c = np.array([3.0, -1.0], np.float32)
    sw = float(sliced_wasserstein(jax.random.key(1), x2, x2 + c, 4096))
    np.testing.assert_allclose(sw, np.linalg.norm(c) / np.sqrt(2), rtol=0.03)


def test_distance_input_errors():
    x = np.zeros((5, 2), np.float32)
    with pytest.raises(ValueError, match=r"same D; got \(5, 2\) and \(5, 3\)"):
        mmd(x, np.zeros((5, 3)))
    with pytest.raises(ValueError, match="at least two points"):
        mmd(x, x[:1])
    with pytest.raises(ValueError, match="equal sample sizes; got 5 and 4"):
        sliced_wasserstein(jax.random.key(0), x, x[:4])
