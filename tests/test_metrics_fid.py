"""FID: the Frechet distance against scipy, the statistics, the driver compute_fid (on the
randomly initialised FID Inception) and the Inception input preprocessing."""

import os

import numpy as np
import pytest
from scipy import linalg

from fmjax.metrics import fid


def random_stats(rng, d, rank=None, ridge=0.0):
    a = rng.normal(size=(d, rank or 2 * d))
    sigma = a @ a.T / a.shape[1] + ridge * np.eye(d)
    return rng.normal(size=d), sigma


def direct_fid(mu1, s1, mu2, s2):
    covmean = linalg.sqrtm(s1 @ s2)
    return float(
        np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(np.real(covmean))
    )


@pytest.mark.parametrize("method", ["sqrtm", "eigh"])
def test_frechet_distance_matches_scipy(method):
    rng = np.random.default_rng(0)
    mu1, s1 = random_stats(rng, 16)
    mu2, s2 = random_stats(rng, 16)
    ref = direct_fid(mu1, s1, mu2, s2)
    assert fid.frechet_distance(mu1, s1, mu2, s2, method=method) == pytest.approx(ref, rel=1e-9)
    # Symmetric.
    assert fid.frechet_distance(mu2, s2, mu1, s1, method=method) == pytest.approx(ref, rel=1e-9)
    # Identical statistics: 0.
    assert abs(fid.frechet_distance(mu1, s1, mu1, s1, method=method)) < 1e-9
    # A translation of the same Gaussian: ||mu1 - mu2||^2.
    shift = rng.normal(size=16)
    assert fid.frechet_distance(mu1, s1, mu1 + shift, s1, method=method) == pytest.approx(
        float(shift @ shift), rel=1e-7, abs=1e-9
    )


def test_frechet_distance_nearly_singular():
    rng = np.random.default_rng(1)
    mu1, s1 = random_stats(rng, 24, rank=6, ridge=1e-12)  # rank 6 in 24 dims
    mu2, s2 = random_stats(rng, 24, rank=6, ridge=1e-12)
    ref = direct_fid(mu1, s1, mu2, s2)
    a = fid.frechet_distance(mu1, s1, mu2, s2)
    b = fid.frechet_distance(mu1, s1, mu2, s2, method="eigh")
    assert np.isfinite(a) and np.isfinite(b)
    assert a == pytest.approx(ref, rel=1e-5) and b == pytest.approx(ref, rel=1e-5)
    # Exactly singular (fewer samples than dimensions), like FID on a small sample.
    f1 = rng.normal(size=(5, 12))
    f2 = rng.normal(size=(5, 12)) + 0.5
    st1, st2 = fid.statistics(f1), fid.statistics(f2)
    a = fid.frechet_distance(*st1, *st2)
    b = fid.frechet_distance(*st1, *st2, method="eigh")
    assert np.isfinite(a) and a == pytest.approx(b, rel=1e-4)


def test_statistics_and_bad_input():
    f = np.random.default_rng(2).normal(size=(50, 4))
    mu, sigma = fid.statistics(f)
    np.testing.assert_allclose(mu, f.mean(0))
    np.testing.assert_allclose(sigma, np.cov(f.T))
    assert mu.dtype == np.float64
    with pytest.raises(ValueError, match="N >= 2"):
        fid.statistics(f[:1])
    with pytest.raises(ValueError, match="same D"):
        fid.frechet_distance(mu, sigma, mu[:3], sigma[:3, :3])
    with pytest.raises(ValueError, match="method"):
        fid.frechet_distance(mu, sigma, mu, sigma, method="svd")


@pytest.fixture(scope="module")
def params():
    return fid.init_random_params(0)


def test_compute_fid(params, tmp_path, monkeypatch):
    # The 2048-d matrix square root takes tens of seconds on 2 CPU cores; the distance itself
    # is tested above, so here it runs on the first 8 feature dimensions (fewer than the 12
    # samples: full rank).
    real = fid.frechet_distance

    def frechet_8(mu1, s1, mu2, s2, **kw):
        assert mu1.shape == mu2.shape == (2048,) and s1.shape == s2.shape == (2048, 2048)
        return real(mu1[:8], s1[:8, :8], mu2[:8], s2[:8, :8], **kw)

    monkeypatch.setattr(fid, "frechet_distance", frechet_8)
    rng = np.random.default_rng(4)
    ref = (2 * rng.integers(0, 256, (12, 32, 32, 3)) / 256 - 1).astype(np.float32)
    calls = []

    def same(i):
        calls.append(i)
        return ref[4 * i : 4 * i + 4]

    def ref_iter():  # eval-style dict batches with a padded, masked last batch
        for s in range(0, 12, 5):
            img = ref[s : s + 5]
            mask = np.ones(5, bool)
            mask[len(img) :] = False
            img = np.concatenate([img, np.full((5 - len(img), 32, 32, 3), -1, np.float32)])
            yield {"image": img, "mask": mask}

    kw = {"feature_batch_size": 4, "resize_to": 75, "params": params}
    stats = tmp_path / "ref_stats.npz"
    d0 = fid.compute_fid(same, ref_iter(), None, 12, save_ref_stats=stats, **kw)
    assert calls == [0, 1, 2]
    assert abs(d0) < 1e-8  # the same 12 images
    noisy = fid.compute_fid(
        lambda i: np.clip(same(i) + 0.3 * rng.normal(size=(4, 32, 32, 3)), -1, 1),
        None,
        None,
        12,
        ref_stats=stats,
        **kw,
    )
    assert noisy > 1e-5  # (features of a random network are small)
    # No weights: the clear error, raised before any sample is drawn.
    calls.clear()
    with pytest.raises(fid.FIDWeightsNotFoundError):
        fid.compute_fid(same, ref_iter(), tmp_path / "missing.npz", 12)
    assert calls == []


def test_preprocess_quantizes_like_an_8bit_file():
    k = np.arange(256)
    levels = (2 * k / 256 - 1).astype(np.float32)
    np.testing.assert_allclose(fid.preprocess(levels), 2 * k / 255 - 1, atol=1e-6)
    np.testing.assert_allclose(fid.preprocess(np.array([-3.0, 3.0])), [-1.0, 1.0])


def test_preprocess_takes_integer_levels_and_warns_about_other_float_ranges():
    k = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1)
    # 8-bit levels as integers are the image-file convention (they were clipped to ~1.0)
    np.testing.assert_array_equal(fid.preprocess(k), fid.preprocess(2 * (k / 256.0) - 1.0))
    with pytest.raises(ValueError, match=r"8-bit levels in \[0, 255\]; got values in \[0, 300\]"):
        fid.preprocess(np.array([[0, 300]], np.int32))
    for bad in (k / 255.0, k.astype(np.float32)):  # [0, 1] and [0, 255] floats
        with pytest.warns(UserWarning, match=r"expects model-space images in \[-1, 1\]"):
            fid.preprocess(bad)


def test_no_torch_needed_to_import(tmp_path):
    import subprocess
    import sys

    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch' or name.startswith('torch.'):\n"
        "            raise ImportError('torch blocked')\n"
        "sys.meta_path.insert(0, Block())\n"
        "from fmjax.metrics import fid\n"
        "assert 'torch' not in sys.modules and fid.fid_skip_reason(None)\n"
        "try:\n"
        "    fid.convert_pytorch_fid_weights('a.pth', 'b.npz')\n"
        "except ImportError as e:\n"
        "    assert 'needs PyTorch' in str(e)\n"
        "else:\n"
        "    raise AssertionError('no ImportError')\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": root},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
